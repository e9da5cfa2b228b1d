"""Budget leases (ledger/lease.py) on a real redis-server and on SQLite: exact to the nano-dollar, never over a limit
across instances and processes, a crashed instance's slices charged as held, few round trips."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate import ledger
from spendgate.ledger import AlertMark, Bucket, Event, Line
from spendgate.ledger.lease import LeasedLedger, LeaseSettings, Slice
from tests.redis_server import RedisServer

USD = 10**9


def _url(server: RedisServer) -> str:
    return f"{server.url}?prefix={uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["redis", "sqlite"])
def lease_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The same leases on both stores that run them: Redis (a prefix of its own) and a SQLite file."""
    if request.param == "redis":
        return _url(request.getfixturevalue("redis_server"))
    return f"sqlite:///{tmp_path}/leases.db?leases=on"


def run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(fn())


def test_hold_capture_release_are_exact_to_the_nano_dollar(lease_url: str) -> None:
    url = lease_url
    day, key = Bucket("team-day", 10 * USD), Bucket("key-day", 5 * USD, window_s=86_400)
    store = ledger.open(url)

    async def go() -> LeasedLedger:
        leased = LeasedLedger(url)
        now = time.time()
        ev = Event(now, "capture", "d1", "gpt-4o-mini", "openai", 1_234_567_891)
        first = await leased.authorize([Line(day, 1_234_567_891), Line(key, 1_234_567_891)], now=now, ttl=600,
                                       event=ev)
        second = await leased.authorize([Line(day, 7), Line(key, 7)], now=now, ttl=600)
        assert first.ok and second.ok and first.hold_id and second.hold_id
        assert leased.stats.local == 2, "both decided in memory against the slices"
        [mid_day, _] = store.states([day, key], now=now)
        assert mid_day.spent + mid_day.held >= 1_234_567_898, "the slice covers both holds in Redis"
        assert await leased.capture(first.hold_id, {"usd": 987_654_321}, now=now, event=ev)
        assert await leased.release(second.hold_id, now=now)
        await leased.flush()
        [d, k] = store.states([day, key], now=now)
        assert (d.spent, k.spent) == (987_654_321, 987_654_321), "charged the actual, once, after the batch"
        assert d.held >= 0 and d.spent + d.held <= d.limit  # type: ignore[operator]
        await leased.close()
        return leased

    leased = run(go)
    [d, k] = store.states([day, key], now=time.time())
    assert (d.spent, d.held, k.spent, k.held) == (987_654_321, 0, 987_654_321, 0), "close hands the slices back"
    captured = [e for e in store.events(0) if e.kind == "capture"]
    assert [(e.decision_id, e.cost) for e in captured] == [("d1", 1_234_567_891)], "the event logged once"
    assert leased.stats.exact == 0
    store.close()


def test_a_capture_is_charged_once_and_a_second_capture_of_the_hold_says_so(lease_url: str) -> None:
    url = lease_url
    b = Bucket("b", 100 * USD)

    async def go() -> None:
        leased = LeasedLedger(url)
        now = time.time()
        auth = await leased.authorize([Line(b, 500)], now=now, ttl=60)
        assert auth.hold_id is not None
        assert await leased.capture(auth.hold_id, {"usd": 321}, now=now)
        assert not await leased.capture(auth.hold_id, {"usd": 321}, now=now)
        await leased.close()

    run(go)
    store = ledger.open(url)
    assert store.states([b], now=time.time())[0].spent == 321
    store.close()


