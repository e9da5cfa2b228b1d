"""The usual usage shapes are read without the strict reader's bookkeeping, to the same result.

``read_usage`` reads OpenAI chat / Responses and Anthropic usage dicts whose counts are all in
order directly, and hands anything else to the strict reader (the definition, which names what is
wrong). Generated usage — valid, malformed, wrapped in a response or bare, with the tier and web
search calls beside it — must read the same both ways: the same counts, tier, speed, processing
and unknown fields, or the same :class:`UnreadableUsage`.
"""

from __future__ import annotations

from dataclasses import astuple
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.pricing.cost import Usage
from spendgate.usage import UnreadableUsage, _read_strict, read_usage

#: counts, and what replaces one: mostly what a count must never be read as
count = st.integers(0, 60)
junk = st.one_of(st.integers(-3, -1), st.booleans(), st.none(), st.text(max_size=2), st.floats(allow_nan=False),
                 st.just([]), st.just({}), st.integers(2**63, 2**70))  # the last: absurd, but counts
#: a part of a count (cached, reasoning): mostly within its whole, not always
part = st.integers(0, 12)


def obj(*keys: str, **nested: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: part for k in keys} | nested)


chat_in = obj("cached_tokens", "cache_write_tokens", "audio_tokens", "image_tokens", "text_tokens",
              cached_tokens_details=obj("audio_tokens", "image_tokens"))
chat_out = obj("reasoning_tokens", "audio_tokens", "image_tokens", "text_tokens", "accepted_prediction_tokens")
tier = st.sampled_from(["default", "priority", "flex", "batch", "standard", ""])
chat = st.fixed_dictionaries(
    {"prompt_tokens": count, "completion_tokens": count},
    optional={"total_tokens": count, "prompt_tokens_details": chat_in, "completion_tokens_details": chat_out,
              "mystery_tokens": count, "prompt_tokens_details_extra": obj("odd_tokens"),
              "service_tier": tier})
embedding = st.fixed_dictionaries({"prompt_tokens": count}, optional={"total_tokens": count})
responses = st.fixed_dictionaries(
    {"input_tokens": count, "output_tokens": count},
    optional={"total_tokens": count, "input_tokens_details": chat_in, "output_tokens_details": chat_out,
              "input_token_details": chat_in, "output_token_details": chat_out, "web_search_calls": part})
anthropic = st.fixed_dictionaries(
    {"input_tokens": count, "output_tokens": count},
    optional={"cache_read_input_tokens": count, "cache_creation_input_tokens": count,
              "cache_creation": obj("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"),
              "server_tool_use": obj("web_search_requests", "web_fetch_requests"), "service_tier": tier,
              "speed": st.sampled_from(["fast", "standard", ""]), "inference_geo": st.just("us")})
other = st.one_of(st.fixed_dictionaries({}, optional={"inputTokens": count, "outputTokens": count,
                                                        "cacheReadInputTokens": count}),
                  st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "prompt_tokens", "x"]), count))
usages = st.one_of(chat, embedding, responses, anthropic, other)


def _paths(node: Any, at: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in node.items():
        out.append((*at, k))
        if isinstance(v, dict):
            out.extend(_paths(v, (*at, k)))
    return out


@st.composite
def payloads(draw: st.DrawFn) -> Any:
    """A usage, half the time with one value (a count, a breakdown, the tier) made garbage, bare
    or in a body with the tier and the web search calls beside it."""
    u = draw(usages)
    if draw(st.booleans()) and u:
        path = draw(st.sampled_from(_paths(u)))
        node = u
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = draw(junk)
    how = draw(st.sampled_from(["body", "body", "bare", "junk"]))
    if how == "bare":
        return u
    if how == "junk":
        return {"usage": draw(junk)}
    body: dict[str, Any] = {"usage": u}
    if draw(st.booleans()):
        body["service_tier"] = draw(st.one_of(tier, junk))
    if draw(st.booleans()):
        body["web_search_calls"] = draw(st.one_of(part, junk))
    return body


def outcome(read: Any, payload: Any) -> Any:
    try:
        usage: Usage = read(payload)
    except UnreadableUsage as why:
        return ("unreadable", str(why), why.field)
    return astuple(usage)


@settings(max_examples=3000, deadline=None)
@given(payloads())
def test_reading_equals_the_strict_definition(payload: Any) -> None:
    assert outcome(read_usage, payload) == outcome(_read_strict, payload)


@pytest.mark.parametrize("payload", [
    {"usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
               "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 0}}, "service_tier": "default"},
    {"usage": {"input_tokens": 30, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 0,
               "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 500},
               "output_tokens": 40, "service_tier": "standard"}},
    {"input_tokens": 5, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 2},
     "output_tokens_details": {"reasoning_tokens": 3}},
])
def test_a_mapping_that_is_not_a_dict_reads_as_the_dict_does(payload: dict[str, Any]) -> None:
    """The SDK may hand over mappings of its own: read by the strict reader, to the same usage."""
    frozen = MappingProxyType({k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in payload.items()})
    assert outcome(read_usage, frozen) == outcome(read_usage, payload) == outcome(_read_strict, payload)
    assert read_usage(payload).total_tokens > 0


def test_a_usual_usage_is_read_exactly() -> None:
    """Chat usage with cached and reasoning tokens, and the tier beside it, read to the token."""
    u = read_usage({"usage": {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240,
                              "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                              "completion_tokens_details": {"reasoning_tokens": 10, "audio_tokens": 0,
                                                            "accepted_prediction_tokens": 0}},
                    "service_tier": "priority", "web_search_calls": 2})
    assert (u.input, u.cache_read, u.output, u.reasoning, u.web_searches, u.tier) == (176, 1024, 40, 10, 2, "priority")
    with pytest.raises(UnreadableUsage, match=r"usage.prompt_tokens_details.cached_tokens is 1201, more than"):
        read_usage({"usage": {"prompt_tokens": 1200, "completion_tokens": 40,
                              "prompt_tokens_details": {"cached_tokens": 1201}}})


