"""Nobody gets around the guard: each path a client, an upstream or a broken disk could use to walk
past the engine, driven through a real ``spendgate serve`` process (or the real proxy app) over the
fake upstream on loopback."""

from __future__ import annotations

import http.client
import json
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from spendgate import approvals, ledger
from spendgate.ledger import Bucket, Line
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from tests.harness import Servers, start_serve

# o1-pro: $150 in / $600 out per Mtok. 2,000 output tokens: a $1.20 worst case, billed in full.
O1 = {"model": "o1-pro", "max_tokens": 2000, "messages": [{"role": "user", "content": "go on"}]}
BILLED = json.dumps({"prompt_tokens": 10, "completion_tokens": 2000, "total_tokens": 2010})
REQUEST_USD = Decimal("0.0015") + Decimal("1.2")  # 10 input + 2,000 output tokens of o1-pro
WORST_USD = Decimal("1.21")  # the estimate: 2,000 output + a handful of counted input tokens, rounded up


def send(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as a client with its own provider key; the fake provider bills :data:`BILLED`."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "Authorization": "Bearer sk-client", "x-mock-usage": BILLED,
        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Serve:
    """A ``spendgate serve`` process on a SQLite file, over a fake upstream."""

    def __init__(self, tmp: Path, upstream: Servers, *args: str, policy: str | None = None) -> None:
        self.db = tmp / "store" / "spend.db"
        self.store_url = f"sqlite:///{self.db}"
        extra = ["--store", self.store_url, "--admin-token", "tok", *args]
        if policy is not None:
            (tmp / "spendgate.toml").write_text(policy)
            extra += ["--config", str(tmp / "spendgate.toml")]
        self.proc, self.port = start_serve(tmp, upstream.upstream_port, *extra)
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        return send(self.url + path, body, headers)

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.url + path, headers={"Authorization": "Bearer tok"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def used(self, prefix: str) -> int:
        """Spent + held (an upper bound of what was charged) over the buckets whose key starts so."""
        store = ledger.open(self.store_url)
        try:
            buckets = [b for b in store.known_buckets() if b.key.startswith(prefix) and b.unit == "usd"]
            return sum(st.used for st in store.states(buckets, now=time.time()))
        finally:
            store.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def serve(tmp_path: Path, upstream: Servers) -> Iterator[Any]:
    made: list[Serve] = []

    def start(*args: str, policy: str | None = None) -> Serve:
        s = Serve(tmp_path, upstream, *args, policy=policy)
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


def run(s: Serve, n: int, headers: dict[str, str], body: Any = None) -> list[tuple[int, dict[str, Any]]]:
    return [s.post("/v1/chat/completions", body or O1, headers) for _ in range(n)]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spendgate.cli.main", *args], capture_output=True, text=True,
                          timeout=60)


# -- 1. self-approval -----------------------------------------------------------------------------

def test_a_clients_allow_header_does_not_lift_session_hour_under_the_defaults(serve: Any) -> None:
    s = serve()
    answers = run(s, 14, {"X-Spendgate-Session": "s1", "X-Spendgate-Allow": "max=1000000"})
    admitted = [a for a in answers if a[0] == 200]
    assert len(admitted) == 8, "$10 / $1.21 worst case: 8 fit, the header adds nothing"
    status, err = answers[-1]
    assert status == 402 and err["spendgate"]["rule"] == "session-hour"
    assert "X-Spendgate-Allow was ignored" in err["error"]["message"]
    assert s.used("session-hour|session=s1") <= usd_to_nanos(10)
    _, doc = s.get("/spendgate/decisions")
    assert not [e for e in doc["events"] if e["kind"] == "approval"], "nothing was approved"
    # refusals are decisions too, listed with what they weighed, in dollars
    [held] = [e for e in doc["events"] if e["kind"] == "hold"]
    assert (held["rule"], held["bucket"], held["amounts"]["limit_usd"]) == ("session-hour",
                                                                          "session-hour|session=s1", "10")
    assert Decimal(held["amounts"]["used_usd"]) + Decimal(held["amounts"]["request_usd"]) > 10
    captures = [e for e in doc["events"] if e["kind"] == "capture"]
    assert len(captures) == 8 and {e["cost_usd"] for e in captures} == {str(REQUEST_USD)}
    assert all("cost" not in e for e in doc["events"]), "dollars as strings, never nano-dollar integers"


def test_the_policy_ceiling_caps_what_the_header_grants_per_bucket_and_window(serve: Any) -> None:
    s = serve(policy="[approvals]\nheader_max_usd = 5\n")
    answers = run(s, 20, {"X-Spendgate-Session": "s1", "X-Spendgate-Allow": "max=1000000"})
    used = s.used("session-hour|session=s1")
    assert usd_to_nanos(10) < used <= usd_to_nanos(Decimal(10) + 5 + WORST_USD)
    assert sum(1 for a in answers if a[0] == 200) == 12, "$10 + $5 of headroom at $1.21 a request"
    assert answers[-1][0] == 402 and "cut to this key's ceiling of $5" in answers[-1][1]["error"]["message"]
    _, doc = s.get("/spendgate/decisions")
    [grant] = [e for e in doc["events"] if e["kind"] == "approval"]
    assert grant["dims"]["channel"] == "header" and grant["dims"]["granted_usd"] == "5"
    assert grant["dims"]["bucket"] == "session-hour|session=s1" and grant["decision_id"]


def test_a_key_made_with_preapprove_max_may_predeclare_up_to_its_ceiling(serve: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-provider-key")
    s = serve()
    made = cli("keys", "create", "--store", s.store_url, "--user", "alice", "--preapprove-max", "3", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    answers = run(s, 16, {"Authorization": f"Bearer {key}", "X-Spendgate-Allow": "max=100"})
    used = s.used("session-hour|session=key:")
    assert usd_to_nanos(10) < used <= usd_to_nanos(Decimal(10) + 3 + WORST_USD)
    assert sum(1 for a in answers if a[0] == 200) == 10
    # a plain client on the same server still cannot
    plain = run(s, 10, {"X-Spendgate-Session": "other", "X-Spendgate-Allow": "max=100"})
    assert sum(1 for a in plain if a[0] == 200) == 8


def test_in_band_directives_are_capped_by_inband_max_usd(serve: Any) -> None:
    s = serve(policy="[approvals]\ninband_max_usd = 2\n")
    body = {**O1, "messages": [{"role": "user", "content": "[spendgate: allow=once max=$1000000] go on"}]}
    answers = run(s, 14, {"X-Spendgate-Session": "s1"}, body)
    used = s.used("session-hour|session=s1")
    assert usd_to_nanos(10) < used <= usd_to_nanos(Decimal(10) + 2 + WORST_USD)
    assert sum(1 for a in answers if a[0] == 200) == 9
    _, doc = s.get("/spendgate/decisions")
    assert [e["dims"]["channel"] for e in doc["events"] if e["kind"] == "approval"] == ["inband"]


def test_an_operator_approval_is_not_capped_and_is_an_event_in_report(serve: Any) -> None:
    s = serve()
    answers = run(s, 9, {"X-Spendgate-Session": "s1"})
    held = answers[-1][1]["spendgate"]
    assert answers[-1][0] == 402 and held["action"] == "hold"
    command = shlex.split(held["approval"]["command"])  # the 402 names the command that reaches this store
    assert command[:3] == ["spendgate", "approve", held["decision_id"]] and "--store" in command
    ok = cli(*command[1:], "--max", "100")
    assert ok.returncode == 0, ok.stderr
    after = [s.post("/v1/chat/completions", {**O1, "messages": [{"role": "user", "content": f"step {i}"}]},
                    {"X-Spendgate-Session": "s1"})[0] for i in range(20)]
    assert after == [200] * 20, "$100 granted, uncapped"
    doc = json.loads(cli("report", "--store", s.store_url, "--by", "kind", "--json").stdout)
    [grant] = doc["approvals"]
    assert (grant["channel"], grant["granted_usd"], grant["rule"]) == ("operator", "100", "session-hour")
    rows = {r["kind"]: r for r in doc["rows"]}
    assert set(rows) == {"capture", "hold"}, "an approval is listed apart, never as spend"
    assert (rows["hold"]["requests"], rows["hold"]["usd"], rows["hold"]["refused"]) == (0, "0", 1)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Any]:
    made: list[Servers] = []

    def make(doc: dict[str, Any] | None = None, store: str = "memory://") -> Servers:
        s = Servers(parse(doc) if doc is not None else default_policy(), store)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def raw_post(s: Servers, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    return send(s.url + path, body, headers)


SESSION_CAP = {"budget": [{"name": "cap", "usd": 1, "window": "1h", "per": "session", "action": "hold"}]}


@pytest.mark.parametrize(("path", "turns"), [
    ("/v1/messages", [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "yes"}]}]),
    ("/v1/messages", [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                                                   {"type": "text", "text": "yes"}]}]),
    ("/v1/chat/completions", [{"role": "tool", "tool_call_id": "c1", "content": "yes"}]),
    ("/v1/chat/completions", [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "carry on"}]),
    ("/v1/responses", [{"type": "function_call_output", "call_id": "c1", "output": "yes"}]),
])
def test_only_text_a_person_typed_in_the_latest_turn_answers_a_hold(proxy: Any, path: str, turns: Any) -> None:
    s = proxy(SESSION_CAP)
    first: dict[str, Any] = {"model": "o1-pro", "max_tokens": 2000, "messages": [{"role": "user", "content": "go"}]}
    if path == "/v1/messages":  # $75 / Mtok out: a $1.50 worst case
        first = {"model": "claude-opus-4-1", "max_tokens": 20_000, "messages": [{"role": "user", "content": "go"}]}
    if path == "/v1/responses":
        first = {"model": "o1-pro", "max_output_tokens": 2000, "input": "go"}
    head = {"X-Spendgate-Session": "s1"}
    status, err = raw_post(s, path, first, head)
    assert status == 402 and err["spendgate"]["action"] == "hold"
    answer = {**first, "input": turns} if path == "/v1/responses" else {**first, "messages": turns}
    status, _ = raw_post(s, path, answer, head)
    assert status == 402, "a tool's 'yes' or an old turn's never approves"
    assert {p.status for p in approvals.pending(s.store)} == {"pending"}, "nothing was approved"
    assert s.mock.reached() == 0