def test_near_the_limit_requests_are_decided_exactly_in_redis(lease_url: str) -> None:
    """Ten holds of 10 fit a limit of 100; the eleventh is refused, naming the bucket — the slice never
    lets a request through that the per-request ledger would refuse, and refuses none it would take."""
    url = lease_url
    b = Bucket("small", 100)

    async def go() -> None:
        leased = LeasedLedger(url)
        now = time.time()
        held = []
        for _ in range(10):
            auth = await leased.authorize([Line(b, 10)], now=now, ttl=60)
            assert auth.ok, auth
            held.append(auth.hold_id)
        refused = await leased.authorize([Line(b, 10)], now=now, ttl=60)
        assert not refused.ok and refused.refused == ("small",)
        st_ = refused.state("small")
        assert st_.spent + st_.held == 100
        assert leased.stats.exact >= 1, "the bucket's last room was decided per request"
        assert leased.stats.by_reason.get("short") == 1, \
            "one request found its slice short; the next went straight to the per-request path"
        for hid in held[:3]:
            assert hid is not None and await leased.capture(hid, {"usd": 4}, now=now)
        again = await leased.authorize([Line(b, 18)], now=now, ttl=60)
        assert again.ok, "what the captures freed (3 x 6) is there for the next request"
        assert not (await leased.authorize([Line(b, 1)], now=now, ttl=60)).ok
        await leased.close()

    run(go)
    store = ledger.open(url)
    s = store.states([b], now=time.time())[0]
    assert (s.spent, s.spent + s.held) == (12, 12 + 7 * 10 + 18)
    store.close()


def test_a_slice_stops_below_the_next_alert_mark_and_the_mark_fires_once(lease_url: str) -> None:
    url = lease_url
    b = Bucket("alerting", 1000)
    mark = AlertMark("alerting|day|0.5", '{"type": "threshold"}', at=500)
    store = ledger.open(url)

    async def go() -> None:
        leased = LeasedLedger(url, settings=LeaseSettings(min_requests=100))
        now = time.time()
        for i in range(60):
            auth = await leased.authorize([Line(b, 10, (mark,))], now=now, ttl=60)
            assert auth.ok
            s = store.states([b], now=now)[0]
            assert s.spent + s.held < 500 or i >= 49, "no slice reaches the mark before a request does"
            fired = [a.key for a in store.alerts()]
            assert fired == ([] if i < 49 else [mark.key]), (i, s)
        await leased.close()

    run(go)
    assert [a.key for a in store.alerts()] == [mark.key]
    store.close()


def test_a_line_without_its_limit_is_never_leased_past_it(lease_url: str) -> None:
    """An approval's (or a forced request's) line comes without the bucket's limit: it goes to the
    per-request path, which places exactly its hold, never a slice past the limit."""
    url = lease_url
    b = Bucket("approved", 100)

    async def go() -> None:
        leased = LeasedLedger(url)
        now = time.time()
        assert (await leased.authorize([Line(b, 90)], now=now, ttl=60)).ok
        from dataclasses import replace
        open_line = Line(replace(b, limit=None), 50)
        auth = await leased.authorize([open_line], now=now, ttl=60)
        assert auth.ok and leased.stats.by_reason.get("open") == 1
        await leased.flush()
        s = ledger.open(url).states([b], now=now)[0]
        assert s.spent + s.held == 140, "the 90 and the approved 50, and no slice past the limit"
        await leased.close()

    run(go)


