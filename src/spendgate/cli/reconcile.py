"""``spendgate reconcile FILE``: the ledger's captured spend against a provider's cost export, per UTC day and model.

Exit code: 0 when the comparison ran, flagged rows or not (it is a report); 1 with ``--strict`` when any
row is off by more than 2 %; 2 when the export cannot be read (the error names the line or field).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from decimal import Decimal
from typing import Any

from spendgate import ledger
from spendgate.cli.context import Context
from spendgate.cli.output import REFUSED, emit_json, styled, table
from spendgate.errors import ConfigError
from spendgate.policy.parse import parse_duration
from spendgate.reconcile import THRESHOLD, Row, read_export, reconcile

FLAG = f"off >{THRESHOLD * 100:.0f}%"


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``reconcile`` on the top-level subparsers."""
    rc = sub.add_parser("reconcile", parents=[common],
                        help="compare the ledger with a provider's cost export, per day and model")
    rc.add_argument("file", metavar="FILE",
                    help="OpenAI /v1/organization/costs JSON, Anthropic /v1/organizations/cost_report JSON, "
                         "or a CSV date,model,usd")
    rc.add_argument("--since", default="30d", help="compare the UTC days from this long ago to today (default 30d)")
    rc.add_argument("--provider", metavar="NAME",
                    help="compare only the ledger's spend through this provider (openai, anthropic); default: "
                         "the export's provider for OpenAI and Anthropic JSON, every provider for a CSV")
    rc.add_argument("--strict", action="store_true", help="exit 1 when any day and model is off by more than 2%%")
    rc.set_defaults(func=cmd_reconcile)


def _usd(d: Decimal) -> str:
    """Like money.fmt_usd, for exact Decimal dollars (the provider's may be finer than a nano-dollar)."""
    if d == 0:
        return "$0.00"
    sign, a = ("-" if d < 0 else ""), abs(d)
    if a >= 1:
        return f"{sign}${a:,.2f}"
    if a >= Decimal("0.0001"):
        return f"{sign}${a:.4f}"
    return f"{sign}${a.normalize():f}"


def _cells(r: Row) -> tuple[Any, ...]:
    ratio = r.ratio
    return (r.day.isoformat(), r.model, _usd(r.ledger_usd), _usd(r.provider_usd), _usd(r.diff_usd),
            f"{ratio:.4f}" if ratio is not None else "-", styled(FLAG, REFUSED) if r.flagged else "")


def cmd_reconcile(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    export = read_export(args.file)  # a bad file fails before the store is opened
    if args.provider:
        export.provider = args.provider
    now = time.time()
    try:
        first = dt.datetime.fromtimestamp(now - parse_duration(args.since, "--since"), dt.UTC).date()
    except (OverflowError, OSError, ValueError):
        raise ConfigError(f"--since: {args.since!r} reaches back before any date spendgate can read") from None
    last = dt.datetime.fromtimestamp(now, dt.UTC).date()
    start = dt.datetime.combine(first, dt.time(0), dt.UTC).timestamp()
    store = ledger.open(ctx.store_url, create=False)
    try:
        events = store.events(start)
    finally:
        store.close()
    result = reconcile(export, events, ctx.prices, first, last)
    code = 1 if args.strict and result.flagged else 0
    if args.json:
        emit_json(result.as_dict(args.since))
        return code
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    who = f"{export.format} export" + (f", compared with the ledger's {export.provider} spend"
                                       if export.provider else ", compared with all the ledger's spend")
    if not result.rows:
        print(f"{args.file}: {who}; nothing to compare on the UTC days {first} … {last}")
        return code
    print(f"{args.file}: {who}, UTC days {result.first_day} … {result.last_day}")
    table(("day", "model", "ledger", "provider", "diff", "ratio", "flag"), [_cells(r) for r in result.rows])
    days = result.days()
    if len(days) < len(result.rows):  # some day has more than one model: show the days' totals too
        print()
        table(("day", "ledger", "provider", "diff", "ratio", "flag"),
              [(c[0], *c[2:]) for c in map(_cells, days)])
    total = Row(last, "total", sum(r.ledger_nanos for r in result.rows), result.provider_total_usd)
    ratio = total.ratio
    print(f"\ntotal: ledger {_usd(total.ledger_usd)}, provider {_usd(total.provider_usd)}, "
          f"diff {_usd(total.diff_usd)}, ratio {f'{ratio:.4f}' if ratio is not None else '-'}; "
          f"{result.flagged} of {len(result.rows)} row(s) and {sum(d.flagged for d in days)} of {len(days)} "
          f"day(s) {FLAG}")
    return code
