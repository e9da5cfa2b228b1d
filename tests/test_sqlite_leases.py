"""Budget leases on SQLite (``sqlite:///…?leases=on``): two `spendgate serve` processes on one file,
each deciding in memory against its slices, never past the limit and charged exactly."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from decimal import Decimal
from pathlib import Path

from spendgate import ledger
from tests.harness import Servers, start_serve
from tests.test_redis_proxy import BODY, _burst, _policy, limited_state, upstream

__all__ = ["upstream"]  # the fixture, shared with the Redis tests


def _stop(procs: list[tuple[subprocess.Popen[str], int]]) -> None:
    for proc, _ in procs:
        proc.terminate()  # a graceful stop writes back what waits and hands the slices back
        proc.wait(timeout=30)


def test_two_instances_on_one_file_never_pass_the_limit_and_charge_exactly(tmp_path: Path,
                                                                          upstream: Servers) -> None:
    worst = upstream.engine.estimator.estimate("openai", "/v1/chat/completions", BODY).cost_nanos
    n_fit = 13
    policy = _policy(tmp_path, Decimal(worst * n_fit + worst // 2) / 10**9)
    url = f"sqlite:///{tmp_path}/leased.db?leases=on"
    procs = [start_serve(tmp_path / f"h{i}", upstream.upstream_port, "--store", url, "--config", str(policy),
                         "--workers", "1") for i in range(2)]
    try:
        codes = _burst([p for _, p in procs], 64, 64)
        admitted = codes.count(200)
        assert 1 <= admitted <= n_fit and codes.count(402) == 64 - admitted
        assert upstream.mock.reached("/v1/chat/completions") == admitted
    finally:
        _stop(procs)
    state = limited_state(url)
    assert state.spent == admitted * worst <= state.limit and state.held == 0


def test_far_from_the_limit_no_request_writes_a_hold_and_every_one_is_charged(tmp_path: Path,
                                                                             upstream: Servers) -> None:
    """The requests' holds live in memory: a reader of the file sees only the instances' lease holds
    (one each) however many requests are in flight, and after a graceful stop every capture."""
    worst = upstream.engine.estimator.estimate("openai", "/v1/chat/completions", BODY).cost_nanos
    policy = _policy(tmp_path, Decimal(worst * 100_000) / 10**9)
    url = f"sqlite:///{tmp_path}/leased.db?leases=on"
    procs = [start_serve(tmp_path / f"h{i}", upstream.upstream_port, "--store", url, "--config", str(policy),
                         "--workers", "1") for i in range(2)]
    most, reads, stop = [0], [0], threading.Event()

    def watch() -> None:
        db = sqlite3.connect(f"{tmp_path}/leased.db", timeout=30)
        while not stop.is_set():
            most[0] = max(most[0], db.execute("SELECT COUNT(*) FROM holds").fetchone()[0])
            reads[0] += 1
        db.close()

    watcher = threading.Thread(target=watch)
    try:
        _burst([p for _, p in procs], 40, 8)
        watcher.start()
        codes = _burst([p for _, p in procs], 400, 16)
        assert codes == [200] * 400
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        _stop(procs)
    assert reads[0] > 10 and most[0] <= 2, f"{most[0]} holds in the file at once"
    store = ledger.open(url)
    try:
        captures = [e for e in store.events(0) if e.kind == "capture"]
        assert len(captures) == 440 and {e.cost for e in captures} == {worst}
        [state] = [s for s in store.states(store.known_buckets(), now=captures[-1].ts) if s.limit is not None]
        assert (state.spent, state.held) == (440 * worst, 0)
    finally:
        store.close()
