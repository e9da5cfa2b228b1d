"""Vertex AI: Gemini and Claude on Google's publisher paths, through the proxy and through
``spendgate.wrap()``, driven by google-genai's ``Client(vertexai=True)`` and anthropic's
``AnthropicVertex`` against a fake Vertex upstream on loopback. The clients are given an access
token (no Google credentials are looked up) and every socket the tests open is proved to be a
loopback one: no call reaches Google."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp import web
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials as OAuthCredentials

import spendgate
from spendgate import keys, providers
from spendgate import ledger as ledger_mod
from spendgate.demo.upstream import FakeUpstream
from spendgate.estimate import Estimator
from spendgate.policy import default_policy, parse
from spendgate.policy.model import Policy
from spendgate.pricing.table import PriceTable
from spendgate.report import SPEND_KINDS
from spendgate.sdk import _runtime
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers, start_serve

PROJECT, LOCATION, REGION = "my-proj", "us-central1", "us-east5"
GEMINI = "gemini-2.5-flash"
CLAUDE = "claude-sonnet-4-5@20250929"
TOKEN = "ya29.fake-access-token"
# gemini-2.5-flash on Vertex: $0.30 / $2.50 per Mtok; claude-sonnet-4-5 on Vertex: $3 / $15 (the google rows)
GEMINI_COST = PROMPT_TOKENS * 300 + COMPLETION_TOKENS * 2_500
CLAUDE_COST = PROMPT_TOKENS * 3_000 + COMPLETION_TOKENS * 15_000
GEMINI_PATH = f"/v1beta1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{GEMINI}"
CLAUDE_PATH = f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/{CLAUDE}"
MSG = [{"role": "user", "content": "hi"}]

# -- every host a socket of this process connects to or looks up, while a test here runs ----------

_HOSTS: list[str] = []
_WATCHING = [False]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCHING[0]:
        return
    if event == "socket.getaddrinfo":
        _HOSTS.append(str(args[0]))
    elif event == "socket.connect" and isinstance(args[1], tuple):
        _HOSTS.append(str(args[1][0]))


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def only_loopback() -> Iterator[None]:
    """Every connection a test makes is to loopback: no token refresh, no metadata server, no Google."""
    _HOSTS.clear()
    _WATCHING[0] = True
    yield
    _WATCHING[0] = False
    assert set(_HOSTS) <= {"127.0.0.1", "localhost", "::1"}, f"a connection left the machine: {set(_HOSTS)}"


def vertex_app(mock: FakeUpstream, app: web.Application | None = None) -> web.Application:
    """The fake's answers on Vertex's paths (added to ``app``, the fake's own app, if given)."""
    app = app or web.Application()
    for v in ("v1", "v1beta1"):
        express = f"/{v}/publishers/google/models/{{model}}"
        app.router.add_post(f"{express}:generateContent", mock.gemini)
        app.router.add_post(f"{express}:streamGenerateContent", mock.gemini)
        base = f"/{v}/projects/{{project}}/locations/{{location}}/publishers"
        app.router.add_post(f"{base}/google/models/{{model}}:generateContent", mock.gemini)
        app.router.add_post(f"{base}/google/models/{{model}}:streamGenerateContent", mock.gemini)
        app.router.add_post(f"{base}/google/models/{{model}}:countTokens", mock.gemini_count)
        app.router.add_post(f"{base}/anthropic/models/count-tokens:rawPredict", mock.count_tokens)
        app.router.add_post(f"{base}/anthropic/models/{{model}}:rawPredict", mock.messages)
        app.router.add_post(f"{base}/anthropic/models/{{model}}:streamRawPredict", mock.messages)
    return app


class Vertex:
    """spendgate's proxy, with the fake Vertex upstream behind ``vertex`` and ``vertex-anthropic``."""

    def __init__(self, policy: Policy, store: str = "memory://") -> None:
        self.servers = Servers(policy, store)
        self.mock = FakeUpstream()
        port = self.servers.bg.serve(vertex_app(self.mock))
        self.upstream = f"http://127.0.0.1:{port}"
        for name in ("vertex", "vertex-anthropic"):
            self.servers.proxy.config.upstreams[name] = self.upstream
        self.url = self.servers.url

    def spend(self) -> list[tuple[str, str, int]]:
        self.servers.settled()
        return [(e.provider, e.model, e.cost) for e in self.servers.store.events(0) if e.kind in SPEND_KINDS]


_KEPT: list[Any] = []  # google-genai closes its HTTP client when the Client is collected


@pytest.fixture
def vertex_for() -> Iterator[Any]:
    made: list[Vertex] = []

    def make(policy: dict[str, Any] | None = None, store: str = "memory://") -> Vertex:
        v = Vertex(parse(policy) if policy is not None else default_policy(), store)
        made.append(v)
        return v

    yield make
    for v in made:
        v.servers.close()
    _KEPT.clear()


def genai_client(base_url: str, token: str = TOKEN, **headers: str) -> genai.Client:
    c = genai.Client(vertexai=True, project=PROJECT, location=LOCATION, credentials=OAuthCredentials(token=token),
                     http_options=types.HttpOptions(base_url=base_url, headers=headers or None))
    _KEPT.append(c)
    return c


def claude_client(base_url: str, token: str = TOKEN) -> anthropic.AnthropicVertex:
    return anthropic.AnthropicVertex(region=REGION, project_id=PROJECT, access_token=token,
                                     base_url=base_url + "/v1", max_retries=0)


def async_claude_client(base_url: str, token: str = TOKEN) -> anthropic.AsyncAnthropicVertex:
    return anthropic.AsyncAnthropicVertex(region=REGION, project_id=PROJECT, access_token=token,
                                          base_url=base_url + "/v1", max_retries=0)


# -- the proxy ----------------------------------------------------------------------------------------


def test_gemini_on_vertex_json_stream_and_count_through_the_proxy(vertex_for: Any) -> None:
    v = vertex_for()
    c = genai_client(v.url)
    assert c.models.generate_content(model=GEMINI, contents="hi").text == "hello"
    assert "".join(x.text or "" for x in c.models.generate_content_stream(model=GEMINI, contents="hi")) \
        == "hello there"
    assert c.models.count_tokens(model=GEMINI, contents="hi").total_tokens == 42
    seen = v.mock.seen
    assert [s.path for s in seen] == [f"{GEMINI_PATH}:generateContent", f"{GEMINI_PATH}:streamGenerateContent",
                                      f"{GEMINI_PATH}:countTokens"]
    assert seen[1].query == "alt=sse"
    assert all(s.headers["authorization"] == f"Bearer {TOKEN}" for s in seen), "the client's token is passed through"
    assert all("model" not in s.json for s in seen)
    assert v.spend() == [("vertex", GEMINI, GEMINI_COST)] * 2, "countTokens is free"
    assert "127.0.0.1" in _HOSTS, "the audit hook sees this process's connections"


def test_gemini_on_vertex_express_mode_with_an_api_key(vertex_for: Any) -> None:
    v = vertex_for()
    c = genai.Client(vertexai=True, api_key="AQ.express-key", http_options=types.HttpOptions(base_url=v.url))
    _KEPT.append(c)
    assert c.models.generate_content(model=GEMINI, contents="hi").text == "hello"
    assert "".join(x.text or "" for x in c.models.generate_content_stream(model=GEMINI, contents="hi")) \
        == "hello there"
    express = f"/v1beta1/publishers/google/models/{GEMINI}"
    assert [s.path for s in v.mock.seen] == [f"{express}:generateContent", f"{express}:streamGenerateContent"]
    assert all(s.headers["x-goog-api-key"] == "AQ.express-key" for s in v.mock.seen)
    assert v.spend() == [("vertex", GEMINI, GEMINI_COST)] * 2


def test_claude_on_vertex_json_stream_and_count_through_the_proxy(vertex_for: Any) -> None:
    v = vertex_for()
    c = claude_client(v.url)
    out = c.messages.create(model=CLAUDE, max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    assert out.content[0].text == "hello"  # type: ignore[union-attr]
    with c.messages.stream(model=CLAUDE, max_tokens=100, messages=MSG) as s:  # type: ignore[arg-type]
        assert "".join(s.text_stream) == "hello"
    assert c.messages.count_tokens(model=CLAUDE, messages=MSG).input_tokens == 42  # type: ignore[arg-type]
    seen = v.mock.seen
    assert [s.path for s in seen] == [
        f"{CLAUDE_PATH}:rawPredict", f"{CLAUDE_PATH}:streamRawPredict",
        f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/count-tokens:rawPredict"]
    assert all(s.headers["authorization"] == f"Bearer {TOKEN}" for s in seen)
    assert all("model" not in s.json and "anthropic_version" in s.json for s in seen[:2])
    assert v.spend() == [("vertex-anthropic", CLAUDE, CLAUDE_COST)] * 2, "count-tokens is free"


def test_a_refusal_is_each_sdks_own_error_with_spendgates_message_and_nothing_is_sent(vertex_for: Any) -> None:
    v = vertex_for({"budget": [{"name": "tiny", "usd": 0.000001, "window": "day"}]})
    with pytest.raises(errors.ClientError) as gerr:
        genai_client(v.url).models.generate_content(model=GEMINI, contents="hi")
    assert (gerr.value.code, gerr.value.status) == (402, "FAILED_PRECONDITION")
    assert 'budget "tiny"' in (gerr.value.message or "")
    with pytest.raises(errors.ClientError):
        list(genai_client(v.url).models.generate_content_stream(model=GEMINI, contents="hi"))
    with pytest.raises(anthropic.APIStatusError) as aerr:
        claude_client(v.url).messages.create(model=CLAUDE, max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    assert aerr.value.status_code == 402 and 'budget "tiny"' in aerr.value.message
    assert v.mock.seen == [] and v.spend() == []


def test_an_unknown_vertex_route_is_refused_and_never_forwarded(vertex_for: Any) -> None:
    v = vertex_for()
    with pytest.raises(errors.ClientError) as err:
        genai_client(v.url).models.embed_content(model="gemini-embedding-001", contents="hi")
    assert err.value.code == 404 and "not a route spendgate can price" in (err.value.message or "")
    assert v.mock.seen == [] and v.spend() == []


def test_32_concurrent_claude_calls_on_vertex_admit_exactly_the_ones_that_fit(vertex_for: Any,
                                                                               tmp_path: Path) -> None:
    route = "/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:rawPredict"
    body = {"model": CLAUDE, "max_tokens": 1000, "messages": MSG, "anthropic_version": "vertex-2023-10-16"}
    worst = vertex_for().servers.engine.estimator.estimate("vertex-anthropic", route, body)
    est, n_fit = worst.cost_nanos, 7
    v = vertex_for({"budget": [{"name": "v", "usd": str(Decimal(est * n_fit + est // 2) / 10**9), "window": "day"}]},
                   store=f"sqlite:///{tmp_path}/q.db")
    # each admitted call bills its full worst case, so no capture frees room for a late request
    v.mock.prompt_tokens, v.mock.completion_tokens = worst.input_tokens, 1000
    c = async_claude_client(v.url)

    async def go() -> list[int]:
        async def one() -> int:
            try:
                await c.messages.create(model=CLAUDE, max_tokens=1000, messages=MSG)  # type: ignore[arg-type]
                return 200
            except anthropic.APIStatusError as e:
                return e.status_code

        return list(await asyncio.gather(*(one() for _ in range(32))))

    codes = asyncio.run(go())
    assert codes.count(200) == n_fit and codes.count(402) == 32 - n_fit
    assert v.mock.reached(f"{CLAUDE_PATH}:rawPredict") == n_fit
    assert v.spend() == [("vertex-anthropic", CLAUDE, est)] * n_fit


def test_a_downgrade_and_a_clamp_go_back_into_vertexs_shape(vertex_for: Any) -> None:
    v = vertex_for({"budget": [{"name": "per-call", "usd": 0.01, "window": "request", "action": "downgrade",
                                "downgrade": {CLAUDE: "claude-haiku-4-5@20251001"}}]})
    claude_client(v.url).messages.create(model=CLAUDE, max_tokens=1000, messages=MSG)  # type: ignore[arg-type]
    sent = v.mock.seen[-1]
    assert sent.path.endswith("/publishers/anthropic/models/claude-haiku-4-5@20251001:rawPredict")
    assert "model" not in sent.json and sent.json["max_tokens"] == 1000
    haiku = PROMPT_TOKENS * 1_000 + COMPLETION_TOKENS * 5_000  # the google row: $1 / $5 per Mtok
    assert v.spend() == [("vertex-anthropic", "claude-haiku-4-5@20251001", haiku)]
    c = vertex_for({"budget": [{"name": "small", "usd": 0.002, "window": "request", "action": "clamp",
                                "min_output": 16}]})
    claude_client(c.url).messages.create(model=CLAUDE, max_tokens=8000, messages=MSG)  # type: ignore[arg-type]
    sent = c.mock.seen[-1]
    assert "model" not in sent.json and 16 <= sent.json["max_tokens"] < 200
    assert sent.path == f"{CLAUDE_PATH}:rawPredict"


def test_a_virtual_key_is_swapped_for_the_vertex_access_token(vertex_for: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTEX_ACCESS_TOKEN", "ya29.spendgates-own-token")
    v = vertex_for()
    secret, _ = keys.create(v.servers.store, user="dora")
    genai_client(v.url, token=secret).models.generate_content(model=GEMINI, contents="hi")
    claude_client(v.url, token=secret).messages.create(model=CLAUDE, max_tokens=10, messages=MSG)  # type: ignore[arg-type]
    assert [s.headers["authorization"] for s in v.mock.seen] == ["Bearer ya29.spendgates-own-token"] * 2
    v.servers.settled()
    assert [(e.provider, e.dims.get("user")) for e in v.servers.store.events(0) if e.kind in SPEND_KINDS] == [
        ("vertex", "dora"), ("vertex-anthropic", "dora")]


def test_spendgate_serve_reaches_vertex_at_the_url_its_environment_names(
        tmp_path: Path, vertex_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    v = vertex_for()
    mock = FakeUpstream()
    port = v.servers.bg.serve(vertex_app(mock, mock.app()))  # every provider's fake, Vertex's paths included
    monkeypatch.setenv("SPENDGATE_VERTEX_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SPENDGATE_VERTEX_ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}")
    store = f"sqlite:///{tmp_path}/serve.db"
    proc, sport = start_serve(tmp_path, port, "--store", store)
    try:
        url = f"http://127.0.0.1:{sport}"
        assert genai_client(url).models.generate_content(model=GEMINI, contents="hi").text == "hello"
        out = claude_client(url).messages.create(model=CLAUDE, max_tokens=10, messages=MSG)  # type: ignore[arg-type]
        assert out.content[0].text == "hello"  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [s.path for s in mock.seen] == [f"{GEMINI_PATH}:generateContent", f"{CLAUDE_PATH}:rawPredict"]
    led = ledger_mod.open(store)
    try:
        assert [(e.provider, e.cost) for e in led.events(0) if e.kind in SPEND_KINDS] == [
            ("vertex", GEMINI_COST), ("vertex-anthropic", CLAUDE_COST)]
    finally:
        led.close()


# -- prices ---------------------------------------------------------------------------------------------


def test_vertex_model_ids_are_priced_from_vertexs_rows_then_anthropics_never_lower() -> None:
    est = Estimator(PriceTable.bundled())
    table = est.prices
    got = est.resolve(CLAUDE, "vertex-anthropic")
    assert (got.price.provider, got.price.model) == ("google", "claude-sonnet-4-5")
    assert (est.resolve(GEMINI, "vertex").price.provider, est.resolve(GEMINI, "vertex").price.model) == \
        ("google", GEMINI)
    # every Claude model Vertex has a row for is priced from it, at no less than Anthropic's own row
    vertex_claude = [r for r in table.entries["google"] if "claude" in r.model]
    assert len(vertex_claude) >= 15
    for row in vertex_claude:
        ours = est.resolve(row.model + "@20250101", "vertex-anthropic").price
        assert ours.provider == "google", row.model
        first_party = table.resolve(row.model, "anthropic")
        if first_party is not None and first_party.price.provider == "anthropic":
            theirs = first_party.price
            assert (ours.input.top, ours.output.top) >= (theirs.input.top, theirs.output.top), row.model
    # a Claude model Vertex has no row for yet: Anthropic's, never a Gemini row or Bedrock's
    later = est.resolve("claude-sonnet-5@20260101", "vertex-anthropic")
    assert (later.price.provider, later.price.model) == ("anthropic", "claude-sonnet-5")


def test_vertex_paths_are_registered_from_the_registry() -> None:
    """The proxy serves every registered provider's paths: Vertex's need no proxy change."""
    s = Servers(default_policy(), "memory://")
    try:
        for path in (f"{GEMINI_PATH}:generateContent", f"{CLAUDE_PATH}:streamRawPredict"):
            found = providers.match(path)
            assert found is not None
            assert s.proxy.routes[found[1]][0] == found[0].name
    finally:
        s.close()


# -- spendgate.wrap() ----------------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    """The fake Vertex upstream, reached straight from wrapped clients (no proxy in the path)."""
    from spendgate.demo.background import BackgroundLoop

    spendgate.configure(store="memory://", policy=default_policy())
    bg = BackgroundLoop()
    mock = FakeUpstream()
    yield mock, f"http://127.0.0.1:{bg.serve(vertex_app(mock))}"
    bg.close()
    _KEPT.clear()
    spendgate.configure(store="memory://", policy=default_policy())


def sdk_spend() -> list[tuple[str, str, int]]:
    return [(e.provider, e.model, e.cost) for e in _runtime.engine().ledger.events(0) if e.kind in SPEND_KINDS]


def test_wrap_guards_a_vertex_genai_client_sync_and_async(upstream: tuple[FakeUpstream, str]) -> None:
    mock, url = upstream
    c = spendgate.wrap(genai_client(url))
    _KEPT.append(c)
    assert type(c) is genai.Client and c.vertexai and spendgate.wrap(c) is c
    assert c.models.generate_content(model=GEMINI, contents="hi").text == "hello"

    async def go() -> str:
        text = ""
        async for chunk in await c.aio.models.generate_content_stream(model=GEMINI, contents="hi"):
            text += chunk.text or ""
        return text

    assert asyncio.run(go()) == "hello there"
    assert c.models.count_tokens(model=GEMINI, contents="hi").total_tokens == 42
    assert [s.path for s in mock.seen] == [f"{GEMINI_PATH}:generateContent", f"{GEMINI_PATH}:streamGenerateContent",
                                           f"{GEMINI_PATH}:countTokens"]
    assert all(s.headers["authorization"] == f"Bearer {TOKEN}" for s in mock.seen)
    assert sdk_spend() == [("vertex", GEMINI, GEMINI_COST)] * 2
    spendgate.configure(store="memory://", policy=parse({"budget": [{"name": "tiny", "usd": 0.000001,
                                                                       "window": "day"}]}))
    with pytest.raises(errors.ClientError) as err:
        c.models.generate_content(model=GEMINI, contents="hi")
    assert isinstance(err.value, spendgate.BudgetExceeded) and err.value.code == 402
    assert len(mock.seen) == 3


def test_wrap_guards_anthropic_vertex_sync_and_async(upstream: tuple[FakeUpstream, str]) -> None:
    mock, url = upstream
    c = spendgate.wrap(claude_client(url))
    assert type(c) is anthropic.AnthropicVertex
    out = c.messages.create(model=CLAUDE, max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    assert out.content[0].text == "hello"  # type: ignore[union-attr]
    a = spendgate.wrap(async_claude_client(url))

    async def go() -> str:
        async with a.messages.stream(model=CLAUDE, max_tokens=100, messages=MSG) as s:  # type: ignore[arg-type]
            return "".join([t async for t in s.text_stream])

    assert asyncio.run(go()) == "hello"
    assert c.messages.count_tokens(model=CLAUDE, messages=MSG).input_tokens == 42  # type: ignore[arg-type]
    assert [s.path.rsplit(":", 1)[1] for s in mock.seen] == ["rawPredict", "streamRawPredict", "rawPredict"]
    assert sdk_spend() == [("vertex-anthropic", CLAUDE, CLAUDE_COST)] * 2
    spendgate.configure(store="memory://", policy=parse({"budget": [{"name": "tiny", "usd": 0.000001,
                                                                       "window": "day"}]}))
    with pytest.raises(spendgate.BudgetExceeded) as err:
        c.messages.create(model=CLAUDE, max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    assert isinstance(err.value, anthropic.AnthropicError) and 'budget "tiny"' in str(err.value)
    assert len(mock.seen) == 3


def test_claude_on_vertex_follows_the_vertex_host_unless_named_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    from spendgate.policy import parse
    from spendgate.proxy.app import ProxyConfig

    monkeypatch.delenv("SPENDGATE_VERTEX_BASE_URL", raising=False)
    monkeypatch.delenv("SPENDGATE_VERTEX_ANTHROPIC_BASE_URL", raising=False)
    regional = "https://us-east5-aiplatform.googleapis.com"
    ups = ProxyConfig.from_policy(parse({"upstream": {"vertex": regional}})).upstreams
    assert ups["vertex-anthropic"] == ups["vertex"] == regional
    monkeypatch.setenv("SPENDGATE_VERTEX_BASE_URL", "http://127.0.0.1:9")
    assert ProxyConfig.from_policy(parse({})).upstreams["vertex-anthropic"] == "http://127.0.0.1:9"
    own = ProxyConfig.from_policy(parse({"upstream": {"vertex": regional, "vertex-anthropic": "http://x"}}))
    assert own.upstreams["vertex-anthropic"] == "http://x"
