"""Group commit: captures of many finished requests written in one SQLite transaction, nothing lost.

The promise under test: a capture's caller hears "captured" only after its transaction committed;
a batch charges exactly what the same captures one by one would have; a process killed with
captures still queued leaves their holds in the store, charged at their worst case when they
expire (over-counted, never lost); under concurrent load through the proxy, fewer commits than
requests and every dollar exact.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate import ledger
from spendgate.errors import StoreError
from spendgate.ledger.base import Bucket, Capture, Event, HoldRequest, Line
from spendgate.ledger.group import GroupCommit
from spendgate.policy import parse
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers

BUCKETS = (Bucket("global", 10**12), Bucket("user:a", 10**12), Bucket("day", None, 86_400))
NOW = 1_800_000_000.0


def _hold(store: ledger.Ledger, amount: int, hid: str) -> str:
    auth = store.authorize([Line(b, amount) for b in BUCKETS], now=NOW, ttl=600, hold_id=hid,
                           event=Event(NOW, "hold", hid, "m", "p", amount))
    assert auth.ok
    return hid


def _spent(store: ledger.Ledger) -> list[tuple[int, int]]:
    return [(s.spent, s.held) for s in store.states(list(BUCKETS), now=NOW + 1)]


def test_concurrent_captures_commit_once_and_each_caller_hears_its_own_outcome(tmp_path: Path) -> None:
    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    amounts = [1_000 * (i + 1) for i in range(20)]
    hids = [_hold(store, 5_000_000, f"h{i}") for i in range(20)]
    door = GroupCommit(store, window_s=3600)  # only the batch size or close() commits
    door._open = 100  # as if many more requests were in flight

    async def run() -> list[bool]:
        tasks = [asyncio.create_task(door.capture(h, {"usd": a}, now=NOW + 1,
                                                  event=Event(NOW + 1, "capture", h, "m", "p", a)))
                 for h, a in zip(hids, amounts, strict=True)]
        tasks.append(asyncio.create_task(door.capture("no-such-hold", {"usd": 7}, now=NOW + 1)))
        await asyncio.sleep(0)  # every task has queued its capture; none is committed yet
        assert not any(t.done() for t in tasks) and _spent(store)[0] == (0, 20 * 5_000_000)
        await door.close()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    assert results == [True] * 20 + [False]
    assert (door.commits, door.captures) == (1, 21)
    assert _spent(store) == [(sum(amounts), 0)] * 3
    assert sorted(e.cost for e in store.events(0) if e.kind == "capture") == amounts
    store.close()


def test_the_last_request_in_flight_commits_its_capture_without_waiting_for_the_window(tmp_path: Path) -> None:
    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    door = GroupCommit(store, window_s=3600)
    b = Bucket("g", 10**12)

    async def run() -> tuple[list[bool], int]:
        first, second = await asyncio.gather(*(door.authorize([Line(b, 100)], now=NOW, ttl=60) for _ in range(2)))
        assert first.hold_id is not None and second.hold_id is not None
        early = asyncio.create_task(door.capture(first.hold_id, {"usd": 10}, now=NOW))
        await asyncio.sleep(0.01)  # another request is in flight: the first capture waits for company
        waiting = int(not early.done())
        last = await door.capture(second.hold_id, {"usd": 20}, now=NOW)  # nothing else in flight
        return [await early, last], waiting

    assert asyncio.run(run()) == ([True, True], 1)
    assert (door.commits, door.captures) == (2, 2)
    assert [(s.spent, s.held) for s in store.states([b], now=NOW)] == [(30, 0)]
    store.close()


def test_a_hold_sharing_a_transaction_with_captures_sees_them_applied(tmp_path: Path) -> None:
    """A capture waiting for company (another request in flight) rides with the next hold, and is
    applied first: the hold finds the unused worst case given back, as one by one in that order."""
    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    door = GroupCommit(store, window_s=3600)  # no timer: only a hold (or close) commits the capture
    b = Bucket("g", 250)

    async def run() -> tuple[bool, bool, bool]:
        first, _ = await asyncio.gather(*(door.authorize([Line(b, 100)], now=NOW, ttl=60) for _ in range(2)))
        assert first.hold_id is not None
        queued = asyncio.create_task(door.capture(first.hold_id, {"usd": 10}, now=NOW))
        await asyncio.sleep(0)
        waiting = not queued.done()
        third = await door.authorize([Line(b, 100)], now=NOW, ttl=60)  # fits only once 90 came back
        return waiting, await queued, third.ok

    assert asyncio.run(run()) == (True, True, True)
    assert (door.commits, door.holds, door.captures) == (2, 3, 1)
    assert [(s.spent, s.held) for s in store.states([b], now=NOW)] == [(10, 200)]
    store.close()


def test_a_full_batch_commits_without_waiting_for_the_window(tmp_path: Path) -> None:
    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    hids = [_hold(store, 100, f"h{i}") for i in range(8)]
    door = GroupCommit(store, window_s=3600, max_batch=4)
    door._open = 100  # many requests in flight (holds placed by others): only a full batch commits early

    async def run() -> list[bool]:
        return list(await asyncio.gather(*(door.capture(h, {"usd": 1}, now=NOW) for h in hids)))

    assert asyncio.run(run()) == [True] * 8  # would hang for an hour if a full batch waited
    assert door.captures == 8
    store.close()


def test_a_failed_commit_is_every_callers_failure_and_leaves_every_hold(tmp_path: Path) -> None:
    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    hids = [_hold(store, 300, f"h{i}") for i in range(3)]

    class Failing(GroupCommit):
        pass

    door = Failing(store, window_s=0)
    original = store.commit

    def broken(holds: object, captures: object) -> tuple[list[object], list[bool]]:
        raise StoreError("disk full")

    store.commit = broken  # type: ignore[method-assign]

    async def run() -> list[BaseException | bool]:
        return list(await asyncio.gather(*(door.capture(h, {"usd": 1}, now=NOW) for h in hids),
                                         return_exceptions=True))

    out = asyncio.run(run())
    assert all(isinstance(r, StoreError) for r in out)
    store.commit = original  # type: ignore[method-assign]
    assert _spent(store)[0] == (0, 900)  # the holds still count every request at its worst case
    store.close()


CHILD = textwrap.dedent("""
    import asyncio, sys
    from spendgate import ledger
    from spendgate.ledger.base import Bucket, Event, Line
    from spendgate.ledger.group import GroupCommit
    store = ledger.open(sys.argv[1])
    now = float(sys.argv[2])
    b = Bucket("global", 10**12)
    door = GroupCommit(store, window_s=3600)

    async def main():
        # two requests in flight; the first finishes, and its capture waits for the other's
        for hid in ("h1", "h2"):
            assert (await door.authorize([Line(b, 5_000)], now=now, ttl=60, hold_id=hid,
                                         event=Event(now, "hold", "d1", "m", "p", 5_000))).ok
        task = asyncio.create_task(door.capture("h1", {"usd": 1_234}, now=now,
                                                event=Event(now, "capture", "d1", "m", "p", 1_234)))
        await asyncio.sleep(0)
        print("queued", flush=True)
        await task

    asyncio.run(main())
