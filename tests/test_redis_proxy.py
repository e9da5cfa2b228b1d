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


def _post(port: int) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(BODY).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-r"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_two_instances_on_one_redis_admit_exactly_n_of_64(tmp_path: Path, redis_server: RedisServer,
                                                          upstream: Servers) -> None:
    worst = upstream.engine.estimator.estimate("openai", "/v1/chat/completions", BODY).cost_nanos
    n_fit = 13
    policy = _policy(tmp_path, Decimal(worst * n_fit + worst // 2) / 10**9)
    url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}"
    procs = [start_serve(tmp_path / f"h{i}", upstream.upstream_port, "--store", url, "--config", str(policy))
             for i in range(2)]
    try:
        async def burst() -> list[int]:
            async with aiohttp.ClientSession() as client:
                async def one(i: int) -> int:
                    port = procs[i % 2][1]
                    async with client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY,
                                           headers={"Authorization": "Bearer sk-r"}) as r:
                        await r.read()
                        return r.status
                return list(await asyncio.gather(*(one(i) for i in range(64))))

        codes = asyncio.run(burst())
        assert codes.count(200) == n_fit and codes.count(402) == 64 - n_fit
        assert upstream.mock.reached("/v1/chat/completions") == n_fit
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=10)


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
