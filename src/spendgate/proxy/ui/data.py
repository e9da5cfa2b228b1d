"""What the dashboard's pages show, computed from the store's events and bucket states.

Pure functions over :class:`~spendgate.ledger.Event` lists, so the pages and their tests agree on
every number without a server: spend per time bucket, forwarded against refused, top spenders, the
estimated share, budget bars, and the decision feed with a message for each line.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spendgate.approvals import Pending
from spendgate.ledger import Bucket, BucketState, Event
from spendgate.money import nanos_to_usd
from spendgate.report import KNOWN_FIELDS, REFUSAL_KINDS, SPEND_KINDS

#: the time steps the overview offers, in seconds
STEPS = {"hour": 3600, "day": 86400}
#: the windows the overview offers
WINDOWS = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
STACKS = ("model", "provider")
#: the most series a stacked chart shows; the rest are summed as "other"
MAX_SERIES = 6
TOP_N = 5
#: what the decision feed lists: refusals, remedies, shadow refusals and the answers to holds
FEED_KINDS = frozenset({"block", "hold", "downgrade", "clamp", "truncate", "alert", "would_refuse", "approval",
                        "deny"})
FILTERS = ("rule", "user", "key", "model")
CSV_COLUMNS = ("time", "kind", "rule", "user", "key", "model", "provider", "bucket", "decision_id", "message")


@dataclass
class Overview:
    labels: list[str]
    #: stack value -> nanos per time bucket (same length as labels)
    spend: dict[str, list[int]]
    forwarded: list[int]
    refused: list[int]
    total_nanos: int
    estimated_nanos: int
    requests: int
    refusals: int
    #: dimension -> [(value, requests, nanos)], dearest first
    top: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)

    @property
    def estimated_share(self) -> float:
        return self.estimated_nanos / self.total_nanos if self.total_nanos else 0.0


def _label(ts: float, step: int) -> str:
    t = dt.datetime.fromtimestamp(ts, dt.UTC)
    return t.strftime("%m-%d %H:00") if step < 86400 else t.strftime("%Y-%m-%d")


def overview(events: Iterable[Event], now: float, window_s: int, step_s: int, stack: str) -> Overview:
    """Spend in ``step_s`` buckets over the last ``window_s`` seconds, stacked by ``stack`` (model or
    provider), the most expensive :data:`MAX_SERIES` named and the rest as "other"; request counts
    forwarded (charged) and refused (blocked or held); the top spenders by key, user, team, model,
    feature and by each other tag seen."""
    first = int((now - window_s) // step_s) * step_s
    n = int(now // step_s) - first // step_s + 1
    labels = [_label(first + i * step_s, step_s) for i in range(n)]
    by_stack: dict[str, list[int]] = defaultdict(lambda: [0] * n)
    forwarded, refused = [0] * n, [0] * n
    top: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    total = estimated = requests = refusals = 0
    for e in events:
        i = int(e.ts // step_s) - first // step_s
        if not 0 <= i < n:
            continue
        if e.kind in REFUSAL_KINDS:
            refused[i] += 1
            refusals += 1
            continue
        if e.kind not in SPEND_KINDS:
            continue
        forwarded[i] += 1
        requests += 1
        total += e.cost
        estimated += e.cost if e.estimated else 0
        by_stack[e.model if stack == "model" else e.provider][i] += e.cost
        dims = {"model": e.model, **{k: e.dims.get(k, "(none)") for k in ("key", "user", "team", "feature")}}
        dims.update({f"tag {k}": v for k, v in e.dims.items() if k not in KNOWN_FIELDS and k != "edits"})
        for dim, value in dims.items():
            g = top[dim][value]
            g[0] += 1
            g[1] += e.cost
    ranked = sorted(by_stack.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    spend = dict(ranked[:MAX_SERIES])
    if len(ranked) > MAX_SERIES:
        spend["other"] = [sum(col) for col in zip(*(v for _, v in ranked[MAX_SERIES:]), strict=True)]
    tops = {dim: sorted(((v, g[0], g[1]) for v, g in groups.items()), key=lambda r: (-r[2], r[0]))[:TOP_N]
            for dim, groups in top.items()}
    order = ["key", "user", "team", "model", "feature", *sorted(d for d in tops if d.startswith("tag "))]
    # a dimension no request set (all "(none)") says nothing: left out
    return Overview(labels, spend, forwarded, refused, total, estimated, requests, refusals,
                    {d: tops[d] for d in order if d in tops and [r[0] for r in tops[d]] != ["(none)"]})


@dataclass(frozen=True)
class BudgetRow:
    bucket: str
    unit: str
    spent: str
    held: str
    limit: str | None
    granted: str
    #: percentages of the limit (with granted headroom) for the bar, each capped so both fit
    spent_pct: float
    held_pct: float
    window: str
    resets: str


def _amount(n: int, unit: str) -> str:
    return str(nanos_to_usd(n)) if unit == "usd" else str(n)


def when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else "—"


def _window(b: Bucket) -> str:
    if b.window_s:
        s = b.window_s
        return f"rolling {s // 86400} d" if s % 86400 == 0 else f"rolling {s // 3600} h" if s % 3600 == 0 \
            else f"rolling {s} s"
    return "calendar period" if b.ends_at else "total"


def budget_rows(rows: Sequence[tuple[Bucket, BucketState]]) -> list[BudgetRow]:
    """One row per bucket, with the numbers as ``status --json`` prints them (dollars as decimal
    strings, tokens as integers) and a bar: spent and held as shares of the limit plus headroom
    granted by approvals. Resets: when the oldest spend leaves a rolling window, or the period's end."""
    out = []
    for b, st in rows:
        limit = st.limit + st.granted if st.limit is not None else None
        spent_pct = min(100.0, 100.0 * st.spent / limit) if limit else 0.0
        held_pct = min(100.0 - spent_pct, 100.0 * st.held / limit) if limit else 0.0
        out.append(BudgetRow(b.key, b.unit, _amount(st.spent, b.unit), _amount(st.held, b.unit),
                             _amount(limit, b.unit) if limit is not None else None, _amount(st.granted, b.unit),
                             round(spent_pct, 2), round(held_pct, 2), _window(b),
                             when(st.frees_at if b.window_s else b.ends_at)))
    return out


