"""Gemini through the proxy, driven by the official google-genai client against a fake upstream on loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import errors, types

import spendgate
from spendgate import ledger as ledger_mod
from spendgate import providers
from spendgate.cli.main import main
from spendgate.policy import default_policy, parse
from spendgate.policy.model import Policy
from spendgate.report import SPEND_KINDS
from spendgate.sdk import _runtime
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers, start_serve

MODEL = "gemini-2.5-flash"
#: gemini-2.5-flash's published rates, USD per million tokens (the bundled table's google row)
RATE_IN, RATE_CACHE, RATE_OUT = Decimal("0.30"), Decimal("0.03"), Decimal("2.50")
ROUTE = "/v1/models/{model}:generateContent"


def nanos(tokens: int, usd_per_mtok: Decimal) -> Decimal:
    return tokens * usd_per_mtok * 1000  # USD/Mtok -> nano-dollars per token is x1000


MOCK_COST = int(nanos(PROMPT_TOKENS, RATE_IN) + nanos(COMPLETION_TOKENS, RATE_OUT))


@pytest.fixture
def servers_for(tmp_path: Path) -> Iterator[Any]:
    made: list[Servers] = []

    def make(policy: Policy | dict | None = None, store: str = "memory://", **kw: Any) -> Servers:
        pol = policy if isinstance(policy, Policy) else parse(policy) if policy is not None else default_policy()
        s = Servers(pol, store, **kw)  # every registered provider's upstream is the fake one
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
    _KEPT.clear()


#: google-genai closes its HTTP client when the Client is collected: keep each one for the test
_KEPT: list[genai.Client] = []


def client(s: Servers, key: str = "AIza-test-key", **headers: str) -> genai.Client:
    c = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=s.url, headers=headers or None))
    _KEPT.append(c)
    return c


def charged(s: Servers) -> list[int]:
    s.settled()
    return [e.cost for e in s.store.events(0) if e.kind in SPEND_KINDS]


def post(s: Servers, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
         ) -> tuple[int, Any]:
    req = urllib.request.Request(s.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


CONTENTS = [{"role": "user", "parts": [{"text": "Say hello in five words."}]}]


# -- calls are forwarded and charged from usageMetadata, to the nano-dollar ----------------------

def test_generate_content_json_is_forwarded_and_charged_exactly(servers_for: Any) -> None:
    s = servers_for()
    resp = client(s).models.generate_content(model=MODEL, contents="hi",
                                             config=types.GenerateContentConfig(max_output_tokens=100))
    assert resp.text == "hello"
    seen = s.mock.seen[-1]
    assert seen.path == f"/v1/models/{MODEL}:generateContent"
    assert "model" not in seen.json, "the path's model is not added to the body sent upstream"
    assert seen.headers["x-goog-api-key"] == "AIza-test-key"
    assert charged(s) == [MOCK_COST]


def test_thoughts_cache_and_tool_prompt_are_priced_at_their_rates(servers_for: Any) -> None:
    s = servers_for()
    usage = {"promptTokenCount": 1000, "cachedContentTokenCount": 400, "candidatesTokenCount": 200,
             "thoughtsTokenCount": 300, "toolUsePromptTokenCount": 50, "totalTokenCount": 1550}
    c = client(s, **{"x-mock-usage": json.dumps(usage)})
    c.models.generate_content(model=MODEL, contents="hi")
    text_in = 1000 + 50 - 400  # tool-use prompt tokens are input; cached ones are read at the cache rate
    want = nanos(text_in, RATE_IN) + nanos(400, RATE_CACHE) + nanos(200 + 300, RATE_OUT)
    assert want == 1_457_000
    assert charged(s) == [int(want)]


def test_stream_is_relayed_and_charged_from_the_last_usage_metadata(servers_for: Any) -> None:
    s = servers_for()
    usage = {"promptTokenCount": 120, "candidatesTokenCount": 30, "thoughtsTokenCount": 7, "totalTokenCount": 157}
    chunks = list(client(s, **{"x-mock-usage": json.dumps(usage)}).models.generate_content_stream(
        model=MODEL, contents="hi"))
    assert "".join(c.text or "" for c in chunks) == "hello there"
    assert s.mock.seen[-1].path == f"/v1/models/{MODEL}:streamGenerateContent"
    assert s.mock.seen[-1].query == "alt=sse"
    assert charged(s) == [int(nanos(120, RATE_IN) + nanos(37, RATE_OUT))]


def test_v1beta_and_the_async_client(servers_for: Any) -> None:
    s = servers_for()
    c = genai.Client(api_key="AIza-k", http_options=types.HttpOptions(base_url=s.url, api_version="v1beta"))

    async def go() -> str:
        text = (await c.aio.models.generate_content(model=MODEL, contents="hi")).text or ""
        async for chunk in await c.aio.models.generate_content_stream(model=MODEL, contents="hi"):
            text += chunk.text or ""
        return text

    assert asyncio.run(go()) == "hellohello there"
    assert [x.path for x in s.mock.seen] == [f"/v1beta/models/{MODEL}:generateContent",
                                            f"/v1beta/models/{MODEL}:streamGenerateContent"]
    assert charged(s) == [MOCK_COST, MOCK_COST]


def test_a_cut_stream_is_charged_never_zero(servers_for: Any) -> None:
    s = servers_for()
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises whatever its HTTP library does
        list(client(s, **{"x-mock": "cut"}).models.generate_content_stream(model=MODEL, contents="hi"))
    [cost] = charged(s)
    assert cost > 0


def test_count_tokens_passes_free(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "tiny", "usd": 0.000001, "window": "day"}]})
    assert client(s).models.count_tokens(model=MODEL, contents="hi").total_tokens == 42
    assert s.mock.reached(f"/v1/models/{MODEL}:countTokens") == 1
    assert charged(s) == []


# -- refusals are google-genai's own errors, with spendgate's message ---------------------------

def test_refusal_is_a_client_error_with_spendgates_message(servers_for: Any) -> None:
    s = servers_for({"budget": [{"name": "tiny", "usd": 0.000001, "window": "day"}]})
    with pytest.raises(errors.ClientError) as err:
        client(s).models.generate_content(model=MODEL, contents="hi")
    e = err.value
    assert (e.code, e.status) == (402, "FAILED_PRECONDITION")
    assert e.message is not None and e.message.startswith("spendgate:") and 'budget "tiny"' in e.message
    assert e.details["spendgate"]["rule"] == "tiny" and e.details["spendgate"]["action"] == "block"
    with pytest.raises(errors.ClientError) as serr:
        list(client(s).models.generate_content_stream(model=MODEL, contents="hi"))
    assert serr.value.code == 402 and 'budget "tiny"' in (serr.value.message or "")
    assert s.mock.reached() == 0, "a refused request never reaches the provider"


def test_an_unknown_gemini_route_is_refused_and_never_forwarded(servers_for: Any) -> None:
    s = servers_for()
    with pytest.raises(errors.ClientError) as err:
        client(s).models.embed_content(model="gemini-embedding-001", contents="hi")
    assert err.value.code == 404 and err.value.status == "NOT_FOUND"
    assert "not a route spendgate can price" in (err.value.message or "")
    assert s.mock.reached() == 0


def test_a_bad_body_is_a_400_naming_the_field(servers_for: Any) -> None:
    s = servers_for()
    status, body = post(s, f"/v1beta/models/{MODEL}:generateContent", {"contents": "hi"},
                        {"x-goog-api-key": "AIza-k"})
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    assert "`contents` must be a list" in body["error"]["message"]


def test_32_concurrent_calls_admit_exactly_the_ones_that_fit(servers_for: Any, tmp_path: Path) -> None:
    probe = servers_for()
    config = types.GenerateContentConfig(max_output_tokens=1000)
    client(probe).models.generate_content(model=MODEL, contents="Say hello.", config=config)
    sent = {**probe.mock.seen[-1].json, "model": MODEL}  # the body the proxy prices
    worst = probe.engine.estimator.estimate("gemini", ROUTE, sent)
    est, n_fit = worst.cost_nanos, 7
    s = servers_for({"budget": [{"name": "g", "usd": str(Decimal(est * n_fit + est // 2) / 10**9),
                                 "window": "day"}]}, store=f"sqlite:///{tmp_path}/q.db")
    # each admitted call bills its full worst case, so no capture frees room for a late request
    s.mock.prompt_tokens, s.mock.completion_tokens = worst.input_tokens, 1000
    c = client(s)

    async def go() -> list[int]:
        async def one() -> int:
            try:
                await c.aio.models.generate_content(model=MODEL, contents="Say hello.", config=config)
                return 200
            except errors.APIError as e:
                return e.code

        return list(await asyncio.gather(*(one() for _ in range(32))))

    codes = asyncio.run(go())
    assert codes.count(200) == n_fit and codes.count(402) == 32 - n_fit
    assert s.mock.reached(f"/v1/models/{MODEL}:generateContent") == n_fit
    assert charged(s) == [est] * n_fit


def test_spendgate_serve_reaches_the_upstream_its_environment_names(servers_for: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = servers_for()
    monkeypatch.setenv("SPENDGATE_GEMINI_BASE_URL", f"http://127.0.0.1:{upstream.upstream_port}")
    store = f"sqlite:///{tmp_path}/serve.db"
    proc, port = start_serve(tmp_path, upstream.upstream_port, "--store", store)
    try:
        c = genai.Client(api_key="AIza-serve", http_options=types.HttpOptions(base_url=f"http://127.0.0.1:{port}"))
        assert c.models.generate_content(model=MODEL, contents="hi").text == "hello"
        assert "".join(x.text or "" for x in c.models.generate_content_stream(model=MODEL, contents="hi")) \
            == "hello there"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    led = ledger_mod.open(store)
    try:
        assert [e.cost for e in led.events(0) if e.kind in SPEND_KINDS] == [MOCK_COST, MOCK_COST]
    finally:
        led.close()


def test_a_truncate_rule_drops_the_oldest_turns_and_the_upstream_gets_geminis_shape(servers_for: Any) -> None:
    def turn(role: str, text: str) -> dict[str, Any]:
        return {"role": role, "parts": [{"text": text}]}

    old = "Tell me everything about the history of the printing press. " * 40
    contents = [turn("user", old), turn("model", old), turn("user", "And paper?"), turn("model", "Paper came first."),
                turn("user", "Thanks. One line on ink?")]
    body = {"contents": contents, "generationConfig": {"maxOutputTokens": 50}}
    kept = contents[2:]
    est = servers_for().engine.estimator
    fits = est.estimate("gemini", ROUTE, {**body, "contents": kept, "model": MODEL}).cost_nanos
    assert est.estimate("gemini", ROUTE, {**body, "model": MODEL}).cost_nanos > fits
    s = servers_for({"budget": [{"name": "per-call", "usd": str(Decimal(fits) / 10**9), "window": "request",
                                 "action": "truncate"}]})
    status, _ = post(s, f"/v1/models/{MODEL}:generateContent", body, {"x-goog-api-key": "AIza-k"})
    assert status == 200
    assert s.mock.seen[-1].json == {"contents": kept, "generationConfig": {"maxOutputTokens": 50}}
    s.settled()
    assert [(e.kind, e.cost) for e in s.store.events(0)] == [("truncate", 0), ("capture", MOCK_COST)]


def test_a_downgrade_changes_the_model_in_the_path(servers_for: Any) -> None:
    # the model's maximum output (65,536) fits $0.05 at flash-lite's $0.40 per Mtok, not at flash's $2.50
    s = servers_for({"budget": [{"name": "per-call", "usd": 0.05, "window": "request", "action": "downgrade",
                                 "downgrade": {MODEL: "gemini-2.5-flash-lite"}}]})
    c = client(s)
    c.models.generate_content(model=MODEL, contents="hi")
    c.models.generate_content(model="gemini-2.5-flash-lite", contents="hi")
    assert [x.path for x in s.mock.seen] == ["/v1/models/gemini-2.5-flash-lite:generateContent"] * 2
    assert all("model" not in x.json for x in s.mock.seen)
    s.settled()
    assert [e.model for e in s.store.events(0) if e.kind in SPEND_KINDS] == ["gemini-2.5-flash-lite"] * 2


# -- credentials ---------------------------------------------------------------------------------

def test_a_key_in_the_query_is_forwarded_as_the_header_and_never_stored(servers_for: Any, tmp_path: Path) -> None:
    secret = "AIzaSECRET-query-key-123"
    db = tmp_path / "k.db"
    s = servers_for(store=f"sqlite:///{db}")
    status, _ = post(s, f"/v1beta/models/{MODEL}:generateContent?key={secret}", {"contents": CONTENTS})
    assert status == 200
    seen = s.mock.seen[-1]
    assert seen.query == "" and seen.headers["x-goog-api-key"] == secret
    held = servers_for({"budget": [{"name": "soft", "usd": 0.000001, "window": "request", "action": "hold"}]},
                       store=f"sqlite:///{tmp_path}/h.db")
    status, body = post(held, f"/v1beta/models/{MODEL}:generateContent?key={secret}&alt=json",
                        {"contents": CONTENTS}, {"x-goog-api-key": secret})
    assert status == 402 and body["spendgate"]["action"] == "hold"
    [record] = held.store.records("hold", now=0)
    assert secret not in json.dumps(record) and "alt=json" in json.dumps(record)
    charged(s), charged(held)
    for f in tmp_path.iterdir():
        assert secret.encode() not in f.read_bytes(), f.name
    status, body = post(s, f"/v1beta/models/{MODEL}:generateContent?key={secret}", {"contents": CONTENTS},
                        {"x-goog-api-key": "AIza-another"})
    assert status == 401 and "more than one credential" in body["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    payload = json.dumps({"contents": CONTENTS}).encode()
    conn.putrequest("POST", f"/v1beta/models/{MODEL}:generateContent")
    for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                        ("x-goog-api-key", "AIza-one"), ("x-goog-api-key", "AIza-two")):
        conn.putheader(name, value)
    conn.endheaders(payload)
    twice = conn.getresponse()
    assert twice.status == 401 and b"more than one x-goog-api-key" in twice.read()
    conn.close()


def test_a_virtual_key_is_swapped_for_gemini_api_key(servers_for: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/v.db"
    assert main(["keys", "create", "--user", "carol", "--store", url, "--json"]) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-real-provider-key")
    s = servers_for(store=url)
    client(s, key=key).models.generate_content(model=MODEL, contents="hi")
    assert s.mock.seen[-1].headers["x-goog-api-key"] == "AIza-real-provider-key"
    s.settled()
    [ev] = [e for e in s.store.events(0) if e.kind in SPEND_KINDS]
    assert ev.dims["user"] == "carol" and ev.cost == MOCK_COST


# -- the adapter ---------------------------------------------------------------------------------

def test_routes_match_with_the_model_from_the_path() -> None:
    found = providers.match(f"/v1beta/models/{MODEL}:streamGenerateContent")
    assert found is not None
    p, route, params = found
    assert (p.name, route, params) == ("gemini", "/v1beta/models/{model}:streamGenerateContent", {"model": MODEL})
    assert providers.match("/v1beta/models/a/b:generateContent") is None
    assert providers.match("/v1/chat/completions") is not None


def test_output_bound_is_max_output_plus_thinking_budget_times_candidates() -> None:
    from spendgate.providers.gemini import generate

    body = {"model": MODEL, "contents": CONTENTS,
            "generationConfig": {"maxOutputTokens": 500, "candidateCount": 2,
                                 "thinkingConfig": {"thinkingBudget": 1024}}}
    shape = generate(body)
    assert (shape.requested_output, shape.choices, shape.exact) == (1524, 2, False)
    assert generate({"model": MODEL, "contents": CONTENTS}).requested_output is None  # the model's maximum
    assert generate({**body, "generationConfig": {"thinkingConfig": {"thinkingBudget": -1}}}).requested_output is None
    snake = {"model": MODEL, "contents": CONTENTS, "system_instruction": {"parts": [{"text": "Be brief. " * 50}]},
             "generation_config": {"max_output_tokens": 500, "candidate_count": 2,
                                   "thinking_config": {"thinking_budget": 1024}}}
    camel = {"model": MODEL, "contents": CONTENTS, "systemInstruction": snake["system_instruction"],
             "generationConfig": body["generationConfig"]}
    assert generate(snake) == generate(camel) and generate(snake).input_tokens > generate(body).input_tokens + 100


def test_inline_images_count_tiles_or_gemini_3s_most_and_other_data_by_size() -> None:
    import base64
    import struct

    from spendgate.providers.gemini import generate

    def png(w: int, h: int) -> str:
        return base64.b64encode(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR"
                                + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0) + b"\0" * 64).decode()

    def inline(mime: str, data: str) -> int:
        part = {"inlineData": {"mimeType": mime, "data": data}}
        return generate({"model": MODEL, "contents": [{"role": "user", "parts": [part]}]}).input_tokens

    text_only = generate({"model": MODEL, "contents": [{"role": "user", "parts": []}]}).input_tokens
    assert inline("image/png", png(1000, 1000)) - text_only == 2240  # 4 tiles (1,032) < Gemini 3's 2,240
    assert inline("image/png", png(3000, 1600)) - text_only == 12 * 258
    audio = base64.b64encode(b"\0" * 120_000).decode()
    assert inline("audio/mp3", audio) - text_only == 120_000 // 12


def test_an_edited_body_goes_back_to_geminis_shape() -> None:
    g = providers.get("gemini")
    params = {"model": MODEL}
    edited = json.dumps({"model": "gemini-2.5-flash-lite", "contents": CONTENTS, "maxOutputTokens": 300,
                         "generationConfig": {"thinkingConfig": {"thinkingBudget": 1000}}}).encode()
    path, out = g.upstream(f"/v1beta/models/{MODEL}:generateContent", params, edited, True)
    assert path == "/v1beta/models/gemini-2.5-flash-lite:generateContent"
    assert json.loads(out) == {"contents": CONTENTS, "generationConfig": {
        "maxOutputTokens": 150, "thinkingConfig": {"thinkingBudget": 150}}}
    assert g.upstream("/p", params, b"raw", False) == ("/p", b"raw")


# -- spendgate.wrap(genai.Client): the same guard in-process ------------------------------------

@pytest.fixture
def sdk(servers_for: Any) -> Iterator[Servers]:
    """The fake upstream, reached straight from a wrapped client (the proxy is not in the path)."""
    spendgate.configure(store="memory://", policy=default_policy())
    yield servers_for()
    spendgate.configure(store="memory://", policy=default_policy())


def wrapped(s: Servers, **headers: str) -> genai.Client:
    c = spendgate.wrap(genai.Client(api_key="AIza-sdk", http_options=types.HttpOptions(
        base_url=f"http://127.0.0.1:{s.upstream_port}", headers=headers or None)))
    _KEPT.append(c)
    return c


def sdk_charged() -> list[int]:
    return [e.cost for e in _runtime.engine().ledger.events(0) if e.kind in SPEND_KINDS]


def test_wrap_guards_sync_json_and_stream_to_the_nano_dollar(sdk: Servers) -> None:
    c = wrapped(sdk)
    assert type(c) is genai.Client and spendgate.wrap(c) is c
    assert c.models.generate_content(model=MODEL, contents="hi").text == "hello"
    usage = {"promptTokenCount": 120, "candidatesTokenCount": 30, "thoughtsTokenCount": 7, "totalTokenCount": 157}
    chunks = list(wrapped(sdk, **{"x-mock-usage": json.dumps(usage)}).models.generate_content_stream(
        model=MODEL, contents="hi"))
    assert "".join(x.text or "" for x in chunks) == "hello there"
    assert [x.path for x in sdk.mock.seen] == [f"/v1/models/{MODEL}:generateContent",
                                              f"/v1/models/{MODEL}:streamGenerateContent"]
    assert all("model" not in x.json for x in sdk.mock.seen)
    assert sdk_charged() == [MOCK_COST, int(nanos(120, RATE_IN) + nanos(37, RATE_OUT))]
    assert c.models.count_tokens(model=MODEL, contents="hi").total_tokens == 42
    assert len(sdk_charged()) == 2, "countTokens is free"


def test_wrap_guards_the_async_client_and_refuses_as_client_error(sdk: Servers) -> None:
    c = wrapped(sdk)

    async def go() -> str:
        text = (await c.aio.models.generate_content(model=MODEL, contents="hi")).text or ""
        async for chunk in await c.aio.models.generate_content_stream(model=MODEL, contents="hi"):
            text += chunk.text or ""
        return text

    assert asyncio.run(go()) == "hellohello there"
    assert sdk_charged() == [MOCK_COST, MOCK_COST]
    spendgate.configure(store="memory://", policy=parse({"budget": [{"name": "tiny", "usd": 0.000001,
                                                                       "window": "day"}]}))
    with pytest.raises(errors.ClientError) as err:
        c.models.generate_content(model=MODEL, contents="hi")
    assert isinstance(err.value, spendgate.BudgetExceeded)
    assert (err.value.code, err.value.status) == (402, "FAILED_PRECONDITION")
    assert 'budget "tiny"' in (err.value.message or "")
    with pytest.raises(errors.ClientError):
        asyncio.run(c.aio.models.generate_content(model=MODEL, contents="hi"))
    with pytest.raises(errors.ClientError, match="cannot be priced"):
        c.models.embed_content(model="gemini-embedding-001", contents="hi")
    assert sdk.mock.reached() == 2


def test_wrap_a_clamp_goes_under_generation_config(sdk: Servers) -> None:
    spendgate.configure(store="memory://", policy=parse({"budget": [
        {"name": "small", "usd": 0.0005, "window": "request", "action": "clamp", "min_output": 16}]}))
    c = wrapped(sdk)
    c.models.generate_content(model=MODEL, contents="hi", config=types.GenerateContentConfig(
        max_output_tokens=60000, thinking_config=types.ThinkingConfig(thinking_budget=4000)))
    sent = sdk.mock.seen[-1].json
    assert "maxOutputTokens" not in sent and "model" not in sent
    config = sent["generationConfig"]
    budget = config["thinkingConfig"]["thinking_budget"]  # the spelling google-genai sends, kept
    fitted = config["maxOutputTokens"] + budget
    assert 16 <= fitted < 4000 and budget == fitted // 2
    [clamp] = [e for e in _runtime.engine().ledger.events(0) if e.kind == "clamp"]
    assert clamp.output_tokens == fitted


def test_wrap_32_concurrent_async_calls_admit_exactly_the_ones_that_fit(sdk: Servers) -> None:
    config = types.GenerateContentConfig(max_output_tokens=1000)
    c = wrapped(sdk)
    c.models.generate_content(model=MODEL, contents="Say hello.", config=config)
    worst = _runtime.engine().estimator.estimate("gemini", ROUTE, {**sdk.mock.seen[-1].json, "model": MODEL})
    est, n_fit = worst.cost_nanos, 5
    spendgate.configure(store="memory://", policy=parse({"budget": [
        {"name": "g", "usd": str(Decimal(est * n_fit + est // 2) / 10**9), "window": "day"}]}))
    sdk.mock.prompt_tokens, sdk.mock.completion_tokens = worst.input_tokens, 1000

    async def go() -> list[int]:
        async def one() -> int:
            try:
                await c.aio.models.generate_content(model=MODEL, contents="Say hello.", config=config)
                return 200
            except errors.APIError as e:
                return e.code

        return list(await asyncio.gather(*(one() for _ in range(32))))

    codes = asyncio.run(go())
    assert codes.count(200) == n_fit and codes.count(402) == 32 - n_fit
    assert sdk_charged() == [est] * n_fit
