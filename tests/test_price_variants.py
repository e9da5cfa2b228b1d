"""Issue 9: every dollar the provider bills — service tiers, fast mode, cache writes, tool fees,
audio, embeddings — held before send and captured from the response, to the nano-dollar."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.estimate import Estimator
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import Usage, usage_nanos
from spendgate.usage import UnreadableUsage, read_usage, warn_unknown
from tests.harness import Servers

TABLE = PriceTable.bundled()
MTOK = Decimal(1_000_000)


def nanos(usd: Decimal) -> int:
    """Exact nano-dollars of an exact dollar amount (every case here is a whole number of nanos)."""
    n = usd * 1_000_000_000
    assert n == n.to_integral_value(), usd
    return int(n)


def price(model: str, provider: str):  # type: ignore[no-untyped-def]
    res = TABLE.resolve(model, provider)
    assert res is not None, model
    return res.price


# -- the table --------------------------------------------------------------------------------------

def test_embedding_models_are_in_the_table_at_their_own_rates() -> None:
    for model, rate in (("text-embedding-3-small", "0.02"), ("text-embedding-3-large", "0.13"),
                        ("text-embedding-ada-002", "0.1")):
        p = price(model, "openai")
        assert p.model == model
        assert p.input.base == Decimal(rate)
        assert p.output.base > 0  # never free, though an embedding has no output


def test_claude_opus_4_1_is_bounded_by_its_documented_32k_output_not_its_context() -> None:
    assert price("claude-opus-4-1", "anthropic").max_output == 32_000
    assert price("claude-opus-4-1-20250805", "anthropic").max_output == 32_000


def test_gemini_output_bounds_are_never_below_the_real_maximum() -> None:
    assert price("gemini-3.1-flash-image-preview", "google").max_output == 65_536
    assert price("gemini-2.5-pro", "google").max_output == 65_536


def test_the_dearest_google_model_is_a_google_model() -> None:
    assert "gemini" in TABLE.dearest("google").model or TABLE.dearest("google").native
    assert "claude" not in TABLE.dearest("google").model


def test_gpt_5_priority_and_flex_variants_carry_their_published_rates() -> None:
    p = price("gpt-5", "openai")
    prio = p.at_variant({"service_tier": "priority"})
    assert (prio.input.base, prio.output.base, prio.cache_read.base) == (Decimal("2.5"), Decimal(20),  # type: ignore[union-attr]
                                                                         Decimal("0.25"))
    assert prio.variant == "service_tier=priority"
    flex = p.at_variant({"service_tier": "flex"})
    assert (flex.input.base, flex.output.base) == (Decimal("0.625"), Decimal(5))
    assert p.at_variant({"service_tier": "default"}) is p
    assert p.at_variant({"service_tier": "auto"}) is p
    batch = p.at_variant({"processing": "batch"})
    assert (batch.input.base, batch.output.base) == (Decimal("0.625"), Decimal(5))
    assert all(v.since for v in p.variants if v.rates)  # every variant price has its date


def test_anthropic_fast_speed_on_opus_4_8_is_twice_standard() -> None:
    fast = price("claude-opus-4-8", "anthropic").at_variant({"speed": "fast"})
    assert (fast.input.base, fast.output.base) == (Decimal(10), Decimal(50))
    assert fast.cache_write is not None and fast.cache_write.base == Decimal("12.5")


# -- through the proxy: the rows of issue 9, JSON and stream, captured to the nano-dollar ----------

def mtok(n: int, rate: str) -> Decimal:
    return n * Decimal(rate) / MTOK


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers(default_policy(), "memory://")
    yield s
    s.close()


def openai_call(s: Servers, api: str, body: dict[str, Any], usage: dict[str, Any], stream: bool,
                headers: dict[str, str] | None = None) -> tuple[Any, int]:
    """One OpenAI request through the proxy whose provider reports ``usage``: the raw response
    and the nano-dollars captured for it."""
    oc = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
    extra = {"x-mock-usage": json.dumps(usage), **(headers or {})}
    if api == "chat":
        raw: Any = oc.chat.completions.with_raw_response.create(**body, stream=stream, extra_headers=extra)
    elif api == "responses":
        raw = oc.responses.with_raw_response.create(**body, stream=stream, extra_headers=extra)
    else:
        raw = oc.embeddings.with_raw_response.create(**body, extra_headers=extra)
    parsed = raw.parse()
    if stream:
        list(parsed)
    return raw, captured(s, raw)


def anthropic_call(s: Servers, body: dict[str, Any], usage: dict[str, Any], stream: bool) -> tuple[Any, int]:
    ac = anthropic.Anthropic(base_url=s.url, api_key="sk-ant-test", max_retries=0)
    extra_body = {"speed": body.pop("speed")} if "speed" in body else None
    raw: Any = ac.messages.with_raw_response.create(**body, stream=stream, extra_body=extra_body,
                                                    extra_headers={"x-mock-usage": json.dumps(usage)})
    parsed = raw.parse()
    if stream:
        list(parsed)
    return raw, captured(s, raw)


def captured(s: Servers, raw: Any) -> int:
    s.settled()
    did = raw.headers["x-spendgate-decision"]
    [ev] = [e for e in s.store.events(0) if e.decision_id == did and e.kind == "capture"]
    assert not ev.estimated
    return int(ev.cost)


def held(raw: Any) -> int:
    return usd_to_nanos(Decimal(raw.headers["x-spendgate-estimate-usd"]))


CHAT = {"model": "gpt-5", "max_completion_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]}
CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 2000, "total_tokens": 3000}
STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])


@STREAMS
def test_gpt_5_priority_is_held_and_captured_at_priority_rates(servers: Servers, stream: bool) -> None:
    raw, cost = openai_call(servers, "chat", {**CHAT, "service_tier": "priority"}, CHAT_USAGE, stream)
    assert cost == nanos(mtok(1000, "2.5") + mtok(2000, "20"))  # $0.0425, not standard's $0.02125
    est = servers.engine.estimator.estimate("openai", "/v1/chat/completions", {**CHAT, "service_tier": "priority"})
    assert est.price.price.variant == "service_tier=priority"
    assert held(raw) == est.cost_nanos == nanos(mtok(est.input_tokens, "2.5") + mtok(2000, "20"))


@STREAMS
def test_gpt_5_fast_tier_is_charged_like_priority(servers: Servers, stream: bool) -> None:
    _, cost = openai_call(servers, "chat", {**CHAT, "service_tier": "fast"}, CHAT_USAGE, stream)
    assert cost == nanos(mtok(1000, "2.5") + mtok(2000, "20"))


@STREAMS
def test_capture_follows_the_tier_the_response_says_it_served(servers: Servers, stream: bool) -> None:
    # asked for priority, served at default: charged standard rates
    _, cost = openai_call(servers, "chat", {**CHAT, "service_tier": "priority"}, CHAT_USAGE, stream,
                          {"x-mock-service-tier": "default"})
    assert cost == nanos(mtok(1000, "1.25") + mtok(2000, "10"))
    # asked nothing (auto), the project default served priority: charged priority rates
    _, cost = openai_call(servers, "chat", CHAT, CHAT_USAGE, stream, {"x-mock-service-tier": "priority"})
    assert cost == nanos(mtok(1000, "2.5") + mtok(2000, "20"))


@STREAMS
def test_gpt_5_5_priority_through_the_responses_api(servers: Servers, stream: bool) -> None:
    body = {"model": "gpt-5.5", "max_output_tokens": 500, "input": "hi", "service_tier": "priority"}
    usage = {"input_tokens": 1200, "output_tokens": 500, "total_tokens": 1700,
             "input_tokens_details": {"cached_tokens": 200}, "output_tokens_details": {"reasoning_tokens": 100}}
    _, cost = openai_call(servers, "responses", body, usage, stream)
    assert cost == nanos(mtok(1000, "12.5") + mtok(200, "1.25") + mtok(500, "75"))


@STREAMS
def test_flex_is_charged_its_discounted_rates(servers: Servers, stream: bool) -> None:
    _, cost = openai_call(servers, "chat", {**CHAT, "service_tier": "flex"}, CHAT_USAGE, stream)
    assert cost == nanos(mtok(1000, "0.625") + mtok(2000, "5"))


@STREAMS
def test_anthropic_fast_speed_on_opus_4_8_is_held_and_charged_at_fast_rates(servers: Servers, stream: bool) -> None:
    body = {"model": "claude-opus-4-8", "max_tokens": 1000, "speed": "fast",
            "messages": [{"role": "user", "content": "hi"}]}
    usage = {"input_tokens": 3000, "output_tokens": 1000, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0, "service_tier": "standard"}
    raw, cost = anthropic_call(servers, dict(body), usage, stream)
    assert cost == nanos(mtok(3000, "10") + mtok(1000, "50"))
    est = servers.engine.estimator.estimate("anthropic", "/v1/messages", body)
    assert held(raw) == est.cost_nanos and est.price.price.input.base == 10
    # the response says it ran at standard speed: standard rates
    _, cost = anthropic_call(servers, dict(body), {**usage, "speed": "standard"}, stream)
    assert cost == nanos(mtok(3000, "5") + mtok(1000, "25"))


@STREAMS
def test_anthropic_web_search_requests_are_ten_dollars_per_thousand(servers: Servers, stream: bool) -> None:
    body = {"model": "claude-opus-4-8", "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]}
    usage = {"input_tokens": 2000, "output_tokens": 300, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0, "server_tool_use": {"web_search_requests": 3}}
    _, cost = anthropic_call(servers, body, usage, stream)
    assert cost == nanos(mtok(2000, "5") + mtok(300, "25") + 3 * Decimal("0.01"))


@STREAMS
def test_openai_cache_writes_are_held_and_charged_at_the_cache_write_rate(servers: Servers, stream: bool) -> None:
    body = {"model": "gpt-5.6-sol", "max_completion_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    usage = {"prompt_tokens": 3000, "completion_tokens": 100, "total_tokens": 3100,
             "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 1500}}
    raw, cost = openai_call(servers, "chat", body, usage, stream)
    assert cost == nanos(mtok(500, "4") + mtok(1000, "0.4") + mtok(1500, "5") + mtok(100, "20"))
    est = servers.engine.estimator.estimate("openai", "/v1/chat/completions", body)
    assert held(raw) == nanos(mtok(est.input_tokens, "5") + mtok(100, "20")), "the hold includes the premium"


@STREAMS
def test_audio_tokens_are_charged_at_audio_rates(servers: Servers, stream: bool) -> None:
    body = {"model": "gpt-audio", "max_completion_tokens": 4000, "messages": [{"role": "user", "content": "hi"}]}
    usage = {"prompt_tokens": 5000, "completion_tokens": 8000, "total_tokens": 13000,
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 4000},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 7500}}
    _, cost = openai_call(servers, "chat", body, usage, stream)
    # text $2.50/$10, audio $32/$64 per Mtok
    assert cost == nanos(mtok(1000, "2.5") + mtok(4000, "32") + mtok(500, "10") + mtok(7500, "64"))


@STREAMS
def test_realtime_shaped_usage_with_cached_audio(servers: Servers, stream: bool) -> None:
    body = {"model": "gpt-realtime", "max_output_tokens": 4000, "input": "hi"}
    usage = {"input_tokens": 6000, "output_tokens": 3000, "total_tokens": 9000,
             "input_token_details": {"text_tokens": 1000, "audio_tokens": 4000, "image_tokens": 1000,
                                     "cached_tokens": 2500,
                                     "cached_tokens_details": {"text_tokens": 500, "audio_tokens": 1500,
                                                               "image_tokens": 500}},
             "output_token_details": {"text_tokens": 1000, "audio_tokens": 2000}}
    _, cost = openai_call(servers, "responses", body, usage, stream)
    # gpt-realtime: text $4 / cached $0.40, audio $32 / cached $0.40, image $5 / cached $0.50, out $16, audio out $64
    assert cost == nanos(mtok(500, "4") + mtok(500, "0.4") + mtok(2500, "32") + mtok(1500, "0.4")
                         + mtok(500, "5") + mtok(500, "0.5") + mtok(1000, "16") + mtok(2000, "64"))


def test_embeddings_are_charged_their_own_rate(servers: Servers) -> None:
    for model, rate in (("text-embedding-3-small", "0.02"), ("text-embedding-3-large", "0.13"),
                        ("text-embedding-ada-002", "0.1")):
        raw, cost = openai_call(servers, "embeddings", {"model": model, "input": "hello world"},
                                {"prompt_tokens": 1000, "total_tokens": 1000}, False)
        assert cost == nanos(mtok(1000, rate))
        assert held(raw) < 1_000_000, "held at its own rate, not o1-pro's"


def test_a_priority_request_that_fits_at_standard_rates_but_not_priority_is_refused() -> None:
    body = {**CHAT, "max_completion_tokens": 1000}
    est = Estimator(PriceTable.bundled()).estimate("openai", "/v1/chat/completions", body)
    standard = est.cost_nanos
    limit = Decimal(standard * 3 // 2) / 1_000_000_000  # 1.5× standard < 2× (priority)
    policy = parse({"budget": [{"name": "per-call", "usd": str(limit), "window": "request"}]})
    s = Servers(policy, "memory://")
    try:
        oc = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
        ok = oc.chat.completions.with_raw_response.create(**body)
        assert held(ok) == standard
        with pytest.raises(openai.APIStatusError) as err:
            oc.chat.completions.create(**body, service_tier="priority")
        assert err.value.status_code >= 400
        assert s.mock.reached("/v1/chat/completions") == 1, "the priority request never left"
    finally:
        s.close()


# -- the usage reader, extended: property tests ------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**12)


@st.composite
def openai_full_usage(draw: st.DrawFn) -> tuple[dict[str, Any], Usage]:
    """Chat usage with every billed part: cached, cache-write, audio in and out, reasoning."""
    text, cached, write, audio = (draw(counts) for _ in range(4))
    r, o_audio, o_text = (draw(counts) for _ in range(3))
    prompt, completion = text + cached + write + audio, r + o_audio + o_text
    u = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
         "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": write, "audio_tokens": audio},
         "completion_tokens_details": {"reasoning_tokens": r, "audio_tokens": o_audio}}
    return u, Usage(input=text, cache_read=cached, cache_write_5m=write, input_audio=audio,
                    output=completion, reasoning=r, output_audio=o_audio)


@st.composite
def gemini_full_usage(draw: st.DrawFn) -> tuple[dict[str, Any], Usage]:
    text, audio, image, c_text, c_audio, tool, cand, thoughts, o_image = (draw(counts) for _ in range(9))
    prompt = text + audio + image + c_text + c_audio
    m = {"promptTokenCount": prompt, "candidatesTokenCount": cand + o_image, "thoughtsTokenCount": thoughts,
         "cachedContentTokenCount": c_text + c_audio, "toolUsePromptTokenCount": tool,
         "promptTokensDetails": [{"modality": "TEXT", "tokenCount": text + c_text},
                                 {"modality": "AUDIO", "tokenCount": audio + c_audio},
                                 {"modality": "IMAGE", "tokenCount": image}],
         "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": c_text},
                                {"modality": "AUDIO", "tokenCount": c_audio}],
         "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": cand},
                                     {"modality": "IMAGE", "tokenCount": o_image}]}
    return m, Usage(input=text + tool, cache_read=c_text, input_audio=audio, cache_audio_read=c_audio,
                    input_image=image, output=cand + o_image + thoughts, reasoning=thoughts,
                    output_image=o_image)


@settings(max_examples=200, deadline=None)
@given(case=openai_full_usage())
def test_openai_usage_with_every_billed_part_reads_exactly(case: tuple[dict[str, Any], Usage]) -> None:
    u, expected = case
    got = read_usage({"usage": u})
    assert got == expected and got.total_input == u["prompt_tokens"]


@settings(max_examples=200, deadline=None)
@given(case=gemini_full_usage())
def test_gemini_usage_with_modalities_and_tool_prompts_reads_exactly(case: tuple[dict[str, Any], Usage]) -> None:
    m, expected = case
    got = read_usage({"usageMetadata": m})
    assert got == expected
    assert got.total_input == m["promptTokenCount"] + m["toolUsePromptTokenCount"]


@settings(max_examples=100, deadline=None)
@given(case=openai_full_usage(), extra=st.integers(min_value=1, max_value=10**6))
def test_parts_that_add_up_to_more_than_the_prompt_are_unreadable(case: tuple[dict[str, Any], Usage],
                                                                   extra: int) -> None:
    u, _ = case
    d = u["prompt_tokens_details"]
    d["audio_tokens"] = u["prompt_tokens"] - d["cached_tokens"] - d["cache_write_tokens"] + extra
    with pytest.raises(UnreadableUsage):
        read_usage({"usage": u})


@pytest.mark.parametrize(("path", "bad"), [(("prompt_tokens_details", "cache_write_tokens"), "5"),
                                           (("prompt_tokens_details", "audio_tokens"), -1),
                                           (("completion_tokens_details", "audio_tokens"), 1.5)])
def test_a_bad_new_count_is_unreadable_by_name(path: tuple[str, str], bad: Any) -> None:
    u: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {},
                         "completion_tokens_details": {}}
    u[path[0]][path[1]] = bad
    with pytest.raises(UnreadableUsage) as err:
        read_usage({"usage": u})
    assert err.value.field == f"usage.{path[0]}.{path[1]}"


def test_gemini_tool_use_prompt_tokens_are_charged_at_the_input_rate() -> None:
    p = price("gemini-2.5-flash", "google")
    u = read_usage({"usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 100,
                                      "toolUsePromptTokenCount": 4000, "thoughtsTokenCount": 50}})
    assert usage_nanos(p, u) == nanos(mtok(5000, "0.3") + mtok(150, "2.5"))


def test_an_unknown_billable_count_is_logged_once_with_the_model(caplog: pytest.LogCaptureFixture) -> None:
    u = read_usage({"usage": {"prompt_tokens": 10, "completion_tokens": 5,
                              "prompt_tokens_details": {"hologram_tokens": 7}}})
    assert u.unknown == ("usage.prompt_tokens_details.hologram_tokens",)
    with caplog.at_level(logging.WARNING, logger="spendgate.usage"):
        warn_unknown(u, "gpt-9", "openai")
        warn_unknown(u, "gpt-9", "openai")
    assert caplog.text.count("hologram_tokens") == 1 and "gpt-9" in caplog.text


def test_batch_processing_variant_is_half_price() -> None:
    p = price("claude-opus-4-8", "anthropic")
    u = read_usage({"usage": {"input_tokens": 1000, "output_tokens": 100, "service_tier": "batch"}})
    assert u.served() == {"processing": "batch"}
    assert usage_nanos(p.at_variant(u.served()), u) == nanos(mtok(1000, "2.5") + mtok(100, "12.5"))


def test_an_unknown_model_is_bounded_by_the_largest_output_of_its_provider() -> None:
    est = Estimator(PriceTable.bundled()).estimate(
        "openai", "/v1/chat/completions", {"model": "gpt-99-unknown", "messages": [{"role": "user", "content": "x"}]})
    assert est.price.how == "dearest"
    assert est.output_tokens == max(r.max_output or 0 for r in TABLE.entries["openai"]) >= 128_000


def test_a_web_search_tool_with_max_uses_is_held_at_its_fee() -> None:
    body = {"model": "claude-opus-4-8", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}
    e = Estimator(PriceTable.bundled())
    with_tool = e.estimate("anthropic", "/v1/messages", body)
    without = e.estimate("anthropic", "/v1/messages", {k: v for k, v in body.items() if k != "tools"})
    assert with_tool.searches == 5
    assert with_tool.cost_nanos - e.price("anthropic", "/v1/messages", with_tool.shape).cost_nanos == nanos(
        5 * Decimal("0.01"))
    assert with_tool.cost_nanos > without.cost_nanos
    assert e.with_output(with_tool, 50).searches == 5


def test_openai_web_search_calls_in_a_responses_output_are_charged_per_call() -> None:
    from spendgate.usage import usage_from_body
    from spendgate.wire.stream import StreamMeter

    usage = {"input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100,
             "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    resp = {"id": "resp_1", "object": "response", "service_tier": "default",
            "output": [{"type": "web_search_call", "id": "ws_1", "status": "completed"},
                       {"type": "web_search_call", "id": "ws_2", "status": "completed"},
                       {"type": "message", "content": [{"type": "output_text", "text": "a \"web_search_call\""}]}],
            "usage": usage}
    expected = nanos(mtok(1000, "1.25") + mtok(100, "10") + 2 * Decimal("0.01"))
    p = price("gpt-5", "openai")
    u = read_usage(usage_from_body(json.dumps(resp).encode()))
    assert u.web_searches == 2 and usage_nanos(p, u) == expected
    meter = StreamMeter("openai")
    meter.feed(b"event: response.completed\ndata: " + json.dumps(
        {"type": "response.completed", "response": resp}).encode() + b"\n\n")
    streamed, _ = meter.capture_args(1.0)
    assert isinstance(streamed, Usage) and usage_nanos(p, streamed) == expected


@settings(max_examples=150, deadline=None)
@given(inp=counts, out=counts, read=counts, searches=counts,
       tier=st.sampled_from(["standard", "priority", "batch", None]), speed=st.sampled_from(["fast", "standard", None]))
def test_anthropic_usage_reads_searches_tier_and_speed(inp: int, out: int, read: int, searches: int,
                                                       tier: str | None, speed: str | None) -> None:
    u: dict[str, Any] = {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": read,
                         "server_tool_use": {"web_search_requests": searches}}
    if tier:
        u["service_tier"] = tier
    if speed:
        u["speed"] = speed
    got = read_usage({"usage": u})
    assert got == Usage(input=inp, cache_read=read, output=out, web_searches=searches)
    assert got.served() == {k: v for k, v in (("service_tier", None if tier == "batch" else tier),
                                              ("speed", speed),
                                              ("processing", "batch" if tier == "batch" else None)) if v}
    u["server_tool_use"]["web_search_requests"] = -1
    with pytest.raises(UnreadableUsage) as err:
        read_usage({"usage": u})
    assert err.value.field == "usage.server_tool_use.web_search_requests"