async def _drive(url: str, key: str, limit: int, n: int, seed: int, ttl: float = 60.0) -> int:
    """Run ``n`` requests, 8 at a time, through one LeasedLedger on the bucket; the total captured."""
    if True:
        rng = random.Random(seed)
        leased = LeasedLedger(url)
        b = Bucket(key, limit)
        total = 0

        async def one() -> int:
            amount = rng.randint(1, 40)
            auth = await leased.authorize([Line(b, amount)], now=time.time(), ttl=ttl)
            await asyncio.sleep(0)
            if not auth.ok or auth.hold_id is None:
                return 0
            if rng.random() < 0.2:
                await leased.release(auth.hold_id, now=time.time())
                return 0
            actual = rng.randint(0, amount)
            assert await leased.capture(auth.hold_id, {"usd": actual}, now=time.time())
            return actual

        for _ in range(n // 8):
            total += sum(await asyncio.gather(*(one() for _ in range(8))))
        await leased.close()
        return total


def _hammer(url: str, key: str, limit: int, n: int, seed: int) -> int:
    return asyncio.run(_drive(url, key, limit, n, seed))


class _Sampler:
    """Reads the bucket from Redis, as fast as it can, on a thread: every reading must keep the limit."""

    def __init__(self, url: str, bucket: Bucket) -> None:
        self.store, self.bucket = ledger.open(url), bucket
        self.worst, self.samples = -(10**18), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.store.states([self.bucket], now=time.time())[0]
            self.worst = max(self.worst, s.spent + s.held - (s.limit or 0) - s.granted)
            self.samples += 1

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.store.close()


def test_instances_on_one_loop_never_take_a_bucket_past_its_limit(lease_url: str) -> None:
    url, limit = lease_url, 3000
    b = Bucket("shared", limit)

    async def go() -> list[int]:
        return list(await asyncio.gather(*(_drive(url, "shared", limit, 400, seed) for seed in range(4))))

    with _Sampler(url, b) as sampler:
        totals = run(go)
    store = ledger.open(url)
    s = store.states([b], now=time.time())[0]
    assert sampler.samples > 10 and sampler.worst <= 0, f"over the limit by {sampler.worst} at some instant"
    assert s.held == 0 and s.spent == sum(totals), "every capture charged once, every slice handed back"
    assert s.spent > limit // 2, "the instances used the budget"
    store.close()


def test_two_processes_never_take_a_bucket_past_its_limit(lease_url: str) -> None:
    url, limit = lease_url, 4000
    b = Bucket("shared", limit)
    ctx = multiprocessing.get_context("spawn")
    with _Sampler(url, b) as sampler, ctx.Pool(2) as pool:
        totals = pool.starmap(_hammer, [(url, "shared", limit, 600, seed) for seed in (1, 2)])
    store = ledger.open(url)
    s = store.states([b], now=time.time())[0]
    assert sampler.samples > 10 and sampler.worst <= 0, f"over the limit by {sampler.worst} at some instant"
    assert s.held == 0 and s.spent == sum(totals)
    store.close()


CRASHER = """
import asyncio, sys, time
from spendgate.ledger import Bucket, Line, Event
from spendgate.ledger.lease import LeasedLedger, LeaseSettings

async def main():
    # nothing is written in the background: what Redis holds when the process dies is what it printed
    leased = LeasedLedger(sys.argv[1], settings=LeaseSettings(ttl=30.0, flush_s=3600, renew_s=3600, batch=10**6))
    b = Bucket("crashy", 10**9)
    now = time.time()
    for i in range(20):
        auth = await leased.authorize([Line(b, 1000)], now=now, ttl=600)
        assert auth.ok
        if i < 15:
            await leased.capture(auth.hold_id, {"usd": 700},
                                 now=now, event=Event(now, "capture", f"d{i}", "m", "openai", 700))
    print(leased._slices["crashy"].lease, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_crashed_instances_slices_expire_and_are_charged_as_held(lease_url: str) -> None:
    url = lease_url
    b = Bucket("crashy", 10**9)
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, url], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    try:
        assert proc.stdout is not None
        lease = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = ledger.open(url)
    before = store.states([b], now=time.time())[0]
    assert before.held == lease and before.spent + lease >= 15 * 700 + 5 * 1000, \
        "the slice is held in Redis: it covers the 5 open holds and the captures not yet written"
    assert store.expire(time.time() + 1) == [], "a live lease's TTL is not over yet"
    gone = store.expire(time.time() + 31)
    assert len(gone) == 1 and gone[0].charged == {"usd": lease}
    after = store.states([b], now=time.time() + 31)[0]
    assert (after.spent, after.held) == (before.spent + lease, 0), "charged in full as held, never dropped"
    [ev] = [e for e in store.events(0) if e.kind == "expired"]
    assert ev.estimated and ev.cost == lease and ev.model == "(budget lease)"
    store.close()


def test_far_from_the_limit_a_request_costs_under_005_round_trips(redis_server: RedisServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.asyncio.connection

    url = _url(redis_server)
    buckets = [Bucket("global", 1000 * USD), Bucket("key-day", 100 * USD, window_s=86_400),
               Bucket("session-hour", 10 * USD, window_s=3600)]
    sent: list[bytes] = []
    real = redis.asyncio.connection.Connection.send_packed_command

    async def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        await real(self, command, check_health)

    monkeypatch.setattr(redis.asyncio.connection.Connection, "send_packed_command", counting)
    n = 2000

    async def go() -> None:
        leased = LeasedLedger(url)
        for i in range(n):
            now = time.time()
            auth = await leased.authorize([Line(b, 300_000) for b in buckets], now=now, ttl=600)
            assert auth.ok and auth.hold_id
            await asyncio.sleep(0)
            ev = Event(now, "capture", f"d{i}", "gpt-4o-mini", "openai", 120_000)
            assert await leased.capture(auth.hold_id, {"usd": 120_000}, now=now, event=ev)
        await leased.close()

    run(go)
    trips = [c for c in sent if b"EVALSHA" in c or b"EVAL" in c]
    assert len(trips) <= 0.05 * n, f"{len(trips)} round trips for {n} requests"
    store = ledger.open(url)
    assert [s.spent for s in store.states(buckets, now=time.time())] == [n * 120_000] * 3
    assert len([e for e in store.events(0) if e.kind == "capture"]) == n
    store.close()


def test_the_engine_decides_and_charges_through_leases(lease_url: str) -> None:
    from spendgate.engine import Engine
    from spendgate.policy import default_policy
    from spendgate.request import Identity, Request

    url = lease_url
    store = ledger.open(url)
    engine = Engine(default_policy(), store)
    req = Request("openai", "/v1/chat/completions",
                  {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
                  Identity(session="s1"))

    async def go() -> list[int]:
        leased = LeasedLedger(url)
        engine.aledger = leased
        costs = []
        try:
            for _ in range(30):
                d = await engine.adecide(req)
                assert d.allowed and d.hold_id
                charge = await engine.acapture(d, {"prompt_tokens": 9, "completion_tokens": 17})
                costs.append(charge.cost_nanos)
            assert leased.stats.local >= 29, leased.stats
        finally:
            await leased.close()
        return costs

    costs = run(go)
    known = store.known_buckets()
    states = store.states(known, now=time.time())
    assert states and all(s.spent == sum(costs) and s.held == 0 for s in states if s.unit == "usd")
    store.close()


# -- the slice's local accounting, against a model of the script -----------------------------------


class _Script:
    """What lua/lease.lua does to one line, as far as the slice's safety depends on it."""

    def __init__(self) -> None:
        self.have = 0
        self.done = 0

    def apply(self, total: int, floor: int, want: int, grow_to: int) -> int:
        c = max(0, total - self.done)
        self.done = max(self.done, total)
        keep = max(floor, min(want, max(self.have - c, 0)))
        new = max(keep, min(want, grow_to)) if want > keep else keep
        self.have = new
        if new == 0:
            self.done = 0  # the line is dropped with its total
        return new


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["take", "capture", "release", "sync", "send", "land", "fail"]),
                          st.integers(0, 50), st.integers(0, 60), st.integers(0, 200)), max_size=80))
