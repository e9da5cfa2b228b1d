"""``spendgate config check FILE``: a policy file validated without starting anything."""

from __future__ import annotations

import argparse
from typing import Any

from spendgate.cli.output import emit_json, table, usd
from spendgate.errors import ConfigError
from spendgate.policy import Rule, load


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
    doc = {"ok": True, "file": args.file, "mode": policy.mode, "version": policy.version, "budgets": [
        {"name": r.name, "usd": str(r.usd) if r.usd is not None else None, "tokens": r.tokens,
         "requests": r.requests, "window": r.window.text, "per": r.per, "action": r.action,
         "immutable": r.immutable, "mode": policy.mode_of(r), "requires_capability": r.requires_capability}
        for r in policy.rules]}
    if args.json:
        emit_json(doc)
    else:
        version = f", version {policy.version}" if policy.version is not None else ""
        shadow = ", shadow mode (nothing is refused)" if policy.mode == "shadow" else ""
        print(f"{args.file}: OK, {len(policy.rules)} budget(s){version}{shadow}")
        table(("name", "limit", "window", "per", "action"),
              [(r.name, limit_text(r), r.window.text, r.per, action_text(r, policy.mode_of(r)))
               for r in policy.rules])
    return 0


def limit_text(rule: Rule) -> str:
    """``$10.00 / 500,000 tokens / 60 requests``: every limit a rule sets."""
    return " / ".join(x for x in (usd(rule.usd) if rule.usd is not None else "",
                                  f"{rule.tokens:,} tokens" if rule.tokens is not None else "",
                                  f"{rule.requests:,} requests" if rule.requests is not None else "") if x)


def action_text(rule: Rule, mode: str) -> str:
    """``hold (immutable)``, ``block (shadow)``, ``block (needs payment_initiate)``."""
    extra = [x for x in ("immutable" if rule.immutable else "", "shadow" if mode == "shadow" else "",
                         f"needs {rule.requires_capability}" if rule.requires_capability else "") if x]
    return rule.action + (f" ({', '.join(extra)})" if extra else "")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate config check``."""
    cfg = sub.add_parser("config", parents=[common], help="validate a policy file")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    chk = csub.add_parser("check", parents=[common], help="validate without starting anything")
    chk.add_argument("file")
    chk.set_defaults(func=cmd_config_check)
