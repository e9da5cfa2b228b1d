"""``GET /metrics`` on a real ``spendgate serve``: the spend counter is the ledger's total to the
nano-dollar, the budget gauges are ``status --json``, 10,000 sessions stay a handful of series, and
only loopback scrapes go without the admin token."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

import openai
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from spendgate import ledger
from spendgate.engine import Engine
from spendgate.ledger import Event
from spendgate.money import usd_to_nanos
from spendgate.observe.metrics import MAX_LABEL_VALUES, OTHER, Metrics, reached_over_loopback, split_key
from spendgate.policy import default_policy
from spendgate.policy.parse import parse
from spendgate.report import SPEND_KINDS
from spendgate.request import Identity, Request
from tests.harness import Servers, start_serve
from tests.test_audit_alerts_serve import BILLED as O1_BILLED

MINI_BILLED = json.dumps({"prompt_tokens": 123, "completion_tokens": 45, "total_tokens": 168})
POLICY = """
defaults = false

[[budget]]
name = "per-call"
usd = 5
window = "request"
action = "block"

[[budget]]
name = "user-day"
usd = 50
window = "day"
per = "user"
action = "block"

[[budget]]
name = "all-month"
usd = 1000
window = "month"
action = "block"
"""


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "SPENDGATE_HOME": str(home / ".spendgate")}
    return subprocess.run([sys.executable, "-m", "spendgate.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(text: str) -> dict[str, list[Sample]]:
    """Every sample by its name, parsed by prometheus_client's own parser."""
    out: dict[str, list[Sample]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


class Serve:
    def __init__(self, tmp: Path, upstream: Servers, store: str, policy: str, *extra: str) -> None:
        (tmp / "spendgate.toml").write_text(policy)
        self.home = tmp
        self.args = ["--store", store, "--config", str(tmp / "spendgate.toml")]
        self.proc, self.port = start_serve(tmp, upstream.upstream_port, *self.args, *extra)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="sk-client", max_retries=0)

    def ask(self, model: str, billed: str, user: str, max_tokens: int = 2000) -> int:
        try:
            self.client.chat.completions.create(
                model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "go on"}],
                extra_headers={"X-Spendgate-User": user, "x-mock-usage": billed})
        except openai.APIStatusError as e:
            return e.status_code
        return 200

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _charges(store_url: str, n: int) -> list[Event]:
    """The store's charges once all ``n`` are in: the proxy charges a local store just after replying."""
    store = ledger.open(store_url, create=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            charges = [e for e in store.events(0) if e.kind in SPEND_KINDS]
            if len(charges) >= n or time.monotonic() > deadline:
                return charges
            time.sleep(0.02)
    finally:
        store.close()


def test_counters_equal_the_ledger_and_gauges_equal_status(tmp_path: Path, upstream: Servers) -> None:
    store = f"sqlite:///{tmp_path / 'spend.db'}"
    s = Serve(tmp_path, upstream, store, POLICY)
    try:
        codes = [s.ask("o1-pro", O1_BILLED, user) for user in ("alice", "bob", "carol", "alice", "bob", "alice")]
        codes += [s.ask("gpt-4o-mini", MINI_BILLED, user, max_tokens=500) for user in ("alice", "dave") * 3]
        codes.append(s.ask("o1-pro", O1_BILLED, "alice", max_tokens=10_000))  # $6 worst case: per-call blocks
        assert codes == [200] * 12 + [402]
        charges = _charges(store, 12)
        assert len(charges) == 12
        status, text = _get(f"{s.base}/metrics")  # loopback: no token needed
        assert status == 200, text
        samples = _samples(text)
        done = _cli(tmp_path, "status", "--json", *s.args)
        assert done.returncode == 0, done.stderr
    finally:
        s.stop()

    by_model: Counter[str] = Counter()
    tokens: Counter[tuple[str, str]] = Counter()
    for e in charges:
        by_model[e.model] += e.cost
        tokens["input", e.model] += e.input_tokens
        tokens["output", e.model] += e.output_tokens
    assert by_model["o1-pro"] == 6 * 1_201_500_000  # $1.2015 each, as billed
    for model, nanos in by_model.items():
        # the float Prometheus shows is the exact nano-dollar sum / 1e9, and the integer is exact
        assert _value(samples, "spendgate_spend_usd_total", provider="openai", model=model) == nanos / 1e9
        assert _value(samples, "spendgate_spend_nanodollars_total", provider="openai", model=model) == nanos
    assert sum(s.value for s in samples["spendgate_spend_nanodollars_total"]) == sum(e.cost for e in charges)
    for (kind, model), n in tokens.items():
        assert _value(samples, "spendgate_tokens_total", type=kind, provider="openai", model=model) == n
    assert _value(samples, "spendgate_decisions_total", action="allow", rule="") == 12
    assert _value(samples, "spendgate_decisions_total", action="block", rule="per-call") == 1
    assert _value(samples, "spendgate_charges_total", kind="capture") == 12
    assert "spendgate_estimated_charges_total" not in samples  # every charge had the provider's usage
    assert _value(samples, "spendgate_decision_seconds_count") == 13
    assert _value(samples, "spendgate_added_latency_seconds_count") == 13
    assert _value(samples, "spendgate_holds_pending") == 0
    assert _value(samples, "spendgate_store_up") == 1

    buckets = [b for b in json.loads(done.stdout)["buckets"] if b["unit"] == "usd"]
    assert {split_key(b["bucket"]) for b in buckets} == {
        ("user-day", "user=alice"), ("user-day", "user=bob"), ("user-day", "user=carol"),
        ("user-day", "user=dave"), ("all-month", "global=(none)")}
    for b in buckets:
        rule, scope = split_key(b["bucket"])
        limit, spent, held = (usd_to_nanos(Decimal(b[k])) for k in ("limit", "spent", "held"))
        assert _value(samples, "spendgate_budget_remaining_usd", rule=rule, scope=scope) == (limit - spent - held) / 1e9
        assert _value(samples, "spendgate_budget_limit_usd", rule=rule, scope=scope) == limit / 1e9
        assert _value(samples, "spendgate_budget_spent_usd", rule=rule, scope=scope) == spent / 1e9
    assert _value(samples, "spendgate_budget_spent_usd", rule="all-month", scope="global=(none)") == \
        sum(e.cost for e in charges) / 1e9


SESSION_POLICY = """
defaults = false

[[budget]]
name = "session-hour"
usd = 10
window = "1h"
per = "session"
action = "block"
"""


def test_ten_thousand_sessions_stay_a_bounded_number_of_series(tmp_path: Path, upstream: Servers) -> None:
    store_url = f"sqlite:///{tmp_path / 'spend.db'}"
    store = ledger.open(store_url)
    engine = Engine(parse(tomllib.loads(SESSION_POLICY)), store)
    body = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    now = time.time()
    for i in range(10_000):  # session i spends (i % 97 + 1) output tokens' worth
        d = engine.decide(Request("openai", "/v1/chat/completions", body, Identity(session=f"s{i}")), now=now)
        assert d.allowed
        engine.capture(d, {"prompt_tokens": 10, "completion_tokens": i % 97 + 1}, now=now)
    states = store.states(store.known_buckets(), now=time.time())
    store.close()
    s = Serve(tmp_path, upstream, store_url, SESSION_POLICY)
    try:
        assert s.ask("gpt-4o-mini", MINI_BILLED, "u") == 200  # one more session, over HTTP
        over_http = [e.cost for e in _charges(store_url, 10_001) if e.dims.get("user") == "u"]
        status, text = _get(f"{s.base}/metrics")
    finally:
        s.stop()
    assert status == 200
    samples = _samples(text)
    assert sum(len(v) for v in samples.values()) < 200  # the whole exposition, not 10,000 lines
    spent = samples["spendgate_budget_spent_usd"]
    assert len(spent) == 21  # the 20 dearest sessions and "(other)"
    assert _value(samples, "spendgate_budget_scopes", rule="session-hour") == 10_001
    # the top 20 are the sessions that spent most, and "(other)" is exactly the sum of the rest
    # (the 10,001st session, over HTTP, spent under a cent: one of the rest)
    ranked = sorted(((st.used, st.key) for st in states), key=lambda r: (-r[0], split_key(r[1])[1]))
    top = {split_key(k)[1]: used for used, k in ranked[:20]}
    shown = {x.labels["scope"]: x.value for x in spent if x.labels["scope"] != OTHER}
    assert shown == {scope: used / 1e9 for scope, used in top.items()}
    assert len(over_http) == 1 and over_http[0] < ranked[19][0]
    rest = sum(used for used, _ in ranked[20:]) + over_http[0]
    assert _value(samples, "spendgate_budget_spent_usd", rule="session-hour", scope=OTHER) == rest / 1e9


def _lan_address() -> str | None:
    """A non-loopback address of this host (no packet is sent), or None on a host without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = str(sock.getsockname()[0])
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_beyond_loopback_metrics_need_the_admin_token_or_public(tmp_path: Path, upstream: Servers) -> None:
    lan = _lan_address()
    if lan is None:
        pytest.skip("this host has no non-loopback IPv4 address to scrape from (the mocked-socket test covers it)")
    store = f"sqlite:///{tmp_path / 'spend.db'}"

    def serve(name: str, policy: str, *extra: str) -> Serve:
        (tmp_path / name).mkdir()
        return Serve(tmp_path / name, upstream, store, policy, "--host", "0.0.0.0", *extra)

    s = serve("token", POLICY, "--admin-token", "tok")
    try:
        assert _get(f"http://127.0.0.1:{s.port}/metrics")[0] == 200
        status, text = _get(f"http://{lan}:{s.port}/metrics")
        assert status == 401 and "admin token" in text
        assert _get(f"http://{lan}:{s.port}/metrics", "wrong")[0] == 401
        status, text = _get(f"http://{lan}:{s.port}/metrics", "tok")
        assert status == 200 and "spendgate_spend_usd" in text
    finally:
        s.stop()
    s = serve("public", POLICY + "\n[metrics]\npublic = true\n")
    try:
        assert _get(f"http://{lan}:{s.port}/metrics")[0] == 200
    finally:
        s.stop()
    s = serve("no-token", POLICY)
    try:
        status, text = _get(f"http://{lan}:{s.port}/metrics")
        assert status == 403 and "loopback only" in text
    finally:
        s.stop()


@pytest.mark.parametrize(("sockname", "loopback"), [
    (("127.0.0.1", 8787), True), (("::1", 8787, 0, 0), True), (("::ffff:127.0.0.1", 8787, 0, 0), True),
    (("192.0.2.2", 8787), False), (("fd00::2", 8787, 0, 0), False), (None, False)])
def test_loopback_is_the_address_the_request_reached(sockname: Any, loopback: bool) -> None:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: sockname if name == "sockname" else default
    request = make_mocked_request("GET", "/metrics", transport=transport)
    assert reached_over_loopback(request) is loopback


def test_metrics_off_is_a_404(tmp_path: Path, upstream: Servers) -> None:
    s = Serve(tmp_path, upstream, f"sqlite:///{tmp_path / 'spend.db'}", POLICY + "\n[metrics]\nenabled = false\n")
    try:
        assert s.ask("gpt-4o-mini", MINI_BILLED, "alice", max_tokens=500) == 200
        assert _get(f"{s.base}/metrics")[0] == 404
    finally:
        s.stop()


def test_label_values_beyond_the_cap_count_as_other() -> None:
    m = Metrics(ledger.open("memory://"))
    for i in range(MAX_LABEL_VALUES + 50):
        m.observe(Event(time.time(), "capture", f"d{i}", f"model-{i}", "openai", 1_000), "", None)
    samples = _samples(m.exposition().decode())
    spend = samples["spendgate_spend_nanodollars_total"]
    assert len(spend) == MAX_LABEL_VALUES + 1
    assert _value(samples, "spendgate_spend_nanodollars_total", provider="openai", model=OTHER) == 50 * 1_000
    assert sum(x.value for x in spend) == (MAX_LABEL_VALUES + 50) * 1_000


def test_a_request_the_store_failed_counts_as_a_store_error() -> None:
    import asyncio

    from aiohttp import web

    from spendgate.proxy.envelope import error_response

    m = Metrics(ledger.open("memory://"))
    failed = error_response("openai", 503, "spendgate: the spend store failed", code="spendgate_store_error")
    upstream_503 = web.Response(status=503, body=b'{"error": {"message": "overloaded"}}')

    async def answer_with(answer: web.Response) -> web.StreamResponse:
        async def handler(_: web.Request) -> web.Response:
            return answer
        return await m.middleware(make_mocked_request("POST", "/v1/chat/completions"), handler)

    for answer in (failed, upstream_503, failed):
        assert asyncio.run(answer_with(answer)) is answer
    samples = _samples(m.exposition().decode())
    assert _value(samples, "spendgate_store_errors_total", where="request") == 2  # not the provider's own 503
    assert _value(samples, "spendgate_store_errors_total", where="scrape") == 0


def test_cached_and_reasoning_tokens_are_counted_apart_from_a_captures_usage() -> None:
    """A capture's usage breakdown reaches ``spendgate_tokens_total`` as cache_read, cache_write and
    reasoning — parts of input and output, which stay the whole counts."""
    from spendgate.engine import Engine
    from spendgate.pricing.cost import Usage
    from spendgate.request import Request

    store = ledger.open("memory://")
    engine = Engine(default_policy(), store)
    m = Metrics(store)
    engine.observers.append(m.observe)
    body = {"model": "gpt-5", "max_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]}
    d = engine.decide(Request("openai", "/v1/chat/completions", body))
    engine.capture(d, Usage(input=100, cache_read=400, output=900, reasoning=700))
    d = engine.decide(Request("anthropic", "/v1/messages", {**body, "model": "claude-sonnet-4-5"}))
    engine.capture(d, Usage(input=50, cache_write_5m=300, cache_write_1h=200, output=10))
    samples = _samples(m.exposition().decode())

    def tokens(kind: str, provider: str, model: str) -> float:
        return _value(samples, "spendgate_tokens_total", type=kind, provider=provider, model=model)

    assert tokens("input", "openai", "gpt-5") == 500 and tokens("cache_read", "openai", "gpt-5") == 400
    assert tokens("output", "openai", "gpt-5") == 900 and tokens("reasoning", "openai", "gpt-5") == 700
    assert tokens("input", "anthropic", "claude-sonnet-4-5") == 550
    assert tokens("cache_write", "anthropic", "claude-sonnet-4-5") == 500
    kinds = {s.labels["type"] for s in samples["spendgate_tokens_total"]}
    assert kinds == {"input", "output", "cache_read", "cache_write", "reasoning"}


def test_workers_counters_are_summed_from_their_files_exactly_and_never_go_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --workers``: each worker counts into its own file; a scrape on any of them shows the
    sum of all, exactly as one process counting every event would, a dead worker's counts included."""
    from spendgate.observe import metrics as metrics_mod

    store = ledger.open("memory://")
    events = [Event(time.time() - 0.001, "allow", f"d{i}", "gpt-4o", "openai", 0) for i in range(7)]
    # $1M a charge: integer nano-dollars, summed exactly across the files
    events += [Event(time.time(), "capture", f"c{i}", "gpt-4o", "openai", 10**15 + i, estimated=i == 2,
                     input_tokens=100 + i, output_tokens=7) for i in range(5)]
    events += [Event(time.time(), "released", "r", "gpt-4o", "openai", 0),
               Event(time.time(), "block", "b", "o1-pro", "openai", 0, rule="user-day")]
    alone = Metrics(store)
    workers = []
    for name in ("w1", "w2", "w3"):
        monkeypatch.setattr(metrics_mod, "_SHARED", (tmp_path, name))
        workers.append(Metrics(store))
    monkeypatch.setattr(metrics_mod, "_SHARED", None)
    for i, event in enumerate(events):
        alone.observe(event, "", None)
        workers[i % 3].observe(event, "", None)
    workers[2].store_error("request")
    alone.store_error("request")
    dead = workers.pop()  # a worker that died: its file stays, and with it its counts
    local_sums = sum(m._decision_s.sum for m in (*workers, dead))  # each timed at its own instant

    def counters(m: Metrics) -> dict[str, list[Sample]]:
        return {k: v for k, v in _samples(m.exposition().decode()).items() if not k.startswith("spendgate_budget")}

    def flat(samples: dict[str, list[Sample]]) -> set[tuple[str, str, float]]:
        """Every sample but the latency sums (float seconds, summed in another order)."""
        return {(k, json.dumps(s.labels, sort_keys=True), s.value) for k, v in samples.items() for s in v
                if not k.endswith("_seconds_sum")}

    expected = counters(alone)
    assert len(flat(expected)) > 40
    for m in workers:
        got = counters(m)
        assert flat(got) == flat(expected)
        # latency sums are kept in integer nanoseconds
        assert _value(got, "spendgate_decision_seconds_sum") == pytest.approx(local_sums, abs=3e-9)
    nanos = _value(counters(workers[0]), "spendgate_spend_nanodollars_total", provider="openai", model="gpt-4o")
    assert nanos == 5 * 10**15 + 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w1.counts", "w2.counts", "w3.counts"]


@pytest.mark.parametrize("shared", [False, True])
def test_events_counted_on_other_threads_add_up_exactly_with_the_event_loops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    """The thread that made the Metrics counts without a lock; events from other threads (a
    networked store's refusal on a worker thread, a scrape's store error) count into a table of
    their own. Interleaved as finely as the interpreter allows, no count is lost, and with
    ``serve --workers`` another worker's scrape sums both files."""
    from spendgate.observe import metrics as metrics_mod

    if shared:
        monkeypatch.setattr(metrics_mod, "_SHARED", (tmp_path, "w1"))
    m = Metrics(ledger.open("memory://"))
    if shared:
        monkeypatch.setattr(metrics_mod, "_SHARED", (tmp_path, "w2"))
        other_worker = Metrics(ledger.open("memory://"))
    n, cost, models = 20_000, 10**9 + 7, 200
    start = threading.Barrier(2)

    def count(tag: str) -> None:
        """n events: a decision, a charge to one of ``models`` models of its own (each new model
        makes new series while the other thread makes its own), a refusal, in turn."""
        events = [Event(time.time(), "allow", "d", "gpt-4o", "openai", 0),
                  *(Event(time.time(), "capture", "c", f"{tag}-{i}", "openai", cost, 11, 13,
                          amounts={"reasoning_tokens": 5}) for i in range(models)),
                  Event(time.time(), "block", "b", "gpt-4o", "openai", 0, rule="user-day")]
        start.wait()
        for i in range(n):
            m.observe(events[1 + i // 3 % models] if i % 3 == 1 else events[i % 3 and -1], "", None)
        m.store_error("request")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a lost update would show
    try:
        other = threading.Thread(target=count, args=("b",))
        other.start()
        count("a")
        other.join()
    finally:
        sys.setswitchinterval(interval)
    per_model = Counter(i // 3 % models for i in range(1, n, 3))
    for scraper in [m, other_worker] if shared else [m]:
        samples = _samples(scraper.exposition().decode())
        for tag in ("a", "b"):
            for i in range(models):
                labels = {"provider": "openai", "model": f"{tag}-{i}"}
                assert _value(samples, "spendgate_spend_nanodollars_total", **labels) == per_model[i] * cost
                assert _value(samples, "spendgate_tokens_total", type="reasoning", **labels) == per_model[i] * 5
        captures = 2 * len(range(1, n, 3))
        assert sum(x.value for x in samples["spendgate_spend_nanodollars_total"]) == captures * cost
        assert _value(samples, "spendgate_charges_total", kind="capture") == captures
        assert _value(samples, "spendgate_decisions_total", action="allow", rule="") == 2 * len(range(0, n, 3))
        assert _value(samples, "spendgate_decisions_total", action="block", rule="user-day") == \
            2 * len(range(2, n, 3))
        assert _value(samples, "spendgate_decision_seconds_count") == 2 * (len(range(0, n, 3)) + len(range(2, n, 3)))
        assert _value(samples, "spendgate_store_errors_total", where="request") == 2
    if shared:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w1.counts", "w1.threads.counts", "w2.counts"]


def test_counts_past_the_remembered_label_values_and_a_growing_shared_file_stay_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More distinct models than a table remembers slots for, enough series to grow a worker's
    counter file past its first map, and charges again into the first series after it grew: the
    shared counts equal one process's, the label cap holds, and a token part never charged has no
    series."""
    from spendgate.observe import metrics as metrics_mod

    models = [f"model-{i}" for i in range(metrics_mod._CACHE_MAX + 100)] + ["gpt-4o"]
    events = [Event(time.time(), "capture", f"c{i}", model, "openai", 1_000 + i, 10, 20,
                    amounts={"cache_read_tokens": 3} if i % 2 else {})
              for i, model in enumerate(models * 2)]
    alone = Metrics(ledger.open("memory://"))
    monkeypatch.setattr(metrics_mod, "_SHARED", (tmp_path, "w1"))
    worker = Metrics(ledger.open("memory://"))
    monkeypatch.setattr(metrics_mod, "_SHARED", None)
    for event in events:
        alone.observe(event, "", None)
        worker.observe(event, "", None)
    assert (tmp_path / "w1.counts").stat().st_size > 64 * 1024  # the map grew
    assert len(worker._own.series) == metrics_mod._CACHE_MAX  # later models took the slow way
    samples = _samples(alone.exposition().decode())
    assert _samples(worker.exposition().decode()) == samples
    spend = samples["spendgate_spend_nanodollars_total"]
    assert len(spend) == MAX_LABEL_VALUES + 1
    assert sum(x.value for x in spend) == sum(e.cost for e in events)
    beyond = [e for e in events if e.model not in {f"model-{i}" for i in range(MAX_LABEL_VALUES)}]
    assert _value(samples, "spendgate_spend_nanodollars_total", provider="openai", model=OTHER) == \
        sum(e.cost for e in beyond)
    assert _value(samples, "spendgate_tokens_total", type="cache_read", provider="openai", model=OTHER) == \
        3 * sum(1 for e in beyond if e.amounts)
    assert _value(samples, "spendgate_tokens_total", type="input", provider="openai", model="model-0") == 20
    assert _value(samples, "spendgate_tokens_total", type="output", provider="openai", model="model-1") == 40
    assert {s.labels["type"] for s in samples["spendgate_tokens_total"]} == {"input", "output", "cache_read"}
    assert _value(samples, "spendgate_charges_total", kind="capture") == len(events)


def test_a_real_server_counts_the_requests_its_lost_store_refused(tmp_path: Path, upstream: Servers) -> None:
    """``spendgate_store_errors_total{where="request"}`` on a real ``serve``: a request the store
    could not take is answered 503 and counted once; the provider's own answers are not."""
    (tmp_path / "store").mkdir()
    s = Serve(tmp_path, upstream, f"sqlite:///{tmp_path / 'store' / 'spend.db'}", POLICY)
    try:
        assert s.ask("gpt-4o-mini", MINI_BILLED, "alice", max_tokens=500) == 200
        shutil.rmtree(tmp_path / "store")
        assert _get(f"{s.base}/spendgate/health")[0] == 503  # the server notices its store is gone
        assert s.ask("gpt-4o-mini", MINI_BILLED, "alice", max_tokens=500) == 503
        status, text = _get(f"{s.base}/metrics")
    finally:
        s.stop()
    assert status == 200, text
    samples = _samples(text)
    assert _value(samples, "spendgate_store_errors_total", where="request") == 1
    assert _value(samples, "spendgate_decisions_total", action="allow", rule="") == 1
    assert _value(samples, "spendgate_added_latency_seconds_count") == 1
