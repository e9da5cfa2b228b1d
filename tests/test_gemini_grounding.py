"""Gemini's Grounding with Google Search is held before send and charged on capture, through the
real proxy with the official google-genai client against a fake upstream on loopback that answers
with ``groundingMetadata``.

Google's published fees (ai.google.dev/gemini-api/docs/pricing and Vertex AI's pricing page, the
bundled table's ``web_search_k`` from genai-prices 0.2.3): Gemini 2.x $35 per 1,000 grounded prompts
(one fee a grounded request, however many queries it ran), Gemini 3 $14 per 1,000 search queries
(each distinct non-empty ``webSearchQueries`` entry). Before these, a grounded answer was charged its
tokens only, so the capture could beat the hold.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials as OAuthCredentials

from spendgate.estimate import TOKENS_PER_SEARCH, Estimator
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.policy.model import Policy
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import worst_case_nanos
from spendgate.report import SPEND_KINDS
from tests.harness import Servers

#: published rates, USD per million tokens, and grounding fees, USD each
FLASH3, FLASH3_IN, FLASH3_OUT, PER_QUERY = "gemini-3-flash-preview", Decimal("0.50"), Decimal("3"), Decimal("0.014")
FLASH25, FLASH25_IN, FLASH25_OUT, PER_PROMPT = "gemini-2.5-flash", Decimal("0.30"), Decimal("2.50"), Decimal("0.035")
ROUTE = "/v1beta/models/{model}:generateContent"
USAGE = {"promptTokenCount": 120, "candidatesTokenCount": 80, "totalTokenCount": 200}
#: what the fake upstream reports the model searched: two repeats and two empty entries, which
#: Google does not bill ("we ignore the empty web search queries when counting unique queries")
QUERIES = ["euro 2024 winner", "", "euro 2024 final score", "euro 2024 winner", "  ", "spain euro 2024"]
DISTINCT = 3
SEARCH = types.Tool(google_search=types.GoogleSearch())
CONFIG = types.GenerateContentConfig(tools=[SEARCH], max_output_tokens=1000)


def nanos(usd: Decimal) -> int:
    n = usd * 1_000_000_000
    assert n == n.to_integral_value(), usd
    return int(n)


def tokens_cost(rate_in: Decimal, rate_out: Decimal) -> int:
    return nanos((USAGE["promptTokenCount"] * rate_in + USAGE["candidatesTokenCount"] * rate_out) / 1_000_000)


class GroundingUpstream:
    """A Gemini upstream whose answers are grounded: ``x-mock-queries`` (a JSON list) is each
    candidate's ``webSearchQueries`` (absent header: no ``groundingMetadata``); ``x-mock-grounding``
    says where a stream puts it — ``last`` (the event with ``finishReason``, as Gemini does),
    ``apart`` (an event of its own without ``usageMetadata``) or ``split`` (half the queries in each
    of two events, each sent once)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.generate)
        return app

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append((request.path, body))
        usage = json.loads(request.headers.get("x-mock-usage", json.dumps(USAGE)))
        raw = request.headers.get("x-mock-queries")
        queries = json.loads(raw) if raw is not None else None

        def event(text: str, meta: Any | None, finish: bool = False, grounding: Any | None = None) -> dict[str, Any]:
            cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
            if finish:
                cand["finishReason"] = "STOP"
            if grounding is not None:
                cand["groundingMetadata"] = {
                    "webSearchQueries": grounding,
                    "searchEntryPoint": {"renderedContent": "<div>…</div>"},
                    "groundingChunks": [{"web": {"uri": "https://example.org", "title": "example.org"}}]}
            out: dict[str, Any] = {"candidates": [cand], "modelVersion": "m", "responseId": "r1"}
            if meta is not None:
                out["usageMetadata"] = meta
            return out

        if not request.path.endswith(":streamGenerateContent"):
            return web.json_response(event("Spain won.", usage, True, queries))
        partial = {"promptTokenCount": usage["promptTokenCount"], "totalTokenCount": usage["promptTokenCount"]}
        where = request.headers.get("x-mock-grounding", "last")
        if queries is None:
            events = [event("Spain", partial), event(" won.", usage, True)]
        elif where == "apart":
            events = [event("Spain", partial), event("", None, grounding=queries), event(" won.", usage, True)]
        elif where == "split":
            half = len(queries) // 2
            events = [event("Spain", partial, grounding=queries[:half]),
                      event(" won.", usage, True, grounding=queries[half:])]
        else:
            events = [event("Spain", partial), event(" won.", usage, True, queries)]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(b"data: " + json.dumps(e).encode() + b"\r\n\r\n")
        await resp.write_eof()
        return resp


