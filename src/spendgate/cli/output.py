"""Printing for the CLI: aligned tables, budget bars, one JSON document, progress on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, TextIO

from spendgate.money import fmt_usd, usd_to_nanos
from spendgate.progress import text_bar


def emit_json(doc: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(doc, out, indent=2, default=lambda o: str(o) if isinstance(o, Decimal) else repr(o))
    out.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def usd(value: Decimal | str | int) -> str:
    """A dollar amount kept as a decimal (a policy's limit, a key's ceiling, an import's price) as
    people read money: ``$2.50``, not ``$2.5000000``; small amounts keep their digits."""
    d = Decimal(str(value))
    if d == d.quantize(Decimal("0.01")):  # whole cents: $0.50, $2.50, $1,000.00
        return f"${d:,.2f}"
    return fmt_usd(usd_to_nanos(d))


def when(ts: float) -> str:
    """A timestamp in the reader's own zone, named: ``2026-12-03 14:32 CET``."""
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(ts))


def bar(fraction: float, width: int = 20) -> str:
    return text_bar(fraction, width)


class Progress:
    """A one-line progress bar on stderr, drawn only for a person (a TTY) and at most 10×/s."""

    def __init__(self, total: int, label: str, out: TextIO | None = None) -> None:
        self.total, self.label = total, label
        self.out: TextIO = out or sys.stderr
        self.enabled = self.out.isatty() and total > 0
        self._last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < self.total):
            return
        self._last = now
        self.out.write(f"\r{self.label} {bar(done / self.total, 30)} {done}/{self.total}")
        if done >= self.total:
            self.out.write("\n")
        self.out.flush()
