"""``spendgate tail``: decisions and charges as they happen, one line each, from the store's log.

It reads the store, not the server: run it in another shell (or on another host) against the
SQLite file or Redis that ``serve`` uses. See :mod:`spendgate.observe.tail` for what the log holds
and how a follow keeps its place.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from spendgate import ledger
from spendgate.cli.context import Context
from spendgate.cli.output import REFUSED, WARN, say
from spendgate.errors import ConfigError
from spendgate.ledger import Event
from spendgate.money import fmt_usd
from spendgate.observe.tail import FILTER_KEYS, Cursor, Filter, parse_filter
from spendgate.policy.parse import parse_duration
from spendgate.report import event_dict

#: how long a follow waits between reads of the store (seconds)
POLL_S = 0.5
#: how far back a plain ``tail`` (no --follow) looks by default
DEFAULT_SINCE = "10m"
STYLE = {"block": REFUSED, "hold": REFUSED, "deny": REFUSED, "would_refuse": WARN, "expired": WARN, "unknown": WARN}


def cmd_tail(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    keep = parse_filter(args.filter)
    interval = args.interval
    if not interval > 0:
        raise ConfigError(f"--interval: expected a number of seconds above 0, got {interval}")
    since_text = args.since if args.since is not None else (None if args.follow else DEFAULT_SINCE)
    since = time.time() - (parse_duration(since_text, "--since") if since_text else 0)
    store = ledger.open(ctx.store_url, create=False)
    cursor = Cursor(since)
    try:
        while True:
            _show(cursor.poll(store), keep, args.json, sys.stdout)
            if not args.follow:
                return 0
            time.sleep(interval)  # a poll of another process's store: nothing to await
    except KeyboardInterrupt:  # Ctrl-C ends a follow: no traceback, no "Aborted"
        return 0
    finally:
        store.close()


def _show(events: list[Event], keep: Filter, as_json: bool, out: TextIO) -> None:
    for e in events:
        if not keep.matches(e):
            continue
        if as_json:
            out.write(json.dumps(event_dict(e), separators=(",", ":")) + "\n")
        else:
            say(line(e), STYLE.get(e.kind, ""), out=out)
    out.flush()  # a pipe would otherwise hold the lines back


def line(e: Event) -> str:
    """One event as a person scans it: time, kind, model, rule, who, amount, what happened."""
    clock = time.strftime("%H:%M:%S", time.localtime(e.ts))
    scope = e.bucket.split("|")[1] if e.bucket.count("|") >= 1 else _who(e.dims)
    fields = (clock, f"{e.kind:<12}", e.model or "-", e.rule or "-", scope or "-", _amount(e), _what(e))
    return "  ".join(f for f in fields if f)


def _who(dims: Any) -> str:
    for name in ("user", "key", "session", "team", "agent"):
        if dims.get(name):
            return f"{name}={dims[name]}"
    return ""


def _amount(e: Event) -> str:
    if e.kind in ("capture", "unknown", "expired"):
        return fmt_usd(e.cost)
    if e.kind == "approval":
        granted = e.dims.get("granted_usd", "")
        return f"${granted}" if granted not in ("", "once") else "once"
    nanos = e.amounts.get("estimate_usd", e.amounts.get("held_usd"))
    return fmt_usd(nanos) if nanos is not None else ""


def _what(e: Event) -> str:
    a = e.amounts
    if e.kind in ("block", "hold", "would_refuse"):
        verb = {"block": "refused", "hold": "held for approval", "would_refuse": "shadow rule would refuse"}[e.kind]
        if "limit_usd" in a:
            return f"{verb}: {fmt_usd(a['used_usd'])} of {fmt_usd(a['limit_usd'])} used, this request " \
                   f"{fmt_usd(a['request_usd'])}"
        if "limit_tokens" in a:
            return f"{verb}: {a['used_tokens']:,} of {a['limit_tokens']:,} tokens used, this request " \
                   f"{a['request_tokens']:,}"
        return verb
    if e.kind == "deny":
        return f"denied by {e.dims.get('by', 'an operator')}"
    if e.kind == "approval":
        return f"approved by {e.dims.get('by', '?')} via {e.dims.get('channel', '?')}"
    if e.kind == "released":
        return "hold released, nothing charged"
    if e.kind == "expired":
        return "hold expired: charged its worst case"
    if e.kind == "unknown":
        return f"outcome unknown: charged as estimated ({e.input_tokens:,} in / {e.output_tokens:,} out tok)"
    if e.kind == "capture":
        edits = f", {e.dims['edits']}" if e.dims.get("edits") else ""
        return f"{e.input_tokens:,} in / {e.output_tokens:,} out tok" + (" (estimated)" if e.estimated else "") + edits
    return ""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate tail``."""
    p = sub.add_parser("tail", parents=[common], help="decisions and charges as they happen (refusals in red)")
    p.add_argument("-f", "--follow", action="store_true", help="keep reading as new events arrive (Ctrl-C stops)")
    p.add_argument("--filter", metavar="KEY=VALUE,…",
                   help=f"only matching events; keys: {', '.join(FILTER_KEYS)}; values may be globs "
                        "(model=gpt-4o*); kind=refused is block, hold and deny")
    p.add_argument("--since", help=f"how far back to start, such as 10m or 1h (default {DEFAULT_SINCE}; with "
                                   "--follow, from now)")
    p.add_argument("--interval", type=float, default=POLL_S, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_tail)
