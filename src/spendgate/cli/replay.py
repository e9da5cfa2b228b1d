"""``spendgate replay TRACE``: what a policy would have saved on a recorded trace."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from spendgate.cli.context import Context
from spendgate.cli.output import REFUSED, Progress, emit_json, styled, table
from spendgate.errors import ConfigError
from spendgate.money import fmt_usd


def cmd_replay(args: argparse.Namespace) -> int:
    from spendgate.replay import read_trace, replay

    ctx = Context.from_args(args)
    if args.chart and not Path(args.chart).parent.is_dir():  # said now, not after the whole replay
        raise ConfigError(f"--chart {args.chart}: cannot write the chart (no directory {Path(args.chart).parent})")
    path = Path(args.trace)
    total = sum(1 for line in path.open() if line.strip()) if path.exists() else 0
    # a long trace shows its progress on a terminal (stderr: stdout keeps only the result)
    with Progress(total if total > 1000 else 0, "replaying") as progress:
        result = replay(read_trace(path, ctx.prices), ctx.policy, ctx.prices, approve=args.approve,
                        persist=args.persist, progress=progress if progress.enabled else None)
    if args.chart:
        from spendgate.chart import write_chart

        try:
            write_chart(result, Path(args.chart))
        except OSError as exc:
            raise ConfigError(f"--chart {args.chart}: cannot write the chart ({exc.strerror or exc})") from exc
    if args.json:
        emit_json(result.as_dict())
        return 0
    doc = result.as_dict()
    print(f"{result.requests} requests: {result.forwarded} forwarded, {result.refused} refused "
          f"under {ctx.policy.source}")
    table(("", "USD"), [("total (no guard)", fmt_usd(result.total_nanos)),
                        ("forwarded", fmt_usd(result.forwarded_nanos)),
                        (styled("refused", REFUSED), styled(fmt_usd(result.refused_nanos), REFUSED)),
                        ("reduction", f"{result.reduction:.1%}")])
    if doc["rules"]:
        print()
        table(("rule", "action", "fired"), [(r["rule"], r["action"], r["count"]) for r in doc["rules"]])
        first = result.firings[0]
        print(f"\nfirst firing: {first.as_dict()['timestamp']} {first.rule} ({first.action}) "
              f"session {first.session}: {first.detail}")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate replay``."""
    rep = sub.add_parser("replay", parents=[common], help="what a policy would have saved on a trace")
    rep.add_argument("trace")
    # --config is the policy flag everywhere; --policy stays as replay's older name for the same thing
    rep.add_argument("--policy", dest="config", default=argparse.SUPPRESS,
                     help="the same as --config: the policy file to judge the trace by (default: the built-in one)")
    rep.add_argument("--approve", action="store_true", help="answer every hold yes (once)")
    rep.add_argument("--persist", action="store_true",
                     help="a refused session keeps sending (default: a 'no' ends the session)")
    rep.add_argument("--chart", metavar="OUT.html", help="write cumulative spend with and without the guard")
    rep.set_defaults(func=cmd_replay)