class Grounded:
    """spendgate's proxy over :class:`GroundingUpstream` for ``gemini`` and ``vertex``."""

    def __init__(self, policy: Policy) -> None:
        self.servers = Servers(policy, "memory://")
        self.upstream = GroundingUpstream()
        port = self.servers.bg.serve(self.upstream.app())
        for name in ("gemini", "vertex"):
            self.servers.proxy.config.upstreams[name] = f"http://127.0.0.1:{port}"
        self.url = self.servers.url

    def client(self, queries: list[str] | None, **headers: str) -> genai.Client:
        if queries is not None:
            headers["x-mock-queries"] = json.dumps(queries)
        c = genai.Client(api_key="AIza-test-key", http_options=types.HttpOptions(base_url=self.url, headers=headers))
        _KEPT.append(c)
        return c

    def captured(self, decision: str) -> int:
        self.servers.settled()
        [ev] = [e for e in self.servers.store.events(0) if e.decision_id == decision and e.kind in SPEND_KINDS]
        assert not ev.estimated
        return ev.cost


_KEPT: list[genai.Client] = []  # google-genai closes its HTTP client when the Client is collected


@pytest.fixture
def grounded() -> Iterator[Any]:
    made: list[Grounded] = []

    def make(policy: dict[str, Any] | None = None) -> Grounded:
        g = Grounded(parse(policy) if policy is not None else default_policy())
        made.append(g)
        return g

    yield make
    for g in made:
        g.servers.close()
    _KEPT.clear()


def held_and_decision(resp: types.GenerateContentResponse) -> tuple[int, str]:
    assert resp.sdk_http_response is not None and resp.sdk_http_response.headers is not None
    h = {k.lower(): v for k, v in resp.sdk_http_response.headers.items()}
    return usd_to_nanos(Decimal(h["x-spendgate-estimate-usd"])), h["x-spendgate-decision"]


# -- Gemini 3: one fee per distinct non-empty search query ----------------------------------------

def test_gemini3_json_charges_each_distinct_query_and_the_hold_covers_it(grounded: Any) -> None:
    g = grounded()
    resp = g.client(QUERIES).models.generate_content(model=FLASH3, contents="Who won euro 2024?", config=CONFIG)
    assert resp.candidates and resp.candidates[0].grounding_metadata is not None
    held, did = held_and_decision(resp)
    want = tokens_cost(FLASH3_IN, FLASH3_OUT) + DISTINCT * nanos(PER_QUERY)
    assert want == 300_000 + 42_000_000
    assert g.captured(did) == want
    # held: the tokens' worst case and one query per 10 tokens of the 1,000-token output bound
    assert held >= want
    body = {**g.upstream.seen[-1][1], "model": FLASH3}
    est = Estimator(PriceTable.bundled()).estimate("gemini", ROUTE, body)
    assert est.searches == 1000 // TOKENS_PER_SEARCH and not est.searches_named
    assert held == est.cost_nanos == worst_case_nanos(est.price.price, est.input_tokens, 1000) + 100 * nanos(PER_QUERY)


@pytest.mark.parametrize("where", ["last", "apart", "split"])
def test_gemini3_stream_charges_the_queries_wherever_the_stream_puts_them(grounded: Any, where: str) -> None:
    g = grounded()
    chunks = list(g.client(QUERIES, **{"x-mock-grounding": where}).models.generate_content_stream(
        model=FLASH3, contents="Who won euro 2024?", config=CONFIG))
    assert "".join(c.text or "" for c in chunks) == "Spain won."
    held, did = held_and_decision(chunks[0])
    want = tokens_cost(FLASH3_IN, FLASH3_OUT) + DISTINCT * nanos(PER_QUERY)
    assert g.captured(did) == want
    assert held >= want