def feed(events: Iterable[Event], filters: Mapping[str, str]) -> list[Event]:
    """The decision feed: refusals, remedies and answers to holds that match every filter given
    (rule, user, key, model; a rule filter matches any of a comma-joined list)."""
    return [e for e in events if e.kind in FEED_KINDS and matches(e, filters)]


def matches(e: Event, filters: Mapping[str, str]) -> bool:
    for name in FILTERS:
        want = filters.get(name, "").strip()
        if not want:
            continue
        if name == "rule":
            rules = {*e.rule.split(","), e.dims.get("rule", "")} if e.rule or e.dims.get("rule") else set()
            if want not in rules:
                return False
        elif name == "model":
            if e.model != want:
                return False
        elif e.dims.get(name) != want:
            return False
    return True


def _usd(amounts: Mapping[str, int], name: str) -> str:
    """An amount exactly, as the admin API gives it (``$6.0015``, not a rounded ``$6.00``)."""
    return f"${nanos_to_usd(amounts[name])}" if name in amounts else "?"


def message(e: Event) -> str:
    """One sentence saying what happened and why, from what the event recorded."""
    a = e.amounts
    if e.kind in ("block", "hold"):
        verb = "blocked" if e.kind == "block" else "held for approval"
        if "limit_usd" in a:
            return (f"{verb} by {e.rule or '?'}: estimate {_usd(a, 'estimate_usd')} with "
                    f"{_usd(a, 'used_usd')} already used of {_usd(a, 'limit_usd')}")
        if "limit_tokens" in a:
            return (f"{verb} by {e.rule or '?'}: {a.get('request_tokens', '?')} tokens with "
                    f"{a.get('used_tokens', '?')} used of {a['limit_tokens']}")
        return f"{verb} by {e.rule or '?'}" + (f" (estimate {_usd(a, 'estimate_usd')})" if "estimate_usd" in a else "")
    if e.kind in ("downgrade", "clamp", "truncate"):
        edits = e.dims.get("edits", "")
        return f"{e.kind} by {e.rule or '?'}" + (f": {edits}" if edits else "")
    if e.kind == "would_refuse":
        return f"shadow rule {e.rule or '?'} would have refused (estimate {_usd(a, 'estimate_usd')})"
    if e.kind == "approval":
        d = e.dims
        return (f"approved by {d.get('by', '?')} via {d.get('channel', '?')} for {d.get('rule', '?')}: "
                f"{'once' if d.get('granted_usd') == 'once' else '$' + d.get('granted_usd', '?') + ' headroom'}")
    if e.kind == "deny":
        return f"denied by {e.dims.get('by', '?')} (rule {e.rule or '?'})"
    if e.kind == "alert":
        return f"alert from {e.rule or '?'}"
    return e.kind


def feed_row(e: Event) -> dict[str, Any]:
    """A feed line as the template and the CSV export show it."""
    return {"time": dt.datetime.fromtimestamp(e.ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"), "ts": e.ts,
            "kind": e.kind, "rule": e.rule or e.dims.get("rule", ""), "user": e.dims.get("user", ""),
            "key": e.dims.get("key", ""), "model": e.model, "provider": e.provider, "bucket": e.bucket,
            "decision_id": e.decision_id, "message": message(e),
            "refusal": e.kind in ("block", "hold", "deny")}



def pending_row(p: Pending) -> dict[str, Any]:
    """A held request as the Approvals page lists it: what (model, route, estimate) and why."""
    try:
        body = json.loads(p.body)
    except ValueError:
        body = {}
    model = body.get("model") if isinstance(body, dict) else None
    return {"id": p.id, "session": p.session, "rule": p.rule, "estimate_usd": p.estimate_usd,
            "message": p.message, "route": p.route, "provider": p.provider,
            "model": model if isinstance(model, str) else "?", "created": when(p.created),
            "expires": when(p.expires_at), "bucket": p.bucket[0] if p.bucket else ""}
