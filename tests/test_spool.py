"""The store fails after a request was authorized and sent: the answer still reaches the client,
and its exact charge waits in a local spool until the store is back — never lost, never twice."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate import ledger
from spendgate.demo.upstream import Seen
from spendgate.engine import Engine
from spendgate.errors import StoreError
from spendgate.ledger import Bucket, Event, Ledger, Line
from spendgate.ledger.memory import MemoryLedger
from spendgate.ledger.spool import Spool
from spendgate.policy import parse
from spendgate.request import Identity, Request
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers
from tests.redis_server import RedisServer

T0 = 1_800_000_000.0
POLICY = {"budget": [{"name": "g", "usd": 100, "window": "day"}]}
# gpt-4o-mini at the fake provider's usage: 50 × $0.15/M + 10 × $0.60/M
MINI_COST = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600
MSG: Any = [{"role": "user", "content": "hi"}]


# -- through the proxy, over a real redis-server that dies mid-request ------------------------

@pytest.fixture
def redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """A redis-server of this test's own (stopping it hurts no other test); a list, so the test
    can swap in the restarted one and the fixture still stops whichever is running."""
    servers = [RedisServer(tmp_path / "redis").start()]
    yield servers
    servers[-1].stop()


def _restart(servers: list[RedisServer]) -> RedisServer:
    old = servers[-1]
    servers.append(RedisServer(old.workdir, port=old.port).start())  # same AOF directory, same port
    return servers[-1]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_store_down_after_send_the_answer_arrives_and_the_charge_is_spooled_then_applied(
        redis: list[RedisServer], stream: bool) -> None:
    url = f"{redis[0].url}?prefix={uuid.uuid4().hex[:12]}"
    s = Servers(parse(POLICY), url)
    try:
        async def redis_dies(_: Seen) -> None:  # after authorize, before the provider answers
            await asyncio.to_thread(redis[-1].stop)

        s.mock.on_request = redis_dies
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
        if stream:
            chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100,
                                                         stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
        else:
            r = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100)
            assert r.choices[0].message.content == "hello" and r.usage is not None
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
        s.mock.on_request = None
        s.settled()
        assert s.engine.spool.pending() == 1, "the charge waits on local disk"

        _restart(redis)
        store = ledger.open(url)
        try:
            [before] = store.states(store.known_buckets(), now=T0)
            assert before.spent == 0 and before.held > 0, "nothing charged yet; the hold (worst case) still counts"
            assert s.engine.drain_spool(now=T0) == 1, "what the proxy calls, on its store, once it is back"
            [after] = store.states(store.known_buckets(), now=T0)
            assert (after.spent, after.held) == (MINI_COST, 0), "charged exactly, and the hold is gone"
            [ev] = store.events(0)
            assert (ev.kind, ev.cost, ev.estimated) == ("capture", MINI_COST, False)
            assert s.engine.spool.pending() == 0 and s.engine.drain_spool(now=T0) == 0
        finally:
            store.close()
    finally:
        s.close()


def test_store_down_when_the_provider_refuses_passes_its_error_through(redis: list[RedisServer]) -> None:
    """The hold's release fails: the hold will expire at its worst case (conservative), and the
    client still gets the provider's own error, not a plain-text 500."""
    url = f"{redis[0].url}?prefix={uuid.uuid4().hex[:12]}"
    s = Servers(parse(POLICY), url)
    try:
        async def redis_dies(_: Seen) -> None:
            await asyncio.to_thread(redis[-1].stop)

        s.mock.on_request = redis_dies
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100,
                                           extra_headers={"x-mock": "500"})
        assert err.value.body == {"message": "upstream exploded", "type": "server_error"}, "the provider's own"
        assert s.engine.spool.pending() == 0, "a release is never spooled"
    finally:
        s.close()


# -- the spool itself ---------------------------------------------------------------------------

class Crash(BaseException):
    """The process dies: nothing after it runs."""


