"""The ledger: authorize (hold), capture, release and expire, atomically over many buckets.

A *bucket* is one budget counted for one scope in one window ("team ml, this month"). For every
bucket, at every instant, ``captured + held <= limit + granted``: :meth:`Ledger.authorize` checks
every bucket a request falls under and places its hold on all of them, or on none, inside one
transaction of the backend.

Backends implement a handful of primitives inside :meth:`Ledger._transaction`; the rules
(what counts, when a hold is refused, what an expired hold costs) live here once. A backend that
can do better in one round trip (Redis, with Lua) overrides the public methods instead and runs
the same contract tests.

Amounts are integers: nano-dollars for ``usd`` buckets, tokens for ``tokens`` buckets.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from spendgate import fastjson, randomid
from spendgate.errors import StoreError

Unit = Literal["usd", "tokens", "requests"]
#: Rolling windows are counted in this many slots; a charge counts while any part of its slot is
#: inside the window, so a rolling window over-counts by under one slot and never under-counts.
SLOTS_PER_WINDOW = 60


@dataclass(slots=True)
class Bucket:
    """One counter a budget rule keeps.

    ``limit`` None means counted but never refused (alert / shadow rules). ``window_s`` set means
    a rolling window of that many seconds; None means the key itself is the period (a calendar
    period's key carries its label, ``total`` never changes).
    """

    key: str
    limit: int | None
    window_s: int | None = None
    unit: Unit = "usd"
    #: when a calendar period's bucket stops counting (epoch seconds): from then on the engine asks
    #: for the next period's key, so :meth:`Ledger.sweep` may prune this one. None: it never ends
    #: by the calendar (a rolling window ends with its slots; ``total`` never ends).
    ends_at: float | None = None

    @property
    def slot_s(self) -> int:
        return max(1, (self.window_s or 0) // SLOTS_PER_WINDOW)

    def slot_of(self, now: float) -> int:
        return int(now // self.slot_s) if self.window_s else 0

    def first_live_slot(self, now: float) -> int:
        """The oldest slot any part of which lies inside the rolling window ending at ``now``."""
        if not self.window_s:
            return 0
        return int((now - self.window_s) // self.slot_s)

    def ended(self, cutoff: float, newest_slot: int | None) -> bool:
        """True when nothing this bucket counted can count at any time from ``cutoff`` on, given
        the newest slot it has charged: the one test of whether a bucket may be pruned."""
        if self.window_s:
            return newest_slot is None or newest_slot < self.first_live_slot(cutoff)
        return self.ends_at is not None and self.ends_at <= cutoff


@dataclass(frozen=True, slots=True)
class AlertMark:
    """An alert the ledger writes into its outbox inside the operation that causes it, so a crash
    can never keep the cause and lose the alert (or the reverse).

    ``key`` makes it once-only: a key already in the outbox (pending, sent or failed) is never
    written again, by any process. In :meth:`Ledger.authorize`, a line's marks fire when the
    bucket's spent + held after the hold reaches ``at`` (``at`` > 0) — or, with ``on_refusal``, only
    when that bucket refuses the request (``at`` is then ignored); marks given to :meth:`Ledger.record`
    / :meth:`Ledger.put_record` are written unconditionally (if absent). ``body`` is JSON text for the
    sender; the ledger never reads it. (A key comes back only after :meth:`Ledger.sweep` deleted the
    settled alert past its retention.)"""

    key: str
    body: str
    at: int = 0
    on_refusal: bool = False


@dataclass(slots=True)
class Line:
    """One bucket's share of a hold, with the alerts crossing a mark on that bucket would fire."""

    bucket: Bucket
    amount: int
    alerts: tuple[AlertMark, ...] = ()


@dataclass(slots=True)
class BucketState:
    key: str
    unit: Unit
    limit: int | None
    spent: int
    held: int
    granted: int = 0
    #: when the oldest counted spend leaves a rolling window (epoch seconds), else None
    frees_at: float | None = None

    @property
    def used(self) -> int:
        return self.spent + self.held

    @property
    def remaining(self) -> int | None:
        if self.limit is None:
            return None
        return self.limit + self.granted - self.spent - self.held


@dataclass(slots=True)
class Authorization:
    """The ledger's answer: a hold on every bucket, or a refusal naming the buckets that overflow."""

    ok: bool
    hold_id: str | None
    states: tuple[BucketState, ...]
    refused: tuple[str, ...] = ()
    #: stale holds this call expired (and charged at their worst case) before deciding
    expired: tuple[ExpiredHold, ...] = ()

    def state(self, key: str) -> BucketState:
        return next(s for s in self.states if s.key == key)


@dataclass(slots=True)
class Event:
    """A row of the spend log: what was charged, to whom, and how sure we are of the amount."""

    ts: float
    kind: str  # capture | expired | unknown
    decision_id: str
    model: str
    provider: str
    cost: int
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False
    dims: Mapping[str, str] = field(default_factory=dict)
    #: the rule and bucket a refusal, approval or alert is about ("" for a plain charge)
    rule: str = ""
    bucket: str = ""
    #: named amounts, the unit in the name: ``…_usd`` in nano-dollars, ``…_tokens`` in tokens
    #: (``estimate_usd``, ``limit_usd``, ``used_tokens`` …) — what a refusal or approval weighed;
    #: empty for a plain charge
    amounts: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        # by hand: dataclasses.asdict deep-copies, and this runs twice on every request
        doc: dict[str, Any] = {"ts": self.ts, "kind": self.kind, "decision_id": self.decision_id,
                               "model": self.model, "provider": self.provider, "cost": self.cost,
                               "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                               "estimated": self.estimated, "dims": dict(self.dims)}
        if self.rule:
            doc["rule"] = self.rule
        if self.bucket:
            doc["bucket"] = self.bucket
        if self.amounts:
            doc["amounts"] = dict(self.amounts)
        return fastjson.dumps(doc)

    @classmethod
    def from_json(cls, raw: str) -> Event:
        """Read a row written by :meth:`to_json`, by this version or an earlier one (rows from before
        ``rule``, ``bucket`` and ``amounts`` lack them: they read as a plain charge)."""
        return event_of_doc(json.loads(raw))


def event_of_doc(doc: Mapping[str, Any]) -> Event:
    """An :class:`Event` from its parsed JSON (see :meth:`Event.from_json`), for a backend that has
    already parsed the row."""
    return Event(doc["ts"], doc["kind"], doc["decision_id"], doc["model"], doc["provider"], doc["cost"],
                 doc.get("input_tokens", 0), doc.get("output_tokens", 0), doc.get("estimated", False),
                 doc.get("dims") or {}, doc.get("rule", ""), doc.get("bucket", ""), doc.get("amounts") or {})


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """One :meth:`Ledger.authorize`'s arguments, for :meth:`Ledger.commit`."""

    lines: Sequence[Line]
    now: float
    ttl: float
    event: Event | None = None
    hold_id: str | None = None


@dataclass(frozen=True, slots=True)
class Capture:
    """One :meth:`Ledger.capture`'s arguments, for :meth:`Ledger.commit`."""

    hold_id: str
    actual: Mapping[str, int]
    now: float
    event: Event | None = None


@dataclass(frozen=True, slots=True)
class ExpiredHold:
    hold_id: str
    charged: dict[str, int]
    event: Event | None


@dataclass(frozen=True, slots=True)
class LeaseEntry:
    """One bucket's slice in a budget-lease batch (see :mod:`spendgate.ledger.lease`): the
    captures made into it so far (cumulative), the local holds it must keep covering (``floor``),
    the size asked for (``want``), what a waiting request needs (``need``, 0: none) and the
    bucket's alert marks not yet fired (``[key, body, at]``)."""

    bucket: Bucket
    total: int
    floor: int
    want: int
    need: int
    marks: list[list[Any]]


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """A batch's outcome: ``gone`` (the instance's lease hold had expired: nothing applied), else
    per entry (slice, spent, held, granted, frees_at); and the holds expired on the way."""

    gone: bool
    rows: list[tuple[int, int, int, int, float | None]]
    expired: list[ExpiredHold]


@dataclass(frozen=True, slots=True)
class Swept:
    """What one :meth:`Ledger.sweep` did."""

    expired: int = 0
    pruned: int = 0
    events_deleted: int = 0
    #: settled (sent, failed, logged) outbox alerts past the retention; pending ones are never deleted
    alerts_deleted: int = 0
    #: the stale holds it expired, with their events (for the audit log)
    gone: tuple[ExpiredHold, ...] = ()


@dataclass(slots=True)
class _Hold:
    hold_id: str
    expires_at: float
    lines: list[Line]
    event: Event | None


#: What an outbox alert may be: waiting (or retrying), delivered to every destination, given up on,
#: or kept with nowhere to send it (no destination configured).
ALERT_STATUSES = ("pending", "sent", "failed", "logged")
#: The statuses a sweep may delete once past the retention (never "pending": it is still owed).
SETTLED_ALERT_STATUSES = ("sent", "failed", "logged")


def check_alert_status(status: str) -> None:
    """Refuse a status outside :data:`ALERT_STATUSES` before anything is written."""
    if status not in ALERT_STATUSES:
        raise ValueError(f"alert status {status!r}: expected one of {', '.join(ALERT_STATUSES)}")


def fired(lines: Sequence[Line], totals: Sequence[int], refused: Sequence[str]) -> list[AlertMark]:
    """The marks an authorize fires, given each line's bucket spent + held after the hold (when it
    was placed) and the refused bucket keys (when it was not): the rule :class:`AlertMark` states,
    in one place for the backends that evaluate it in Python."""
    if refused:
        return [m for ln in lines if ln.bucket.key in refused for m in ln.alerts if m.on_refusal]
    return [m for ln, total in zip(lines, totals, strict=True) for m in ln.alerts
            if not m.on_refusal and 0 < m.at <= total]


@dataclass(slots=True)
class OutboxAlert:
    """One alert in the store's outbox, as the sender sees it."""

    key: str
    created: float
    body: str
    status: str = "pending"
    attempts: int = 0
    #: when the sender may next try it (a claim pushes this to the end of its lease)
    next_at: float = 0.0
    error: str = ""
    sent_at: float | None = None
    #: the destinations (the sender's ids for them) that already took it
    done: tuple[str, ...] = ()


#: A bucket is pruned only once it has been over for this long, so a process sharing the store whose
#: clock runs behind the sweeper's never finds a bucket it still counts gone (that would under-count).
PRUNE_GRACE_S = 300.0
#: Rows a sweep handles per transaction: each batch holds the store's write lock for ~a millisecond,
#: so requests interleave with a long sweep instead of waiting for all of it.
SWEEP_BATCH = 1000


def new_hold_id() -> str:
    return randomid.token_hex(16)


class Ledger(ABC):
    """The store interface; pick a backend with :func:`spendgate.ledger.open`.

    Every method is atomic on its own: a backend may run it as one SQL transaction
    (:class:`TransactionalLedger`) or one Lua script (Redis), and one contract test suite holds
    them all to the same behaviour.
    """

    url: str = ""
    #: True when every call is a network round trip (callers on an event loop move it to a thread)
    networked: bool = False

    @abstractmethod
    def authorize(self, lines: Sequence[Line], *, now: float, ttl: float,
                  event: Event | None = None, hold_id: str | None = None) -> Authorization:
        """Hold every line's amount on its bucket, or refuse with the overflowing buckets.

        Stale holds are expired first, so a crashed caller cannot pin a budget past its TTL (they
        are returned in :attr:`Authorization.expired`). ``event`` is kept with the hold so an expiry
        can be logged with its origin. Each line's alert marks (:class:`AlertMark`) are written to
        the outbox, in the same transaction, when the hold takes the bucket's spent + held to ``at`` or
        more — or, for an ``on_refusal`` mark, only when that bucket is one of those refused.
        """

    @abstractmethod
    def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                event: Event | None = None) -> bool:
        """Replace a hold by the actual amounts (by unit); False if the hold is gone (expired).
        ``event``, when given, is logged atomically with the charge."""

    def commit(self, holds: Sequence[HoldRequest], captures: Sequence[Capture]
               ) -> tuple[list[Authorization], list[bool]]:
        """:meth:`capture` for each of ``captures``, then :meth:`authorize` for each of ``holds``, in
        order: what each returned, as if called one by one (each authorization sees what the captures
        freed and the holds placed before it — a request that finished before these were asked has
        given its unused worst case back). A backend that can run them in one transaction does:
        requests that arrive or finish together share one commit."""
        captured = [self.capture(c.hold_id, c.actual, now=c.now, event=c.event) for c in captures]
        return ([self.authorize(h.lines, now=h.now, ttl=h.ttl, event=h.event, hold_id=h.hold_id) for h in holds],
                captured)

    @abstractmethod
    def release(self, hold_id: str, *, now: float, event: Event | None = None) -> bool:
        """Drop a hold without charging (the request was never sent); ``event``, when given, is
        logged in the same transaction if the hold was still there."""

    @abstractmethod
    def expire(self, now: float) -> list[ExpiredHold]:
        """Charge every hold past its TTL at its worst case and flag it for reconciliation."""

    @abstractmethod
    def sweep(self, now: float, *, retention_s: float | None = None) -> Swept:
        """Upkeep, off the request path (a periodic task), so storage stays bounded however many
        sessions, users and keys clients invent: expire stale holds (as :meth:`expire`), prune
        buckets whose window is over — a rolling one with no slot inside its window, a calendar
        period past ``ends_at``, in both cases with nothing held, no live grant and no hold naming
        it, and over for :data:`PRUNE_GRACE_S` — and delete events older than ``retention_s``
        (None keeps them all). ``total`` buckets are never pruned. Runs in batches of
        :data:`SWEEP_BATCH` rows, each atomic, so requests interleave with it.

        A pruned bucket reads exactly as it did (nothing spent, held or granted) at every time from
        ``now`` on: pruning never changes what a limit counts."""

    @abstractmethod
    def check(self, now: float) -> None:
        """Raise :class:`~spendgate.errors.StoreError`, saying why, unless the store takes a write
        now: what a request needs, for the health endpoint (a store that turned read-only, filled
        its disk or lost its file fails here, not only on the next request)."""

    @abstractmethod
    def grant(self, bucket: Bucket, amount: int, *, now: float, until: float) -> None:
        """Raise ``bucket``'s limit by ``amount`` until ``until`` (an approval's headroom)."""

    @abstractmethod
    def states(self, buckets: Sequence[Bucket], *, now: float) -> list[BucketState]: ...

    @abstractmethod
    def forget(self, keys: Sequence[str]) -> None:
        """Drop what ``keys`` counted (spent, grants, the bucket's listing) once no hold is left on
        them: a bucket that lived for one ``with spendgate.budget()`` block must not stay forever."""

    @abstractmethod
    def record(self, event: Event, *, alerts: Sequence[AlertMark] = ()) -> None:
        """Log an event without a hold (a refusal, an approval, a charge made elsewhere), with the
        alerts it causes written to the outbox (each only if its key is new) in the same transaction."""

    @abstractmethod
    def put_record(self, kind: str, key: str, value: str, *, expires_at: float | None = None,
                   alerts: Sequence[AlertMark] = ()) -> None:
        """Store ``value`` under (kind, key), replacing what was there: shared state of the doors
        (held requests, virtual keys) that every process on the store must see. ``alerts`` as in
        :meth:`record` (a held request's notification is written with the hold it announces)."""

    @abstractmethod
    def get_record(self, kind: str, key: str, *, now: float) -> str | None: ...

    @abstractmethod
    def take_record(self, kind: str, key: str, *, now: float) -> str | None:
        """Read and delete in one step, so a one-time approval is consumed exactly once."""

    @abstractmethod
    def delete_record(self, kind: str, key: str) -> None: ...

    @abstractmethod
    def records(self, kind: str, *, now: float) -> list[tuple[str, str]]:
        """Every live (key, value) of ``kind``."""

    @abstractmethod
    def events(self, since: float, until: float | None = None) -> list[Event]:
        """Spend events with ``since <= ts < until``, oldest first."""

    @abstractmethod
    def known_buckets(self) -> list[Bucket]:
        """Every bucket a hold or grant has touched, for ``spendgate status``."""

    # -- the alert outbox: written by authorize / record / put_record, drained by a sender --------

    @abstractmethod
    def claim_alerts(self, now: float, owner: str, lease_s: float, limit: int) -> list[OutboxAlert]:
        """Atomically take up to ``limit`` pending alerts due by ``now`` (``next_at <= now``) that
        no other owner holds a live claim on, oldest first, and claim them for ``owner`` until
        ``now + lease_s`` (their ``next_at`` moves there): across processes and instances, each
        alert goes to one sender at a time, and to another only once the claim lapses."""

    @abstractmethod
    def update_alert(self, key: str, owner: str, *, status: str, attempts: int, next_at: float,
                     error: str = "", done: Sequence[str] = (), sent_at: float | None = None) -> bool:
        """Record a delivery attempt's outcome and drop the claim — only if ``owner`` still holds
        it (False otherwise: the claim lapsed and another sender may have it)."""

    @abstractmethod
    def alerts(self, limit: int = 1000) -> list[OutboxAlert]:
        """The outbox, newest first: pending, sent, failed and logged alerts with their attempts."""

    # -- the audit log: one hash chain per writer, and signed checkpoints of each chain's head -----

    @abstractmethod
    def append_audit(self, chain: str, first_seq: int, entries: Sequence[str]) -> None:
        """Append ``entries`` (JSON text, seq ``first_seq``, ``first_seq + 1`` …) to ``chain``.
        Idempotent: when the chain already holds these very entries at those seqs (an earlier
        attempt whose answer was lost), nothing changes; any other mismatch with the chain's length
        raises :class:`~spendgate.errors.StoreError` and writes nothing."""

    @abstractmethod
    def put_checkpoint(self, chain: str, checkpoint: str) -> None:
        """Keep a signed checkpoint (JSON text) of ``chain``'s head, apart from its entries."""

    @abstractmethod
    def audit_chains(self) -> list[str]:
        """Every chain id with an entry or a checkpoint, sorted."""

    @abstractmethod
    def audit_entries(self, chain: str, after_seq: int = 0, limit: int | None = None) -> list[str]:
        """``chain``'s entries with seq above ``after_seq``, in the order they were appended
        (exactly as stored: a verifier must see what is there, not a re-sorted copy)."""

    @abstractmethod
    def audit_checkpoints(self, chain: str) -> list[str]:
        """``chain``'s checkpoints, oldest first."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources."""


class TransactionalLedger(Ledger):
    """The rules of the ledger written once, over a few primitives a backend runs inside one
    transaction (:meth:`_transaction`): the memory and SQLite backends."""

    # -- the public contract ------------------------------------------------------------------

    def authorize(self, lines: Sequence[Line], *, now: float, ttl: float,
                  event: Event | None = None, hold_id: str | None = None) -> Authorization:
        with self._transaction():
            return self._authorize_locked(lines, now, ttl, event, hold_id)

    def _authorize_locked(self, lines: Sequence[Line], now: float, ttl: float, event: Event | None,
                          hold_id: str | None) -> Authorization:
        hid = hold_id or new_hold_id()
        marked = any(line.alerts for line in lines)  # no marks: not one more statement
        expired = tuple(self._expire_locked(now))
        states = [self._state(line.bucket, now) for line in lines]
        refused = tuple(
            s.key for s, line in zip(states, lines, strict=True)
            if s.limit is not None and line.amount > 0
            and s.spent + s.held + line.amount > s.limit + s.granted
        )
        if refused:
            if marked and (marks := fired(lines, (), refused)):
                self._add_alerts(marks, now)
            return Authorization(False, None, tuple(states), refused, expired)
        self._put_hold(_Hold(hid, now + ttl, list(lines), event))
        after = tuple(
            BucketState(s.key, s.unit, s.limit, s.spent, s.held + line.amount, s.granted, s.frees_at)
            for s, line in zip(states, lines, strict=True)
        )
        if marked and (marks := fired(lines, [s.used for s in after], ())):
            self._add_alerts(marks, now)
        return Authorization(True, hid, after, (), expired)

    def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                event: Event | None = None) -> bool:
        with self._transaction():
            return self._capture_locked(hold_id, actual, now, event)

    def commit(self, holds: Sequence[HoldRequest], captures: Sequence[Capture]
               ) -> tuple[list[Authorization], list[bool]]:
        """One transaction for all of them: one commit (one WAL append, each bucket's pages written
        once) however many requests arrived or finished together. All or none: a failure places no
        hold and leaves every captured hold in place (each then charged at its worst case when it
        expires, or spooled by the caller)."""
        with self._transaction():
            captured = [self._capture_locked(c.hold_id, c.actual, c.now, c.event) for c in captures]
            return [self._authorize_locked(h.lines, h.now, h.ttl, h.event, h.hold_id) for h in holds], captured

    def _capture_locked(self, hold_id: str, actual: Mapping[str, int], now: float, event: Event | None) -> bool:
        hold = self._pop_hold(hold_id, event=False)
        if hold is None:
            return False
        self._charge([(line.bucket, actual.get(line.bucket.unit, line.amount)) for line in hold.lines], now)
        if event is not None:
            self._add_event(event)
        return True

    def release(self, hold_id: str, *, now: float, event: Event | None = None) -> bool:
        with self._transaction():
            if self._pop_hold(hold_id, event=False) is None:
                return False
            if event is not None:
                self._add_event(event)
        return True

    def expire(self, now: float) -> list[ExpiredHold]:
        with self._transaction():
            return self._expire_locked(now)

    def sweep(self, now: float, *, retention_s: float | None = None) -> Swept:
        gone = tuple(self.expire(now))
        pruned, after, cutoff = 0, "", now - PRUNE_GRACE_S
        while True:
            with self._transaction():
                dead, last = self._ended_buckets(after, cutoff, SWEEP_BATCH)
                for key in dead:
                    self._forget(key)
            pruned += len(dead)
            if last is None:
                break
            after = last
        deleted = alerts_deleted = 0
        if retention_s is not None:
            while True:
                with self._transaction():
                    n = self._delete_events(now - retention_s, SWEEP_BATCH)
                deleted += n
                if n < SWEEP_BATCH:
                    break
            while True:
                with self._transaction():
                    n = self._delete_alerts(now - retention_s, SWEEP_BATCH)
                alerts_deleted += n
                if n < SWEEP_BATCH:
                    break
        return Swept(len(gone), pruned, deleted, alerts_deleted, gone)

    def grant(self, bucket: Bucket, amount: int, *, now: float, until: float) -> None:
        with self._transaction():
            self._touch(bucket, now)
            self._add_grant(bucket.key, amount, until)

    def states(self, buckets: Sequence[Bucket], *, now: float) -> list[BucketState]:
        with self._transaction():
            return [self._state(b, now) for b in buckets]

    def forget(self, keys: Sequence[str]) -> None:
        with self._transaction():
            for key in keys:
                if self._held(key) == 0:
                    self._forget(key)

    @abstractmethod
    def _forget(self, key: str) -> None: ...

    def record(self, event: Event, *, alerts: Sequence[AlertMark] = ()) -> None:
        with self._transaction():
            self._add_event(event)
            if alerts:
                self._add_alerts(alerts, event.ts)

    # -- records shared by every process on the store (approvals, virtual keys) ----------------

    def put_record(self, kind: str, key: str, value: str, *, expires_at: float | None = None,
                   alerts: Sequence[AlertMark] = ()) -> None:
        now = time.time() if alerts else 0.0
        with self._transaction():
            self._put_record(kind, key, value, expires_at)
            if alerts:
                self._add_alerts(alerts, now)

    def get_record(self, kind: str, key: str, *, now: float) -> str | None:
        with self._transaction():
            return self._get_record(kind, key, now)

    def take_record(self, kind: str, key: str, *, now: float) -> str | None:
        with self._transaction():
            value = self._get_record(kind, key, now)
            if value is not None:
                self._delete_record(kind, key)
            return value

    def delete_record(self, kind: str, key: str) -> None:
        with self._transaction():
            self._delete_record(kind, key)

    @abstractmethod
    def _put_record(self, kind: str, key: str, value: str, expires_at: float | None) -> None: ...

    @abstractmethod
    def _get_record(self, kind: str, key: str, now: float) -> str | None: ...

    @abstractmethod
    def _delete_record(self, kind: str, key: str) -> None: ...

    # -- the audit log ---------------------------------------------------------------------------

    def append_audit(self, chain: str, first_seq: int, entries: Sequence[str]) -> None:
        if first_seq < 1:
            raise ValueError(f"audit seqs start at 1, not {first_seq}")
        with self._transaction():
            have = self._audit_len(chain)
            if have == first_seq - 1:
                if entries:
                    self._audit_add(chain, first_seq, entries)
                return
            if have >= first_seq - 1 + len(entries) and self._audit_range(chain, first_seq - 1, len(entries)) == list(
                    entries):
                return  # a retry of an append that went through
            raise audit_conflict(chain, have, first_seq, len(entries))

    def put_checkpoint(self, chain: str, checkpoint: str) -> None:
        with self._transaction():
            self._add_checkpoint(chain, checkpoint)

    @abstractmethod
    def _audit_len(self, chain: str) -> int:
        """How many entries ``chain`` holds (its seqs are 1 … that, with no gap)."""

    @abstractmethod
    def _audit_range(self, chain: str, after_seq: int, limit: int | None) -> list[str]:
        """Up to ``limit`` entries of ``chain`` with seq above ``after_seq``, in seq order."""

    @abstractmethod
    def _audit_add(self, chain: str, first_seq: int, entries: Sequence[str]) -> None: ...

    @abstractmethod
    def _add_checkpoint(self, chain: str, checkpoint: str) -> None: ...

    # -- primitives a backend provides (called inside _transaction) ---------------------------

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[None]:
        """Serialize the enclosed primitives against every other writer of this store."""

    @abstractmethod
    def _state(self, bucket: Bucket, now: float) -> BucketState:
        """Spent inside the bucket's window (and when its oldest counted slot leaves), held, granted."""

    @abstractmethod
    def _held(self, key: str) -> int: ...

    @abstractmethod
    def _put_hold(self, hold: _Hold) -> None:
        """Place ``hold`` on its buckets and list them (as :meth:`_touch`), with their current
        limit and window: the sweep prunes by what the policy says now, not what it first said."""

    @abstractmethod
    def _pop_hold(self, hold_id: str, *, event: bool = True) -> _Hold | None:
        """Remove a hold from its buckets and return it; ``event=False`` when the caller does not
        need the event kept with it (a capture or a release has its own), which a backend that stores
        it as text may then leave unread."""

    @abstractmethod
    def _stale_holds(self, now: float) -> Iterator[str]: ...

    @abstractmethod
    def _charge(self, charges: Sequence[tuple[Bucket, int]], now: float) -> None:
        """Add each amount to its bucket's spend at ``now`` (one call for all of a hold's lines)."""

    @abstractmethod
    def _add_grant(self, key: str, amount: int, until: float) -> None: ...

    @abstractmethod
    def _add_event(self, event: Event) -> None: ...

    @abstractmethod
    def _touch(self, bucket: Bucket, now: float) -> None:
        """Remember that ``bucket`` exists (for status listings and the sweep); :meth:`_put_hold`
        does the same for every bucket of its hold."""

    @abstractmethod
    def _ended_buckets(self, after: str, cutoff: float, n: int) -> tuple[list[str], str | None]:
        """Look at up to ``n`` listed buckets with keys above ``after``, in key order: the keys of
        those that may be pruned (:meth:`Bucket.ended` at ``cutoff``; nothing held; no hold naming
        them; no grant live after ``cutoff``), and the last key looked at (None: no more)."""

    @abstractmethod
    def _delete_events(self, before: float, n: int) -> int:
        """Delete up to ``n`` of the oldest events with ``ts < before``; how many went."""

    @abstractmethod
    def _add_alerts(self, marks: Sequence[AlertMark], now: float) -> None:
        """Write each mark to the outbox as a new pending alert (created and due at ``now``) unless
        an alert with its key is there already, whatever its status: insert-if-absent, so a key is
        written once however many requests, processes and instances cross the same mark."""

    @abstractmethod
    def _delete_alerts(self, before: float, n: int) -> int:
        """Delete up to ``n`` of the oldest settled (:data:`SETTLED_ALERT_STATUSES`) alerts created
        before ``before``; how many went. Pending alerts stay, however old."""

    # -- shared logic -------------------------------------------------------------------------

    def _expire_locked(self, now: float) -> list[ExpiredHold]:
        out = []
        for hid in list(self._stale_holds(now)):
            hold = self._pop_hold(hid)
            if hold is None:
                continue
            charged: dict[str, int] = {}
            self._charge([(line.bucket, line.amount) for line in hold.lines], now)
            for line in hold.lines:
                charged[line.bucket.unit] = max(charged.get(line.bucket.unit, 0), line.amount)
            ev = None
            if hold.event is not None:
                e = hold.event
                ev = Event(now, "expired", e.decision_id, e.model, e.provider,
                           charged.get("usd", e.cost), e.input_tokens, e.output_tokens, True, e.dims)
                self._add_event(ev)
            out.append(ExpiredHold(hid, charged, ev))
        return out


def audit_conflict(chain: str, have: int, first_seq: int, n: int) -> StoreError:
    """The error of an append that neither extends the chain nor repeats what it holds: two writers
    on one chain, or a writer that lost track of its own length."""
    return StoreError(f"audit chain {chain!r} holds {have} entries: cannot append {n} at seq {first_seq} "
                      f"(expected seq {have + 1}, or a repeat of entries already there)")


def serialize_hold(hold: _Hold) -> tuple[str, str | None]:
    """(lines JSON, event JSON) for backends that store holds as text."""
    lines = fastjson.dumps([[ln.bucket.key, ln.bucket.limit, ln.bucket.window_s, ln.bucket.unit, ln.amount]
                            for ln in hold.lines])
    return lines, hold.event.to_json() if hold.event else None


def deserialize_hold(hold_id: str, expires_at: float, lines: str, event: str | None) -> _Hold:
    parsed = [Line(Bucket(k, lim, win, unit), amt) for k, lim, win, unit, amt in json.loads(lines)]
    return _Hold(hold_id, expires_at, parsed, Event.from_json(event) if event else None)
