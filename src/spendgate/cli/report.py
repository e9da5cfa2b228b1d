"""``spendgate status`` (every budget: spent, held, limit) and ``spendgate report`` (spend grouped by fields)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from spendgate import ledger
from spendgate.cli.context import Context, ExpiryLog
from spendgate.cli.output import REFUSED, WARN, bar, emit_json, say, styled, table, usd, when
from spendgate.errors import ConfigError
from spendgate.money import fmt_usd, nanos_to_usd


def cmd_status(args: argparse.Namespace) -> int:
    from spendgate.report import status

    ctx = Context.from_args(args)
    store = ledger.open(ctx.store_url, create=False)
    expired = ExpiryLog(ctx.policy, store)
    try:
        rows = status(store, on_expired=expired)
    finally:
        expired.close()
        store.close()
    docs: list[dict[str, Any]] = []
    rows_out: list[tuple[Any, ...]] = []
    for b, st in rows:
        limit = (st.limit or 0) + st.granted if st.limit is not None else None
        money = b.unit == "usd"

        def fmt(n: int, money: bool = money) -> str:
            return fmt_usd(n) if money else f"{n:,} tok"

        rows_out.append((b.key, fmt(st.spent), fmt(st.held), fmt(limit) if limit is not None else "-",
                         bar(st.used / limit) if limit else ""))
        docs.append({"bucket": b.key, "unit": b.unit,
                     "spent": str(nanos_to_usd(st.spent)) if money else st.spent,
                     "held": str(nanos_to_usd(st.held)) if money else st.held,
                     "limit": (str(nanos_to_usd(limit)) if money else limit) if limit is not None else None,
                     "granted": str(nanos_to_usd(st.granted)) if money else st.granted})
    # a budget no request has reached yet has no bucket in the store; it is in force all the same,
    # so it is listed at $0 (a fresh store would otherwise look unguarded)
    used = {b.key.split("|", 1)[0] for b, _ in rows}
    idle = [r for r in ctx.policy.rules if r.name not in used and (r.usd is not None or r.tokens is not None)]
    for r in idle:
        per_call = r.window.kind == "request"
        zero = "-" if per_call else "$0.00" if r.usd is not None else "0 tok"
        scope = "each request" if per_call else \
            f"{'all requests' if r.per == 'global' else 'each ' + r.per}, {r.window.text}"
        rows_out.append((f"{r.name} ({scope})", zero, zero,
                         " / ".join(x for x in (usd(r.usd) if r.usd is not None else "",
                                                f"{r.tokens:,} tok" if r.tokens is not None else "") if x),
                         "" if per_call else bar(0)))
    if args.json:
        emit_json({"store": ctx.store_url, "buckets": docs,
                   "unused_budgets": [{"rule": r.name, "per": r.per, "window": r.window.text,
                                       "limit_usd": str(r.usd) if r.usd is not None else None,
                                       "limit_tokens": r.tokens} for r in idle],
                   "price_table": {"built": ctx.prices.built, "warning": ctx.prices.stale_warning()}})
    else:
        if not docs:
            print(f"no budget has been used yet in {ctx.store_url}; the limits in force:")
        table(("bucket", "spent", "held", "limit", "use"), rows_out)
    if not args.json and ctx.prices.stale_warning():
        say(f"warning: {ctx.prices.stale_warning()}", WARN)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from spendgate.policy.parse import parse_duration
    from spendgate.report import approvals, report

    ctx = Context.from_args(args)
    by = [f.strip() for f in args.by.split(",") if f.strip()]
    if not by:
        raise ConfigError("--by: name at least one field, such as user,model")
    store = ledger.open(ctx.store_url, create=False)
    expired = ExpiryLog(ctx.policy, store)
    try:
        rows = report(store, by, args.since, on_expired=expired)
        granted = approvals(store, args.since)
    finally:
        expired.close()
        store.close()
    if args.json:
        emit_json({"since": args.since, "by": by, "rows": [r.as_dict(by) for r in rows],
                   "total_usd": str(nanos_to_usd(sum(r.cost for r in rows))), "approvals": granted})
        return 0
    if granted:
        table(("approved at", "channel", "by", "rule", "bucket", "granted"),
              [(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["ts"])), a["channel"], a["by"], a["rule"],
                a["bucket"], a["granted_usd"] if a["granted_usd"] in ("once", "") else usd(a["granted_usd"]))
               for a in granted])
        print()
    if not rows:
        print(f"no spend in the last {args.since}")
        return 0
    # a shadow rule's would-be refusals get a column only while one is being rolled out
    shadow = any(r.would_refuse for r in rows)
    table((*by, "requests", "spent", "in tok", "out tok", "estimated", "refused", *(("would refuse",) * shadow)),
          [(*r.group, r.requests, fmt_usd(r.cost), f"{r.input_tokens:,}", f"{r.output_tokens:,}",
            r.estimated or "", styled(r.refused, REFUSED) if r.refused else "",
            *((r.would_refuse or "",) * shadow)) for r in rows])
    start = time.time() - parse_duration(args.since, "--since")
    print(f"total {fmt_usd(sum(r.cost for r in rows))} since {when(start)} ({args.since})")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate status`` and ``spendgate report``."""
    st = sub.add_parser("status", parents=[common], help="every budget: spent, held, limit")
    st.set_defaults(func=cmd_status)
    rp = sub.add_parser("report", parents=[common], help="spend grouped by fields")
    rp.add_argument("--by", default="model", help="comma-separated: user, team, session, model, feature, …")
    rp.add_argument("--since", default="24h", help="a duration such as 1h, 24h, 7d")
    rp.set_defaults(func=cmd_report)
