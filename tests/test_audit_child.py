"""The server's audit chain written by a child process: handed over in batches, continued across
restarts of the writer, and still a chain that verifies when the writer is killed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import marshal
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from spendgate import ledger, providers
from spendgate.demo.background import BackgroundLoop
from spendgate.demo.upstream import FakeUpstream
from spendgate.engine import Engine
from spendgate.events.process import STORE_ENV, AuditChild, _batches, _frame, _record
from spendgate.events.signing import load_key, parse_public, public_hex
from spendgate.events.verify import verify_store
from spendgate.ledger import Event
from spendgate.policy import parse
from spendgate.proxy.app import Proxy, ProxyConfig


def _event(i: int) -> Event:
    return Event(1_800_000_000.0 + i, "allow", f"d-{i}", "gpt-4o-mini", "openai", 0, 10, 20,
                 dims={"user": "alice"}, amounts={"estimate_usd": 1000 + i})


def _child(url: str, chain: str | None = None) -> AuditChild:
    return AuditChild(url, None, checkpoint_entries=4, checkpoint_seconds=60.0, chain=chain)


def _ids(url: str, chain: str) -> list[str]:
    store = ledger.open(url)
    try:
        return [json.loads(t)["decision_id"] for t in store.audit_entries(chain)]
    finally:
        store.close()


def _verified(url: str) -> bool:
    store = ledger.open(url)
    try:
        return verify_store(store, [parse_public(public_hex(load_key()))]).ok
    finally:
        store.close()


def test_events_reach_the_store_through_the_child_and_a_second_writer_continues_the_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spend.db'}"

    async def first() -> str:
        child = _child(url)
        await child.start()
        for i in range(10):
            child.add(_event(i), "ab" * 32, b'{"model": "gpt-4o-mini"}')
        await child.close()  # the child stores everything it was sent, checkpoints and exits
        return child.chain

    chain = asyncio.run(first())
    assert _ids(url, chain) == [f"d-{i}" for i in range(10)]

    async def again() -> None:
        child = _child(url, chain)
        await child.start()
        for i in range(10, 15):
            child.add(_event(i), "ab" * 32)
        await child.close()

    asyncio.run(again())
    assert _ids(url, chain) == [f"d-{i}" for i in range(15)]
    assert _verified(url)
    store = ledger.open(url)
    try:
        first_entry = json.loads(store.audit_entries(chain, 0, 1)[0])
        last_checkpoint = json.loads(store.audit_checkpoints(chain)[-1])
    finally:
        store.close()
    assert len(first_entry["request_hash"]) == 64, "the digest crosses the pipe, never the body"
    assert last_checkpoint["seq"] == 15


def test_a_killed_writer_is_started_again_and_the_chain_still_verifies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spend.db'}"

    async def go() -> str:
        child = _child(url)
        await child.start()
        for i in range(5):
            child.add(_event(i), "ab" * 32)
        await child.pump()
        proc = child._proc
        assert proc is not None
        proc.kill()
        await proc.wait()
        for i in range(5, 10):
            child.add(_event(i), "ab" * 32)
        await child.pump()  # notices the exit, starts a new writer on the same chain
        await child.close()
        return child.chain

    chain = asyncio.run(go())
    ids = _ids(url, chain)
    assert ids[-5:] == [f"d-{i}" for i in range(5, 10)]
    assert ids[:-5] in ([], [f"d-{i}" for i in range(5)]), "a killed writer may lose what it had not stored"
    assert _verified(url)


def test_the_writer_runs_only_on_cpu_the_server_leaves(tmp_path: Path) -> None:
    """Linux's SCHED_IDLE: a request arriving on a core the writer is using takes it at once."""

    async def go() -> int:
        child = _child(f"sqlite:///{tmp_path / 'spend.db'}")
        await child.start()
        child.add(_event(0), "ab" * 32)
        await child.pump()  # the writer has read its first frame, so it is past its start-up
        assert child._proc is not None
        policy = os.sched_getscheduler(child._proc.pid)
        await child.close()
        return policy

    assert asyncio.run(go()) == os.SCHED_IDLE


