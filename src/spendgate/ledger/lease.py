"""Budget leases: the store off the hot path while a bucket is far from its limit.

Written for Redis (``redis://…?leases=on``), where each authorize and capture is a round trip; the
same leases run on SQLite (``sqlite:///…?leases=on``), where they take the commit before each send
off the request path. Below, "Redis" stands for either: the batch is one ``EVALSHA`` of
``lua/lease.lua`` there, one transaction of :meth:`SQLiteLedger.lease_sync` here, same rules.

An instance holds, for each bucket its requests fall under, a *lease*: a slice of the bucket's
headroom placed in Redis as an ordinary hold (one hold per instance, one line per bucket), so every
other instance, ``spendgate status`` and expiry count it as held. Requests are authorized in memory
against the slices of all their buckets (all or nothing, as the ledger does); captures settle into the
slices and are written back in batches, one ``EVALSHA`` (``lua/lease.lua``) for many requests, which
also renews the hold and resizes every slice. So in Redis, at every instant,
``captured + held (leases included) <= limit + granted`` across all instances — the ledger's
invariant, with the slices as the holds.

A slice is sized from the bucket's recent rate at this instance (:attr:`LeaseSettings.seconds` of
traffic, at least a few requests' worth), capped in the script by half the bucket's room divided by
the instances leasing it, and stopped below the bucket's next alert mark (the mark then fires on the
per-request path, as without leases). Near the limit the cap shrinks the slice below what a request
needs: that request, and the bucket's next ones for :attr:`LeaseSettings.exact_s`, go to the
ordinary per-request authorize in Redis (after the slice's free part is handed back), so a bucket's
last dollars are decided exactly, at the cost of one more round trip for the request that finds its
slice short. A crashed instance's hold stops being renewed and expires: every slice is charged in
full (what it covered, plus its unused part), flagged like any expired hold.

Approvals, forced requests, refusals (and their ``on_refusal`` alerts) and grants take the
per-request path: a line whose limit differs from its slice's is never decided locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import redis

from spendgate.errors import StoreError
from spendgate.ledger.base import (
    Authorization,
    Bucket,
    BucketState,
    Event,
    ExpiredHold,
    LeaseEntry,
    LeaseReply,
    Line,
    new_hold_id,
)
from spendgate.ledger.group import GroupCommit
from spendgate.ledger.redis import AsyncRedisLedger, _expired_holds, _meta
from spendgate.ledger.sqlite import SQLiteLedger

log = logging.getLogger("spendgate.lease")
#: buckets whose limit is remembered (then forgotten all at once: a bucket forgotten is merely leased
#: again on its next line with a limit)
MAX_KNOWN = 100_000


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """How leases are sized and written back (the defaults suit a proxy instance)."""

    #: a slice covers this many seconds of the bucket's traffic at this instance
    seconds: float = 2.0
    #: ... and at least this many of the largest recent request on it
    min_requests: int = 8
    #: the lease hold's TTL in Redis: a crashed instance's slices are charged after this long
    ttl: float = 30.0
    #: renew (rewrite) the hold at least this often, so it never lapses while the instance lives
    renew_s: float = 5.0
    #: write captures back after at most this long (a capture waiting here is covered by the slice in
    #: Redis meanwhile: the interval trades how soon others see spent, not safety, for round trips) ...
    flush_s: float = 0.25
    #: ... or once this many captures and events wait
    batch: int = 64
    #: a slice unused this long is handed back
    idle_s: float = 5.0
    #: a bucket whose slice could not cover a request is decided per request for this long
    exact_s: float = 1.0
    #: how fast a bucket's rate estimate forgets (half-life, seconds)
    half_life_s: float = 1.0


class Slice:
    """One bucket's lease at this instance, in local accounting (no I/O: property-tested).

    ``lease`` is what the slice holds in Redis as last written; ``holds`` the local holds it covers;
    ``captured - acked`` the captures not yet charged in Redis (they stay inside the slice until a
    batch charges them). A request fits when ``holds + unsent captures + amount <= capacity``. While
    a batch is in flight (``inflight``: captured total and want sent) the capacity is what the
    script is sure to leave: ``min(lease, want + sent captures)``, so a reply can never find more
    local holds than the slice it sets.
    """

    __slots__ = ("acked", "bucket", "captured", "exact_until", "holds", "inflight", "last_used", "lease",
                 "marks", "max_amount", "meta", "rate_acc", "rate_t", "state")

    def __init__(self, bucket: Bucket, now: float) -> None:
        self.bucket = bucket
        self.meta = _meta(bucket)
        self.lease = 0
        self.holds = 0
        self.captured = 0
        self.acked = 0
        self.inflight: tuple[int, int] | None = None
        self.marks: list[list[Any]] = []
        #: (spent, held, granted, frees_at) as of the last batch's reply
        self.state: tuple[int, int, int, float | None] = (0, 0, 0, None)
        self.rate_acc = 0.0
        self.rate_t = now
        self.max_amount = 0
        self.last_used = now
        self.exact_until = 0.0

    @property
    def capacity(self) -> int:
        if self.inflight is None:
            return self.lease
        total, want = self.inflight
        return min(self.lease, want + total - self.acked)

    @property
    def free(self) -> int:
        # (capacity written out: asked twice per line of every request)
        if self.inflight is None:
            return self.lease - self.holds - self.captured + self.acked
        total, want = self.inflight
        return min(self.lease, want + total - self.acked) - self.holds - self.captured + self.acked

    def take(self, amount: int) -> bool:
        if amount > self.free:
            return False
        self.holds += amount
        return True

    def settle(self, held: int, actual: int) -> None:
        """A local hold of ``held`` captured at ``actual`` (may be more: as without leases, an
        overrun capture is charged in full)."""
        self.holds -= held
        self.captured += actual

    def drop(self, held: int) -> None:
        self.holds -= held

    def send(self, want: int) -> tuple[int, int, int]:
        """Start a batch: (captured total, floor, want) for the script."""
        self.inflight = (self.captured, want)
        return self.captured, self.holds, want

    def landed(self, lease: int) -> None:
        assert self.inflight is not None
        self.acked = self.inflight[0]
        self.lease = lease
        self.inflight = None
        if lease == 0:
            # the script dropped the line, and with it the total it had charged: count afresh (no
            # capture can have come in meanwhile: a slice sent with nothing held admits nothing)
            self.captured -= self.acked
            self.acked = 0

    def failed(self) -> None:
        """The batch's outcome is unknown: keep only what the script was sure to leave (a resend of
        the cumulative total charges each capture once)."""
        self.lease = self.capacity
        self.inflight = None

    def used_rate(self, now: float, half_life: float) -> float:
        """Recent amount per second at this instance (exponentially decayed)."""
        self._decay(now, half_life)
        return self.rate_acc * math.log(2) / half_life

    def note(self, amount: int, now: float, half_life: float) -> None:
        self._decay(now, half_life)
        self.rate_acc += amount
        self.max_amount = max(self.max_amount, amount)
        self.last_used = now

    def _decay(self, now: float, half_life: float) -> None:
        dt = now - self.rate_t
        if dt > 0:
            self.rate_acc *= 0.5 ** (dt / half_life)
            self.rate_t = now


def lease_settings(url: str) -> LeaseSettings | None:
    """The leases a store URL (Redis or SQLite) asks for: ``?leases=on`` (``1``, ``true``, ``yes``) turns them on,
    ``&lease_s=N`` sizes a slice at N seconds of traffic (default 2); None when they are off (the
    default: every request authorized in Redis). Anything else is an error naming the option."""
    from urllib.parse import parse_qsl, urlsplit

    query = dict(parse_qsl(urlsplit(url).query))
    raw = query.get("leases", "off").lower()
    if raw not in ("on", "1", "true", "yes", "off", "0", "false", "no"):
        raise StoreError(f"store URL option leases={raw!r}: expected on or off")
    if raw in ("off", "0", "false", "no"):
        if "lease_s" in query:
            raise StoreError("store URL option lease_s is set but leases are off (add leases=on)")
        return None
    if "lease_s" not in query:
        return LeaseSettings()
    try:
        seconds = float(query["lease_s"])
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 60:
        raise StoreError(f"store URL option lease_s={query['lease_s']!r}: expected seconds, above 0 and at most 60")
    return LeaseSettings(seconds=seconds)


@dataclass(slots=True)
class _Local:
    """A hold decided in memory: the slices it took from, and what it took."""

    parts: list[tuple[Slice, int]]
    expires_at: float
    event: Event | None
    epoch: int


@dataclass(slots=True)
class LeaseStats:
    """What the leases did (for the scale bench and tests)."""

    local: int = 0
    exact: int = 0
    syncs: int = 0
    gone: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class _RedisBatches:
    """A batch as one ``EVALSHA`` of ledger.lua with lease.lua spliced in."""

    def __init__(self, exact: AsyncRedisLedger) -> None:
        self.exact = exact
        self._script = exact._r.register_script(_lease_lua())

    async def sync(self, now: float, ttl: float, hold_id: str, expect: bool, entries: Sequence[LeaseEntry],
                   hold_event: str, events: Sequence[tuple[float, str]]) -> LeaseReply:
        payload = [[e.bucket.key, -1 if e.bucket.limit is None else e.bucket.limit, e.bucket.window_s or 0,
                    e.bucket.unit, e.bucket.slot_s, _meta(e.bucket), e.total, e.floor, e.want, e.need, e.marks]
                   for e in entries]
        flat: list[str] = []
        for ts, ev in events:
            flat += [repr(ts), ev]
        args = ["lease", self.exact._p, repr(now), repr(ttl), hold_id, "1" if expect else "0", _dumps(payload),
                hold_event, *flat]
        try:
            res = await self._script(keys=self.exact._keys, args=args)
        except (redis.RedisError, OSError) as exc:
            raise StoreError(f"Redis store {self.exact._name}: {exc}") from exc
        if res[0] == "gone":
            return LeaseReply(True, [], _expired_holds(now, res[1:]))
        rows: list[tuple[int, int, int, int, float | None]] = []
        for i in range(len(entries)):
            lease, spent, held, granted, frees = res[1 + 5 * i: 6 + 5 * i]
            rows.append((int(lease), int(spent), int(held), int(granted), None if float(frees) < 0 else float(frees)))
        return LeaseReply(False, rows, _expired_holds(now, res[1 + 5 * len(entries):]))


class _SQLiteBatches:
    """A batch as one transaction on the SQLite store the per-request path commits to."""

    def __init__(self, exact: GroupCommit) -> None:
        assert isinstance(exact.ledger, SQLiteLedger)
        self.exact = exact
        self.store = exact.ledger

    async def sync(self, now: float, ttl: float, hold_id: str, expect: bool, entries: Sequence[LeaseEntry],
                   hold_event: str, events: Sequence[tuple[float, str]]) -> LeaseReply:
        return self.store.lease_sync(now, ttl, hold_id, expect, entries, hold_event, events)


class LeasedLedger:
    """The engine's :class:`~spendgate.engine.AsyncLedger` over a Redis or SQLite store, with budget
    leases.

    Create it inside the running loop that will use it, and :meth:`close` it there (its slices go
    back to the buckets). ``exact`` is the per-request path: an :class:`AsyncRedisLedger`, or a
    :class:`GroupCommit` over the SQLite store (made from ``url`` when not given).
    """

    def __init__(self, url: str, *, exact: AsyncRedisLedger | GroupCommit | None = None,
                 settings: LeaseSettings | None = None, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._owned: SQLiteLedger | None = None
        if exact is None and url.startswith("sqlite:"):
            self._owned = SQLiteLedger(url)
            exact = GroupCommit(self._owned)
        self.exact: AsyncRedisLedger | GroupCommit = exact or AsyncRedisLedger(url)
        self._batches = _SQLiteBatches(self.exact) if isinstance(self.exact, GroupCommit) \
            else _RedisBatches(self.exact)
        self.settings = settings or LeaseSettings()
        self.clock = clock
        self.stats = LeaseStats()
        self._slices: dict[str, Slice] = {}
        self._holds: dict[str, _Local] = {}
        self._gone: set[str] = set()
        #: the latest limit each bucket was decided under: a line without one on such a bucket is an
        #: approval's or a forced request's, never leased
        self._limited: dict[str, int] = {}
        self._events: list[tuple[float, str]] = []
        self._expired: list[ExpiredHold] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._epoch = 0
        self._new_hold()
        self._dirty_since: float | None = None
        self._last_sync = 0.0
        self._next_expiry_scan = 0.0

    def _new_hold(self) -> None:
        self._hold_id = "lease-" + new_hold_id()
        self._expect = False
        self._hold_event = Event(self.clock(), "capture", self._hold_id, "(budget lease)", "", 0,
                                 estimated=True).to_json()

    # -- the engine's calls ----------------------------------------------------------------------

    async def authorize(self, lines: Sequence[Line], *, now: float, ttl: float, event: Event | None = None,
                        hold_id: str | None = None) -> Authorization:
        self._start()
        fast = self._try_local(lines, now, ttl, event, hold_id)
        if fast is not None:
            return fast
        why = self._why_exact(lines, now)
        if why is None:
            async with self._lock:
                fast = self._try_local(lines, now, ttl, event, hold_id)  # a batch may have refilled them
                if fast is not None:
                    return fast
                need = {ln.bucket.key: ln.amount for ln in lines}
                await self._sync(self.clock(), need)
                fast = self._try_local(lines, now, ttl, event, hold_id)
                if fast is not None:
                    return fast
                for ln in lines:
                    s = self._slices.get(ln.bucket.key)
                    if s is None and ln.bucket.limit is not None:  # handed back whole: remember why
                        s = self._slices[ln.bucket.key] = Slice(ln.bucket, now)
                    if s is not None and s.free < ln.amount:
                        s.exact_until = now + self.settings.exact_s
            why = "short"
        elif any((s := self._slices.get(ln.bucket.key)) is not None and s.exact_until > now
                 and (s.lease > s.holds or s.captured > s.acked) for ln in lines):
            # the slice of a bucket decided per request still holds room or captures not charged
            # yet: hand them back first, or the request is weighed against this instance's own slice
            async with self._lock:
                await self._sync(self.clock(), {})
        self.stats.exact += 1
        self.stats.by_reason[why] = self.stats.by_reason.get(why, 0) + 1
        auth = await self.exact.authorize(lines, now=now, ttl=ttl, event=event, hold_id=hold_id)
        return self._with_expired(auth)

    async def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                      event: Event | None = None) -> bool:
        local = self._holds.pop(hold_id, None)
        if local is None:
            if hold_id in self._gone:
                self._gone.discard(hold_id)
                return False
            return await self.exact.capture(hold_id, actual, now=now, event=event)
        for s, amount in local.parts:
            s.settle(amount, actual.get(s.bucket.unit, amount))
        if event is not None:
            self._log(now, event.to_json())
        else:
            self._dirty(now)
        return True

    async def release(self, hold_id: str, *, now: float, event: Event | None = None) -> bool:
        local = self._holds.pop(hold_id, None)
        if local is None:
            if hold_id in self._gone:
                self._gone.discard(hold_id)
                return False
            return await self.exact.release(hold_id, now=now, event=event)
        for s, amount in local.parts:
            s.drop(amount)
        if event is not None:
            self._log(now, event.to_json())
        return True

    async def grant(self, bucket: Bucket, amount: int, *, now: float, until: float) -> None:
        await self.exact.grant(bucket, amount, now=now, until=until)

    async def flush(self) -> None:
        """Write every capture and event waiting here to Redis now (one round trip), local holds
        past their TTL charged as held first."""
        async with self._lock:
            now = self.clock()
            self._expire_local(now)
            await self._sync(now, {})

    async def close(self) -> None:
        """Write back what waits and hand every slice back (local holds still open stay covered
        until the hold's TTL, then are charged as held)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            async with self._lock:
                await self._sync(self.clock(), {}, closing=True)
        except StoreError as exc:
            log.warning("budget leases not handed back on close (they expire in %.0f s): %s",
                        self.settings.ttl, exc)
        await self.exact.close()
        if self._owned is not None:
            self._owned.close()

    # -- deciding in memory ----------------------------------------------------------------------

    def _why_exact(self, lines: Sequence[Line], now: float) -> str | None:
        """Why a request that missed its slices is not worth a batch to refill them (None: it is)."""
        if self._closed:
            return "closed"
        for ln in lines:
            if ln.bucket.limit is None and ln.bucket.key in self._limited:
                return "open"  # an approval's or a forced request's line past a limited bucket
            s = self._slices.get(ln.bucket.key)
            if s is not None and s.exact_until > now:
                return "near-limit"
        return None

    def _try_local(self, lines: Sequence[Line], now: float, ttl: float, event: Event | None,
                   hold_id: str | None) -> Authorization | None:
        taken: list[tuple[Slice, int]] = []
        ok = True
        for ln in lines:
            b = ln.bucket
            if b.limit is None:
                if b.key in self._limited:
                    ok = False  # never lease past a limit: the per-request path decides it
                    continue
            elif self._limited.get(b.key) != b.limit:
                if len(self._limited) >= MAX_KNOWN:
                    self._limited.clear()
                self._limited[b.key] = b.limit
            s = self._slices.get(b.key)
            if s is None:
                s = self._slices[b.key] = Slice(b, now)
                ok = False
            elif b.limit != s.bucket.limit:
                # a new limit (a reload, a scope's own limit): hand the slice back, decide per request
                # for a moment, then lease again under the new limit
                s.bucket, s.meta = b, _meta(b)
                s.exact_until = now + self.settings.exact_s
                ok = False
            elif s.exact_until > now:
                ok = False
            if ln.alerts:
                marks = [[m.key, m.body, m.at] for m in ln.alerts if m.at > 0 and not m.on_refusal]
                if marks != s.marks:
                    s.marks = marks
            if ok and ln.amount > 0 and not s.take(ln.amount):
                ok = False
            if ok:
                taken.append((s, ln.amount if ln.amount > 0 else 0))
        if not ok:
            for s, amount in taken:
                s.drop(amount)
            return None
        hs = self.settings.half_life_s
        states = []
        for ln, (s, amount) in zip(lines, taken, strict=True):
            s.note(amount, now, hs)
            states.append(self._state(ln, s))
        hid = hold_id or new_hold_id()
        self._holds[hid] = _Local(taken, now + ttl, event, self._epoch)
        self.stats.local += 1
        expired: tuple[ExpiredHold, ...] = ()
        if self._expired:
            expired, self._expired = tuple(self._expired), []
        return Authorization(True, hid, tuple(states), (), expired)

    def _state(self, ln: Line, s: Slice) -> BucketState:
        """The bucket as Redis last showed it, with this slice's free part taken off what is held:
        the other instances' slices count in full, so the room reported is never more than there was
        at the last batch. An alert mark this request would seem to cross is reported as crossed
        before it (the lease never crosses an unfired mark: the script fired it when it was reached)."""
        spent, held, granted, frees = s.state
        held = max(0, held - max(0, s.free))
        for m in s.marks:
            at = m[2]
            if spent + held - ln.amount < at <= spent + held:
                held = at + ln.amount - spent
        return BucketState(ln.bucket.key, ln.bucket.unit, ln.bucket.limit, spent, held, granted, frees)

    def _with_expired(self, auth: Authorization) -> Authorization:
        if not self._expired:
            return auth
        mine, self._expired = tuple(self._expired), []
        return Authorization(auth.ok, auth.hold_id, auth.states, auth.refused, (*auth.expired, *mine))

    def _log(self, now: float, event: str) -> None:
        self._events.append((now, event))
        self._dirty(now)
        if len(self._events) >= self.settings.batch:
            self._wake.set()

    def _dirty(self, now: float) -> None:
        if self._dirty_since is None:
            self._dirty_since = now

    # -- writing back ----------------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._flusher(), name="spendgate-leases")

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            # a timer on the event, not wait_for: a cancelled wait_for can swallow the cancellation
            tick = loop.call_later(self.settings.flush_s, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                tick.cancel()
            self._wake.clear()
            now = self.clock()
            if not self._due(now):
                continue
            try:
                async with self._lock:
                    await self._sync(self.clock(), {})
            except StoreError as exc:
                log.warning("budget leases: write-back failed, retried on the next batch: %s", exc)

    def _due(self, now: float) -> bool:
        st = self.settings
        if now >= self._next_expiry_scan:
            self._expire_local(now)
            self._next_expiry_scan = now + 1.0
        if len(self._events) >= st.batch:
            return True
        if self._dirty_since is not None and now - self._dirty_since >= st.flush_s:
            return True
        if self._slices and now - self._last_sync >= st.renew_s:
            return True
        for s in self._slices.values():
            if s.lease and s.free < s.lease // 4:
                return True
            if now - s.last_used >= st.idle_s and s.lease > s.holds:
                return True
        return False

    def _expire_local(self, now: float) -> None:
        """A local hold past its TTL is charged as held, flagged, as the ledger's expiry does."""
        for hid, local in list(self._holds.items()):
            if local.expires_at > now:
                continue
            del self._holds[hid]
            self._gone.add(hid)
            charged: dict[str, int] = {}
            for s, amount in local.parts:
                s.settle(amount, amount)
                charged[s.bucket.unit] = max(charged.get(s.bucket.unit, 0), amount)
            ev = None
            if local.event is not None:
                e = local.event
                ev = Event(now, "expired", e.decision_id, e.model, e.provider, charged.get("usd", e.cost),
                           e.input_tokens, e.output_tokens, True, e.dims)
                self._log(now, ev.to_json())
            self._dirty(now)
            self._expired.append(ExpiredHold(hid, charged, ev))

    def _want(self, s: Slice, now: float, closing: bool) -> int:
        st = self.settings
        if closing or s.exact_until > now or now - s.last_used >= st.idle_s:
            return 0
        rate = s.used_rate(now, st.half_life_s)
        return max(math.ceil(rate * st.seconds), st.min_requests * s.max_amount)

    async def _sync(self, now: float, need: Mapping[str, int], closing: bool = False) -> None:
        """One round trip: charge the captures waiting, log the events, renew the hold, resize every
        slice (``need``: the amounts a request waiting here needs on top of each slice's holds)."""
        slices = list(self._slices.values())
        entries = []
        for s in slices:
            want = self._want(s, now, closing)
            extra = need.get(s.bucket.key)
            floor_need = 0
            if extra is not None:
                want = max(want, s.holds + extra)
                floor_need = s.holds + extra
            total, floor, want = s.send(want)
            entries.append(LeaseEntry(s.bucket, total, floor, want, floor_need, s.marks))
        events, self._events = self._events, []
        self._dirty_since = None
        self.stats.syncs += 1
        try:
            reply = await self._batches.sync(now, self.settings.ttl, self._hold_id, self._expect, entries,
                                             self._hold_event, events)
        except StoreError:
            for s in slices:
                s.failed()
            # resending an event is harmless in Redis (ZADD of the same member); a failed SQLite
            # transaction stored none of them
            self._events = events + self._events
            if events:
                self._dirty(now)
            raise
        except BaseException:
            for s in slices:
                s.failed()
            self._events = events + self._events
            raise
        self._last_sync = now
        if reply.gone:
            self._lapsed(slices, now)
            self._expired += reply.expired
            return
        for s, (lease, spent, held, granted, frees) in zip(slices, reply.rows, strict=True):
            s.landed(lease)
            s.state = (spent, held, granted, frees)
            if s.lease == 0 and s.holds == 0 and s.captured == s.acked and s.exact_until <= now:
                del self._slices[s.bucket.key]
        self._expect = any(s.lease > 0 for s in self._slices.values())
        self._expired += reply.expired

    def _lapsed(self, slices: Sequence[Slice], now: float) -> None:
        """The hold expired (this instance stalled past its TTL): Redis charged every slice in full,
        which covers every local hold and capture made against it. Those holds are gone (a capture
        says so, as for any expired hold); start over with a new hold."""
        self.stats.gone += 1
        log.warning("budget lease %s expired before it was renewed: its slices were charged in full",
                    self._hold_id)
        for hid in self._holds:
            self._gone.add(hid)
        self._holds.clear()
        self._events.clear()
        self._slices.clear()
        self._epoch += 1
        self._new_hold()
        del slices, now


def _dumps(doc: Any) -> str:
    import json

    return json.dumps(doc, separators=(",", ":"))


@cache
def _lease_lua() -> str:
    """ledger.lua with lease.lua's operation spliced in ahead of its dispatch, so the lease
    operation runs on the same helpers (one script, one EVALSHA)."""
    pkg = resources.files("spendgate.ledger")
    ledger = pkg.joinpath("lua/ledger.lua").read_text()
    lease = pkg.joinpath("lua/lease.lua").read_text()
    marker = "\nif op == 'authorize' then"
    at = ledger.index(marker)
    return ledger[:at] + "\n" + lease + ledger[at:]