""")


def test_a_process_killed_with_captures_queued_leaves_the_hold_charged_at_its_worst_case(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(NOW)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "queued"
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = ledger.open(url)
    b = Bucket("global", 10**12)
    assert [(s.spent, s.held) for s in store.states([b], now=NOW)] == [(0, 10_000)]  # still held, not lost
    assert [e.kind for e in store.events(0)] == []  # nothing claimed a capture that never committed
    gone = store.expire(NOW + 61)
    assert [g.charged for g in gone] == [{"usd": 5_000}] * 2
    assert [(s.spent, s.held) for s in store.states([b], now=NOW + 61)] == [(10_000, 0)]
    assert [(e.kind, e.cost, e.estimated) for e in store.events(0)] == [("expired", 5_000, True)] * 2
    store.close()


def test_holds_asked_together_share_a_commit_and_admit_exactly_what_fits(tmp_path: Path) -> None:
    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    door = GroupCommit(store)
    bucket = Bucket("tight", 7 * 1_000)

    async def run() -> list[bool]:
        auths = await asyncio.gather(*(door.authorize([Line(bucket, 1_000)], now=NOW, ttl=60) for _ in range(32)))
        return [a.ok for a in auths]

    admitted = asyncio.run(run())
    assert admitted.count(True) == 7 and admitted[:7] == [True] * 7  # in the order asked, as one by one
    assert (door.commits, door.holds) == (1, 32)
    assert [(s.spent, s.held) for s in store.states([bucket], now=NOW)] == [(0, 7_000)]
    store.close()


TWO_PROCS = textwrap.dedent("""
    import asyncio, sys
    from spendgate import ledger
    from spendgate.ledger.base import Bucket, Event, Line
    from spendgate.ledger.group import GroupCommit
    store = ledger.open(sys.argv[1])
    door = GroupCommit(store)
    b = Bucket("shared", 25 * 1_000)

    async def one(i):
        a = await door.authorize([Line(b, 1_000)], now=1.8e9, ttl=60)
        if a.ok:
            await door.capture(a.hold_id, {"usd": 400}, now=1.8e9)
        return a.ok

    async def main():
        ok = 0
        for _ in range(10):
            ok += sum(await asyncio.gather(*(one(i) for i in range(8))))
        await door.close()
        print(ok)

    asyncio.run(main())