#: one full usage of each usual shape, every breakdown present
FULL = {
    "chat": {"prompt_tokens": 50, "completion_tokens": 30, "total_tokens": 80,
             "prompt_tokens_details": {"cached_tokens": 20, "cache_write_tokens": 5, "audio_tokens": 6,
                                       "image_tokens": 7,
                                       "cached_tokens_details": {"audio_tokens": 2, "image_tokens": 3}},
             "completion_tokens_details": {"reasoning_tokens": 10, "audio_tokens": 4, "image_tokens": 5},
             "service_tier": "priority", "web_search_calls": 2},
    "responses": {"input_tokens": 50, "output_tokens": 30, "total_tokens": 80,
                  "input_tokens_details": {"cached_tokens": 20, "audio_tokens": 6,
                                           "cached_tokens_details": {"audio_tokens": 2}},
                  "output_tokens_details": {"reasoning_tokens": 10}, "web_search_calls": 1},
    "realtime": {"input_tokens": 50, "output_tokens": 30,
                 "input_token_details": {"cached_tokens": 20, "text_tokens": 9},
                 "output_token_details": {"audio_tokens": 10, "text_tokens": 20}},
    "anthropic": {"input_tokens": 50, "output_tokens": 30, "cache_read_input_tokens": 20,
                  "cache_creation_input_tokens": 15, "service_tier": "batch", "speed": "fast",
                  "cache_creation": {"ephemeral_5m_input_tokens": 5, "ephemeral_1h_input_tokens": 7},
                  "server_tool_use": {"web_search_requests": 3}},
}
REPLACEMENTS = [None, -1, True, False, "5", 1.5, [], {}, 2**70, 0, 10**6]


def _every_replacement() -> list[tuple[str, tuple[str, ...], Any]]:
    return [(shape, path, value) for shape, usage in FULL.items() for path in _paths(usage) for value in REPLACEMENTS]


@pytest.mark.parametrize("shape", sorted(FULL))
def test_each_full_shape_is_read_by_the_plain_reader(shape: str) -> None:
    from spendgate.usage import _read_plain

    assert _read_plain(FULL[shape], None) is not None
    assert outcome(read_usage, {"usage": FULL[shape]}) == outcome(_read_strict, {"usage": FULL[shape]})


def test_any_one_value_replaced_reads_as_the_strict_definition() -> None:
    """Every value of every usual shape, replaced by garbage, a huge count, zero or a count past its
    whole: read the same both ways (bare and in a body)."""
    import copy

    for shape, path, value in _every_replacement():
        usage = copy.deepcopy(FULL[shape])
        node = usage
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        for payload in (usage, {"usage": usage, "service_tier": "flex"}):
            assert outcome(read_usage, payload) == outcome(_read_strict, payload), (shape, path, value)


# -- the usage of a response body, found without parsing it all ---------------------------------

def _reference_usage_from_body(data: bytes) -> Any:
    """``usage_from_body`` as it was: the tier's key counted, then found again."""
    import json

    decoder = json.JSONDecoder()

    def value_of(key: bytes) -> Any:
        at = data.find(key)
        if at < 0:
            return None
        try:
            return decoder.raw_decode(data[at + len(key):at + len(key) + 200].decode(errors="replace").lstrip())[0]
        except ValueError:
            return None

    for key, wrap in ((b'"usage":', "usage"), (b'"usageMetadata":', "usageMetadata")):
        at = data.rfind(key)
        if at < 0:
            continue
        try:
            value, _ = decoder.raw_decode(data[at + len(key):].decode().lstrip())
        except (UnicodeDecodeError, ValueError):
            break
        if isinstance(value, dict):
            if wrap == "usageMetadata" and (b'"groundingMetadata"' in data or b'"grounding_metadata"' in data):
                break
            if data.count(b'"service_tier":') > 1:
                break
            found: dict[str, Any] = {wrap: value}
            tier = value_of(b'"service_tier":')
            if isinstance(tier, str):
                found["service_tier"] = tier
            calls = data.count(b'"web_search_call"')
            if calls:
                found["web_search_calls"] = calls
            return found
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


json_leaf = st.one_of(st.none(), st.integers(0, 99), st.text(max_size=4), st.sampled_from(["default", "flex"]))
body_parts = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=5), "usage": st.one_of(usages, json_leaf), "usageMetadata": st.one_of(chat, json_leaf),
    "service_tier": st.one_of(tier, json_leaf, st.text(min_size=190, max_size=210)),
    "output": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["web_search_call", "message"])},
                                             optional={"service_tier": tier}), max_size=3),
    "candidates": st.lists(st.fixed_dictionaries({}, optional={"groundingMetadata": st.just({})}), max_size=2),
})


@settings(max_examples=1500, deadline=None)
@given(body_parts, st.sampled_from([None, ", ", "\n  "]), st.integers(0, 40))
def test_the_usage_of_a_body_is_found_as_before(body: dict[str, Any], sep: str | None, cut: int) -> None:
    """Bodies with the tier beside the usage, in it, nested in an output item, twice, too long for
    its window or absent, and cut short (not JSON at all): found the same as before."""
    import json

    from spendgate.usage import usage_from_body

    data = json.dumps(body, separators=None if sep is None else (sep, ": ")).encode()
    for raw in (data, data[:max(len(data) - cut, 0)]):
        assert usage_from_body(raw) == _reference_usage_from_body(raw)
