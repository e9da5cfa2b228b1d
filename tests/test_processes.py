"""Two processes x 32 workers on one SQLite file: exactly the holds that fit are admitted."""

from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path
from typing import Any

from spendgate import ledger
from spendgate.ledger import Bucket, Line

WORST = 3_000_000
N_FIT = 11


def _process(url: str, barrier: Any, results: Any) -> None:
    store = ledger.open(url)
    bucket = Bucket("shared", WORST * N_FIT + WORST - 1)
    admitted = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        auth = store.authorize([Line(bucket, WORST)], now=1_800_000_000.0, ttl=60)
        if auth.ok:
            with lock:
                admitted.append(auth.hold_id)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    results.put(len(admitted))


def test_two_processes_on_one_sqlite_file_admit_exactly_n(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ledger.open(url).close()  # create the schema once, before the race
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(64)
    results = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(url, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(counts) == N_FIT
    [state] = ledger.open(url).states([Bucket("shared", None)], now=1_800_000_000.0)
    assert state.held == WORST * N_FIT
