"""``spendgate config check FILE``: a policy file validated without starting anything."""

from __future__ import annotations

import argparse
from typing import Any

from spendgate.cli.output import emit_json, table, usd
from spendgate.errors import ConfigError
from spendgate.policy import load


def cmd_config_check(args: argparse.Namespace) -> int:
    from spendgate.events.signing import load_key

    try:
        policy = load(args.file)
        if policy.audit.enabled and policy.audit.key is not None:
            load_key(policy.audit.key)  # an operator's key must be readable now, not when serve starts
    except ConfigError as exc:
        if not args.json:
            raise
        # a script reading --json gets its one document on a failure too, and the exit status
        emit_json({"ok": False, "file": args.file, "errors": [str(exc)]})
        return 2
    doc = {"ok": True, "file": args.file, "budgets": [
        {"name": r.name, "usd": str(r.usd) if r.usd is not None else None, "tokens": r.tokens,
         "window": r.window.text, "per": r.per, "action": r.action, "immutable": r.immutable}
        for r in policy.rules]}
    if args.json:
        emit_json(doc)
    else:
        print(f"{args.file}: OK, {len(policy.rules)} budget(s)")
        table(("name", "limit", "window", "per", "action"),
              [(r.name, " / ".join(x for x in (usd(r.usd) if r.usd is not None else "",
                                                f"{r.tokens:,} tokens" if r.tokens is not None else "") if x),
                r.window.text, r.per, r.action + (" (immutable)" if r.immutable else ""))
               for r in policy.rules])
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate config check``."""
    cfg = sub.add_parser("config", help="validate a policy file")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    chk = csub.add_parser("check", parents=[common], help="validate without starting anything")
    chk.add_argument("file")
    chk.set_defaults(func=cmd_config_check)