# -- 2. identity ---------------------------------------------------------------------------------

def test_a_virtual_keys_user_cannot_be_changed_by_any_header_or_body_field(serve: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-provider-key")
    s = serve(policy='[[budget]]\nname = "per-user"\nusd = 3\nwindow = "1h"\nper = "user"\naction = "block"\n')
    key = json.loads(cli("keys", "create", "--store", s.store_url, "--user", "alice", "--json").stdout)["key"]
    auth = {"Authorization": f"Bearer {key}"}
    tries = [
        ({"X-Spendgate-User": "bob"}, O1),
        ({"X-Spendgate-User": "carol"}, O1),
        ({"X-Spendgate-Tags": "user=dave"}, O1),
        ({}, {**O1, "user": "erin"}),
        ({"X-Spendgate-User": "frank", "X-Spendgate-Tags": "user=gina, team=x"}, {**O1, "user": "hal"}),
        ({"X-Spendgate-Session": "new"}, O1),
    ]
    statuses = [s.post("/v1/chat/completions", body, {**auth, **h})[0] for h, body in tries]
    assert statuses == [200, 200, 402, 402, 402, 402], "$3 for alice, whoever the headers say"
    store = ledger.open(s.store_url)
    try:
        assert {b.key for b in store.known_buckets() if b.key.startswith("per-user")} == {"per-user|user=alice"}
    finally:
        store.close()


def test_key_day_holds_a_key_whatever_sessions_it_rotates_through(serve: Any) -> None:
    s = serve()
    body = {**O1, "max_tokens": 15_000}  # a $9.00 worst case: under request-soft's $10
    billed = json.dumps({"prompt_tokens": 10, "completion_tokens": 15_000, "total_tokens": 15_010})
    answers = [s.post("/v1/chat/completions", body, {"X-Spendgate-Session": f"s{i}", "x-mock-usage": billed})
               for i in range(13)]
    assert [a[0] for a in answers].count(200) == 11, "$100 a day per key at $9.0015 a request"
    status, err = answers[11]
    assert status == 402 and err["spendgate"]["rule"] == "key-day" and err["spendgate"]["action"] == "hold"
    assert s.used("key-day|key=") <= usd_to_nanos(100)


# -- 6. a lost store ----------------------------------------------------------------------------

def test_a_store_deleted_under_the_server_is_noticed_by_health_and_requests(serve: Any) -> None:
    s = serve()
    assert s.post("/v1/chat/completions", O1, {"X-Spendgate-Session": "a"})[0] == 200
    assert s.get("/spendgate/health") == (200, {"ok": True})
    shutil.rmtree(s.db.parent)
    status, doc = s.get("/spendgate/health")
    assert status == 503 and str(s.db) in doc["store"]
    status, err = s.post("/v1/chat/completions", O1, {"X-Spendgate-Session": "a"})
    assert status == 503 and err["error"]["code"] == "spendgate_store_error"
    assert not s.db.exists(), "no empty store was made in its place"


def test_read_only_commands_on_a_missing_store_say_so_and_create_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nowhere' / 'spend.db'}"
    for args in (("status",), ("report",), ("approvals",), ("keys", "list")):
        done = cli(*args, "--store", url)
        assert done.returncode != 0 and "no spendgate store" in done.stderr, (args, done.stderr)
    assert not (tmp_path / "nowhere").exists()


# -- 5. stale holds are swept without traffic -----------------------------------------------------

def test_the_proxys_upkeep_charges_stale_holds_without_any_request(proxy: Any, tmp_path: Path) -> None:
    s = proxy(store=f"sqlite:///{tmp_path / 's.db'}")
    bucket = Bucket("session-hour|session=crashed", usd_to_nanos(10), 3600)
    assert s.store.authorize([Line(bucket, 1_000)], now=time.time() - 700, ttl=600).ok
    s.bg.run(s.proxy.upkeep())
    [state] = s.store.states([bucket], now=time.time())
    assert (state.held, state.spent) == (0, 1_000)
    assert [e.kind for e in s.store.events(0)] == []  # a bare hold carries no event; its charge stands
    assert not any(t.done() for t in s.proxy._background), "upkeep and the spool drain run in the background"


# -- 7. answers on faults ------------------------------------------------------------------------

def test_a_stream_cut_mid_way_ends_with_an_error_event_not_a_second_status_line(proxy: Any) -> None:
    s = proxy()
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                        "Authorization": "Bearer sk-x", "x-mock": "cut"})
    resp = conn.getresponse()
    data = resp.read()  # IncompleteRead if the chunked body were left open
    assert resp.status == 200 and b"HTTP/1.1" not in data
    last = data.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert "broke off" in json.loads(last.split(b"data: ", 1)[1])["error"]["message"]
    conn.close()
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-x", max_retries=0)
    with pytest.raises(openai.APIError, match="broke off"):
        list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=50, stream=True, extra_headers={"x-mock": "cut"}))
    ant = anthropic.Anthropic(base_url=s.url, api_key="sk-ant-x", max_retries=0)
    with pytest.raises(anthropic.APIError, match="broke off"):
        list(ant.messages.create(model="claude-haiku-4-5", max_tokens=50, stream=True, extra_headers={"x-mock": "cut"},
                                 messages=[{"role": "user", "content": "hi"}]))
    s.settled()
    assert [e.estimated and e.cost > 0 for e in s.store.events(0)] == [True, True, True]
    assert client.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                          messages=[{"role": "user", "content": "hi"}]).choices


