"""``spendgate alerts``: the alert outbox — pending, sent and failed alerts with their attempts.

What an operator asks when a Slack channel stayed quiet: was the alert written, was it delivered,
and if not, what the webhook answered and when the sender tries again. Webhook URLs never appear
here (the store holds only their hashed ids and errors name scheme://host).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from spendgate import ledger
from spendgate.cli.context import Context
from spendgate.cli.output import OK, REFUSED, WARN, emit_json, styled, table
from spendgate.ledger.base import ALERT_STATUSES, OutboxAlert


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _subject(body: dict[str, Any]) -> str:
    """What the alert is about: ``rule scope`` for a budget alert, the decision id for a hold."""
    if body.get("type") == "hold":
        return f"decision {body.get('decision_id', '?')}"
    return " ".join(str(x) for x in (body.get("rule") or body.get("bucket") or "?", body.get("scope") or "") if x)


def _row_cells(a: OutboxAlert, body: dict[str, Any], now: float) -> tuple[Any, ...]:
    from spendgate.events.alerts import percent

    threshold = str(body.get("threshold") or "")
    if a.status == "pending":
        wait = a.next_at - now
        next_try = "now" if wait <= 0 else f"in {wait:.0f} s" if wait < 120 else _when(a.next_at)
    else:
        next_try = "-"
    error = a.error if len(a.error) <= 60 else a.error[:57] + "..."
    status = styled(a.status, {"failed": REFUSED, "pending": WARN, "sent": OK}.get(a.status, ""))
    return (_when(a.created), status, str(a.attempts), str(body.get("type", "?")), _subject(body),
            percent(threshold) if threshold else "-", error or "-", next_try)


def _doc(a: OutboxAlert, body: dict[str, Any]) -> dict[str, Any]:
    return {"key": a.key, "created": a.created, "status": a.status, "attempts": a.attempts,
            "next_at": a.next_at if a.status == "pending" else None, "error": a.error, "sent_at": a.sent_at,
            "done": list(a.done), "body": body}


def cmd_alerts(args: argparse.Namespace) -> int:
    from spendgate.events.alerts import parse_body

    ctx = Context.from_args(args)
    store = ledger.open(ctx.store_url, create=False)
    try:
        rows = store.alerts(limit=args.limit)
    finally:
        store.close()
    if args.status:
        rows = [a for a in rows if a.status == args.status]
    parsed = [(a, parse_body(a)) for a in rows]
    if args.json:
        emit_json({"alerts": [_doc(a, body) for a, body in parsed]})
        return 0
    if not parsed:
        print(f"no {args.status} alerts" if args.status else "no alerts")
        return 0
    now = time.time()
    table(("created", "status", "attempts", "type", "about", "threshold", "last error", "next try"),
          [_row_cells(a, body, now) for a, body in parsed])
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate alerts``."""
    p = sub.add_parser("alerts", parents=[common], help="alerts: pending, sent, failed, with their attempts")
    p.add_argument("--status", choices=ALERT_STATUSES, help="only alerts with this status")
    p.add_argument("--limit", type=int, default=1000, help="the newest this many alerts (default 1000)")
    p.set_defaults(func=cmd_alerts)
