"""The live policy: run-time budgets applied on every instance, hot reload, shadow mode, effective_from.

Unit tests drive :class:`~spendgate.policy.live.LivePolicy` with an injected clock; the end-to-end
tests run ``spendgate serve`` processes on one redis-server, driven by the official openai client
over the fake upstream."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.engine import Engine
from spendgate.errors import StoreError
from spendgate.ledger.memory import MemoryLedger
from spendgate.policy import default_policy, load, runtime
from spendgate.policy.live import LivePolicy
from spendgate.request import hash_key
from tests.harness import Servers, start_serve
from tests.redis_server import RedisServer

BODY: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
BASE = 'defaults = false\nversion = "1"\n[[budget]]\nname = "day"\nusd = 1000\nwindow = "day"\n'


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _live(tmp_path: Path, text: str, clock: Clock | None = None) -> tuple[LivePolicy, Engine, Path]:
    path = tmp_path / "spendgate.toml"
    path.write_text(text)
    policy = load(path)
    engine = Engine(policy, ledger.open("memory://"))
    return LivePolicy(engine, engine.ledger, str(path), policy, clock=clock or Clock(T0)), engine, path


# -- unit: the store's overlay ------------------------------------------------------------------------


def test_run_time_rules_limits_and_pauses_apply_once_per_change(tmp_path: Path) -> None:
    live, engine, _ = _live(tmp_path, BASE)
    assert live.refresh_now() is True  # first read
    file_hash = engine.policy_hash
    assert live.refresh_now() is False  # nothing changed: no rebuild
    runtime.put_rule(engine.ledger, {"name": "rt", "usd": "2.5", "window": "day", "per": "user"},
                     file_rules=live.file_policy.rules, by="ops")
    assert live.refresh_now() is True
    assert [r.name for r in engine.policy.rules] == ["day", "rt"]
    assert engine.policy_hash != file_hash and engine.policy.version == "1"
    rule = engine.policy.rules[1]
    runtime.set_limit(engine.ledger, rule, "user=alice", usd="7", by="ops")
    runtime.pause(engine.ledger, "key=0123456789abcdef", by="ops")
    assert live.refresh_now() is True
    assert engine.limits[("rt", "user=alice")].usd == 7_000_000_000
    assert [p.scope for p in engine.pauses] == ["key=0123456789abcdef"]
    assert [b.limit for b in engine.buckets_for(rule, "user=alice", T0)] == [7_000_000_000]
    assert [b.limit for b in engine.buckets_for(rule, "user=bob", T0)] == [2_500_000_000]
    assert live.refresh_now() is False


def test_a_run_time_rule_named_like_a_new_file_rule_is_dropped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    live, engine, path = _live(tmp_path, BASE)
    runtime.put_rule(engine.ledger, {"name": "rt", "usd": "2", "window": "day"}, file_rules=live.file_policy.rules,
                     by="ops")
    live.refresh_now()
    path.write_text(BASE + '[[budget]]\nname = "rt"\nusd = 9\nwindow = "week"\n')
    with caplog.at_level(logging.INFO, "spendgate.policy"):
        assert live.reload_file() is True
        live.refresh_now()
    rts = [r for r in engine.policy.rules if r.name == "rt"]
    assert len(rts) == 1 and rts[0].window.period == "week"  # the file's
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert warnings == ['run-time budget "rt" is ignored: the policy file has a budget of that name, and the '
                        "file's wins"]


class FailingStore(MemoryLedger):
    fail = False

    def records(self, kind: str, *, now: float) -> list[tuple[str, str]]:
        if self.fail:
            raise StoreError("redis: connection refused")
        return super().records(kind, now=now)


def test_a_store_error_keeps_the_last_state_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore()
    engine = Engine(default_policy(), store)
    live = LivePolicy(engine, store, None, default_policy())
    runtime.put_rule(store, {"name": "rt", "usd": "1", "window": "day"}, file_rules=(), by="ops")
    live.refresh_now()
    before = engine.policy_hash
    store.fail = True
    with caplog.at_level(logging.INFO, "spendgate.policy"):
        for _ in range(5):
            assert live.refresh_now() is False
            live.maybe_refresh()  # the SDK's path: never raises
        store.fail = False
        live.refresh_now()
    assert engine.policy_hash == before and engine.policy.rules[-1].name == "rt"
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "cannot read run-time budgets" in m]) == 1
    assert len([m for m in said if "answers again" in m]) == 1


# -- unit: the file -----------------------------------------------------------------------------------


def test_a_reload_that_fails_validation_keeps_the_policy_and_names_the_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    live, engine, path = _live(tmp_path, BASE)
    live.refresh_now()
    before = engine.policy_hash
    path.write_text(BASE.replace('window = "day"', 'window = "fortnightly"'))
    with caplog.at_level(logging.INFO, "spendgate.policy"):
        assert live.reload_file("SIGHUP") is False
    assert engine.policy_hash == before
    (err,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    said = err.getMessage()
    assert 'budget[0] "day".window: expected request' in said and "policy in force stays" in said


def test_effective_from_stages_a_reload_until_its_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(T0)
    live, engine, path = _live(tmp_path, BASE, clock)
    live.refresh_now()
    old = engine.policy_hash
    path.write_text(BASE.replace('version = "1"', f'version = "2"\neffective_from = {_iso(T0 + 60)}'))
    assert live.file_changed()
    with caplog.at_level(logging.INFO, "spendgate.policy"):
        assert live.reload_file() is True
        assert not live.file_changed()
        assert engine.policy_hash == old and live.staged is not None
        clock.now = T0 + 59
        assert live.tick() is False and live.refresh_now() is False
        clock.now = T0 + 60
        assert live.tick() is True
    assert engine.policy.version == "2" and live.staged is None
    said = [r.getMessage() for r in caplog.records]
    assert any("staged; it takes over at" in m for m in said)
    assert any("takes over: its effective_from" in m for m in said)
    assert any("(version 2) in force" in m and "in force" in m for m in said)


def test_a_staged_policy_also_takes_over_from_the_refresh_pass(tmp_path: Path) -> None:
    clock = Clock(T0)
    live, engine, path = _live(tmp_path, BASE, clock)
    live.refresh_now()
    path.write_text(BASE.replace('version = "1"', f'version = "3"\neffective_from = {_iso(T0 + 5)}'))
    live.reload_file()
    clock.now = T0 + 5
    assert live.refresh_now() is True and engine.policy.version == "3"


def test_at_start_a_future_effective_from_applies_at_once_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    live, engine, _ = _live(tmp_path, BASE.replace('version = "1"', f'version = "9"\neffective_from = '
                                                                    f'{_iso(T0 + 3600)}'))

    async def run() -> None:
        await live.start()
        live.announce()  # as serve does once it listens
        await live.stop()

    with caplog.at_level(logging.INFO, "spendgate.policy"):
        asyncio.run(run())
    assert engine.policy.version == "9"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "still ahead; at start it applies at once" in warned[0]


# -- end to end: serve processes on one Redis ------------------------------------------------------------


class Tail:
    """A serve process's stderr, read on a thread, so a test can wait for a line without a sleep."""

    def __init__(self, proc: Any) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(proc.stderr,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"serve never said {text!r}; it said {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0)


def _ask(client: openai.OpenAI, user: str = "alice", fresh: bool = True) -> tuple[int, dict[str, Any]]:
    """One call; ``fresh`` makes its body new (a refused body repeated is answered from memory)."""
    body = {**BODY, "messages": [{"role": "user", "content": f"hi {uuid.uuid4().hex}"}]} if fresh else BODY
    try:
        client.chat.completions.create(**body, extra_headers={"X-Spendgate-User": user})
    except openai.APIStatusError as e:
        return e.status_code, e.response.json()
    return 200, {}


def _stop(proc: Any) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    assert proc.returncode in (0, -15)


def _until(predicate: Any, limit: float) -> float:
    """Seconds until ``predicate()`` holds, polled; fails past ``limit``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < limit, f"not within {limit} s"
    return time.monotonic() - start


def test_a_rule_written_to_the_store_refuses_on_another_instance_within_two_seconds(
        tmp_path: Path, redis_server: RedisServer, upstream: Servers) -> None:
    url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}"
    (tmp_path / "p.toml").write_text(BASE)
    args = ("--store", url, "--config", str(tmp_path / "p.toml"))
    procs = [start_serve(tmp_path / f"h{i}", upstream.upstream_port, *args) for i in range(2)]
    store = ledger.open(url)
    try:
        a, b = (_client(port) for _, port in procs)
        assert _ask(a)[0] == _ask(b)[0] == 200
        # the README's command, from another shell's point of view: it writes to the shared store
        assert main(["budgets", "add", "per-user", "--usd", "0.000001", "--window", "day", "--per", "user",
                     *args]) == 0
        took = _until(lambda: _ask(b, "alice")[0] == 402, 2.0)
        assert took < 2.0
        code, body = _ask(b, "carol")
        assert code == 402 and body["spendgate"]["rule"] == "per-user"
        # one user's own limit: bob may spend again, on both instances; alice and carol stay refused
        rule = next(r for r in runtime.load(store).rules if r.name == "per-user")
        _until(lambda: _ask(a, "bob", fresh=False)[0] == 402, 2.0)  # A applies the rule too
        assert main(["budgets", "limit", rule.name, "user=bob", "--usd", "10", *args]) == 0
        # the very body refused a moment ago passes: a change forgets the refusals a retry repeats
        _until(lambda: _ask(a, "bob", fresh=False)[0] == 200, 2.0)
        _until(lambda: _ask(b, "bob")[0] == 200, 2.0)
        assert _ask(a, "alice")[0] == _ask(b, "carol")[0] == 402
        # the kill switch: one key, on every instance within a second, until resumed
        key_id = hash_key("sk-client")[:8]
        assert main(["pause", f"key={key_id}", "--reason", "incident 7", *args]) == 0
        for client in (a, b):
            assert _until(lambda c=client: _ask(c, "bob")[0] == 402, 1.0) < 1.0
        code, body = _ask(b, "bob")
        assert "paused by" in body["error"]["message"] and "incident 7" in body["error"]["message"]
        assert main(["resume", f"key={key_id}", *args]) == 0
        for client in (a, b):
            _until(lambda c=client: _ask(c, "bob")[0] == 200, 1.0)
    finally:
        store.close()
        for proc, _ in procs:
            _stop(proc)


SHADOW = 'defaults = false\nmode = "shadow"\nversion = "a1"\n[[budget]]\nname = "rpm"\nrequests = 2\nwindow = "1m"\n'


def test_shadow_then_enforce_on_sighup_and_a_broken_reload_keeps_the_policy(
        tmp_path: Path, redis_server: RedisServer, upstream: Servers) -> None:
    url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}"
    path = tmp_path / "p.toml"
    path.write_text(SHADOW)
    proc, port = start_serve(tmp_path / "h", upstream.upstream_port, "--store", url, "--config", str(path))
    tail = Tail(proc)
    store = ledger.open(url)
    try:
        tail.wait_for("(version a1) in force")
        client = _client(port)
        assert [_ask(client)[0] for _ in range(4)] == [200] * 4  # shadow: nothing refused
        would = [e for e in store.events(0) if e.kind == "would_refuse"]
        assert [(e.rule, e.amounts["used_requests"], e.amounts["limit_requests"]) for e in would] == \
            [("rpm", 2, 2), ("rpm", 3, 2)]
        assert upstream.mock.reached("/v1/chat/completions") == 4
        # the same size and mtime: only SIGHUP can tell the server the file changed
        st = os.stat(path)
        path.write_text(SHADOW.replace('"shadow"', '"enforce"').replace('"a1"', '"2"'))
        assert os.stat(path).st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        proc.send_signal(signal.SIGHUP)
        tail.wait_for("(version 2) in force")
        code, body = _ask(client)
        assert code == 402 and body["spendgate"]["rule"] == "rpm"
        # a broken file: the enforce policy stays, and the log names the key
        path.write_text(SHADOW.replace('"shadow"', '"sometimes"'))
        proc.send_signal(signal.SIGHUP)
        line = tail.wait_for("was not loaded")
        assert "mode: expected one of" in line and "'sometimes'" in line and "(version 2)" in line
        code, body = _ask(client)
        assert code == 402 and body["spendgate"]["rule"] == "rpm"
        assert upstream.mock.reached("/v1/chat/completions") == 4
    finally:
        store.close()
        _stop(proc)


def test_ten_requests_a_minute_pass_exactly_ten_of_thirty_concurrent(
        tmp_path: Path, redis_server: RedisServer, upstream: Servers) -> None:
    url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}"
    path = tmp_path / "p.toml"
    path.write_text('defaults = false\n[[budget]]\nname = "rpm"\nrequests = 10\nwindow = "1m"\n')
    proc, port = start_serve(tmp_path / "h", upstream.upstream_port, "--store", url, "--config", str(path))
    try:
        async def burst() -> list[int]:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client",
                                        max_retries=0)

            async def one() -> int:
                try:
                    await client.chat.completions.create(**BODY)
                except openai.APIStatusError as e:
                    return e.status_code
                return 200

            try:
                return list(await asyncio.gather(*(one() for _ in range(30))))
            finally:
                await client.close()

        codes = asyncio.run(burst())
        assert codes.count(200) == 10 and codes.count(402) == 20
        assert upstream.mock.reached("/v1/chat/completions") == 10
    finally:
        _stop(proc)
