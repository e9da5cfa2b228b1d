"""AuditLog: the request path only queues; the background writer chains, signs and stores in
batches, checkpoints at exact counts and on time, survives a failing store without losing or
reordering anything, and leaves one chain that verifies."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate import ledger
from spendgate.errors import StoreError
from spendgate.events.chain import AuditLog
from spendgate.events.verify import verify_store
from spendgate.ledger import Ledger
from spendgate.ledger.base import Event
from tests.conftest import race

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = [KEY.public_key()]
PH = "cd" * 32
IDLE = 3600.0  # a flush interval the test never reaches: only flush() and close() write


def ev(i: int | str, kind: str = "allow") -> Event:
    return Event(1796297643.0, kind, f"d-{i}", "gpt-4o", "openai", 10, dims={"user": "zoé"},
                 amounts={"estimate_usd": 1500})


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    led = ledger.open("memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'audit.db'}")
    yield led
    led.close()


def ids(store: Ledger, chain: str) -> list[str]:
    return [json.loads(t)["decision_id"] for t in store.audit_entries(chain)]


def cp_seqs(store: Ledger, chain: str) -> list[int]:
    return [json.loads(t)["seq"] for t in store.audit_checkpoints(chain)]


class Recording:
    """A ledger wrapper that records audit calls, and fails or blocks them when told to."""

    def __init__(self, inner: Ledger, *, fail_before: int = 0, fail_after: int = 0, fail_checkpoints: int = 0) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int, int]] = []
        self.fail_before = fail_before  # raise before the append reaches the store
        self.fail_after = fail_after  # append, then raise as if the answer was lost
        self.fail_checkpoints = fail_checkpoints
        self.failed = 0
        self.exhausted = threading.Event()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def _maybe_done(self) -> None:
        if not (self.fail_before or self.fail_after or self.fail_checkpoints):
            self.exhausted.set()

    def append_audit(self, chain: str, first_seq: int, entries: Sequence[str]) -> None:
        self.calls.append(("append", first_seq, len(entries)))
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(30)
        if self.fail_before:
            self.fail_before -= 1
            self.failed += 1
            self._maybe_done()
            raise StoreError("disk full")
        self.inner.append_audit(chain, first_seq, entries)
        if self.fail_after:
            self.fail_after -= 1
            self.failed += 1
            self._maybe_done()
            raise StoreError("connection reset after the write")

    def put_checkpoint(self, chain: str, text: str) -> None:
        self.calls.append(("checkpoint", json.loads(text)["seq"], 0))
        if self.fail_checkpoints:
            self.fail_checkpoints -= 1
            self.failed += 1
            self._maybe_done()
            raise StoreError("disk full")
        self.inner.put_checkpoint(chain, text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_eight_threads_of_adds_make_one_chain_that_verifies(store: Ledger) -> None:
    log = AuditLog(store, KEY, flush_s=0.005, checkpoint_entries=64, checkpoint_seconds=IDLE)
    counter = iter(range(10**9))
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            with lock:
                i = next(counter)
            log.add(ev(i), PH, b"{}")

    race(8, worker)
    log.close()
    assert log.written == 1600 and log.seq == 1600
    assert sorted(ids(store, log.chain)) == sorted(f"d-{i}" for i in range(1600))
    assert [json.loads(t)["seq"] for t in store.audit_entries(log.chain)] == list(range(1, 1601))
    assert cp_seqs(store, log.chain) == list(range(64, 1601, 64))  # 1600 is a multiple: close adds none
    report = verify_store(store, PUB)
    assert report.ok and report.chains[0].entries == 1600 and report.chains[0].checkpoint_seq == 1600


def test_checkpoints_land_on_exact_counts_and_close_adds_the_head(store: Ledger) -> None:
    log = AuditLog(store, KEY, flush_s=IDLE, checkpoint_entries=30, checkpoint_seconds=IDLE)
    for i in range(100):
        log.add(ev(i), PH)
    log.flush()
    assert log.written == 100 and cp_seqs(store, log.chain) == [30, 60, 90]
    heads = {json.loads(t)["seq"]: json.loads(t)["hash"] for t in store.audit_entries(log.chain)}
    assert all(json.loads(t)["head"] == heads[json.loads(t)["seq"]] for t in store.audit_checkpoints(log.chain))
    log.close()
    assert cp_seqs(store, log.chain) == [30, 60, 90, 100]
    assert json.loads(store.audit_checkpoints(log.chain)[-1])["head"] == heads[100]
    log.close()  # a second close does nothing
    assert cp_seqs(store, log.chain) == [30, 60, 90, 100]
    assert verify_store(store, PUB).ok


def test_a_batch_is_one_append_cut_at_the_checkpoint_boundary(store: Ledger) -> None:
    rec = Recording(store)
    log = AuditLog(cast(Ledger, rec), KEY, flush_s=IDLE, checkpoint_entries=64, checkpoint_seconds=IDLE)
    for i in range(150):
        log.add(ev(i), PH)
    assert rec.calls == []  # add never touches the store
    log.flush()
    assert rec.calls == [("append", 1, 64), ("checkpoint", 64, 0), ("append", 65, 64), ("checkpoint", 128, 0),
                         ("append", 129, 22)]
    log.close()
    assert rec.calls[-1] == ("checkpoint", 150, 0)


def test_a_checkpoint_is_written_after_checkpoint_seconds_with_new_entries(store: Ledger) -> None:
    now = [0.0]
    log = AuditLog(store, KEY, flush_s=IDLE, checkpoint_entries=1000, checkpoint_seconds=5.0, clock=lambda: now[0])
    log.add(ev(1), PH)
    log.flush()
    assert cp_seqs(store, log.chain) == []
    now[0] = 5.0
    log.flush()  # nothing new to store, but the time has come for what is
    assert cp_seqs(store, log.chain) == [1]
    now[0] = 20.0
    log.flush()  # nothing since the last checkpoint: none
    assert cp_seqs(store, log.chain) == [1]
    log.add(ev(2), PH)
    log.add(ev(3), PH)
    log.flush()
    assert cp_seqs(store, log.chain) == [1, 3]
    log.close()
    assert cp_seqs(store, log.chain) == [1, 3]


def test_close_of_an_empty_log_writes_nothing(store: Ledger) -> None:
    log = AuditLog(store, KEY, flush_s=IDLE)
    log.close()
    assert store.audit_chains() == []


def test_a_failing_store_loses_nothing_and_the_chain_still_verifies(
        store: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recording(store, fail_before=3, fail_after=2, fail_checkpoints=1)
    log = AuditLog(cast(Ledger, rec), KEY, flush_s=IDLE, checkpoint_entries=10, checkpoint_seconds=IDLE)
    n = 0
    failures = 0
    with caplog.at_level(logging.WARNING, logger="spendgate.audit"):
        while rec.failed < 6 or log.pending:
            for _ in range(7):
                log.add(ev(n), PH)
                n += 1
            try:
                log.flush()
            except StoreError:
                failures += 1
    assert failures == 6
    log.close()
    assert ids(store, log.chain) == [f"d-{i}" for i in range(n)]  # every one, in the order added
    assert log.written == n
    assert verify_store(store, PUB).ok
    warned = [r.getMessage() for r in caplog.records]
    assert sum("the store failed" in m for m in warned) == 1 and sum("the store is back" in m for m in warned) == 1


def test_the_background_thread_retries_until_the_store_is_back(store: Ledger) -> None:
    rec = Recording(store, fail_before=4)
    log = AuditLog(cast(Ledger, rec), KEY, flush_s=0.001, checkpoint_entries=8, checkpoint_seconds=IDLE)
    for i in range(20):
        log.add(ev(i), PH)
    assert rec.exhausted.wait(30)
    for i in range(20, 40):
        log.add(ev(i), PH)
    log.close()
    assert ids(store, log.chain) == [f"d-{i}" for i in range(40)]
    assert verify_store(store, PUB).ok
    # every retry is the same batch at the same seq, before anything newer
    firsts = [c[1] for c in rec.calls if c[0] == "append"]
    assert firsts[:5] == [1] * 5


def test_add_returns_while_the_store_is_stuck(store: Ledger) -> None:
    rec = Recording(store)
    rec.gate = threading.Event()
    log = AuditLog(cast(Ledger, rec), KEY, flush_s=0.001, checkpoint_seconds=IDLE)
    log.add(ev(0), PH)
    assert rec.entered.wait(30)  # the writer is inside a store call that does not return
    for i in range(1, 1001):
        log.add(ev(i), PH)  # returns at once: nothing here waits for the store
    assert log.pending >= 1000
    rec.gate.set()
    log.close()
    assert ids(store, log.chain) == [f"d-{i}" for i in range(1001)]


def test_an_event_that_cannot_be_an_entry_is_logged_and_skipped(
        store: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(store, KEY, flush_s=IDLE)
    log.add(ev(1), PH)
    bad = Event(1.0, "allow", "d-bad", "m", "p", 0, amounts=cast(Any, {"x_usd": "lots"}))
    log.add(bad, PH)
    log.add(ev(2), PH)
    with caplog.at_level(logging.ERROR, logger="spendgate.audit"):
        log.close()
    assert "cannot log event d-bad (allow)" in caplog.text
    assert ids(store, log.chain) == ["d-1", "d-2"]
    assert verify_store(store, PUB).ok


def test_a_named_chain_continues_from_its_stored_head(store: Ledger) -> None:
    first = AuditLog(store, KEY, flush_s=IDLE, checkpoint_entries=4)
    for i in range(37):
        first.add(ev(i), PH)
    first.close()
    again = AuditLog(store, KEY, chain=first.chain, flush_s=IDLE, checkpoint_entries=4)
    assert again.seq == 37
    for i in range(37, 45):
        again.add(ev(i), PH)
    again.close()
    assert ids(store, first.chain) == [f"d-{i}" for i in range(45)]
    assert cp_seqs(store, first.chain)[-3:] == [37, 41, 45]
    report = verify_store(store, PUB)
    assert report.ok and report.chains[0].last_seq == 45


def test_chain_ids_are_16_hex_and_differ_per_writer(store: Ledger) -> None:
    a, b = AuditLog(store, KEY, flush_s=IDLE), AuditLog(store, KEY, flush_s=IDLE)
    a.add(ev("a"), PH)
    b.add(ev("b"), PH)
    a.close()
    b.close()
    assert a.chain != b.chain and all(len(c) == 16 and int(c, 16) >= 0 for c in (a.chain, b.chain))
    assert store.audit_chains() == sorted([a.chain, b.chain])
    assert verify_store(store, PUB).ok


def test_close_raises_when_the_store_never_comes_back(store: Ledger) -> None:
    rec = Recording(store, fail_before=10**6)
    log = AuditLog(cast(Ledger, rec), KEY, flush_s=IDLE)
    log.add(ev(1), PH)
    with pytest.raises(StoreError, match="1 entries could not be stored"):
        log.close()


def test_bad_settings_are_refused(store: Ledger) -> None:
    for kwargs in ({"flush_s": 0}, {"checkpoint_entries": 0}, {"checkpoint_seconds": -1}):
        with pytest.raises(ValueError, match="must be above 0"):
            AuditLog(store, KEY, **kwargs)
