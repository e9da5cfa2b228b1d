"""``memory://``: the ledger in this process's memory, for tests, the SDK and replays."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace

from spendgate.ledger.base import (
    SETTLED_ALERT_STATUSES,
    AlertMark,
    Bucket,
    BucketState,
    Event,
    OutboxAlert,
    TransactionalLedger,
    _Hold,
    check_alert_status,
)


class MemoryLedger(TransactionalLedger):
    """Thread-safe in one process; shared by nothing else."""

    schemes = ("memory",)

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.RLock()
        self._slots: dict[str, dict[int, int]] = defaultdict(dict)
        self._holds: dict[str, _Hold] = {}
        self._held_by: dict[str, int] = defaultdict(int)
        self._grants: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._events: list[Event] = []
        self._buckets: dict[str, Bucket] = {}
        self._records: dict[tuple[str, str], tuple[str, float | None]] = {}
        #: the outbox by key, and who holds a claim on which key
        self._alerts: dict[str, OutboxAlert] = {}
        self._claims: dict[str, str] = {}
        self._audit: dict[str, list[str]] = defaultdict(list)
        self._checkpoints: dict[str, list[str]] = defaultdict(list)

    def _transaction(self) -> AbstractContextManager[None]:
        return _Locked(self._lock)

    def _state(self, bucket: Bucket, now: float) -> BucketState:
        spent, frees_at = self._spent(bucket, now)
        return BucketState(bucket.key, bucket.unit, bucket.limit, spent, self._held(bucket.key),
                           self._granted(bucket.key, now), frees_at)

    def _spent(self, bucket: Bucket, now: float) -> tuple[int, float | None]:
        slots = self._slots.get(bucket.key)
        if not slots:
            return 0, None
        if not bucket.window_s:
            return sum(slots.values()), None
        first = bucket.first_live_slot(now)
        for old in [s for s in slots if s < first]:
            del slots[old]
        if not slots:
            return 0, None
        oldest = min(slots)
        return sum(slots.values()), (oldest + 1) * bucket.slot_s + bucket.window_s

    def _held(self, key: str) -> int:
        return self._held_by.get(key, 0)

    def _granted(self, key: str, now: float) -> int:
        grants = self._grants.get(key)
        if not grants:
            return 0
        live = [(a, u) for a, u in grants if u > now]
        self._grants[key] = live
        return sum(a for a, _ in live)

    def _put_hold(self, hold: _Hold) -> None:
        self._holds[hold.hold_id] = hold
        for line in hold.lines:
            self._held_by[line.bucket.key] += line.amount
            self._buckets[line.bucket.key] = line.bucket

    def _pop_hold(self, hold_id: str, *, event: bool = True) -> _Hold | None:
        hold = self._holds.pop(hold_id, None)
        if hold is not None:
            for line in hold.lines:
                self._held_by[line.bucket.key] -= line.amount
        return hold

    def _stale_holds(self, now: float) -> Iterator[str]:
        return (h.hold_id for h in self._holds.values() if h.expires_at <= now)

    def _charge(self, charges: Sequence[tuple[Bucket, int]], now: float) -> None:
        for bucket, amount in charges:
            slots = self._slots[bucket.key]
            slot = bucket.slot_of(now)
            slots[slot] = slots.get(slot, 0) + amount

    def _add_grant(self, key: str, amount: int, until: float) -> None:
        self._grants[key].append((amount, until))

    def _forget(self, key: str) -> None:
        for table in (self._slots, self._held_by, self._grants, self._buckets):
            table.pop(key, None)

    def _add_event(self, event: Event) -> None:
        self._events.append(event)

    def _ended_buckets(self, after: str, cutoff: float, n: int) -> tuple[list[str], str | None]:
        keys = sorted(k for k in self._buckets if k > after)[:n]
        busy = {ln.bucket.key for h in self._holds.values() for ln in h.lines}
        dead = [k for k in keys
                if k not in busy and not self._held_by.get(k)
                and not any(until > cutoff for _, until in self._grants.get(k, ()))
                and self._buckets[k].ended(cutoff, max(self._slots.get(k) or (), default=None))]
        return dead, keys[-1] if len(keys) == n else None

    def _delete_events(self, before: float, n: int) -> int:
        old = [i for i, e in enumerate(self._events) if e.ts < before][:n]
        for i in reversed(old):
            del self._events[i]
        return len(old)

    def _add_alerts(self, marks: Sequence[AlertMark], now: float) -> None:
        for m in marks:
            if m.key not in self._alerts:
                self._alerts[m.key] = OutboxAlert(m.key, now, m.body, "pending", 0, now)

    def _delete_alerts(self, before: float, n: int) -> int:
        old = sorted((a for a in self._alerts.values() if a.created < before and a.status in SETTLED_ALERT_STATUSES),
                     key=lambda a: (a.created, a.key))[:n]
        for a in old:
            del self._alerts[a.key]
            self._claims.pop(a.key, None)
        return len(old)

    # (copies go out, so a caller changing what it got cannot change the outbox)

    def claim_alerts(self, now: float, owner: str, lease_s: float, limit: int) -> list[OutboxAlert]:
        with self._lock:
            due = sorted((a for a in self._alerts.values() if a.status == "pending" and a.next_at <= now),
                         key=lambda a: (a.created, a.key))[:max(0, limit)]
            for a in due:
                a.next_at = now + lease_s
                self._claims[a.key] = owner
            return [replace(a) for a in due]

    def update_alert(self, key: str, owner: str, *, status: str, attempts: int, next_at: float,
                     error: str = "", done: Sequence[str] = (), sent_at: float | None = None) -> bool:
        check_alert_status(status)
        with self._lock:
            a = self._alerts.get(key)
            if a is None or self._claims.get(key) != owner:
                return False
            a.status, a.attempts, a.next_at, a.error, a.done, a.sent_at = (status, attempts, next_at, error,
                                                                           tuple(done), sent_at)
            del self._claims[key]
            return True

    def alerts(self, limit: int = 1000) -> list[OutboxAlert]:
        with self._lock:
            newest = sorted(self._alerts.values(), key=lambda a: (a.created, a.key), reverse=True)
            return [replace(a) for a in newest[:max(0, limit)]]

    def _audit_len(self, chain: str) -> int:
        return len(self._audit.get(chain, ()))

    def _audit_range(self, chain: str, after_seq: int, limit: int | None) -> list[str]:
        entries = self._audit.get(chain, [])
        return entries[after_seq:] if limit is None else entries[after_seq:after_seq + max(0, limit)]

    def _audit_add(self, chain: str, first_seq: int, entries: Sequence[str]) -> None:
        self._audit[chain].extend(entries)

    def _add_checkpoint(self, chain: str, checkpoint: str) -> None:
        self._checkpoints[chain].append(checkpoint)

    def audit_chains(self) -> list[str]:
        with self._lock:
            return sorted({c for c, e in self._audit.items() if e} | {c for c, k in self._checkpoints.items() if k})

    def audit_entries(self, chain: str, after_seq: int = 0, limit: int | None = None) -> list[str]:
        with self._lock:
            return self._audit_range(chain, max(0, after_seq), limit)

    def audit_checkpoints(self, chain: str) -> list[str]:
        with self._lock:
            return list(self._checkpoints.get(chain, ()))

    def check(self, now: float) -> None:
        """Memory cannot fail a write."""

    def _touch(self, bucket: Bucket, now: float) -> None:
        self._buckets[bucket.key] = bucket

    def _put_record(self, kind: str, key: str, value: str, expires_at: float | None) -> None:
        self._records[(kind, key)] = (value, expires_at)

    def _get_record(self, kind: str, key: str, now: float) -> str | None:
        found = self._records.get((kind, key))
        if found is None or (found[1] is not None and found[1] <= now):
            return None
        return found[0]

    def _delete_record(self, kind: str, key: str) -> None:
        self._records.pop((kind, key), None)

    def records(self, kind: str, *, now: float) -> list[tuple[str, str]]:
        with self._lock:
            return [(k, v) for (kd, k), (v, exp) in self._records.items()
                    if kd == kind and (exp is None or exp > now)]

    def events(self, since: float, until: float | None = None) -> list[Event]:
        with self._lock:
            return [e for e in self._events if e.ts >= since and (until is None or e.ts < until)]

    def known_buckets(self) -> list[Bucket]:
        with self._lock:
            return list(self._buckets.values())


class _Locked(AbstractContextManager[None]):
    __slots__ = ("_lock",)

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
