"""``spendgate demo``: a runaway agent held by the guard, offline, no API key."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    from spendgate.demo.run import run

    result = run(json=args.json)
    return 0 if result.turns_sent and result.refused else 1


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate demo`` (its own ``--json``: the demo reads no store and no policy file)."""
    demo = sub.add_parser("demo", help="a runaway agent held by the guard, offline, no API key")
    demo.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print only one JSON document with the summary")
    demo.set_defaults(func=cmd_demo)
