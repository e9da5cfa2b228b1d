"""The audit log and the alerts, end to end: real ``spendgate serve`` processes driven by the official
``openai`` client over the fake upstream, the CLI run as a user runs it, a webhook receiver on
loopback, and the Node.js verifier."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from spendgate.demo.background import BackgroundLoop
from tests.harness import Servers, free_port, start_serve
from tests.redis_server import RedisServer

# o1-pro: $150 in / $600 out per Mtok; 2,000 output tokens: a $1.21 worst case, $1.2015 billed
BILLED = json.dumps({"prompt_tokens": 10, "completion_tokens": 2000, "total_tokens": 2010})
O1: dict[str, Any] = {"model": "o1-pro", "max_tokens": 2000, "messages": [{"role": "user", "content": "go on"}]}


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "SPENDGATE_HOME": str(home / ".spendgate")}
    return subprocess.run([sys.executable, "-m", "spendgate.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


class Serve:
    def __init__(self, tmp: Path, upstream: Servers, store: str, policy: str) -> None:
        self.tmp = tmp
        (tmp / "spendgate.toml").write_text(policy)
        self.args = ["--store", store, "--config", str(tmp / "spendgate.toml")]
        self.proc, self.port = start_serve(tmp, upstream.upstream_port, *self.args, "--admin-token", "tok")
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="sk-client",
                                    max_retries=0, default_headers={"x-mock-usage": BILLED})

    def ask(self, user: str = "alice", **over: Any) -> tuple[int, str]:
        """(status, decision id) of one chat completion through the official client."""
        try:
            r = self.client.chat.completions.with_raw_response.create(
                **{**O1, **over}, extra_headers={"X-Spendgate-User": user})
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("x-spendgate-decision", "")
        return r.http_response.status_code, r.headers.get("x-spendgate-decision", "")

    def stop(self) -> str:
        """Stop as an operator does (SIGTERM): the final checkpoint is written on the way out."""
        self.proc.terminate()
        self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        assert self.proc.returncode in (0, -15), err
        return err


POLICY = """
defaults = false

[[budget]]
name = "per-call"
usd = 5
window = "request"
action = "block"

