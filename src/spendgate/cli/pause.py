"""``spendgate pause [SCOPE]`` and ``spendgate resume [SCOPE]``: the kill switch.

A pause is a record in the store: every instance sharing it re-reads the store at least every
:data:`spendgate.policy.runtime.REFRESH_S` seconds and refuses the paused scope before pricing,
naming who paused it and when. No approval lifts a pause; only ``resume`` does.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from spendgate.cli.budgets import operator, record
from spendgate.cli.context import Context, open_store
from spendgate.cli.output import OK, REFUSED, emit_json, say, when
from spendgate.errors import SpendgateError


def _what(scope: str) -> str:
    return "everything" if scope == "global" else scope


def cmd_pause(args: argparse.Namespace) -> int:
    from spendgate.policy import runtime

    scope = runtime.parse_scope(args.scope)
    ctx = Context.from_args(args)
    store = open_store(args)
    by, now = operator(args), time.time()
    try:
        p = runtime.pause(store, scope, by=by, reason=args.reason or "", now=now)
        record(ctx, store, runtime.change_event("pause", by=by, scope=scope, now=now, reason=p.reason))
    finally:
        store.close()
    if args.json:
        emit_json({"change": "pause", **p.as_dict()})
        return 0
    say(f"paused {_what(scope)} ({by}, {when(now)}{': ' + p.reason if p.reason else ''})", REFUSED)
    print(f"every spendgate instance sharing this store refuses it within a second, until spendgate resume "
          f"{args.scope if scope != 'global' else ''}".rstrip())
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from spendgate.policy import runtime

    scope = runtime.parse_scope(args.scope)
    ctx = Context.from_args(args)
    store = open_store(args)
    by, now = operator(args), time.time()
    try:
        if not runtime.resume(store, scope):
            paused = sorted(s for s, _ in store.records(runtime.PAUSE_KIND, now=now))
            raise SpendgateError(f"{scope} is not paused; paused now: {', '.join(paused) or 'nothing'}")
        record(ctx, store, runtime.change_event("resume", by=by, scope=scope, now=now))
    finally:
        store.close()
    if args.json:
        emit_json({"change": "resume", "scope": scope, "by": by})
    else:
        say(f"resumed {_what(scope)}: every instance sharing this store lets it through within a second", OK)
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate pause`` and ``spendgate resume``."""
    scope_help = "global (the default: everything), key=<id>, user=NAME, team=NAME, model=GLOB, provider=NAME …"
    p = sub.add_parser("pause", parents=[common], help="refuse everything, or one key, user, team or model, at once")
    p.add_argument("scope", metavar="SCOPE", nargs="?", default="global", help=scope_help)
    p.add_argument("--reason", help="shown in every refusal")
    p.add_argument("--by", help="who pauses (default $USER@hostname)")
    p.set_defaults(func=cmd_pause)
    r = sub.add_parser("resume", parents=[common], help="lift a pause")
    r.add_argument("scope", metavar="SCOPE", nargs="?", default="global", help=scope_help)
    r.add_argument("--by", help="who resumes (default $USER@hostname)")
    r.set_defaults(func=cmd_resume)
