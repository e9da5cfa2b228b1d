"""The server's audit chain written by a child process: handed over in batches, continued across
restarts of the writer, and still a chain that verifies when the writer is killed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from spendgate import ledger
from spendgate.events.process import AuditChild
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
