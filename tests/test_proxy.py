"""The proxy, driven by the official openai and anthropic clients against a mock upstream on loopback."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from spendgate import approvals
from spendgate.cli.main import main
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.policy.model import Policy
from spendgate.report import SPEND_KINDS
from tests.conftest import store_url
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers

MSG = [{"role": "user", "content": "hi"}]
# gpt-4o-mini at the mock's usage: 50 * $0.15/M + 10 * $0.60/M
MINI_COST = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600


@pytest.fixture
def servers_for(tmp_path: Path) -> Iterator[Any]:
    made: list[Servers] = []

    def make(policy: Policy | dict | None = None, store: str = "memory://", **kw: Any) -> Servers:
        pol = policy if isinstance(policy, Policy) else parse(policy) if policy is not None else default_policy()
        s = Servers(pol, store, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def oai(s: Servers, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0, **kw)


def ant(s: Servers) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=s.url, api_key="sk-ant-test", max_retries=0)


def events(s: Servers) -> list[Any]:
    s.settled()
    return s.store.events(0)


def charged(s: Servers) -> list[int]:
    """What was charged: the spend events (refusals and released holds are events too, of no cost)."""
    return [e.cost for e in events(s) if e.kind in SPEND_KINDS]


def states(s: Servers) -> list[Any]:
    s.settled()
    return s.store.states(s.store.known_buckets(), now=0)


def post(s: Servers, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    req = urllib.request.Request(s.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# -- successful calls arrive unchanged and are charged from usage ------------------------------

def test_openai_sync_chat_is_forwarded_and_charged_exactly(servers_for: Any) -> None:
    s = servers_for()
    raw = oai(s).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG, max_tokens=20)
    assert raw.parse().choices[0].message.content == "hello"
    assert Decimal(raw.headers["x-spendgate-estimate-usd"]) > 0
    assert raw.headers["x-spendgate-remaining-usd"]
    assert charged(s) == [MINI_COST]
    assert states(s)[0].held == 0


def test_body_bytes_are_forwarded_byte_for_byte(servers_for: Any) -> None:
    s = servers_for()
    body = b'{ "model" :"gpt-4o-mini",\n "messages":[{"role":"user","content":"hi \\u00e9"}], "max_tokens": 5,' \
           b' "unknown_key": {"kept": [1, 2.50]}}'
    status, _, _ = post(s, "/v1/chat/completions", body)
    assert status == 200 and s.mock.seen[-1].body == body


def test_openai_stream_adds_include_usage_meters_it_and_withholds_the_chunk(servers_for: Any) -> None:
    s = servers_for()
    chunks = list(oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=20, stream=True))
    assert s.mock.seen[-1].json["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
    assert all(c.choices for c in chunks), "the usage chunk the client did not ask for is withheld"
    asked = list(oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=20, stream=True,
                                                stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert charged(s) == [MINI_COST, MINI_COST]


def test_openai_async_client_streaming_and_not(servers_for: Any) -> None:
    s = servers_for()

    async def go() -> str:
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="sk-a", max_retries=0)
        r = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return (r.choices[0].message.content or "") + "|" + text

    assert asyncio.run(go()) == "hello|hello there"
    assert charged(s) == [MINI_COST, MINI_COST]


def test_responses_api_plain_and_streamed(servers_for: Any) -> None:
    s = servers_for()
    c = oai(s)
    assert c.responses.create(model="gpt-5", input="hi", max_output_tokens=100).output_text == "hello"
    events = [e.type for e in c.responses.create(model="gpt-5", input="hi", max_output_tokens=100, stream=True)]
    assert events[-1] == "response.completed"
    gpt5 = PROMPT_TOKENS * 1250 + COMPLETION_TOKENS * 10_000
    assert charged(s) == [gpt5, gpt5]


def test_anthropic_messages_plain_stream_helper_and_free_count_tokens(servers_for: Any) -> None:
    s = servers_for()
    a = ant(s)
    m = a.messages.create(model="claude-opus-4-8", max_tokens=100, messages=MSG)
    assert m.content[0].text == "hello"  # type: ignore[union-attr]
    with a.messages.stream(model="claude-opus-4-8", max_tokens=100, messages=MSG) as st:
        assert st.get_final_text() == "hello"
    assert a.messages.count_tokens(model="claude-opus-4-8", messages=MSG).input_tokens == 42
    opus = PROMPT_TOKENS * 5000 + COMPLETION_TOKENS * 25_000
    assert charged(s) == [opus, opus], "count_tokens is free and passed through"
    assert s.mock.seen[0].headers["authorization"] == "Bearer sk-ant-test"  # credentials forwarded as sent


def test_claude_code_path_with_query_string_routes_on_the_path(servers_for: Any) -> None:
    s = servers_for()
    body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 64000, "messages": MSG,
                       "metadata": {"user_id": "{\"device\":\"d1\"}"}}).encode()
    status, _, _ = post(s, "/v1/messages?beta=true", body, {"x-api-key": "sk-ant", "anthropic-beta": "a,b,c",
                                                            "X-Claude-Code-Session-Id": "cc-1"})
    assert status == 200
    seen = s.mock.seen[-1]
    assert seen.query == "beta=true" and seen.headers["anthropic-beta"] == "a,b,c"
    [ev] = events(s)
    assert ev.dims["session"] == "cc-1" and ev.dims["user"] == '{"device":"d1"}'


def test_embeddings_and_models_pass(servers_for: Any) -> None:
    s = servers_for()
    c = oai(s)
    assert c.embeddings.create(model="text-embedding-3-small", input="hello").data[0].embedding == [0.1, 0.2]
    assert [m.id for m in c.models.list()] == ["gpt-4o-mini"]


# -- refusals ----------------------------------------------------------------------------------

def test_refusal_is_a_402_in_each_providers_envelope_with_the_spendgate_fields(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "tiny", "usd": 0.000001, "window": "day", "per": "user"}]})
    with pytest.raises(openai.APIStatusError) as err:
        oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100, user="alice")
    e = err.value
    assert e.status_code == 402
    sg = e.body["spendgate"]  # type: ignore[index]
    assert (sg["rule"], sg["action"], sg["scope"], sg["limit_usd"]) == ("tiny", "block", "user=alice", "0.000001")
    for field in ("decision_id", "window", "spent_usd", "held_usd", "estimate_usd", "remaining_usd", "resets_at",
                  "retryable", "recovery"):
        assert field in sg
    assert e.response.headers["x-spendgate-decision"] == sg["decision_id"]
    assert int(e.response.headers["retry-after"]) > 0
    assert "x-should-retry" not in e.response.headers
    with pytest.raises(anthropic.APIStatusError) as aerr:
        ant(s).messages.create(model="claude-opus-4-8", max_tokens=100, messages=MSG,
                               metadata={"user_id": "alice"})
    assert aerr.value.status_code == 402
    body = aerr.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "budget_exceeded"
    assert body["spendgate"]["rule"] == "tiny" and "budget \"tiny\"" in body["error"]["message"]
    assert s.mock.reached() == 0, "a refused request never reaches the provider"


def test_unknown_model_is_priced_dearest_and_says_so(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "cap", "usd": 0.01, "window": "request"}]})
    with pytest.raises(openai.APIStatusError) as err:
        oai(s).chat.completions.create(model="acme/unknown-model", messages=MSG, max_tokens=100)
    sg = err.value.body["spendgate"]  # type: ignore[index]
    assert sg["priced_as"] == "openai/o1-pro (dearest)" and "acme/unknown-model" in " ".join(sg["notes"])


def test_64_concurrent_requests_admit_exactly_the_ones_that_fit(servers_for: Any, tmp_path: Path) -> None:
    s = servers_for({"budget": [{"name": "g", "usd": 1, "window": "day"}]}, store=f"sqlite:///{tmp_path}/p.db")
    body = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 1000}
    worst = s.engine.estimator.estimate("openai", "/v1/chat/completions", body)
    est = worst.cost_nanos
    n_fit = 9
    s2 = servers_for({"budget": [{"name": "g", "usd": str(Decimal(est * n_fit + est // 2) / 10**9),
                                  "window": "day"}]}, store=f"sqlite:///{tmp_path}/q.db")
    # each admitted call bills its full worst case, so no capture frees room for a late request
    s2.mock.prompt_tokens, s2.mock.completion_tokens = worst.input_tokens, 1000

    async def go() -> list[int]:
        client = openai.AsyncOpenAI(base_url=s2.url + "/v1", api_key="sk-c", max_retries=0)

        async def one() -> int:
            try:
                await client.chat.completions.create(**body)  # type: ignore[call-overload]
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        codes = await asyncio.gather(*(one() for _ in range(64)))
        await client.close()
        return list(codes)

    codes = asyncio.run(go())
    assert codes.count(200) == n_fit and codes.count(402) == 64 - n_fit
    assert s2.mock.reached("/v1/chat/completions") == n_fit


# -- holds, approvals and the runaway session ---------------------------------------------------

def _agent_turn(text: str, older: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"model": "claude-opus-4-8", "max_tokens": 8000,
            "messages": [*(older or []), {"role": "user", "content": text}]}


def test_runaway_session_is_held_then_yes_max_5_lets_it_spend_5_more(servers_for: Any) -> None:
    s = servers_for()
    s.mock.prompt_tokens, s.mock.completion_tokens = 2000, 7900  # ~$0.21 per turn on opus 4.8
    cost = 2000 * 5000 + 7900 * 25_000
    a = ant(s)
    headers = {"X-Spendgate-Session": "agent-1"}
    sent = 0
    held: anthropic.APIStatusError | None = None
    for i in range(200):
        try:
            a.messages.create(**_agent_turn(f"step {i}"), extra_headers=headers)  # type: ignore[arg-type]
            sent += 1
        except anthropic.APIStatusError as e:
            held = e
            break
    assert held is not None and held.status_code == 402
    sg = held.response.json()["spendgate"]
    assert sg["action"] == "hold" and sg["rule"] == "session-hour" and sg["approval"]["id"] == sg["decision_id"]
    assert sent * cost <= usd_to_nanos(10) < (sent + 1) * cost + usd_to_nanos(1)
    # a directive left in an older turn approves nothing
    old = [{"role": "user", "content": "[spendgate: allow=once max=$5] earlier"},
           {"role": "assistant", "content": "ok"}]
    with pytest.raises(anthropic.APIStatusError) as again:
        a.messages.create(**_agent_turn("continue", old), extra_headers=headers)  # type: ignore[arg-type]
    assert again.value.response.json()["spendgate"]["action"] == "hold"
    # "yes max=$5" in the latest turn: the latest held request is replayed byte for byte, with $5 headroom
    [latest] = [p for p in approvals.pending(s.store) if p.status == "pending"][-1:]
    before = s.mock.reached()
    a.messages.create(**_agent_turn("yes max=$5", old), extra_headers=headers)  # type: ignore[arg-type]
    assert s.mock.reached() == before + 1
    assert s.mock.seen[-1].body == latest.body
    assert json.loads(latest.body)["messages"][-1]["content"] == "continue"
    more = 0
    for i in range(200):
        try:
            a.messages.create(**_agent_turn(f"after {i}"), extra_headers=headers)  # type: ignore[arg-type]
            more += 1
        except anthropic.APIStatusError as e:
            assert e.response.json()["spendgate"]["action"] == "hold"
            break
    extra = (1 + more) * cost
    assert usd_to_nanos(4) < extra <= usd_to_nanos(5) + cost, "about $5 more, without being asked in between"
    total = sum(charged(s))
    assert total <= usd_to_nanos(15)


def test_immutable_cap_refuses_regardless_of_any_approval(servers_for: Any) -> None:
    s = servers_for()
    big = {"model": "o1-pro", "input": "[spendgate: allow=once max=$1000] go", "max_output_tokens": 100_000}
    status, _, body = post(s, "/v1/responses", json.dumps(big).encode(), {"X-Spendgate-Allow": "max=1000"})
    assert status == 402 and body["spendgate"]["rule"] == "request-hard"
    assert s.mock.reached() == 0


def test_directive_is_stripped_and_consumed_once(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "soft", "usd": 0.0001, "window": "request", "action": "hold"}]})
    body = {"model": "gpt-4o-mini", "max_tokens": 1000,
            "messages": [{"role": "user", "content": "[TIP: allow=once max=$1] summarise this"}]}
    status, _, _ = post(s, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200
    assert s.mock.seen[-1].json["messages"][-1]["content"] == "summarise this"
    plain = {**body, "messages": [{"role": "user", "content": "summarise this"}]}
    status, _, _ = post(s, "/v1/chat/completions", json.dumps(plain).encode())
    assert status == 402, "the directive approved one request, not the next"


def test_headless_agent_predeclares_with_allow_header(servers_for: Any) -> None:
    soft = [{"name": "soft", "usd": 0.0001, "window": "request", "action": "hold"}]
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": MSG}).encode()
    off = servers_for({"budget": soft})
    assert post(off, "/v1/chat/completions", body, {"X-Spendgate-Allow": "max=1"})[0] == 402, "off by default"
    s = servers_for({"approvals": {"header_max_usd": 1}, "budget": soft})
    assert post(s, "/v1/chat/completions", body, {"X-Spendgate-Allow": "max=1"})[0] == 200
    assert post(s, "/v1/chat/completions", body, {"X-Spendgate-Allow": "max=0.0001"})[0] == 402
    status, _, err = post(s, "/v1/chat/completions", body, {"X-Spendgate-Allow": "lots"})
    assert status == 400 and "X-Spendgate-Allow" in err["error"]["message"]


def test_a_repeated_refused_body_gets_the_same_answer_without_a_new_hold(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "soft", "usd": 0.0001, "window": "request", "action": "hold"}]})
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": MSG}).encode()
    answers = [post(s, "/v1/chat/completions", body)[2]["spendgate"]["decision_id"] for _ in range(6)]
    assert len(set(answers)) == 1
    assert len(s.store.records("hold", now=0)) == 1


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_cli_approve_by_id_lets_the_retry_through(servers_for: Any, tmp_path: Path, kind: str,
                                                   request: pytest.FixtureRequest,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = store_url(kind, tmp_path, request)
    s = servers_for({"budget": [{"name": "soft", "usd": 0.0001, "window": "request", "action": "hold"}]}, store=url)
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": MSG}).encode()
    status, _, refused = post(s, "/v1/chat/completions", body, {"X-Spendgate-Session": "s9"})
    assert status == 402
    hold_id = refused["spendgate"]["approval"]["id"]
    assert main(["approvals", "--store", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pending"][0]["id"] == hold_id
    assert main(["approve", hold_id, "--store", url]) == 0
    assert post(s, "/v1/chat/completions", body, {"X-Spendgate-Session": "s9"})[0] == 200
    assert post(s, "/v1/chat/completions", body, {"X-Spendgate-Session": "s9"})[0] == 402, "approved once"


def test_a_bare_no_denies_the_held_request(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "soft", "usd": 0.0001, "window": "request", "action": "hold"}]})
    h = {"X-Spendgate-Session": "s1"}
    first = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": MSG}).encode()
    assert post(s, "/v1/chat/completions", first, h)[0] == 402
    no = {"model": "gpt-4o-mini", "max_tokens": 1000, "messages": [{"role": "user", "content": "no"}]}
    status, _, body = post(s, "/v1/chat/completions", json.dumps(no).encode(), h)
    assert status == 402 and body["spendgate"]["action"] == "denied"
    assert s.mock.reached() == 0


def test_admin_api_needs_the_token_and_answers_holds(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "soft", "usd": 0.0001, "window": "request", "action": "hold"}]})
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": MSG}).encode()
    hold_id = post(s, "/v1/chat/completions", body)[2]["spendgate"]["decision_id"]

    def admin(method: str, path: str, token: str | None, data: bytes | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(s.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert admin("GET", "/spendgate/approvals", None)[0] == 401
    assert admin("GET", "/spendgate/approvals", "wrong")[0] == 401
    code, doc = admin("GET", "/spendgate/approvals", "admin-secret")
    assert code == 200 and doc["pending"][0]["id"] == hold_id
    code, doc = admin("POST", f"/spendgate/approvals/{hold_id}", "admin-secret", b'{"deny": true}')
    assert code == 200 and doc["status"] == "denied"
    assert admin("POST", "/spendgate/approvals/nope", "admin-secret", b"{}")[0] == 404
    assert admin("GET", "/spendgate/status", "admin-secret")[0] == 200


# -- identity -----------------------------------------------------------------------------------

def test_virtual_key_is_swapped_and_attributed(servers_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    assert main(["keys", "create", "--user", "carol", "--team", "ml", "--store", url, "--json"]) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-provider-key")
    s = servers_for(store=url)
    oai_client = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
    oai_client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
    assert s.mock.seen[-1].headers["Authorization"] == "Bearer sk-real-provider-key"
    [ev] = events(s)
    assert (ev.dims["user"], ev.dims["team"]) == ("carol", "ml") and key not in json.dumps(ev.dims)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="sg-forged", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=MSG, max_tokens=5)


def test_own_key_is_counted_by_hash_and_tags_are_read(servers_for: Any) -> None:
    s = servers_for()
    oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                   extra_headers={"X-Spendgate-Tags": "feature=search, team=ml"})
    [ev] = events(s)
    assert ev.dims["feature"] == "search" and ev.dims["team"] == "ml"
    assert len(ev.dims["key"]) == 16 and "sk-test-key" not in json.dumps(ev.dims)
    assert ev.dims["session"] == f"key:{ev.dims['key']}", "no session header: counted under the key"


def test_dry_run_estimates_without_calling_the_provider(servers_for: Any) -> None:
    s = servers_for()
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 100, "messages": MSG}).encode()
    status, _, doc = post(s, "/v1/chat/completions", body, {"X-Spendgate-Estimate": "1"})
    assert status == 200 and doc["allowed"] and Decimal(doc["spendgate"]["estimate_usd"]) > 0
    assert s.mock.reached() == 0 and charged(s) == []
    assert all(st.held == 0 for st in states(s))


# -- bad input and upstream failures never take the proxy down ----------------------------------

@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "model"),
    ("/v1/chat/completions", b'{"model": "gpt-4o", "messages": [], "max_tokens": "many"}', 400, "max_tokens"),
    ("/v1/audio/speech", b'{"model": "tts-1"}', 404, "not a route spendgate can price"),
    ("/v1/images/generations", b'{"model": "gpt-image-1"}', 400, "prompt"),
])
def test_bad_input_is_a_4xx_that_names_the_problem(servers_for: Any, path: str, body: bytes, status: int,
                                                    needle: str) -> None:
    s = servers_for()
    code, _, doc = post(s, path, body)
    assert code == status and needle in doc["error"]["message"]
    assert post(s, "/v1/chat/completions", json.dumps({"model": "gpt-4o-mini", "messages": MSG,
                                                       "max_tokens": 5}).encode())[0] == 200


def test_oversized_body_is_refused_in_the_envelope(servers_for: Any) -> None:
    s = servers_for(max_body_bytes=1000)
    code, _, doc = post(s, "/v1/messages", json.dumps(_agent_turn("x" * 2000)).encode(), {"x-api-key": "k"})
    assert code == 413 and "1,000-byte limit" in doc["error"]["message"] and doc["type"] == "error"


def test_upstream_error_is_passed_on_and_the_hold_released(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "g", "usd": 1, "window": "day"}]})
    with pytest.raises(openai.InternalServerError):
        oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5,
                                       extra_headers={"x-mock": "500"})
    assert charged(s) == []
    assert all(st.held == 0 and st.spent == 0 for st in states(s))


def test_missing_usage_and_a_cut_stream_are_charged_never_zero(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "g", "usd": 1, "window": "day"}]})
    oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100,
                                   extra_headers={"x-mock": "nousage"})
    with pytest.raises(openai.APIError):
        list(oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100, stream=True,
                                            extra_headers={"x-mock": "cut"}))
    evs = events(s)
    assert [e.estimated for e in evs] == [True, True]
    assert all(e.cost > 0 for e in evs)


def test_unreachable_upstream_is_a_502_and_nothing_is_charged(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "g", "usd": 1, "window": "day"}]})
    s.proxy.config.upstreams["openai"] = "http://127.0.0.1:9"  # discard port: connection refused
    with pytest.raises(openai.APIStatusError) as err:
        oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
    assert err.value.status_code == 502 and "nothing charged" in str(err.value.message)
    assert charged(s) == []
    s.proxy.config.upstreams["openai"] = f"http://127.0.0.1:{s.upstream_port}"
    assert oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5).choices


def test_upstream_timeout_after_send_charges_the_worst_case_flagged(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "g", "usd": 1, "window": "day"}]}, upstream_timeout_s=0.3)
    with pytest.raises(openai.APIStatusError) as err:
        oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100,
                                       extra_headers={"x-mock": "hang"})
    assert err.value.status_code == 504
    [ev] = events(s)
    worst = s.engine.estimator.estimate("openai", "/v1/chat/completions",
                                        {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 100}).cost_nanos
    assert ev.estimated and ev.cost == worst
    assert oai(s).chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5).choices


def test_approving_with_max_lets_the_immediate_retry_through(servers_for: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    s = servers_for({"budget": [{"name": "sess", "usd": 0.0001, "window": "1h", "per": "session",
                                 "action": "hold"}]}, store=url)
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": MSG}).encode()
    h = {"X-Spendgate-Session": "s7"}
    status, _, refused = post(s, "/v1/chat/completions", body, h)
    assert status == 402
    assert post(s, "/v1/chat/completions", body, h)[0] == 402, "a plain retry gets the same answer"
    assert main(["approve", refused["spendgate"]["decision_id"], "--max", "1", "--store", url]) == 0
    assert post(s, "/v1/chat/completions", body, h)[0] == 200, "the retry right after approval goes through"
    other = json.dumps({"model": "gpt-4o-mini", "max_tokens": 900, "messages": MSG}).encode()
    assert post(s, "/v1/chat/completions", other, h)[0] == 200, "and the granted $1 covers the next ones"
