"""``spendgate approvals``, ``approve ID`` and ``deny ID``: requests held for an operator's answer."""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from spendgate.cli.context import Context, audit_log, open_store
from spendgate.cli.output import OK, REFUSED, emit_json, say, styled, table, usd
from spendgate.errors import ConfigError, SpendgateError
from spendgate.policy import policy_hash

if TYPE_CHECKING:
    from spendgate.approvals import Pending


def cmd_approvals(args: argparse.Namespace) -> int:
    from spendgate import approvals

    store = open_store(args, create=False)
    try:
        items = approvals.pending(store)
    finally:
        store.close()
    now = time.time()
    if args.json:
        emit_json({"pending": [{"id": p.id, "session": p.session, "model": _held_model(p), "rule": p.rule,
                                "estimate_usd": p.estimate_usd, "status": p.status,
                                "expires_in_s": int(p.expires_at - now)} for p in items]})
    elif not items:
        print("no held requests")
    else:
        table(("id", "session", "model", "rule", "estimate", "status", "expires"),
              [(p.id, p.session, _held_model(p), p.rule, usd(p.estimate_usd),
                styled(p.status, REFUSED if p.status == "denied" else OK if p.status == "approved" else ""),
                f"{int(p.expires_at - now)} s") for p in items])
    return 0


def _held_model(p: Pending) -> str:
    """The model a held request asked for, read from its kept body: what an operator weighs first."""
    try:
        body = json.loads(p.body)
    except ValueError:
        return ""
    return str(body.get("model", "")) if isinstance(body, dict) else ""


def cmd_approve(args: argparse.Namespace) -> int:
    from spendgate import approvals

    try:
        max_usd = approvals.parse_max(args.max) if args.max is not None else None
    except ValueError as exc:
        raise ConfigError(f"--max: {exc}") from None
    ctx = Context.from_args(args)
    store = open_store(args, create=False)
    audit = audit_log(ctx.policy, store)
    on_event = None if audit is None else partial(audit.add, policy_hash=policy_hash(ctx.policy))
    try:
        p = approvals.approve(store, args.id, max_usd, on_event=on_event) if not args.deny \
            else approvals.deny(store, args.id, on_event=on_event)
    except (KeyError, ValueError) as exc:
        raise SpendgateError(str(exc.args[0])) from None
    finally:
        if audit is not None:
            audit.close()
        store.close()
    if args.json:
        emit_json({"id": p.id, "status": p.status, "max_usd": args.max})
    elif p.status == "denied":
        say(f"denied {p.id}", REFUSED)
    elif p.status == "approved":
        say(f"approved {p.id}: {usd(max_usd or 0)} more for {p.rule}; the session will not be asked again until "
            "it is used", OK)
    else:
        say(f"approved {p.id} once: its next retry (or a 'yes' reply) goes through", OK)
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate approvals``, ``approve`` and ``deny``."""
    ap = sub.add_parser("approvals", parents=[common], help="requests held for approval")
    ap.set_defaults(func=cmd_approvals)
    ok = sub.add_parser("approve", parents=[common], help="approve a held request by id")
    ok.add_argument("id")
    ok.add_argument("--max", help="grant this many dollars of headroom to the tripped budget")
    ok.set_defaults(func=cmd_approve, deny=False)
    no = sub.add_parser("deny", parents=[common], help="deny a held request by id")
    no.add_argument("id")
    no.set_defaults(func=cmd_approve, deny=True, max=None)
