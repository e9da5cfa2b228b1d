"""Many instances, one budget: `spendgate serve` processes sharing a real redis-server."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from spendgate import ledger
from spendgate.ledger import BucketState
from spendgate.policy import default_policy
from tests.harness import Servers, start_serve
from tests.redis_server import RedisServer

BODY = {"model": "gpt-4o-mini", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def upstream() -> Iterator[Servers]:
    """A fake provider that bills each call's full worst case, so no capture frees room."""
    s = Servers(default_policy(), "memory://")
    s.mock.bill_input = lambda body: s.engine.estimator.shape("openai", "/v1/chat/completions", body).input_tokens
    s.mock.completion_tokens = 1000
    yield s
    s.close()


def _policy(tmp_path: Path, usd: Decimal) -> Path:
    p = tmp_path / "p.toml"
    p.write_text(f'defaults = false\n[[budget]]\nname = "global-day"\nusd = "{usd}"\nwindow = "day"\n')
    return p


def limited_state(url: str) -> BucketState:
    """The one bucket with a limit in the store at ``url``, as it stands once everything settled."""
    store = ledger.open(url)
    try:
        [state] = [s for s in store.states(store.known_buckets(), now=1e10) if s.limit is not None]
        return state
    finally:
        store.close()


def _post(port: int) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(BODY).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-r"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("leases", [False, True])
def test_two_instances_on_one_redis_admit_exactly_n_of_64(tmp_path: Path, redis_server: RedisServer,
                                                          upstream: Servers, leases: bool) -> None:
    """Per request, exactly the 13 that fit; with budget leases never more (room left in the other
    instance's slice may turn one away), and every admitted one charged when the instances stop."""
    worst = upstream.engine.estimator.estimate("openai", "/v1/chat/completions", BODY).cost_nanos
    n_fit = 13
    policy = _policy(tmp_path, Decimal(worst * n_fit + worst // 2) / 10**9)
    url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}" + ("&leases=on" if leases else "")
    procs = [start_serve(tmp_path / f"h{i}", upstream.upstream_port, "--store", url, "--config", str(policy))
             for i in range(2)]
    try:
        codes = _burst([p for _, p in procs], 64, 64)
        admitted = codes.count(200)
        assert admitted == n_fit if not leases else 1 <= admitted <= n_fit
        assert codes.count(402) == 64 - admitted
        assert upstream.mock.reached("/v1/chat/completions") == admitted
    finally:
        for proc, _ in procs:
            proc.terminate()  # with leases, a graceful stop writes back what waits
            proc.wait(timeout=30)
    state = limited_state(url)
    assert state.spent == admitted * worst <= state.limit and state.held == 0


def test_redis_down_refuses_clearly_then_resumes_with_nothing_lost(tmp_path: Path, upstream: Servers) -> None:
    server = RedisServer(tmp_path / "redis").start()
    policy = _policy(tmp_path, Decimal(100))
    proc, port = start_serve(tmp_path / "home", upstream.upstream_port, "--store", server.url,
                             "--config", str(policy))
    try:
        for _ in range(3):
            assert _post(port)[0] == 200
        server.stop()
        status, body = _post(port)
        assert status == 503 and proc.poll() is None, "refused, and the proxy is still up"
        msg = body["error"]["message"]
        assert "Redis store redis://127.0.0.1" in msg and 'on_store_error = "block"' in msg
        server = RedisServer(tmp_path / "redis", port=server.port).start()  # same AOF directory
        assert _post(port)[0] == 200, "service resumes once Redis is back"
        store = ledger.open(server.url)
        try:
            events = store.events(0)
            assert len(events) == 4 and not any(e.estimated for e in events), "no captured spend was lost"
            [state] = store.states(store.known_buckets(), now=events[-1].ts)
            assert state.spent == sum(e.cost for e in events) and state.held == 0
        finally:
            store.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.stop()


def test_health_endpoint_follows_the_store(tmp_path: Path, upstream: Servers) -> None:
    server = RedisServer(tmp_path / "redis").start()
    proc, port = start_serve(tmp_path / "home", upstream.upstream_port, "--store", server.url)

    def health() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/spendgate/health", timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert health() == 200
        server.stop()
        assert health() == 503
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _burst(ports: list[int], n: int, concurrency: int) -> list[int]:
    async def run() -> list[int]:
        gate = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as client:
            async def one(i: int) -> int:
                async with gate, client.post(f"http://127.0.0.1:{ports[i % len(ports)]}/v1/chat/completions",
                                             json=BODY, headers={"Authorization": "Bearer sk-r"}) as r:
                    await r.read()
                    return r.status
            return list(await asyncio.gather(*(one(i) for i in range(n))))
    return asyncio.run(run())


def _evalsha_calls(redis_url: str) -> int:
    import redis

    stats = redis.Redis.from_url(redis_url.split("?")[0]).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_leases_take_redis_off_the_path_far_from_the_limit_and_charge_exactly(
        tmp_path: Path, redis_server: RedisServer, upstream: Servers) -> None:
    worst = upstream.engine.estimator.estimate("openai", "/v1/chat/completions", BODY).cost_nanos
    policy = _policy(tmp_path, Decimal(worst * 100_000) / 10**9)  # far from its limit all along
    url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}&leases=on"
    procs = [start_serve(tmp_path / f"h{i}", upstream.upstream_port, "--store", url, "--config", str(policy))
             for i in range(2)]
    try:
        _burst([p for _, p in procs], 40, 8)  # the first slices are claimed
        before = _evalsha_calls(url)
        codes = _burst([p for _, p in procs], 600, 8)
        trips = _evalsha_calls(url) - before
        assert codes == [200] * 600
        assert trips / 600 <= 0.05, f"{trips} ledger round trips for 600 requests"
    finally:
        for proc, _ in procs:
            proc.terminate()  # a graceful stop writes back what waits and hands the slices back
            proc.wait(timeout=30)
    store = ledger.open(url)
    try:
        captures = [e for e in store.events(0) if e.kind == "capture"]
        assert len(captures) == 640 and {e.cost for e in captures} == {worst}  # the fake bills the worst case
        [state] = [s for s in store.states(store.known_buckets(), now=captures[-1].ts) if s.limit is not None]
        assert (state.spent, state.held) == (640 * worst, 0)
    finally:
        store.close()