def test_an_answer_without_grounding_is_charged_its_tokens_only(grounded: Any) -> None:
    g = grounded()
    resp = g.client(None).models.generate_content(model=FLASH3, contents="hi", config=CONFIG)
    _, did = held_and_decision(resp)
    assert g.captured(did) == tokens_cost(FLASH3_IN, FLASH3_OUT)


# -- Gemini 2.x: one fee per grounded prompt --------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_gemini25_charges_one_fee_per_grounded_prompt_and_holds_exactly_one(grounded: Any, stream: bool) -> None:
    g = grounded()
    c = g.client(QUERIES)
    if stream:
        chunks = list(c.models.generate_content_stream(model=FLASH25, contents="Who won euro 2024?", config=CONFIG))
        resp = chunks[0]
    else:
        resp = c.models.generate_content(model=FLASH25, contents="Who won euro 2024?", config=CONFIG)
    held, did = held_and_decision(resp)
    want = tokens_cost(FLASH25_IN, FLASH25_OUT) + nanos(PER_PROMPT)
    assert want == 236_000 + 35_000_000
    assert g.captured(did) == want
    body = {**g.upstream.seen[-1][1], "model": FLASH25}
    est = Estimator(PriceTable.bundled()).estimate("gemini", ROUTE, body)
    assert est.searches == 1
    assert held == worst_case_nanos(est.price.price, est.input_tokens, 1000) + nanos(PER_PROMPT) >= want


def test_vertex_gemini_grounding_is_held_and_charged_the_same(grounded: Any) -> None:
    g = grounded()
    c = genai.Client(vertexai=True, project="my-proj", location="us-central1",
                     credentials=OAuthCredentials(token="ya29.fake-access-token"),
                     http_options=types.HttpOptions(base_url=g.url, headers={"x-mock-queries": json.dumps(QUERIES)}))
    _KEPT.append(c)
    resp = c.models.generate_content(model=FLASH3, contents="Who won euro 2024?", config=CONFIG)
    path, body = g.upstream.seen[-1]
    assert "/publishers/google/models/" in path and body["tools"] == [{"googleSearch": {}}]
    held, did = held_and_decision(resp)
    want = tokens_cost(FLASH3_IN, FLASH3_OUT) + DISTINCT * nanos(PER_QUERY)
    assert g.captured(did) == want
    assert held >= want


# -- the budget --------------------------------------------------------------------------------------