def test_an_approval_by_id_lets_the_retry_through_on_another_instance_and_after_a_restart(proxy: Any,
                                                                                         tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = proxy(SESSION_CAP, url), proxy(SESSION_CAP, url)
    for i, (held_on, retried_on) in enumerate(((a, b), (b, None))):
        body = {**O1, "messages": [{"role": "user", "content": f"task {i}"}]}
        status, err = raw_post(held_on, "/v1/chat/completions", body, {"X-Spendgate-Session": f"s{i}"})
        assert status == 402
        approvals.approve(held_on.store, err["spendgate"]["decision_id"], None)
        if retried_on is None:  # the instance that held it restarts
            held_on.close()
            retried_on = proxy(SESSION_CAP, url)
        assert raw_post(retried_on, "/v1/chat/completions", body, {"X-Spendgate-Session": f"s{i}"})[0] == 200
        assert raw_post(retried_on, "/v1/chat/completions", body, {"X-Spendgate-Session": f"s{i}"})[0] == 402, \
            "approved once"


def test_one_users_refusal_is_never_repeated_to_another_user(proxy: Any) -> None:
    s = proxy({"budget": [{"name": "per-user", "usd": 2, "window": "1h", "per": "user", "action": "block"}]})
    same = {"X-Spendgate-Session": "shared"}
    assert raw_post(s, "/v1/chat/completions", O1, {**same, "X-Spendgate-User": "ann"})[0] == 200
    status, err = raw_post(s, "/v1/chat/completions", O1, {**same, "X-Spendgate-User": "ann"})
    assert status == 402 and err["spendgate"]["scope"] == "user=ann"
    status, _ = raw_post(s, "/v1/chat/completions", O1, {**same, "X-Spendgate-User": "ben"})
    assert status == 200, "ben's own budget decides, not ann's remembered refusal"


# -- 8. crafted input --------------------------------------------------------------------------------

def test_crafted_input_is_a_clear_4xx_and_the_server_keeps_serving(proxy: Any) -> None:
    s = proxy(SESSION_CAP)
    deep = b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, err = raw_post(s, "/v1/chat/completions", deep)
    assert status == 400 and "nests" in err["error"]["message"]
    status, err = raw_post(s, "/v1/messages", deep.replace(b"gpt-4o-mini", b"claude-haiku-4-5"),
                           {"anthropic-version": "2023-06-01"})
    assert status == 400 and err["type"] == "error"
    admin = {"Authorization": "Bearer admin-secret"}
    req = urllib.request.Request(s.url + "/spendgate/decisions?seconds=abc", headers=admin)
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=10)
    assert bad.value.code == 400 and "seconds" in json.loads(bad.value.read())["error"]["message"]
    for doc in (b"[1]", b'"yes"', b"12", b'{"max_usd": "NaN"}', b'{"max_usd": -5}'):
        req = urllib.request.Request(s.url + "/spendgate/approvals/abc", data=doc, method="POST",
                                     headers={**admin, "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(req, timeout=10)
        assert bad.value.code == 400, doc
    assert raw_post(s, "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 5,
                                                "messages": [{"role": "user", "content": "hi"}]})[0] == 200


def test_a_credential_in_the_query_string_is_not_kept_with_a_held_request(proxy: Any) -> None:
    s = proxy(SESSION_CAP)
    status, _ = raw_post(s, "/v1/chat/completions?key=sk-secret-123&beta=true&api_key=sk-other", O1,
                         {"X-Spendgate-Session": "s1"})
    assert status == 402
    [(_, kept)] = s.store.records(approvals.KIND, now=0)
    assert "sk-secret-123" not in kept and "sk-other" not in kept and "sk-client" not in kept
    assert approvals.Pending.from_json(kept).query == "beta=true"


# -- 9. the upstream timeout ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "policy"])
def test_the_upstream_timeout_is_configurable(serve: Any, how: str) -> None:
    s = serve("--upstream-timeout", "0.5") if how == "flag" else serve(policy="upstream_timeout_s = 0.5\n")
    status, err = s.post("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 5,
                                                  "messages": [{"role": "user", "content": "hi"}]},
                         {"x-mock": "hang"})
    assert status == 504 and err["error"]["code"] == "spendgate_timeout"


