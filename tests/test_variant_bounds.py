"""A variant or a modality must never make the hold smaller than what the provider may bill, and a
client's JSON echoed in a response must never choose the tier the call is charged at."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest

from spendgate.money import usd_to_nanos
from spendgate.policy import parse
from spendgate.usage import read_usage, usage_from_body
from tests.harness import Servers


@pytest.fixture
def s() -> Iterator[Servers]:
    servers = Servers(parse({"budget": [{"name": "cap", "usd": "0.05", "window": "1h", "per": "session",
                                         "action": "block"}]}), "memory://")
    yield servers
    servers.close()


def call(s: Servers, body: dict[str, Any], usage: dict[str, Any], headers: dict[str, str] | None = None,
         stream: bool = False) -> tuple[int, int]:
    """(held, captured) nano-dollars of one call through the proxy."""
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        **body, stream=stream, extra_headers={"x-mock-usage": json.dumps(usage), "x-spendgate-session": "s1",
                                              **(headers or {})})
    parsed = raw.parse()
    if stream:
        list(parsed)
    s.settled()
    did = raw.headers["x-spendgate-decision"]
    [ev] = [e for e in s.store.events(0) if e.decision_id == did]
    return usd_to_nanos(Decimal(raw.headers["x-spendgate-estimate-usd"])), ev.cost


@pytest.mark.parametrize("stream", [False, True])
def test_a_flex_request_is_held_at_standard_rates_the_provider_may_bill(s: Servers, stream: bool) -> None:
    body = {"model": "gpt-5", "max_completion_tokens": 2000, "service_tier": "flex",
            "messages": [{"role": "user", "content": "hi"}]}
    usage = {"prompt_tokens": 5, "completion_tokens": 2000, "total_tokens": 2005}  # no more input than sent
    held, captured = call(s, body, usage, {"x-mock-service-tier": "default"}, stream)
    # gpt-5 standard: $1.25 in / $10 out per Mtok, served at default
    assert captured == 5 * 1250 + 2000 * 10_000
    assert held >= captured, "the hold bounds a flex request the provider served at default"
    _, flex = call(s, body, usage, {"x-mock-service-tier": "flex"}, stream)
    assert flex == (5 * 1250 + 2000 * 10_000) // 2, "served at flex: charged flex (half), as billed"


def test_audio_output_is_held_at_the_audio_output_rate(s: Servers) -> None:
    body = {"model": "gpt-audio", "max_completion_tokens": 200, "modalities": ["text", "audio"],
            "audio": {"voice": "alloy", "format": "wav"}, "messages": [{"role": "user", "content": "hi"}]}
    usage = {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205,
             "completion_tokens_details": {"audio_tokens": 200}}
    held, captured = call(s, body, usage)
    assert held >= captured >= 200 * 64_000, "200 audio tokens out at $64 / Mtok"


def test_a_service_tier_nested_in_a_responses_output_does_not_choose_the_tier() -> None:
    body = {"id": "resp_1", "object": "response", "model": "gpt-5",
            "output": [{"type": "mcp_list_tools", "server_label": "x",
                        "tools": [{"name": "t", "input_schema": {"type": "object", "service_tier": "flex"}}]},
                       {"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
            "service_tier": "priority",
            "usage": {"input_tokens": 1000, "output_tokens": 2000, "total_tokens": 3000}}
    assert read_usage(usage_from_body(json.dumps(body).encode())).tier == "priority"


def test_a_flat_variant_keeps_the_long_context_step_of_the_standard_rate() -> None:
    from spendgate.pricing import PriceTable
    from spendgate.pricing.cost import Usage, usage_nanos

    standard = PriceTable.bundled().resolve("gpt-5.5-pro", "openai").price  # type: ignore[union-attr]
    flex = standard.at_variant({"service_tier": "flex"})
    assert (flex.input.base, dict(flex.input.tiers)) == (Decimal(15), {272_000: Decimal(30)})
    long = Usage(input=300_000, output=10_000)
    # half the standard price above 272K ($60 / $270): 300K × $30 + 10K × $135 per Mtok
    assert usage_nanos(flex, long) == usage_nanos(standard, long) // 2 == 300_000 * 30_000 + 10_000 * 135_000