def test_requests_wait_while_the_writer_is_behind_and_nothing_is_lost(tmp_path: Path) -> None:
    """A writer that cannot keep up (here: stopped) fills the pipe; the server's queue then grows to
    its bound, where requests wait; once the writer reads again they go on, and every event is in
    the chain, in order."""
    url = f"sqlite:///{tmp_path / 'spend.db'}"

    async def go() -> tuple[str, int]:
        child = _child(url)
        child.max_backlog = 100
        await child.start()
        assert child._proc is not None
        os.kill(child._proc.pid, signal.SIGSTOP)
        n = 0
        while True:  # until a pump cannot hand its batch over
            for _ in range(20):
                big = {"user": f"{n}" + "u" * 2000}  # (each its own text: marshal writes a repeat once)
                child.add(Event(1.8e9 + n, "allow", f"d-{n}", "m", "openai", 0, dims=big), "ab" * 32)
                n += 1
            pumping = asyncio.create_task(child.pump())
            await asyncio.wait({pumping}, timeout=0.5)
            if not pumping.done():
                break
            assert n < 10_000, "the pipe never filled"
        assert not child.behind
        while not child.behind:
            child.add(Event(1.8e9 + n, "allow", f"d-{n}", "m", "openai", 0), "ab" * 32)
            n += 1
        waiting = asyncio.create_task(child.caught_up())
        await asyncio.wait({waiting}, timeout=0.2)
        assert not waiting.done(), "a request waits while the writer is behind"
        os.kill(child._proc.pid, signal.SIGCONT)
        await pumping  # the writer reads again: the blocked batch is handed over
        await child.pump()  # the next pump takes the backlog
        await asyncio.wait_for(waiting, 10)
        await child.close()
        return child.chain, n

    chain, n = asyncio.run(go())
    assert _ids(url, chain) == [f"d-{i}" for i in range(n)]
    assert _verified(url)



def _frame_of(events: list[Event]) -> bytes:
    return _frame([(e, "ab" * 32, None) for e in events], "c")


def test_an_event_crosses_the_pipe_exactly_and_one_marshal_cannot_write_is_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every field comes out as it went in: an integer past 64 bits, a float to the bit, a lone
    surrogate, non-default everything — and the request's digest, never the body."""
    odd = Event(1_800_000_000.1234567, "capture", "d-\ud800-\U0001f600", "m\u2028", "p", 2**70, 2**64 + 1, 7, True,
                {"user": "\udfff", "n": "1"}, "r", "b", {"estimate_usd": 2**80, "x_tokens": 3})
    bad = Event(1.0, "allow", "d-bad", "m", "p", 0, dims={"user": object()})  # type: ignore[dict-item]
    with caplog.at_level(logging.ERROR, logger="spendgate.audit"):
        frame = _frame([(odd, "ab" * 32, b'{"model": "m"}'), (bad, "ab" * 32, None), (_event(1), "cd" * 32, None)],
                       "c")
    assert "event 'd-bad' cannot be handed to the writer" in caplog.text
    r, w = os.pipe()
    os.write(w, frame)
    os.close(w)
    got = [item for batch in _batches(r, "c") for item in batch]
    os.close(r)
    digest = hashlib.sha256(b'{"model": "m"}').hexdigest()
    assert got == [(odd, "ab" * 32, digest), (_event(1), "cd" * 32, None)]
    assert got[0][0].ts.hex() == odd.ts.hex()


