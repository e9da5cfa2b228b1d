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
from spendgate.ledger.base import Bucket, Capture, Event, Line
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


def test_a_full_batch_commits_without_waiting_for_the_window(tmp_path: Path) -> None:
    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    hids = [_hold(store, 100, f"h{i}") for i in range(8)]
    door = GroupCommit(store, window_s=3600, max_batch=4)

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
    original = store.capture_many

    def broken(captures: list[Capture]) -> list[bool]:
        raise StoreError("disk full")

    store.capture_many = broken  # type: ignore[method-assign]

    async def run() -> list[BaseException | bool]:
        return list(await asyncio.gather(*(door.capture(h, {"usd": 1}, now=NOW) for h in hids),
                                         return_exceptions=True))

    out = asyncio.run(run())
    assert all(isinstance(r, StoreError) for r in out)
    store.capture_many = original  # type: ignore[method-assign]
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
    assert store.authorize([Line(b, 5_000)], now=now, ttl=60, hold_id="h1",
                           event=Event(now, "hold", "d1", "m", "p", 5_000)).ok
    door = GroupCommit(store, window_s=3600)

    async def main():
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
    assert [(s.spent, s.held) for s in store.states([b], now=NOW)] == [(0, 5_000)]  # still held, not lost
    assert [e.kind for e in store.events(0)] == []  # nothing claimed a capture that never committed
    gone = store.expire(NOW + 61)
    assert [g.charged for g in gone] == [{"usd": 5_000}]
    assert [(s.spent, s.held) for s in store.states([b], now=NOW + 61)] == [(5_000, 0)]
    assert [(e.kind, e.cost, e.estimated) for e in store.events(0)] == [("expired", 5_000, True)]
    store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 10**9), st.booleans()), min_size=1, max_size=25))
def test_a_batch_charges_exactly_what_the_same_captures_one_by_one_would(tmp_path_factory: pytest.TempPathFactory,
                                                                      ops: list[tuple[int, int, bool]]) -> None:
    """Repeated and unknown hold ids included: a hold captured twice is charged once, in both."""
    d = tmp_path_factory.mktemp("batch")
    one, many = (ledger.open(f"sqlite:///{d / n}") for n in ("one.db", "many.db"))
    for store in (one, many):
        for i in range(10):
            _hold(store, 10**9, f"h{i}")
    caps = [Capture(f"h{i}", {"usd": amount}, NOW + 1, Event(NOW + 1, "capture", f"h{i}", "m", "p", amount)
                    if logged else None) for i, amount, logged in ops]
    alone = [one.capture(c.hold_id, c.actual, now=c.now, event=c.event) for c in caps]
    assert many.capture_many(caps) == alone
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
        assert door.captures == 32 and door.commits < 32
        cost = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600  # gpt-4o-mini: $0.15 / $0.60 per Mtok
        captured = [e.cost for e in s.store.events(0) if e.kind == "capture"]
        assert captured == [cost] * 32
        [bucket] = [b for b in s.store.known_buckets() if b.key.startswith("cap")]
        [state] = s.store.states([bucket], now=NOW * 2)
        assert (state.spent, state.held, state.limit) == (32 * cost, 0, 10**9)
    finally:
        s.close()