""")


def test_two_processes_grouping_holds_on_one_file_stay_exact(tmp_path: Path) -> None:
    """Each process's groups take SQLite's write lock like a single hold does: 160 requests of $1
    held and 40 c captured, against a $25 limit, from two processes at once."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    ledger.open(url).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCS, url], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    admitted = sum(int(p.communicate()[0]) for p in procs)
    [state] = ledger.open(url).states([Bucket("shared", 25_000)], now=1.8e9)
    assert state.held == 0 and state.spent == admitted * 400
    # every hold fitted when placed: while holds were outstanding the bucket never went past $25,
    # and once captured each left $0.60 of room, so more than 25 were admitted in all
    assert 25 < admitted <= 160 and state.spent <= 25_000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 10**9), st.booleans()), min_size=1, max_size=25),
       asks=st.lists(st.tuples(st.integers(1, 4 * 10**9), st.integers(0, 2)), max_size=12))
def test_a_batch_charges_exactly_what_the_same_calls_one_by_one_would(tmp_path_factory: pytest.TempPathFactory,
                                                                   ops: list[tuple[int, int, bool]],
                                                                   asks: list[tuple[int, int]]) -> None:
    """Repeated and unknown hold ids included (a hold captured twice is charged once, in both), and
    holds that fit or not on buckets the captures also touch."""
    d = tmp_path_factory.mktemp("batch")
    one, many = (ledger.open(f"sqlite:///{d / n}") for n in ("one.db", "many.db"))
    for store in (one, many):
        for i in range(10):
            _hold(store, 10**9, f"h{i}")
    tight = Bucket("user:a", 12 * 10**9)
    holds = [HoldRequest([Line(b, amount) for b in (BUCKETS[0], tight, BUCKETS[2])[:k + 1]], NOW + 1, 60,
                         hold_id=f"n{j}") for j, (amount, k) in enumerate(asks)]
    caps = [Capture(f"h{i}", {"usd": amount}, NOW + 1, Event(NOW + 1, "capture", f"h{i}", "m", "p", amount)
                    if logged else None) for i, amount, logged in ops]
    alone = [one.capture(c.hold_id, c.actual, now=c.now, event=c.event) for c in caps]
    alone_holds = [one.authorize(h.lines, now=h.now, ttl=h.ttl, hold_id=h.hold_id).ok for h in holds]
    placed, captured = many.commit(holds, caps)
    assert [a.ok for a in placed] == alone_holds
    assert captured == alone
    assert _spent(many) == _spent(one)
    assert [(e.kind, e.cost) for e in many.events(0)] == [(e.kind, e.cost) for e in one.events(0)]
    one.close()
    many.close()


def test_concurrent_requests_through_the_proxy_share_commits_and_charge_exactly(tmp_path: Path) -> None:
    policy = parse({"budget": [{"name": "cap", "usd": 1, "window": "total"}]})
    s = Servers(policy, f"sqlite:///{tmp_path / 's.db'}")
    try:
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)

        async def one() -> None:
            await client.chat.completions.create(model="gpt-4o-mini", max_tokens=16,
                                                 messages=[{"role": "user", "content": "hi"}])

        async def run() -> None:
            await asyncio.gather(*(one() for _ in range(32)))
            await client.close()

        asyncio.run(run())
        s.settled()
        door = s.engine.aledger
        assert isinstance(door, GroupCommit)
        assert door.captures == 32 and door.holds == 32 and door.commits < 64
        cost = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600  # gpt-4o-mini: $0.15 / $0.60 per Mtok
        captured = [e.cost for e in s.store.events(0) if e.kind == "capture"]
        assert captured == [cost] * 32
        [bucket] = [b for b in s.store.known_buckets() if b.key.startswith("cap")]
        [state] = s.store.states([bucket], now=NOW * 2)
        assert (state.spent, state.held, state.limit) == (32 * cost, 0, 10**9)
    finally:
        s.close()