def test_a_slice_never_covers_more_holds_than_redis_holds_for_it(ops: list[tuple[str, int, int, int]]) -> None:
    s = Slice(Bucket("p", 10**6), 0.0)
    redis_ = _Script()
    local: list[int] = []
    pending: tuple[int, int, int] | None = None
    for op, a, b, c in ops:
        if op == "take":
            if s.take(a):
                local.append(a)
        elif op == "capture" and local:
            held = local.pop(a % len(local))
            s.settle(held, min(held, b))  # captures within their holds
        elif op == "release" and local:
            s.drop(local.pop(a % len(local)))
        elif op == "send" and pending is None:
            pending = s.send(c)
        elif op in ("land", "fail", "sync") and pending is not None:
            total, floor, want = pending
            pending = None
            if op == "fail" and a % 2:
                s.failed()  # lost before the script ran
            else:
                new = redis_.apply(total, floor, want, c)
                if op == "fail":
                    s.failed()  # ran, but the reply was lost
                else:
                    s.landed(new)
        # Redis covers every local hold and every capture it has not charged yet
        unsent = s.captured - redis_.done
        assert sum(local) == s.holds
        assert s.holds + unsent <= redis_.have, (s.holds, unsent, redis_.have)


def test_a_local_hold_past_its_ttl_is_charged_as_held_and_flagged(lease_url: str) -> None:
    url = lease_url
    b = Bucket("ttl", 10 * USD)
    clock = [time.time()]

    async def go() -> None:
        leased = LeasedLedger(url, clock=lambda: clock[0])
        ev = Event(clock[0], "capture", "slow", "gpt-4o", "openai", 5000)
        auth = await leased.authorize([Line(b, 5000)], now=clock[0], ttl=60, event=ev)
        assert auth.hold_id is not None
        clock[0] += 61
        await leased.flush()
        assert not await leased.capture(auth.hold_id, {"usd": 10}, now=clock[0]), "expired: its charge was the hold"
        nxt = await leased.authorize([Line(b, 1)], now=clock[0], ttl=60)
        assert [(g.hold_id, g.charged) for g in nxt.expired] == [(auth.hold_id, {"usd": 5000})]
        assert nxt.hold_id is not None and await leased.release(nxt.hold_id, now=clock[0])
        await leased.close()

    run(go)
    store = ledger.open(url)
    assert store.states([b], now=time.time())[0].spent == 5000
    [expired] = [e for e in store.events(0) if e.kind == "expired"]
    assert (expired.decision_id, expired.cost, expired.estimated) == ("slow", 5000, True)
    store.close()