# -- more ways around, found in review ------------------------------------------------------------

def _raw_http(port: int, head: bytes, body: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        c.settimeout(10)
        out = b""
        while b"\r\n\r\n" not in out:
            out += c.recv(65536)
        return out


def test_a_second_credential_header_is_refused_not_counted_apart_from_the_one_billed(proxy: Any) -> None:
    s = proxy()
    body = json.dumps(O1).encode()
    for name, path in ((b"Authorization: Bearer ", b"/v1/chat/completions"), (b"x-api-key: ", b"/v1/messages")):
        head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + name + b"sk-junk-1\r\n" + name + b"sk-real\r\n")
        out = _raw_http(s.port, head, body)
        assert out.startswith(b"HTTP/1.1 401") and b"more than one" in out, out[:200]
    assert s.mock.reached() == 0


def test_what_a_key_binds_as_tags_beats_the_clients_tags_and_matches_without_them(serve: Any,
                                                                                monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-provider-key")
    s = serve(policy='[[budget]]\nname = "ml-team"\nusd = 2\nwindow = "1h"\nper = "team"\naction = "block"\n'
                     '[[budget]]\nname = "ml-only"\nusd = 3\nwindow = "1h"\nmatch = { tags = { team = "ml" } }\n'
                     'action = "block"\n')
    key = json.loads(cli("keys", "create", "--store", s.store_url, "--tag", "team=ml", "--json").stdout)["key"]
    statuses = [s.post("/v1/chat/completions", O1, {"Authorization": f"Bearer {key}",
                                                     "X-Spendgate-Tags": f"team=t{i}"})[0] for i in range(4)]
    assert statuses == [200, 402, 402, 402], "$2 for team ml, whatever team the client names"
    team = json.loads(cli("keys", "create", "--store", s.store_url, "--team", "ml", "--json").stdout)["key"]
    store = ledger.open(s.store_url)
    try:
        assert s.post("/v1/chat/completions", O1, {"Authorization": f"Bearer {team}"})[0] == 402
        keys = {b.key for b in store.known_buckets()}
        assert "ml-only|global=(none)" in keys, "the tag-matched rule applies with no tag sent"
    finally:
        store.close()


def test_identity_headers_that_are_not_text_are_a_400(proxy: Any) -> None:
    s = proxy()
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-client\r\nX-Spendgate-Session: caf\xe9\r\nConnection: close\r\n")
    assert _raw_http(s.port, head, body.encode()).startswith(b"HTTP/1.1 400")
    status, err = raw_post(s, "/v1/chat/completions", {**json.loads(body), "user": "\udce9"})
    assert status == 400 and "UTF-8" in err["error"]["message"]


@pytest.mark.parametrize("depth", [940, 960, 975, 990])
def test_a_body_nested_near_the_limit_is_a_400_and_holds_nothing(proxy: Any, depth: int) -> None:
    s = proxy()
    nested = "[" * depth + "]" * depth
    for extra, content in ((',"stream":true', "hi"), ("", "[spendgate: allow=once] hi")):
        raw = ('{"model":"gpt-4o-mini","max_tokens":5' + extra + ',"x":' + nested +
               ',"messages":[{"role":"user","content":"' + content + '"}]}').encode()
        req = urllib.request.Request(s.url + "/v1/chat/completions", data=raw, method="POST", headers={
            "Content-Type": "application/json", "Authorization": "Bearer sk-x"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status, err = e.code, json.loads(e.read())
            assert "nests" in err["error"]["message"]
        assert status in (200, 400)
    s.settled()
    assert all(st.held == 0 for st in s.store.states(s.store.known_buckets(), now=time.time()))


def test_a_store_failure_on_the_repeat_of_a_held_request_is_a_503(proxy: Any) -> None:
    from spendgate.errors import StoreError

    s = proxy(SESSION_CAP)
    assert raw_post(s, "/v1/chat/completions", O1, {"X-Spendgate-Session": "a"})[0] == 402

    def broken(*args: Any, **kwargs: Any) -> None:
        raise StoreError("store down")

    s.store.take_record = broken  # type: ignore[method-assign]
    status, err = raw_post(s, "/v1/chat/completions", O1, {"X-Spendgate-Session": "a"})
    assert status == 503 and err["error"]["code"] == "spendgate_store_error"


def test_an_approval_by_id_answers_only_the_rule_it_was_shown(proxy: Any) -> None:
    s = proxy({"budget": [{"name": "s-cap", "usd": 1, "window": "1h", "per": "session", "action": "hold"},
                          {"name": "k-cap", "usd": "1.5", "window": "24h", "per": "key", "action": "hold"}]})
    small = {**O1, "max_tokens": 1000}  # $0.60, billed in full
    bill = json.dumps({"prompt_tokens": 10, "completion_tokens": 1000, "total_tokens": 1010})
    assert raw_post(s, "/v1/chat/completions", small, {"X-Spendgate-Session": "a", "x-mock-usage": bill})[0] == 200
    assert raw_post(s, "/v1/chat/completions", small, {"X-Spendgate-Session": "b", "x-mock-usage": bill})[0] == 200
    status, held = raw_post(s, "/v1/chat/completions", small, {"X-Spendgate-Session": "c", "x-mock-usage": bill})
    assert status == 402 and held["spendgate"]["rule"] == "k-cap"
    approvals.approve(s.store, held["spendgate"]["decision_id"], None)
    # meanwhile another key spends in session c: the retry now trips s-cap too, which nobody approved
    other = {"X-Spendgate-Session": "c", "Authorization": "Bearer sk-other", "x-mock-usage": bill}
    assert raw_post(s, "/v1/chat/completions", {**small, "max_tokens": 999}, other)[0] == 200
    status, again = raw_post(s, "/v1/chat/completions", small, {"X-Spendgate-Session": "c", "x-mock-usage": bill})
    assert status == 402 and again["spendgate"]["rule"] == "s-cap"
    approvals.approve(s.store, again["spendgate"]["decision_id"], None)
    status, _ = raw_post(s, "/v1/chat/completions", small, {"X-Spendgate-Session": "c", "x-mock-usage": bill})
    assert status == 200, "both holds approved by their ids: the first approval was kept, not lost"


def test_a_dry_run_spends_no_approval(proxy: Any) -> None:
    s = proxy({"approvals": {"header_max_usd": 5},
               "budget": [{"name": "s-cap", "usd": 1, "window": "1h", "per": "session", "action": "hold"}]})
    for _ in range(3):
        status, doc = raw_post(s, "/v1/chat/completions", O1, {"X-Spendgate-Session": "a", "X-Spendgate-Estimate": "1",
                                                               "X-Spendgate-Allow": "max=5"})
        assert status == 200 and doc["allowed"] is False
    assert not [e for e in s.store.events(0) if e.kind == "approval"]
    assert all(st.granted == 0 for st in s.store.states(s.store.known_buckets(), now=time.time()))


def test_an_approval_by_id_releases_a_held_request_that_carried_a_directive(proxy: Any) -> None:
    s = proxy({"approvals": {"inband_max_usd": 0},
               "budget": [{"name": "soft", "usd": 1, "window": "request", "action": "hold"}]})
    big = {**O1, "messages": [{"role": "user", "content": "[spendgate: allow=once] go"}]}
    status, held = raw_post(s, "/v1/chat/completions", big, {"X-Spendgate-Session": "a"})
    assert status == 402 and "directive was ignored" in held["error"]["message"]
    approvals.approve(s.store, held["spendgate"]["decision_id"], None)
    assert raw_post(s, "/v1/chat/completions", big, {"X-Spendgate-Session": "a"})[0] == 200
    assert "[spendgate" not in s.mock.seen[-1].body.decode(), "the directive is stripped before forwarding"


def test_a_stream_cut_after_its_usage_arrived_is_charged_that_usage(proxy: Any) -> None:
    from aiohttp import web

    usage = {"prompt_tokens": 10, "completion_tokens": 3000, "total_tokens": 3010}

    async def cut_after_usage(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        await resp.write(b"data: " + json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": "hi"},
                                                                        "finish_reason": "stop"}]}).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps({**chunk, "choices": [], "usage": usage}).encode() + b"\n\n")
        assert request.transport is not None
        request.transport.close()  # no [DONE], no end of the chunked body
        return resp

    s = proxy()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", cut_after_usage)
    s.proxy.config.upstreams["openai"] = f"http://127.0.0.1:{s.bg.serve(app)}"
    body = {"model": "gpt-4o-mini", "max_tokens": 4000, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json",
                                                                    "Authorization": "Bearer sk-x"})
    assert b"broke off" in conn.getresponse().read()
    conn.close()
    s.settled()
    [ev] = s.store.events(0)
    assert ev.cost == 10 * 150 + 3000 * 600, "gpt-4o-mini: $0.15 / $0.60 per Mtok, as billed"


def test_serve_prices_with_what_prices_update_imported(serve: Any, tmp_path: Path) -> None:
    dear = {"gpt-4o-mini": {"input_cost_per_token": 1e-3, "output_cost_per_token": 2e-3,
                            "litellm_provider": "openai", "mode": "chat"}}
    (tmp_path / "dear.json").write_text(json.dumps(dear))
    env = {**__import__("os").environ, "SPENDGATE_HOME": str(tmp_path / ".spendgate")}
    done = subprocess.run([sys.executable, "-m", "spendgate.cli.main", "prices", "update", "--from",
                           str(tmp_path / "dear.json")], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    s = serve()
    status, doc = s.post("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 5,
                                                  "messages": [{"role": "user", "content": "hi"}]},
                         {"X-Spendgate-Estimate": "1"})
    assert status == 200 and Decimal(doc["spendgate"]["estimate_usd"]) >= Decimal("0.01"), \
        "5 output tokens at the imported $2,000 / Mtok, not the bundled $0.60"