def test_frames_cut_anywhere_by_the_pipes_reads_come_out_whole_and_a_bad_one_is_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    """The writer reads the pipe a chunk at a time: a frame whose header or body is split between
    reads is read whole; a frame that is not marshal, an event of the wrong shape, and a last
    frame the pipe's end cuts short are reported and skipped, and reading goes on."""
    garbage = b"\xff\x00not marshal"
    wrong = marshal.dumps([("too", "short"), (*_record(_event(4), "ab" * 32, None),)])
    good1, good2 = _frame_of([_event(0), _event(1)]), _frame_of([_event(2), _event(3)])
    stream = (good1 + len(garbage).to_bytes(4, "big") + garbage + len(wrong).to_bytes(4, "big") + wrong + good2
              + _frame_of([_event(5)])[:-3])
    cuts = [2, len(good1) + 1, len(good1) + 9, len(stream) - len(good2) - 10]
    r, w = os.pipe()
    got: list[tuple[Event, str, str | None]] = []
    with caplog.at_level(logging.ERROR, logger="spendgate.audit"):
        batches = _batches(r, "c")
        os.write(w, stream[:cuts[0]])  # inside the first header: the first read yields nothing whole
        os.write(w, stream[cuts[0]:cuts[1]])
        got += next(batches)
        for a, b in zip(cuts[1:], [*cuts[2:], len(stream)], strict=True):
            os.write(w, stream[a:b])
        os.close(w)
        got += [item for batch in batches for item in batch]
    os.close(r)
    assert [g[0].decision_id for g in got] == ["d-0", "d-1", "d-4", "d-2", "d-3"]
    assert "an unreadable batch of events was skipped" in caplog.text
    assert "an unreadable event was skipped" in caplog.text
    assert "the server's last batch was cut short" in caplog.text


def test_the_writer_process_stores_what_it_can_read_and_the_chain_verifies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    env = {**os.environ, STORE_ENV: url}
    data = _frame_of([_event(0)]) + (3).to_bytes(4, "big") + b"bad" + _frame_of([_event(1), _event(2)])
    done = subprocess.run([sys.executable, "-m", "spendgate.events.process", "--chain", "0123456789abcdef",
                           "--checkpoint-entries", "2", "--checkpoint-seconds", "60"],
                          input=data, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "an unreadable batch of events was skipped" in done.stderr.decode()
    assert _ids(url, "0123456789abcdef") == ["d-0", "d-1", "d-2"]
    assert _verified(url)


class _Behind(AuditChild):
    """A writer the test declares behind, and caught up when it says so."""

    def __init__(self, url: str) -> None:
        super().__init__(url, None, checkpoint_entries=4, checkpoint_seconds=60.0)
        self.lagging = True
        self.caught: asyncio.Event | None = None

    @property
    def behind(self) -> bool:
        return self.lagging

    async def caught_up(self) -> None:
        self.caught = self.caught or asyncio.Event()
        await self.caught.wait()


def test_a_request_through_the_proxy_waits_while_the_writer_is_behind(tmp_path: Path) -> None:
    """Nothing is decided or sent upstream while the writer is behind; the request then goes on."""
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    bg = BackgroundLoop()
    mock = FakeUpstream()
    store = ledger.open(url)
    writer = _Behind(url)
    up = f"http://127.0.0.1:{bg.serve(mock.app())}"
    proxy = Proxy(Engine(parse({}), store), ProxyConfig(upstreams={p.name: up for p in providers.all_providers()}),
                  writer)
    port = bg.serve(proxy.app())
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.chat.completions.create, model="gpt-4o-mini", max_tokens=16,
                               messages=[{"role": "user", "content": "hi"}])
            done, _ = concurrent.futures.wait([call], timeout=0.5)
            assert not done and mock.seen == [] and store.events(0) == [], "nothing decided, nothing sent"

            async def catch_up() -> None:
                writer.lagging = False
                assert writer.caught is not None
                writer.caught.set()

            bg.run(catch_up())
            assert call.result(timeout=30).usage is not None
        assert len(mock.seen) == 1
    finally:
        client.close()
        bg.close()
        store.close()
