"""``spendgate tail``: run as a user runs it, in another process, while a real ``spendgate serve``
handles requests from the official ``openai`` client — on SQLite and on Redis."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate import ledger
from spendgate.cli.tail import line
from spendgate.errors import ConfigError
from spendgate.ledger import Event
from spendgate.observe.tail import Cursor, parse_filter
from tests.harness import Servers, start_serve
from tests.redis_server import RedisServer
from tests.test_audit_alerts_serve import BILLED

POLICY = """
defaults = false

[[budget]]
name = "per-call"
usd = 5
window = "request"
action = "block"
"""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(home), "SPENDGATE_HOME": str(home / ".spendgate"), "NO_COLOR": "1"}


class Tail:
    """``spendgate tail`` as a child process, its lines read by a thread into a queue."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "spendgate.cli.main", "tail", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home))
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self.lines.put(text)

    def next(self, within: float = 30.0) -> str:
        try:
            return self.lines.get(timeout=within)
        except queue.Empty:
            assert self.proc.stderr is not None
            raise AssertionError(f"no line from spendgate tail within {within} s "
                                 f"(exit {self.proc.poll()})") from None

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C, as a person stops a follow."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def _ask(client: openai.OpenAI, user: str, max_tokens: int = 2000) -> tuple[int, str]:
    try:
        r = client.chat.completions.with_raw_response.create(
            model="o1-pro", max_tokens=max_tokens, messages=[{"role": "user", "content": "go on"}],
            extra_headers={"X-Spendgate-User": user, "x-mock-usage": BILLED})
    except openai.APIStatusError as e:
        return e.status_code, e.response.headers.get("x-spendgate-decision", "")
    return r.http_response.status_code, r.headers.get("x-spendgate-decision", "")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_tail_follows_a_serving_proxy_one_line_per_decision(tmp_path: Path, upstream: Servers, backend: str,
                                                           request: pytest.FixtureRequest) -> None:
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = f"{server.url}?prefix={uuid.uuid4().hex[:12]}"
    else:
        store = f"sqlite:///{tmp_path / 'spend.db'}"
    (tmp_path / "spendgate.toml").write_text(POLICY)
    args = ["--store", store, "--config", str(tmp_path / "spendgate.toml")]
    proc, port = start_serve(tmp_path, upstream.upstream_port, *args)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0)
    # from a minute back: whatever tail's start-up overlaps is still shown, once
    tail = Tail(tmp_path, "--json", "--follow", "--since", "1m", "--interval", "0.05", *args)
    try:
        sent = [_ask(client, "alice"), _ask(client, "bob"), _ask(client, "alice", max_tokens=10_000),
                _ask(client, "carol")]
        assert [code for code, _ in sent] == [200, 200, 402, 200]
        got = [json.loads(tail.next()) for _ in sent]
        # one line per decision: the three charges and the refusal, each with its decision id
        assert sorted((e["kind"], e["decision_id"]) for e in got) == sorted(
            ("capture" if code == 200 else "block", did) for code, did in sent)
        charge = next(e for e in got if e["decision_id"] == sent[0][1])
        assert charge["cost_usd"] == "1.2015" and charge["dims"]["user"] == "alice"
        block = next(e for e in got if e["kind"] == "block")
        assert block["rule"] == "per-call" and block["amounts"]["limit_usd"] == "5"
        # nothing is printed twice: the next line is the next decision's
        code, did = _ask(client, "dave")
        assert code == 200
        after = json.loads(tail.next())
        assert (after["kind"], after["decision_id"]) == ("capture", did)
        exit_code, err = tail.interrupt()
        assert exit_code == 0 and err == ""  # Ctrl-C ends it quietly
    finally:
        if tail.proc.poll() is None:
            tail.proc.kill()
        proc.terminate()
        proc.wait(timeout=30)

    # the same log, read once (no --follow), filtered, for a person
    done = subprocess.run([sys.executable, "-m", "spendgate.cli.main", "tail", "--filter", "kind=refused", *args],
                          capture_output=True, text=True, timeout=60, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert len(out) == 1 and "block" in out[0] and "per-call" in out[0] and "$5.00" in out[0], out
    done = subprocess.run([sys.executable, "-m", "spendgate.cli.main", "tail", "--json", "--filter",
                           "user=alice,kind=capture", *args], capture_output=True, text=True, timeout=60,
                          env=_env(tmp_path))
    assert [json.loads(x)["decision_id"] for x in done.stdout.splitlines()] == [sent[0][1]]


def _event(ts: float, did: str, kind: str = "capture", **kw: Any) -> Event:
    return Event(ts, kind, did, "gpt-4o-mini", "openai", 1_000, 10, 5, **kw)


def test_cursor_returns_each_event_once_even_when_written_late() -> None:
    store = ledger.open("memory://")
    now = time.time()
    cursor = Cursor(now - 60)
    store.record(_event(now, "a"))
    store.record(_event(now, "b"))  # the same timestamp: still two events
    assert [e.decision_id for e in cursor.poll(store)] == ["a", "b"]
    assert cursor.poll(store) == []
    store.record(_event(now - 1, "late"))  # stamped before the newest seen, written after it
    store.record(_event(now, "a", kind="block", rule="r"))  # same decision, another kind
    assert sorted((e.decision_id, e.kind) for e in cursor.poll(store)) == [("a", "block"), ("late", "capture")]
    assert cursor.poll(store) == []


def test_filter_names_its_bad_part() -> None:
    with pytest.raises(ConfigError, match=r"--filter 'colour=red': unknown key 'colour'"):
        parse_filter("user=alice,colour=red")
    with pytest.raises(ConfigError, match=r"--filter 'user': expected key=value"):
        parse_filter("user")
    keep = parse_filter("model=gpt-4o*,kind=refused")
    assert keep.matches(Event(0, "hold", "d", "gpt-4o-mini", "openai", 0))
    assert not keep.matches(Event(0, "capture", "d", "gpt-4o-mini", "openai", 0))
    assert not keep.matches(Event(0, "block", "d", "o1-pro", "openai", 0))


def test_a_refusal_line_says_what_tripped() -> None:
    e = Event(time.time(), "hold", "d1", "o1-pro", "openai", 0, dims={"user": "alice"}, rule="user-day",
              bucket="user-day|user=alice|2026-12-03",
              amounts={"estimate_usd": 1_210_000_000, "limit_usd": 3_000_000_000, "used_usd": 2_403_000_000,
                       "request_usd": 1_210_000_000})
    text = line(e)
    assert text == time.strftime("%H:%M:%S", time.localtime(e.ts)) + "  hold          o1-pro  user-day  user=alice  " \
        "$1.21  held for approval: $2.40 of $3.00 used, this request $1.21"
