"""Opening the SQLite store: processes that open a new file together all get it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from spendgate.ledger.sqlite import SQLiteLedger


def _open_and_close(url: str, start: Any, results: Any) -> None:
    start.wait()
    try:
        SQLiteLedger(url).close()
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(repr(exc))


def test_processes_opening_a_new_store_together_all_open_it(tmp_path: Path) -> None:
    """``serve --workers`` and their audit writers open a fresh store at the same moment: switching
    the file to WAL once answered "database is locked" to all but one of them, at random."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(8):
        url = f"sqlite:///{tmp_path}/fresh-{trial}.db"
        start, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_and_close, args=(url, start, results)) for _ in range(6)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == ["ok"] * 6, got