class Flaky(MemoryLedger):
    """A store whose capture can fail before it applies (``down``) or crash the caller after."""

    down = False
    crash_after_capture = False
    #: captures that may still succeed before the store goes down (None: no limit)
    captures_left: int | None = None

    def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float, event: Event | None = None) -> bool:
        if self.captures_left is not None:
            self.down, self.captures_left = self.captures_left <= 0, self.captures_left - 1
        if self.down:
            raise StoreError("store down")
        ok = super().capture(hold_id, actual, now=now, event=event)
        if self.crash_after_capture:
            raise Crash  # applied in the store, not yet deleted from the spool
        return ok

    def release(self, hold_id: str, *, now: float, event: Event | None = None) -> bool:
        if self.down:
            raise StoreError("store down")
        return super().release(hold_id, now=now, event=event)


def _hold(store: Ledger, amount: int = 1000, ttl: float = 600) -> str:
    auth = store.authorize([Line(Bucket("b", 10**9), amount)], now=T0, ttl=ttl)
    assert auth.hold_id is not None
    return auth.hold_id


def _spent(store: Ledger) -> tuple[int, int]:
    [st] = store.states([Bucket("b", 10**9)], now=T0)
    return st.spent, st.held


def test_a_crash_between_capture_and_delete_never_charges_twice(tmp_path: Path) -> None:
    store = Flaky()
    spool = Spool(tmp_path / "spool.db")
    spool.add(_hold(store), {"usd": 300}, None)
    store.crash_after_capture = True
    with pytest.raises(Crash):
        spool.drain(store, now=T0)
    spool.close()
    assert _spent(store) == (300, 0), "the capture was applied before the crash"
    store.crash_after_capture = False
    again = Spool(tmp_path / "spool.db")  # the next process
    assert again.pending() == 1
    assert again.drain(store, now=T0 + 1) == 1, "re-applied: the hold is gone, so it charges nothing"
    assert _spent(store) == (300, 0) and again.pending() == 0


def test_a_store_error_stops_draining_and_keeps_the_rest_in_order(tmp_path: Path) -> None:
    store = Flaky()
    spool = Spool(tmp_path / "spool.db")
    for amount in (100, 20, 3):
        spool.add(_hold(store), {"usd": amount}, None)
    store.captures_left = 1
    assert spool.drain(store, now=T0) == 1
    assert spool.pending() == 2 and _spent(store) == (100, 2000)
    store.captures_left, store.down = None, False
    assert spool.drain(store, now=T0) == 2 and _spent(store) == (123, 0)


def test_a_hold_that_expired_meanwhile_is_dropped_at_its_worst_case(tmp_path: Path) -> None:
    store = MemoryLedger()
    spool = Spool(tmp_path / "spool.db")
    spool.add(_hold(store, amount=1000, ttl=60), {"usd": 300}, None)
    store.expire(T0 + 61)  # the store came back after the hold's TTL and charged it
    assert spool.drain(store, now=T0 + 62) == 1 and spool.pending() == 0
    assert _spent(store) == (1000, 0), "over-counted, never under-counted, never both"


def test_the_engine_spools_a_failed_capture_and_makes_no_file_until_then(tmp_path: Path) -> None:
    home = tmp_path / "home"  # SPENDGATE_HOME (conftest)
    store = Flaky()
    engine = Engine(parse(POLICY), store)
    req = Request("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 100, "messages": MSG},
                  Identity())
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
    ok = engine.capture(engine.decide(req, now=T0), usage, now=T0)
    assert ok.captured and not ok.spooled and engine.drain_spool(now=T0) == 0 and engine.spool.pending() == 0
    assert not (home / "spool.db").exists(), "nothing spooled: no file"
    d, never_sent = engine.decide(req, now=T0), engine.decide(req, now=T0)
    store.down = True
    c = engine.capture(d, usage, now=T0)
    assert (c.spooled, c.captured, c.cost_nanos, c.estimated) == (True, False, MINI_COST, False)
    assert (home / "spool.db").exists() and engine.spool.pending() == 1
    assert engine.release(never_sent, now=T0) is False, "a failed release is logged, not raised"
    assert engine.drain_spool(now=T0) == 0 and engine.spool.pending() == 1, "still down: kept"
    store.down = False
    assert engine.drain_spool(now=T0) == 1
    [st] = [st for st in store.states(store.known_buckets(), now=T0) if st.unit == "usd"]
    worst = never_sent.estimate.cost_nanos if never_sent.estimate else 0
    assert (st.spent, st.held) == (2 * MINI_COST, worst), "exact charges; the unreleased hold waits to expire"