def test_a_budget_that_fits_the_tokens_but_not_the_grounding_fee_refuses_before_send(grounded: Any) -> None:
    body = {"model": FLASH25, "contents": [{"role": "user", "parts": [{"text": "Who won euro 2024?"}]}],
            "generationConfig": {"maxOutputTokens": 1000}}
    est = Estimator(PriceTable.bundled())
    grounded_est = est.estimate("gemini", ROUTE, {**body, "tools": [{"googleSearch": {}}]})
    tokens_only = worst_case_nanos(grounded_est.price.price, grounded_est.input_tokens, 1000)
    assert grounded_est.cost_nanos == tokens_only + nanos(PER_PROMPT)
    assert est.estimate("gemini", ROUTE, body).cost_nanos < tokens_only
    limit = Decimal(tokens_only + nanos(PER_PROMPT) // 2) / 1_000_000_000  # the tokens fit, the fee does not
    g = grounded({"budget": [{"name": "per-call", "usd": str(limit), "window": "request"}]})
    c = g.client(QUERIES)
    config = types.GenerateContentConfig(max_output_tokens=1000)
    c.models.generate_content(model=FLASH25, contents="Who won euro 2024?", config=config)  # no tool: fits
    sent = len(g.upstream.seen)
    with pytest.raises(errors.ClientError) as err:
        c.models.generate_content(model=FLASH25, contents="Who won euro 2024?",
                                  config=types.GenerateContentConfig(tools=[SEARCH], max_output_tokens=1000))
    assert err.value.code == 402
    assert len(g.upstream.seen) == sent, "a refused request is never sent"


# -- what the request and the response say ----------------------------------------------------------

@pytest.mark.parametrize("tool", [{"googleSearch": {}}, {"google_search": {}},
                                  {"googleSearchRetrieval": {"dynamicRetrievalConfig": {"mode": "MODE_DYNAMIC"}}},
                                  {"google_search_retrieval": {}}, {"enterpriseWebSearch": {}}])
def test_every_spelling_of_the_search_tool_is_held(tool: dict[str, Any]) -> None:
    est = Estimator(PriceTable.bundled())
    base = {"contents": [{"role": "user", "parts": [{"text": "news?"}]}], "generationConfig": {"maxOutputTokens": 500}}
    three = est.estimate("gemini", ROUTE, {**base, "model": FLASH3, "tools": [{"functionDeclarations": []}, tool]})
    assert three.searches == 500 // TOKENS_PER_SEARCH
    two = est.estimate("vertex", "/v1/projects/{project}/locations/{location}/publishers/google/models/"
                       "{model}:generateContent", {**base, "model": FLASH25, "tools": [tool]})
    assert two.searches == 1


def test_grounding_without_web_search_and_no_grounding_tool() -> None:
    est = Estimator(PriceTable.bundled())
    base = {"contents": [{"role": "user", "parts": [{"text": "near me?"}]}],
            "generationConfig": {"maxOutputTokens": 500}}
    assert est.estimate("gemini", ROUTE, {**base, "model": FLASH3, "tools": [{"googleMaps": {}}]}).searches == 1
    assert est.estimate("gemini", ROUTE, {**base, "model": FLASH3, "tools": [{"codeExecution": {}},
                                                                             {"urlContext": {}}]}).searches == 0
    assert est.estimate("gemini", ROUTE, {**base, "model": FLASH3}).searches == 0


def test_a_malformed_query_list_is_charged_the_worst_case_never_as_no_search(grounded: Any) -> None:
    g = grounded()
    body = {"contents": [{"role": "user", "parts": [{"text": "Who won euro 2024?"}]}],
            "tools": [{"googleSearch": {}}], "generationConfig": {"maxOutputTokens": 1000}}
    req = urllib.request.Request(f"{g.url}/v1beta/models/{FLASH3}:generateContent", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "x-goog-api-key": "AIza-test-key",
                                                         "x-mock-queries": json.dumps("euro 2024 winner")})
    with urllib.request.urlopen(req, timeout=30) as r:
        held, did = usd_to_nanos(Decimal(r.headers["x-spendgate-estimate-usd"])), r.headers["x-spendgate-decision"]
    g.servers.settled()
    [ev] = [e for e in g.servers.store.events(0) if e.decision_id == did and e.kind in SPEND_KINDS]
    assert ev.estimated and ev.cost == held


# -- spendgate.wrap(genai.Client): the same charge in-process -------------------------------------

def test_wrap_charges_grounding_in_json_and_stream(grounded: Any) -> None:
    import spendgate
    from spendgate.sdk import _runtime

    g = grounded()
    spendgate.configure(store="memory://", policy=default_policy())
    try:
        port = g.servers.proxy.config.upstreams["gemini"].rsplit(":", 1)[1]
        c = spendgate.wrap(genai.Client(api_key="AIza-sdk", http_options=types.HttpOptions(
            base_url=f"http://127.0.0.1:{port}", headers={"x-mock-queries": json.dumps(QUERIES)})))
        _KEPT.append(c)
        c.models.generate_content(model=FLASH3, contents="Who won euro 2024?", config=CONFIG)
        list(c.models.generate_content_stream(model=FLASH25, contents="Who won euro 2024?", config=CONFIG))
        costs = [e.cost for e in _runtime.engine().ledger.events(0) if e.kind in SPEND_KINDS]
        assert costs == [tokens_cost(FLASH3_IN, FLASH3_OUT) + DISTINCT * nanos(PER_QUERY),
                         tokens_cost(FLASH25_IN, FLASH25_OUT) + nanos(PER_PROMPT)]
    finally:
        spendgate.configure(store="memory://", policy=default_policy())
