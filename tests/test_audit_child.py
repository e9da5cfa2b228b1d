"""The server's audit chain written by a child process: handed over in batches, continued across
restarts of the writer, and still a chain that verifies when the writer is killed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spendgate import ledger
from spendgate.events.process import STORE_ENV, AuditChild, _batches, _line
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


def _lines(events: list[Event]) -> bytes:
    return b"".join(_line(e, "ab" * 32, None) for e in events)


def test_lines_cut_anywhere_by_the_pipes_reads_come_out_whole_and_a_bad_line_is_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    """The writer reads the pipe a chunk at a time: a line (and a UTF-8 character) split between
    two reads is read whole, a line is cut at "\\n" only (U+2028 inside a line is text), and a line
    that is not an event — bad JSON, bad UTF-8, the wrong shape — is reported and skipped."""
    odd = Event(1_800_000_000.5, "allow", "d-\u2028-é-\U0001f600", "m", "p", 0, dims={"user": "\u2029"})
    good = [_event(0), odd, _event(2), _event(3)]
    first, second = _lines(good[:2]), _lines(good[2:])
    mid = first.index("é".encode()) + 1  # inside the two bytes of é
    pieces = [first[:mid], first[mid:] + b"not json\n" + b'{"kind": "allow"}\n' + b"\xff\xfe\n" + second[:7],
              second[7:-1]]  # the last line has no newline: the pipe's end ends it
    r, w = os.pipe()
    got: list[tuple[Event, str, str | None]] = []
    with caplog.at_level(logging.ERROR, logger="spendgate.audit"):
        batches = _batches(r, "c")
        os.write(w, pieces[0])  # no complete line yet: the first read yields nothing
        os.write(w, pieces[1])
        got += next(batches)
        os.write(w, pieces[2])
        os.close(w)
        got += [item for batch in batches for item in batch]
    os.close(r)
    assert [g[0] for g in got] == good and {g[1] for g in got} == {"ab" * 32}
    assert caplog.text.count("an unreadable event line was skipped") == 3


def test_the_writer_process_stores_only_the_readable_lines(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    env = {**os.environ, STORE_ENV: url}
    data = _lines([_event(0)]) + b"[1, 2\n" + _lines([_event(1)]) + b"\n" + _lines([_event(2)])[:-1]
    done = subprocess.run([sys.executable, "-m", "spendgate.events.process", "--chain", "0123456789abcdef",
                           "--checkpoint-entries", "2", "--checkpoint-seconds", "60"],
                          input=data, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().count("an unreadable event line was skipped") == 2  # the bad one, the empty one
    assert _ids(url, "0123456789abcdef") == ["d-0", "d-1", "d-2"]
    assert _verified(url)
