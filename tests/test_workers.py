"""``spendgate serve --workers 2``: two real server processes on one port, one store, one sender.

Each test starts the real command (the parent and its two workers) over a fake upstream on loopback
and drives it with the official ``openai`` client. Which worker answered is read from the
``X-Spendgate-Worker`` header each one sets.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from spendgate import ledger
from spendgate.demo.background import BackgroundLoop
from spendgate.policy import default_policy
from spendgate.report import SPEND_KINDS
from tests.conftest import store_url
from tests.harness import Servers, free_port, start_serve
from tests.test_audit_alerts_serve import Receiver, _alert_policy

# o1-pro: $150 in / $600 out per Mtok. Billed 10 in + 2,000 out: $1.2015 a call, to the nano-dollar
BILLED = {"prompt_tokens": 10, "completion_tokens": 2000, "total_tokens": 2010}
BILLED_NANOS = 10 * 150_000 // 1000 * 1000 + 2000 * 600 * 1000
BODY: dict[str, Any] = {"model": "o1-pro", "max_tokens": 2000, "messages": [{"role": "user", "content": "go on"}]}
N_FIT = 10


def test_billed_nanos_is_the_price_table_arithmetic() -> None:
    assert BILLED_NANOS == 1_201_500_000


class Workers:
    """``spendgate serve --workers 2`` with its stderr read on a thread (a test waits for a line,
    never sleeps, and a full pipe never blocks a worker)."""

    def __init__(self, home: Path, upstream_port: int, *args: str, workers: int = 2) -> None:
        self.proc, self.port = start_serve(home, upstream_port, "--workers", str(workers), *args)
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        for line in self.seen:
            if text in line:
                self.seen.remove(line)
                return line
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"serve never said {text!r}; it said {self.seen}") from None
            if text in line:
                return line
            self.seen.append(line)

    def said(self) -> str:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return "".join(self.seen)

    def workers(self) -> list[int]:
        """The worker processes' pids (the parent's children, from /proc)."""
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(k) for k in kids]

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; the exit status (what it said is in the failure)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        assert code == 0, self.said()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def upstream() -> Iterator[Servers]:
    s = Servers(default_policy(), "memory://")  # only its fake upstream is used
    yield s
    s.close()


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spendgate.toml"
    path.write_text(text)
    return path


def _worst(upstream: Servers) -> int:
    return upstream.engine.estimator.estimate("openai", "/v1/chat/completions", BODY).cost_nanos


def _budget(usd: Decimal) -> str:
    return f'defaults = false\n[[budget]]\nname = "global-day"\nusd = "{usd}"\nwindow = "day"\n'


async def _burst(port: int, n: int) -> list[tuple[int, str]]:
    """``n`` concurrent chat completions through the official async client: (status, worker)."""
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0,
                                default_headers={"x-mock-usage": json.dumps(BILLED)})

    async def one(i: int) -> tuple[int, str]:
        body = {**BODY, "messages": [{"role": "user", "content": f"go on {i}"}]}
        try:
            r = await client.chat.completions.with_raw_response.create(**body)
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("x-spendgate-worker", "")
        return r.http_response.status_code, r.headers.get("x-spendgate-worker", "")

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await client.close()


def _scrape(port: int) -> tuple[str, dict[str, float]]:
    """(the worker that answered, ``name{labels}`` -> value) of one scrape on a new connection."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        worker = r.headers["X-Spendgate-Worker"]
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name + json.dumps(dict(sorted(s.labels.items())))] = s.value
    return worker, out


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "SPENDGATE_HOME": str(home / ".spendgate")}
    return subprocess.run([sys.executable, "-m", "spendgate.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_two_workers_admit_exactly_the_calls_that_fit_charge_them_exactly_and_count_them_once(
        tmp_path: Path, upstream: Servers, kind: str, request: pytest.FixtureRequest) -> None:
    worst = _worst(upstream)
    # room for N_FIT worst cases and half of one more: captures ($1.2015 < the worst case) never
    # free enough for an eleventh, whatever the order
    policy = _policy(tmp_path, _budget(Decimal(worst * N_FIT + worst // 2) / 10**9))
    url = store_url(kind, tmp_path, request)
    s = Workers(tmp_path, upstream.upstream_port, "--store", url, "--config", str(policy))
    try:
        answers = asyncio.run(_burst(s.port, 32))
        codes = Counter(code for code, _ in answers)
        assert codes == {200: N_FIT, 402: 32 - N_FIT}
        assert upstream.mock.reached("/v1/chat/completions") == N_FIT
        assert {w for _, w in answers} == {"1", "2"}, "both workers answered"
        # /metrics, whichever worker answers, counts every worker's requests
        seen: set[str] = set()
        for _ in range(40):
            worker, m = _scrape(s.port)
            seen.add(worker)
            assert m['spendgate_decisions_total{"action": "allow", "rule": ""}'] == N_FIT
            assert m['spendgate_decisions_total{"action": "block", "rule": "global-day"}'] == 32 - N_FIT
            assert m['spendgate_spend_nanodollars_total{"model": "o1-pro", "provider": "openai"}'] \
                == N_FIT * BILLED_NANOS
            assert m['spendgate_charges_total{"kind": "capture"}'] == N_FIT
            assert m['spendgate_added_latency_seconds_count{}'] == 32
            if seen == {"1", "2"}:
                break
        assert seen == {"1", "2"}
        assert s.stop() == 0
        err = s.said()
        assert "error" not in err and "Traceback" not in err, err
    finally:
        s.kill()
    store = ledger.open(url)
    try:
        charged = [e.cost for e in store.events(0) if e.kind in SPEND_KINDS]
        assert charged == [BILLED_NANOS] * N_FIT, "each admitted call charged its usage, to the nano-dollar"
        assert [e.kind for e in store.events(0)].count("block") == 32 - N_FIT
    finally:
        store.close()
    out = tmp_path / "audit.jsonl"
    done = _cli(tmp_path, "audit", "export", "--store", url, "--out", str(out))
    assert done.returncode == 0, done.stderr
    entries = [json.loads(x) for x in out.read_text().splitlines()]
    chains = Counter(e["chain"] for e in entries if e["kind"] != "checkpoint")
    assert len(chains) == 2 and sum(chains.values()) == 32 + N_FIT, "one chain per worker, every decision in one"
    ok = _cli(tmp_path, "audit", "verify", "--from", str(out))
    assert ok.returncode == 0, ok.stdout + ok.stderr


class SlowUpstream:
    """An OpenAI chat upstream that answers only when the test lets it."""

    def __init__(self) -> None:
        self.bg = BackgroundLoop()
        self.release = asyncio.Event()
        self.arrived = 0
        self.cond = threading.Condition()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.port = self.bg.serve(app)

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
        await self.release.wait()
        return web.json_response({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}], "usage": BILLED})

    def wait_arrived(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.arrived >= n, timeout=60), self.arrived

    def let_go(self) -> None:
        async def go() -> None:
            self.release.set()

        self.bg.run(go())


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_stops_both_workers_gracefully_and_loses_no_capture(tmp_path: Path) -> None:
    slow = SlowUpstream()
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    s = Workers(tmp_path, slow.port, "--store", url, "--config", str(_policy(tmp_path, "defaults = false\n")))
    n = 12
    results: list[tuple[int, str]] = []
    try:
        runner = threading.Thread(target=lambda: results.extend(asyncio.run(_burst(s.port, n))))
        runner.start()
        slow.wait_arrived(n)  # every call is in flight, in one worker or the other
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _refused(s.port):  # both workers closed their sockets: they are stopping
            assert time.monotonic() < deadline, "the workers kept listening after SIGTERM"
            time.sleep(0.02)
        assert s.proc.poll() is None, "the parent waits for its workers' requests"
        slow.let_go()
        runner.join(60)
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.kill()
        slow.bg.close()
    assert sorted(code for code, _ in results) == [200] * n
    assert {w for _, w in results} == {"1", "2"}
    store = ledger.open(url)
    try:
        captures = [e.cost for e in store.events(0) if e.kind == "capture"]
        assert captures == [BILLED_NANOS] * n, "every call answered before the stop is captured"
    finally:
        store.close()


def test_exactly_one_worker_sends_each_alert(tmp_path: Path, upstream: Servers) -> None:
    rx = Receiver(free_port())
    rx.start()
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    s = Workers(tmp_path, upstream.upstream_port, "--store", url, "--config",
                str(_policy(tmp_path, _alert_policy(rx.url))))
    try:
        answers = asyncio.run(_burst(s.port, 16))  # (16 connections: both workers answer some)
        assert Counter(code for code, _ in answers)[200] == 4  # $6 holds four $1.21 worst cases
        assert {w for _, w in answers} == {"1", "2"}
        docs = rx.wait_for(3)
        assert sorted((d["spendgate"]["type"], d["spendgate"]["threshold"]) for d in docs) == \
            [("refused", "1"), ("threshold", "0.5"), ("threshold", "0.8")]
        assert s.stop() == 0
        assert len(rx.got) == 3, "each alert delivered once: one worker sends"
        keys = [h["Idempotency-Key"] for h, _ in rx.got]
        assert len(set(keys)) == 3
    finally:
        s.kill()
        rx.stop()


def test_sighup_reloads_the_policy_in_every_worker(tmp_path: Path, upstream: Servers) -> None:
    path = _policy(tmp_path, 'defaults = false\nversion = "a1"\n')
    s = Workers(tmp_path, upstream.upstream_port, "--store", f"sqlite:///{tmp_path / 'spend.db'}",
                "--config", str(path))
    try:
        for w in (1, 2):
            assert "(version a1) in force" in s.wait_for(f"worker {w}: policy")
        # the same size and mtime: only SIGHUP can tell the workers the file changed
        st = os.stat(path)
        path.write_text('defaults = false\nversion = "b2"\n')
        assert os.stat(path).st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        s.proc.send_signal(signal.SIGHUP)
        for w in (1, 2):
            assert "(version b2) in force" in s.wait_for(f"worker {w}: policy")
        assert s.stop() == 0
    finally:
        s.kill()


def test_a_killed_worker_is_reported_and_started_again(tmp_path: Path, upstream: Servers) -> None:
    s = Workers(tmp_path, upstream.upstream_port, "--store", f"sqlite:///{tmp_path / 'spend.db'}",
                "--config", str(_policy(tmp_path, "defaults = false\n")))
    try:
        first = s.workers()
        assert len(first) == 2
        os.kill(first[1], signal.SIGKILL)
        line = s.wait_for("unexpectedly")
        assert f"(pid {first[1]}) was killed by SIGKILL unexpectedly; starting it again" in line
        s.wait_for("is serving again")
        now = s.workers()
        assert len(now) == 2 and first[0] in now and first[1] not in now
        answers = asyncio.run(_burst(s.port, 16))
        assert [code for code, _ in answers] == [200] * 16
        assert {w for _, w in answers} == {"1", "2"}
        assert s.stop() == 0
    finally:
        s.kill()


def test_a_worker_dying_again_and_again_stops_the_server(tmp_path: Path, upstream: Servers) -> None:
    """Five deaths within a minute are started again; the sixth is a bug, not bad luck: the server
    stops (exit 1) and says why, rather than restarting a crashing worker forever."""
    from spendgate.proxy.workers import MAX_RESTARTS

    s = Workers(tmp_path, upstream.upstream_port, "--store", f"sqlite:///{tmp_path / 'spend.db'}",
                "--config", str(_policy(tmp_path, "defaults = false\n")))
    try:
        for _ in range(MAX_RESTARTS):
            victim = s.workers()[0]
            os.kill(victim, signal.SIGKILL)
            assert f"(pid {victim}) was killed by SIGKILL unexpectedly; starting it again" in s.wait_for("unexpectedly")
            s.wait_for("is serving again")
        assert len(s.workers()) == 2
        victim = s.workers()[0]
        os.kill(victim, signal.SIGKILL)
        assert s.proc.wait(timeout=60) == 1
        said = s.said()
        assert f"(pid {victim}) was killed by SIGKILL; {MAX_RESTARTS + 1} workers died within 60 s, so the server " \
               "stops instead of starting them again" in said, said
    finally:
        s.kill()


def test_a_worker_that_cannot_start_stops_the_server_with_its_reason(tmp_path: Path) -> None:
    key = tmp_path / "ops" / "audit.key"  # missing: no worker may run with an unsigned log
    policy = _policy(tmp_path, f'audit_key = "file:{key}"\n')
    done = _cli(tmp_path, "serve", "--workers", "2", "--port", str(free_port()), "--config", str(policy),
                "--store", f"sqlite:///{tmp_path / 'spend.db'}")
    assert done.returncode == 2, done.stderr
    assert str(key) in done.stderr and "guarding" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_a_memory_store_cannot_be_shared_by_workers(tmp_path: Path) -> None:
    done = _cli(tmp_path, "serve", "--workers", "2", "--port", str(free_port()), "--store", "memory://")
    assert done.returncode == 2
    assert "--workers 2" in done.stderr and "memory://" in done.stderr and "one process" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_workers_must_be_a_count(tmp_path: Path, value: str) -> None:
    done = _cli(tmp_path, "serve", "--workers", value, "--port", str(free_port()))
    assert done.returncode == 2 and "--workers" in done.stderr and "1 or more, or auto" in done.stderr


def test_auto_is_one_worker_per_core_within_the_cgroups_quota(tmp_path: Path) -> None:
    from spendgate.proxy.workers import _cgroup_cpus, default_workers

    assert default_workers() == min(len(os.sched_getaffinity(0)), _cgroup_cpus() or 10**6)
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpus(str(tmp_path / "cpu.max")) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpus(str(tmp_path / "cpu.max")) is None


def test_a_busy_port_is_one_line_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _cli(tmp_path, "serve", "--workers", "2", "--port", str(port),
                    "--store", f"sqlite:///{tmp_path / 'spend.db'}")
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_the_dashboard_cookie_and_csrf_work_whichever_worker_answers(tmp_path: Path, upstream: Servers) -> None:
    s = Workers(tmp_path, upstream.upstream_port, "--store", f"sqlite:///{tmp_path / 'spend.db'}",
                "--admin-token", "tok")
    try:
        req = urllib.request.Request(f"{s.url}/ui/login", data=b"token=tok", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(req, timeout=10)
            raise AssertionError("the login answers 303")
        except urllib.error.HTTPError as e:
            assert e.code == 303
            cookie = e.headers["Set-Cookie"].split(";")[0]
            signed_by = e.headers["X-Spendgate-Worker"]
        served: set[str] = set()
        csrf_ok: set[str] = set()
        for i in range(40):  # a new connection each time: the kernel spreads them over the workers
            page = urllib.request.Request(f"{s.url}/ui/keys", headers={"Cookie": cookie})
            with urllib.request.urlopen(page, timeout=10) as r:
                assert r.status == 200
                served.add(r.headers["X-Spendgate-Worker"])
                html = r.read().decode()
            csrf = html.split('name="csrf" value="')[1].split('"')[0]
            form = f"csrf={csrf}&user=u{i}".encode()
            post = urllib.request.Request(f"{s.url}/ui/keys", data=form, method="POST",
                                          headers={"Cookie": cookie,
                                                   "Content-Type": "application/x-www-form-urlencoded"})
            try:
                with opener.open(post, timeout=10) as r:
                    status, worker = r.status, r.headers["X-Spendgate-Worker"]
            except urllib.error.HTTPError as e:
                status, worker = e.code, e.headers["X-Spendgate-Worker"]
            assert status in (200, 303), status
            csrf_ok.add(worker)
            if served == csrf_ok == {"1", "2"}:
                break
        assert served == csrf_ok == {"1", "2"}, (signed_by, served, csrf_ok)
        assert s.stop() == 0
    finally:
        s.kill()


def test_metrics_counter_files_sum_across_processes(tmp_path: Path) -> None:
    from spendgate.observe.metrics import CounterFile

    a, b = CounterFile(tmp_path / "a.counts"), CounterFile(tmp_path / "b.counts")
    for i in range(5000):  # past the first 64 KiB: the map grows
        a.set(("spend", f"m{i}"), i * 10**12)
    b.set(("released",), 3)
    read = CounterFile.read(tmp_path / "a.counts")
    assert len(read) == 5000 and read[json.dumps(["spend", "m4999"], separators=(",", ":"))] == 4999 * 10**12
    assert CounterFile.read(tmp_path / "b.counts") == {'["released"]': 3}


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_workers_stop_by_themselves_when_the_parent_is_killed(tmp_path: Path, upstream: Servers) -> None:
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("spendgate-metrics-*"))
    s = Workers(tmp_path, upstream.upstream_port, "--store", f"sqlite:///{tmp_path / 'spend.db'}",
                "--config", str(_policy(tmp_path, "defaults = false\n")))
    try:
        pids = s.workers()
        assert len(pids) == 2
        [counters] = set(tmp.glob("spendgate-metrics-*")) - before  # the parent made it for the workers
        s.proc.kill()  # SIGKILL: the parent passes nothing on
        s.proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while not all(_gone(p) for p in pids):  # each sees its stdin close and stops as on SIGTERM
            assert time.monotonic() < deadline, [p for p in pids if not _gone(p)]
            time.sleep(0.05)
        assert _refused(s.port)
        assert not counters.exists(), "the orphaned workers removed the counters' directory"
    finally:
        s.kill()


@pytest.mark.parametrize(("store", "expect_auto"), [("sqlite", True), ("memory", False)])
def test_serve_without_a_count_runs_one_worker_per_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        store: str, expect_auto: bool) -> None:
    from spendgate.proxy.workers import default_workers

    monkeypatch.delenv("SPENDGATE_WORKERS")
    url = f"sqlite:///{tmp_path / 's.db'}" if store == "sqlite" else "memory://"
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "spendgate.cli.main", "serve", "--port", str(free_port()),
                             "--store", url], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    n = default_workers() if expect_auto else 1
    assert "guarding" in banner
    assert (f"; {n} workers)" in banner) if n > 1 else ("workers" not in banner), banner