def test_an_instance_that_outlived_its_lease_charges_nothing_twice(lease_url: str) -> None:
    """A stall past the lease's TTL: another process expires the hold and charges every slice in full.
    The stalled instance's holds then read as expired, its waiting captures are not charged again, and
    it leases afresh."""
    url = lease_url
    b = Bucket("stalled", 10 * USD)
    store = ledger.open(url)

    async def go() -> None:
        leased = LeasedLedger(url, settings=LeaseSettings(ttl=30.0))
        now = time.time()
        a1 = await leased.authorize([Line(b, 1000)], now=now, ttl=600)
        a2 = await leased.authorize([Line(b, 1000)], now=now, ttl=600)
        assert a1.hold_id and a2.hold_id and await leased.capture(a1.hold_id, {"usd": 600}, now=now)
        lease = leased._slices["stalled"].lease
        gone = store.expire(time.time() + 31)
        assert [g.charged for g in gone] == [{"usd": lease}]
        await leased.flush()
        assert leased.stats.gone == 1
        assert not await leased.capture(a2.hold_id, {"usd": 700}, now=now), "covered by the expired slice"
        a3 = await leased.authorize([Line(b, 1000)], now=now, ttl=600)
        assert a3.hold_id and await leased.capture(a3.hold_id, {"usd": 250}, now=now)
        await leased.close()
        s = store.states([b], now=time.time())[0]
        assert (s.spent, s.held) == (lease + 250, 0)

    run(go)
    store.close()


@pytest.mark.parametrize(("query", "seconds"), [("", None), ("?leases=off", None), ("?leases=on", 2.0),
                                                ("?prefix=x&leases=1&lease_s=0.5", 0.5)])
def test_leases_are_turned_on_in_the_store_url(query: str, seconds: float | None,
                                               redis_server: RedisServer) -> None:
    from spendgate.ledger.lease import lease_settings

    got = lease_settings(redis_server.url + query)
    assert (got.seconds if got else None) == seconds
    store = ledger.open(redis_server.url + query)  # redis-py never sees spendgate's own options
    store.check(time.time())
    store.close()


@pytest.mark.parametrize("query", ["?leases=maybe", "?leases=on&lease_s=0", "?lease_s=2"])
def test_a_bad_lease_option_is_an_error_naming_it(query: str) -> None:
    from spendgate.errors import StoreError
    from spendgate.ledger.lease import lease_settings

    with pytest.raises(StoreError, match="lease"):
        lease_settings("redis://127.0.0.1:6379/0" + query)


def test_a_request_takes_from_every_slice_or_from_none(lease_url: str) -> None:
    url = lease_url
    wide, narrow = Bucket("wide", 100 * USD), Bucket("narrow", 25)

    async def go() -> None:
        leased = LeasedLedger(url)
        now = time.time()
        kept = []
        for _ in range(2):
            auth = await leased.authorize([Line(wide, 10), Line(narrow, 10)], now=now, ttl=60)
            assert auth.ok
            kept.append(auth.hold_id)
        before = leased._slices["wide"].holds
        refused = await leased.authorize([Line(wide, 10), Line(narrow, 10)], now=now, ttl=60)
        assert not refused.ok and refused.refused == ("narrow",)
        assert leased._slices["wide"].holds == before, "the refused request took nothing from wide's slice"
        assert (await leased.authorize([Line(wide, 10)], now=now, ttl=60)).ok
        await leased.close()
        s = ledger.open(url).states([wide, narrow], now=now)
        assert [x.held for x in s] == [30, 20], "three holds on wide, two on narrow, no slice left"

    run(go)
