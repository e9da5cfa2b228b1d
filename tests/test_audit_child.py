"""The server's audit chain written by a child process: handed over in batches, continued across
restarts of the writer, and still a chain that verifies when the writer is killed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import marshal
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spendgate import ledger
from spendgate.events.process import STORE_ENV, AuditChild, _batches, _frame, _record
from spendgate.events.signing import load_key, parse_public, public_hex
from spendgate.events.verify import verify_store
from spendgate.ledger import Event


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
