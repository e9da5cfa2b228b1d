"""Web searches billed per call are held before send: at the request's cap (OpenAI's
``max_tool_calls``), else at one search per 10 output tokens of the output bound — never left to
capture alone, which let ``captured + held <= limit`` break."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest

from spendgate.estimate import TOKENS_PER_SEARCH, Estimator
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import worst_case_nanos
from tests.harness import Servers

MTOK = Decimal(1_000_000)
SEARCH = Decimal("0.01")  # $10 per 1,000 web search calls (gpt-5)
TOOLS = [{"type": "web_search"}]


def nanos(usd: Decimal) -> int:
    n = usd * 1_000_000_000
    assert n == n.to_integral_value(), usd
    return int(n)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers(default_policy(), "memory://")
    yield s
    s.close()


def call(s: Servers, body: dict[str, Any], usage: dict[str, Any]) -> tuple[int, int]:
    oc = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
    raw = oc.responses.with_raw_response.create(**body, extra_headers={"x-mock-usage": json.dumps(usage)})
    raw.parse()
    s.settled()
    did = raw.headers["x-spendgate-decision"]
    [ev] = [e for e in s.store.events(0) if e.decision_id == did and e.kind == "capture"]
    return usd_to_nanos(Decimal(raw.headers["x-spendgate-estimate-usd"])), int(ev.cost)


def input_tokens(body: dict[str, Any]) -> int:
    return Estimator(PriceTable.bundled()).estimate("openai", "/v1/responses", body).input_tokens


#: Responses usage; the three web_search_call output items the proxy counts beside it are carried in
#: it as the stream meter carries them (the fake upstream writes no output items)
USAGE = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 500,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 600, "web_search_calls": 3}


def test_max_tool_calls_bounds_the_searches_held(servers: Servers) -> None:
    body = {"model": "gpt-5", "input": "news?", "tools": TOOLS, "max_output_tokens": 1000, "max_tool_calls": 4}
    held, cost = call(servers, body, USAGE)
    n = input_tokens(body)
    assert held == nanos(n * Decimal("1.25") / MTOK + 1000 * Decimal(10) / MTOK + 4 * SEARCH)
    assert cost == nanos(100 * Decimal("1.25") / MTOK + 500 * Decimal(10) / MTOK + 3 * SEARCH)
    assert held >= cost


def test_web_search_without_a_cap_is_held_at_one_search_per_ten_output_tokens(servers: Servers) -> None:
    body = {"model": "gpt-5", "input": "news?", "tools": TOOLS, "max_output_tokens": 1000}
    held, cost = call(servers, body, USAGE)
    n = input_tokens(body)
    searches = 1000 // TOKENS_PER_SEARCH
    assert held == nanos(n * Decimal("1.25") / MTOK + 1000 * Decimal(10) / MTOK + searches * SEARCH)
    assert cost == nanos(100 * Decimal("1.25") / MTOK + 500 * Decimal(10) / MTOK + 3 * SEARCH)


def test_no_web_search_tool_holds_no_search_fee() -> None:
    est = Estimator(PriceTable.bundled()).estimate(
        "openai", "/v1/responses", {"model": "gpt-5", "input": "x", "max_output_tokens": 1000,
                                    "tools": [{"type": "function", "name": "f", "parameters": {}}]})
    assert est.searches == 0


def test_a_budget_that_fits_the_tokens_but_not_the_searches_refuses_before_send() -> None:
    body = {"model": "gpt-5", "input": "news?", "tools": TOOLS, "max_output_tokens": 1000, "max_tool_calls": 50}
    est = Estimator(PriceTable.bundled())
    tokens_only = est.estimate("openai", "/v1/responses", {**body, "tools": []}).cost_nanos
    limit = Decimal(tokens_only * 10) / 1_000_000_000  # ~$0.10: the tokens fit, 50 searches ($0.50) do not
    s = Servers(parse({"budget": [{"name": "per-call", "usd": str(limit), "window": "request"}]}), "memory://")
    try:
        oc = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            oc.responses.create(**body)
        assert err.value.status_code == 402
        assert s.mock.reached("/v1/responses") == 0
    finally:
        s.close()


def test_a_clamp_rederives_the_searches_from_the_smaller_output_bound() -> None:
    est = Estimator(PriceTable.bundled())
    wide = est.estimate("openai", "/v1/responses", {"model": "gpt-5", "input": "x", "tools": TOOLS,
                                                     "max_output_tokens": 10_000})
    assert wide.searches == 1000
    assert est.with_output(wide, 500).searches == 50


def test_anthropic_web_search_without_max_uses_is_held_at_the_output_bound() -> None:
    """Before: a web_search tool without ``max_uses`` added nothing to the hold, though each search
    it ran was charged on capture ($10 per 1,000): the capture could beat the hold."""
    est = Estimator(PriceTable.bundled())
    base = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "news?"}]}
    bare = est.estimate("anthropic", "/v1/messages", base)
    unbounded = est.estimate("anthropic", "/v1/messages",
                             {**base, "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    capped = est.estimate("anthropic", "/v1/messages",
                          {**base, "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]})
    assert (unbounded.searches, unbounded.searches_named) == (1000 // TOKENS_PER_SEARCH, False)
    assert capped.searches == 3
    fee = nanos(SEARCH)  # Anthropic: $10 per 1,000 searches
    for e in (bare, capped, unbounded):  # the tokens' worst case, plus every search at the fee
        tokens = worst_case_nanos(e.price.price, e.input_tokens, e.output_tokens, e.shape.cache_write)
        assert e.cost_nanos == tokens + e.searches * fee


def test_a_stream_cut_short_is_charged_the_searches_it_may_have_run() -> None:
    """Before: a stream cut short was charged its input and the output seen, and no search fee,
    though the provider bills the searches it ran before the cut."""
    from spendgate.engine import Engine
    from spendgate.ledger import open as open_store
    from spendgate.request import Identity, Request

    engine = Engine(default_policy(), open_store("memory://"))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "news?"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}
    d = engine.decide(Request("anthropic", "/v1/messages", body, Identity(key="k")))
    assert d.allowed and d.estimate is not None and d.estimate.searches == 3
    charge = engine.charge_unknown(d, output_seen=40)
    est = d.estimate
    tokens = worst_case_nanos(est.price.price, est.input_tokens, 40, est.shape.cache_write)
    assert charge.cost_nanos == tokens + 3 * nanos(SEARCH) <= est.cost_nanos
