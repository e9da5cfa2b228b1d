"""Printing for the CLI, through ``rich``: tables, budget bars, colour, progress — and one JSON document.

Two readers, two renderings of the same calls:

- a person at a terminal gets colour (refusals and overspent budgets in red), drawn bars and live
  progress on stderr;
- a pipe, a file or a test capturing stdout gets plain text — no ANSI codes, no wrapping at 80
  columns, no trailing blanks — laid out as it always was (a header, a rule of dashes, the rows,
  columns two spaces apart), so ``grep``/``awk``/``cut`` keep working.

``NO_COLOR`` is honoured on a terminal (rich reads it). ``--json`` output never goes through rich:
:func:`emit_json` writes with :mod:`json` alone, so the documents scripts parse stay byte-identical.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from decimal import Decimal
from types import TracebackType
from typing import Any, TextIO

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from spendgate.money import fmt_usd, usd_to_nanos
from spendgate.progress import text_bar

#: a width no plain-text row reaches: piped output is never folded at 80 columns
PLAIN_WIDTH = 100_000

#: styles for what a person must see first
REFUSED = "bold red"
WARN = "yellow"
OK = "green"


def _is_tty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream: plain text
        return False


def console(out: TextIO | None = None) -> Console:
    """A rich console on ``out`` (stdout by default): a terminal's own width and colours (``NO_COLOR``
    respected); otherwise plain text, never forced to a terminal by ``FORCE_COLOR``, never folded."""
    out = out or sys.stdout
    if _is_tty(out):
        return Console(file=out, highlight=False, soft_wrap=False)
    return Console(file=out, force_terminal=False, color_system=None, width=PLAIN_WIDTH, highlight=False,
                   soft_wrap=True, emoji=False, markup=False)


def emit_json(doc: Any, out: TextIO | None = None) -> None:
    """One JSON document, two-space indented, ASCII-escaped: the format scripts parse (never rich's)."""
    out = out or sys.stdout
    json.dump(doc, out, indent=2, default=lambda o: str(o) if isinstance(o, Decimal) else repr(o))
    out.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """Rows under headers. Cells are strings, numbers or rich renderables (a :func:`styled` text, a
    :func:`bar`); text is never read as rich markup (a ``[tag]`` in a name stays as it is). On a
    terminal the header is bold over a rule and styled cells keep their colour."""
    out = out or sys.stdout
    tty = _is_tty(out)
    if tty:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    else:  # the hand-made layout: columns two spaces apart, a rule of dashes as wide as each column
        t = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1, 0, 1), header_style="")
    for h in headers:
        t.add_column(Text(str(h)), no_wrap=not tty, overflow="fold")
    if not tty:
        t.add_row(*(Rule(characters="-", style="", end="") for _ in headers))
    for r in rows:
        t.add_row(*(c if isinstance(c, Text | Bar) else Text(str(c)) for c in r))
    if tty:
        console(out).print(t)
        return
    # plain text: rendered whole, then each line without the blanks rich pads its last column with
    buf = io.StringIO()
    console(buf).print(t)
    out.write("".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines()))


def styled(text: Any, style: str) -> Text:
    """A table cell or a line in ``style`` on a terminal; the bare text elsewhere."""
    return Text(str(text), style=style)


def say(text: str, style: str = "", out: TextIO | None = None) -> None:
    """One line for a person: in ``style`` on a terminal, as it is elsewhere (no markup is read)."""
    out = out or sys.stdout
    if _is_tty(out) and style:
        console(out).print(Text(text, style=style), soft_wrap=True)  # the terminal folds it, not rich
    else:
        out.write(text + "\n")


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


class Bar:
    """A budget's use: a coloured bar on a terminal (green, yellow from 80 %, red when full), the text
    bar ``[#####...............]`` elsewhere, ``!`` after it when overspent."""

    def __init__(self, fraction: float, width: int = 20) -> None:
        self.fraction, self.width = fraction, width

    def __str__(self) -> str:
        return text_bar(self.fraction, self.width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.text(console.is_terminal)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        n = self.text(console.is_terminal).cell_len
        return Measurement(n, n)

    def text(self, terminal: bool) -> Text:
        """The bar as text: drawn in colour for a terminal, ``[##..]`` for anything else."""
        if not terminal:
            return Text(str(self))
        f = self.fraction
        full = round(max(0.0, min(f, 1.0)) * self.width)
        colour = REFUSED if f >= 1 else WARN if f >= 0.8 else OK
        drawn = Text("━" * full, style=colour)
        drawn.append("━" * (self.width - full), style="bright_black")
        if f > 1:
            drawn.append("!", style=REFUSED)
        return drawn


def bar(fraction: float, width: int = 20) -> Bar:
    """A table cell showing ``fraction`` of a budget used (see :class:`Bar`)."""
    return Bar(fraction, width)


class Progress:
    """Progress on stderr for a person: a rich bar with the count and time left, drawn only on a
    terminal (a log or a pipe gets nothing), at most 10×/s, with no thread of its own.

    Called with the number done so far; used as a context manager it always leaves the terminal's
    line clean, also when the work stops half-way."""

    def __init__(self, total: int, label: str, out: TextIO | None = None) -> None:
        self.total, self.label = total, label
        self.out: TextIO = out or sys.stderr
        self.enabled = _is_tty(self.out) and total > 0
        self._last = 0.0
        self._bar: RichProgress | None = None
        self._task: Any = None

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        if self._bar is None:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=console(self.out), auto_refresh=False,
                                     transient=False)
            self._task = self._bar.add_task(self.label, total=self.total)
            self._bar.start()
        self._bar.update(self._task, completed=done, refresh=True)
        if done >= self.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def working(label: str, out: TextIO | None = None) -> AbstractContextManager[object]:
    """A spinner with ``label`` on stderr while a step of unknown length runs (a price import), on a
    terminal only."""
    out = out or sys.stderr
    if not _is_tty(out):
        return nullcontext()
    return _spinner(label, out)


@contextmanager
def _spinner(label: str, out: TextIO) -> Iterator[object]:
    with console(out).status(label) as status:
        yield status
