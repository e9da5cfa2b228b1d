"""Where the money went: spend events grouped by any dimension, and budget states for status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spendgate.errors import ConfigError, StoreError
from spendgate.ledger import Bucket, BucketState, Event, Ledger
from spendgate.money import nanos_to_usd
from spendgate.policy.parse import parse_duration

log = logging.getLogger("spendgate.report")
#: Fields of an event that are not in its ``dims``.
EVENT_FIELDS = ("model", "provider", "kind")
APPROVAL = "approval"
#: events that charge a budget: what the provider billed, an unknown outcome, an expired hold
SPEND_KINDS = frozenset({"capture", "unknown", "expired"})
#: decisions that kept a request from being sent (a denial answers a hold already counted)
REFUSAL_KINDS = frozenset({"block", "hold"})
#: a shadow rule's refusal that was not made (the request went through): what enforcing it would do
WOULD_REFUSE = "would_refuse"
APPROVAL_FIELDS = ("channel", "by", "rule", "bucket", "granted_usd", "session")
#: What ``report --by`` groups on without looking at the data: the event's own fields, the identity
#: dimensions and what the engine adds (route, tier). Any other name must be a tag that a spend or
#: refusal in the window carries; else it is a typo, and grouping on it would put every request
#: under "(none)" and look like an answer.
KNOWN_FIELDS = (*EVENT_FIELDS, "key", "user", "team", "session", "agent", "feature", "route", "tier")


#: told of each hold a read expires (its charge, for the audit log)
OnExpired = Callable[[Event], None] | None


def _expire(store: Ledger, now: float, on_expired: OnExpired = None) -> None:
    """Charge holds past their TTL before reading: after a crash with no traffic since, nothing else
    would, and status would show the holds forever and report $0 (no expiry event yet). On a store
    that takes no writes (a read-only copy) the report still reads what is there."""
    try:
        gone = store.expire(now)
    except StoreError as exc:
        log.warning("stale holds not expired before reading: %s", exc)
        return
    for hold in gone:
        if on_expired is not None and hold.event is not None:
            on_expired(hold.event)


@dataclass(frozen=True, slots=True)
class Row:
    group: tuple[str, ...]
    requests: int
    cost: int
    input_tokens: int
    output_tokens: int
    estimated: int
    #: requests refused (blocked, held, denied) in this group: money the guard kept
    refused: int = 0
    #: requests a shadow rule would have refused (each counted once, however many rules)
    would_refuse: int = 0

    def as_dict(self, by: Sequence[str]) -> dict[str, Any]:
        d: dict[str, Any] = dict(zip(by, self.group, strict=True))
        d.update(requests=self.requests, usd=str(nanos_to_usd(self.cost)), input_tokens=self.input_tokens,
                 output_tokens=self.output_tokens, estimated=self.estimated, refused=self.refused,
                 would_refuse=self.would_refuse)
        return d


def report(store: Ledger, by: Sequence[str], since: str | float = "24h", now: float | None = None,
           on_expired: OnExpired = None) -> list[Row]:
    """Spend since ``since`` (a duration such as 7d, or epoch seconds) grouped by ``by``, dearest first."""
    now = time.time() if now is None else now
    start = now - parse_duration(since, "--since") if isinstance(since, str) else since
    _expire(store, now, on_expired)
    groups: dict[tuple[str, ...], list[int]] = {}
    seen: set[str] = set()
    shadowed: set[str] = set()
    for e in store.events(start):
        spend, refusal = e.kind in SPEND_KINDS, e.kind in REFUSAL_KINDS
        if e.kind == WOULD_REFUSE and e.decision_id not in shadowed:
            shadowed.add(e.decision_id)
            key = tuple(str(getattr(e, f)) if f in EVENT_FIELDS else e.dims.get(f, "(none)") for f in by)
            groups.setdefault(key, [0, 0, 0, 0, 0, 0, 0])[6] += 1
            continue
        if not spend and not refusal:
            continue  # an approval lifts a limit, a release gives a hold back: neither spends (see approvals())
        seen.update(e.dims)
        key = tuple(str(getattr(e, f)) if f in EVENT_FIELDS else e.dims.get(f, "(none)") for f in by)
        g = groups.setdefault(key, [0, 0, 0, 0, 0, 0, 0])
        if refusal:
            g[5] += 1
            continue
        g[0] += 1
        g[1] += e.cost
        g[2] += e.input_tokens
        g[3] += e.output_tokens
        g[4] += int(e.estimated)
    unknown = [f for f in by if f not in KNOWN_FIELDS and f not in seen]
    if unknown:
        tags = sorted(seen - set(KNOWN_FIELDS) - {"edits"})
        raise ConfigError(f"--by {unknown[0]}: not a field spendgate records, nor a tag on any request in the "
                          f"window; fields: {', '.join(KNOWN_FIELDS)}; tags seen: {', '.join(tags) or 'none'}")
    rows = [Row(k, *v) for k, v in groups.items()]
    return sorted(rows, key=lambda r: (-r.cost, r.group))


def approvals(store: Ledger, since: str | float = "24h", now: float | None = None) -> list[dict[str, Any]]:
    """Every approval since ``since``, oldest first: when, which channel (operator, header, inband),
    who, the rule and bucket it lifted, the headroom it granted ("once" for a single request)."""
    now = time.time() if now is None else now
    start = now - parse_duration(since, "--since") if isinstance(since, str) else since
    return [{"ts": e.ts, "decision_id": e.decision_id, **{k: e.dims.get(k, "") for k in APPROVAL_FIELDS}}
            for e in store.events(start) if e.kind == APPROVAL]


def event_dict(e: Event) -> dict[str, Any]:
    """An event as the admin API and ``--json`` show it: amounts in dollars as strings (tokens as
    integers), never nano-dollar integers a reader would have to know to divide."""
    out: dict[str, Any] = {"ts": e.ts, "kind": e.kind, "decision_id": e.decision_id, "model": e.model,
                           "provider": e.provider, "estimated": e.estimated, "dims": dict(e.dims)}
    if e.kind in SPEND_KINDS:
        out.update(cost_usd=str(nanos_to_usd(e.cost)), input_tokens=e.input_tokens, output_tokens=e.output_tokens)
    if e.rule:
        out["rule"] = e.rule
    if e.bucket:
        out["bucket"] = e.bucket
    if e.amounts:
        out["amounts"] = {k: str(nanos_to_usd(v)) if k.endswith("_usd") else v for k, v in e.amounts.items()}
    return out


def status(store: Ledger, now: float | None = None,
           on_expired: OnExpired = None) -> list[tuple[Bucket, BucketState]]:
    """Every bucket the store knows, with its current state. A calendar bucket's key carries its
    period (``…|2026-11``), so past periods are listed too, with what they spent."""
    now = time.time() if now is None else now
    _expire(store, now, on_expired)
    buckets = store.known_buckets()
    return list(zip(buckets, store.states(buckets, now=now), strict=True))