[[budget]]
name = "user-day"
usd = 3
window = "day"
per = "user"
action = "hold"
"""


def _drive(s: Serve, home: Path) -> None:
    """allow + capture twice, a block, a hold, an operator's approval from another shell, the retry."""
    assert s.ask()[0] == 200
    assert s.ask()[0] == 200
    assert s.ask(max_tokens=10_000)[0] == 402  # $6 worst case: per-call blocks
    status, held = s.ask()  # $2.403 spent + $1.21 > $3: held
    assert status == 402 and held
    done = cli(home, "approve", held, "--max", "5", *s.args)
    assert done.returncode == 0, done.stderr
    assert s.ask()[0] == 200


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _verify(home: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return cli(home, "audit", "verify", "--from", str(path))


def test_a_served_day_exports_and_verifies_and_every_tampering_is_named(
        tmp_path: Path, upstream: Servers) -> None:
    store = f"sqlite:///{tmp_path / 'spend.db'}"
    s = Serve(tmp_path, upstream, store, POLICY)
    _drive(s, tmp_path)
    s.stop()
    out = tmp_path / "audit.jsonl"
    done = cli(tmp_path, "audit", "export", "--store", store, "--out", str(out))
    assert done.returncode == 0, done.stderr
    entries = [json.loads(x) for x in _lines(out)]
    server_chain = [e for e in entries if e["kind"] != "checkpoint" and e["kind"] != "approval"]
    # a capture may land just after the next request's decision: count, do not order
    assert Counter(e["kind"] for e in server_chain) == {"allow": 3, "capture": 3, "block": 1, "hold": 1}
    assert [e["seq"] for e in server_chain] == list(range(1, 9))
    approvals = [e for e in entries if e["kind"] == "approval"]
    assert len(approvals) == 1 and approvals[0]["chain"] != server_chain[0]["chain"]  # the CLI's own chain
    capture = next(e for e in server_chain if e["kind"] == "capture")
    assert capture["amounts"]["cost_usd"] == "1.2015" and capture["dims"]["user"] == "alice"
    assert all("go on" not in line and "sk-client" not in line for line in _lines(out))  # no prompts, no keys
    ok = _verify(tmp_path, out)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    chain = server_chain[0]["chain"]
    lines = _lines(out)
    idx = [i for i, x in enumerate(lines) if json.loads(x)["chain"] == chain and json.loads(x)["kind"] != "checkpoint"]

    def tampered(name: str, new: list[str]) -> subprocess.CompletedProcess[str]:
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(new) + "\n")
        return _verify(tmp_path, p)

    edited = list(lines)
    at = idx[capture["seq"] - 1]
    edited[at] = edited[at].replace('"1.2015"', '"1.2014"')  # one byte of one entry
    assert edited[at] != lines[at]
    swapped = list(lines)
    swapped[idx[2]], swapped[idx[3]] = swapped[idx[3]], swapped[idx[2]]
    deleted = [x for i, x in enumerate(lines) if i != idx[4]]
    cut = [x for i, x in enumerate(lines) if i not in idx[-5:]]
    for name, new, expected in (("edited", edited, f"seq {capture['seq']}: edited"),
                                ("swapped", swapped, "seq 3: reordered"),
                                ("deleted", deleted, "seq 5: missing"),
                                ("cut", cut, "seq 8: truncated after seq 3")):
        bad = tampered(name, new)
        said = bad.stdout + bad.stderr
        assert bad.returncode == 1, (name, said)
        assert f"chain {chain}: {expected}" in said, (name, said)

    node = shutil.which("node")
    assert node is not None, "Node.js is needed for the cross-language check (scripts/test.sh installs it)"
    pub = cli(tmp_path, "audit", "pubkey").stdout.strip()
    assert len(pub) == 64
    script = Path(__file__).resolve().parents[1] / "scripts" / "verify-audit.mjs"
    good = subprocess.run([node, str(script), str(out), pub], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = subprocess.run([node, str(script), str(tmp_path / "edited.jsonl"), pub], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1, bad.stdout + bad.stderr


def test_two_instances_on_one_redis_write_two_chains_that_both_verify(
        tmp_path: Path, upstream: Servers, redis_server: RedisServer) -> None:
    store = f"{redis_server.url}?prefix=audit2"
    a = Serve(tmp_path, upstream, store, "defaults = false\n")
    b = Serve(tmp_path, upstream, store, "defaults = false\n")
    for _ in range(3):
        assert a.ask()[0] == 200
        assert b.ask(user="bob")[0] == 200
    a.stop()
    b.stop()
    out = tmp_path / "audit.jsonl"
    assert cli(tmp_path, "audit", "export", "--store", store, "--out", str(out)).returncode == 0
    chains = {json.loads(x)["chain"] for x in _lines(out)}
    assert len(chains) == 2
    for chain in chains:
        mine = [json.loads(x) for x in _lines(out) if json.loads(x)["chain"] == chain]
        assert [e["seq"] for e in mine if e["kind"] != "checkpoint"] == [1, 2, 3, 4, 5, 6]
    ok = _verify(tmp_path, out)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    stored = cli(tmp_path, "audit", "verify", "--store", store)
    assert stored.returncode == 0, stored.stdout + stored.stderr


class Receiver:
    """A webhook receiver on a fixed loopback port, started and stopped at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.got: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.changed = threading.Condition()
        self.bg: BackgroundLoop | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        doc = await request.json()
        with self.changed:
            self.got.append((dict(request.headers), doc))
            self.changed.notify_all()
        return web.json_response({"ok": True})

    def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.bg = BackgroundLoop()

        async def bind() -> None:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.bg._runners.append(runner)  # type: ignore[union-attr]

        self.bg.run(bind())

    def wait_for(self, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.got) >= n, timeout=timeout), self.got
            return [doc for _, doc in self.got]

    def stop(self) -> None:
        if self.bg is not None:
            self.bg.close()


def _alert_policy(hook: str) -> str:
    return f"""
defaults = false

[[budget]]
name = "user-day"
usd = 6
window = "day"
per = "user"
alert_at = [0.5, 0.8, 1.0]

[alerts]
webhooks = ["{hook}"]
"""


def _cross_every_threshold(s: Serve) -> None:
    # worst case $1.21, billed $1.2015: 50 % ($3) at the 3rd, 80 % ($4.80) at the 4th; the 5th would
    # pass $6 and is refused: the 100 % alert
    assert [s.ask()[0] for _ in range(6)] == [200, 200, 200, 200, 402, 402]


def _thresholds(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["spendgate"]["type"], d["spendgate"]["threshold"]) for d in docs)


EXPECTED = [("refused", "1"), ("threshold", "0.5"), ("threshold", "0.8")]


def test_a_webhook_gets_each_threshold_exactly_once(tmp_path: Path, upstream: Servers) -> None:
    rx = Receiver(free_port())
    rx.start()
    try:
        store = f"sqlite:///{tmp_path / 'spend.db'}"
        s = Serve(tmp_path, upstream, store, _alert_policy(rx.url))
        _cross_every_threshold(s)
        docs = rx.wait_for(3)
        assert _thresholds(docs) == EXPECTED
        assert all(d["text"] and "user-day" in d["text"] for d in docs)
        keys = [h["Idempotency-Key"] for h, _ in rx.got]
        assert len(set(keys)) == 3 and all(d["spendgate"]["idempotency_key"] in keys for d in docs)
        assert s.ask()[0] == 402  # still full: no alert again
        s.stop()
        assert len(rx.got) == 3
        listed = json.loads(cli(tmp_path, "alerts", "--json", "--store", store).stdout)["alerts"]
        assert sorted(a["status"] for a in listed) == ["sent", "sent", "sent"]
    finally:
        rx.stop()


def test_alerts_crossed_while_the_receiver_is_down_arrive_after_a_restart(tmp_path: Path, upstream: Servers) -> None:
    rx = Receiver(free_port())  # nothing listens there yet
    store = f"sqlite:///{tmp_path / 'spend.db'}"
    s = Serve(tmp_path, upstream, store, _alert_policy(rx.url))
    _cross_every_threshold(s)
    s.stop()
    pending = json.loads(cli(tmp_path, "alerts", "--json", "--store", store).stdout)["alerts"]
    assert sorted(a["status"] for a in pending) == ["pending", "pending", "pending"]
    rx.start()
    try:
        again = Serve(tmp_path, upstream, store, _alert_policy(rx.url))
        docs = rx.wait_for(3)
        assert _thresholds(docs) == EXPECTED
        again.stop()
        assert len(rx.got) == 3
    finally:
        rx.stop()


HOLD_POLICY = """
defaults = false

[[budget]]
name = "user-day"
usd = 2
window = "day"
per = "user"
action = "hold"

[alerts]
webhooks = ["{hook}"]
"""


def test_a_hold_notifies_with_an_approve_command_that_works_as_printed(tmp_path: Path, upstream: Servers) -> None:
    rx = Receiver(free_port())
    rx.start()
    try:
        store = f"sqlite:///{tmp_path / 'store' / 'spend.db'}"
        s = Serve(tmp_path, upstream, store, HOLD_POLICY.format(hook=rx.url))
        assert s.ask()[0] == 200
        status, held = s.ask()
        assert status == 402
        (doc,) = rx.wait_for(1)
        note = doc["spendgate"]
        assert note["type"] == "hold" and note["decision_id"] == held
        assert held in doc["text"] and note["approve_command"] in doc["text"]
        assert note["approve_url"] == f"http://127.0.0.1:{s.port}/spendgate/approvals/{held}"
        argv = shlex.split(note["approve_command"])
        assert argv[:3] == ["spendgate", "approve", held]
        done = cli(tmp_path, *argv[1:])
        assert done.returncode == 0, done.stderr
        assert s.ask()[0] == 200  # the held request's retry passes
        s.stop()
    finally:
        rx.stop()


@pytest.mark.parametrize("content", [None, "not a key\n"])
def test_serve_stops_rather_than_write_an_unsigned_log(tmp_path: Path, content: str | None) -> None:
    key = tmp_path / "ops" / "audit.key"
    if content is not None:
        key.parent.mkdir()
        key.write_text(content)
    (tmp_path / "spendgate.toml").write_text(f'audit_key = "file:{key}"\n')
    done = cli(tmp_path, "serve", "--port", str(free_port()), "--config", str(tmp_path / "spendgate.toml"),
               "--store", f"sqlite:///{tmp_path / 'spend.db'}")
    assert done.returncode == 2
    assert str(key) in done.stderr and "guarding" not in done.stderr
    assert done.stderr.count("\n") == 1, "one line, no traceback"


def test_config_check_reads_an_operators_signing_key(tmp_path: Path) -> None:
    key = tmp_path / "missing.key"
    (tmp_path / "spendgate.toml").write_text(f'audit_key = "file:{key}"\n')
    done = cli(tmp_path, "config", "check", str(tmp_path / "spendgate.toml"))
    assert done.returncode == 2 and str(key) in done.stderr
    assert not key.exists(), "an operator's key is never created"
