"""Usage that is not a set of non-negative integer counts is unreadable: charged conservatively,
flagged estimated, logged by field — never read as zero tokens and charged $0."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.engine import Engine
from spendgate.estimate import Estimate
from spendgate.estimate.tokens import counter
from spendgate.ledger import open as open_ledger
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.pricing.cost import Usage, usage_nanos, worst_case_nanos
from spendgate.request import Identity, Request
from spendgate.usage import MISSING, UnreadableUsage, read_usage
from spendgate.wire.stream import StreamMeter
from tests.harness import Servers

T0 = 1_800_000_000.0

# -- the parser, property-tested --------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**15)
#: what a count must never be read as: strings, negatives, floats, null, booleans, objects, lists
garbage = st.one_of(st.text(max_size=5), st.integers(max_value=-1), st.floats(allow_nan=False), st.none(),
                    st.booleans(), st.dictionaries(st.text(max_size=3), counts, max_size=2),
                    st.lists(counts, max_size=2))


@st.composite
def chat_usage(draw: st.DrawFn) -> tuple[dict[str, Any], Usage]:
    prompt, completion = draw(counts), draw(counts)
    cached, reasoning = draw(st.integers(0, prompt)), draw(st.integers(0, completion))
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if draw(st.booleans()):
        u["total_tokens"] = prompt + completion
    if draw(st.booleans()):
        u["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
    else:
        cached = 0
    if draw(st.booleans()):
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    else:
        reasoning = 0
    return u, Usage(input=prompt - cached, cache_read=cached, output=completion, reasoning=reasoning)


@st.composite
def responses_usage(draw: st.DrawFn) -> tuple[dict[str, Any], Usage]:
    inp, out = draw(counts), draw(counts)
    cached, reasoning = draw(st.integers(0, inp)), draw(st.integers(0, out))
    u = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
         "input_tokens_details": {"cached_tokens": cached}, "output_tokens_details": {"reasoning_tokens": reasoning}}
    return u, Usage(input=inp - cached, cache_read=cached, output=out, reasoning=reasoning)


@st.composite
def anthropic_usage(draw: st.DrawFn) -> tuple[dict[str, Any], Usage]:
    inp, out, read, w5, w1 = (draw(counts) for _ in range(5))
    u: dict[str, Any] = {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": read,
                         "cache_creation_input_tokens": w5 + w1, "service_tier": "standard"}
    if draw(st.booleans()):
        u["cache_creation"] = {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1}
    else:
        w5, w1 = w5 + w1, 0
    return u, Usage(input=inp, cache_read=read, cache_write_5m=w5, cache_write_1h=w1, output=out)


@st.composite
def gemini_usage(draw: st.DrawFn) -> tuple[dict[str, Any], Usage]:
    prompt, cand, thoughts = draw(counts), draw(counts), draw(counts)
    cached = draw(st.integers(0, prompt))
    m = {"promptTokenCount": prompt, "candidatesTokenCount": cand, "thoughtsTokenCount": thoughts,
         "cachedContentTokenCount": cached, "totalTokenCount": prompt + cand + thoughts}
    return m, Usage(input=prompt - cached, cache_read=cached, output=cand + thoughts, reasoning=thoughts)


def wrap(kind: str, u: dict[str, Any]) -> dict[str, Any]:
    return {"usageMetadata": u} if kind == "gemini" else {"id": "x", "usage": u}


SHAPES = {"chat": chat_usage(), "responses": responses_usage(), "anthropic": anthropic_usage(),
          "gemini": gemini_usage()}


@pytest.mark.parametrize("kind", SHAPES)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_integer_counts_parse_to_exactly_those_numbers(kind: str, data: st.DataObject) -> None:
    u, expected = data.draw(SHAPES[kind])
    assert read_usage(wrap(kind, u)) == expected
    if kind != "gemini":
        assert read_usage(u) == expected, "a bare usage object reads the same"


#: fields a usage block may carry that spendgate does not price: never what makes it unreadable
UNUSED = ("audio_tokens", "service_tier")


def _paths(u: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every count field of a usage dict that the reader uses, nested ones included."""
    return [(k, *sub) if isinstance(v, dict) else (k,)
            for k, v in u.items() for sub in (_paths(v) if isinstance(v, dict) else [()])]


@pytest.mark.parametrize("kind", SHAPES)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_one_count_that_is_not_a_non_negative_int_makes_usage_unreadable(kind: str, data: st.DataObject) -> None:
    u, _ = data.draw(SHAPES[kind])
    path = data.draw(st.sampled_from([p for p in _paths(u) if p[-1] not in UNUSED]))
    bad = data.draw(garbage)
    node = u
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises(UnreadableUsage) as err:
        read_usage(wrap(kind, u))
    assert err.value.field.endswith("." + ".".join(path)) and err.value.value == bad, "the bad field is named"


@pytest.mark.parametrize(("usage", "field"), [
    ({"prompt_tokens": 50}, "usage.completion_tokens"),  # chat with no output count
    ({"completion_tokens": 10}, "usage.prompt_tokens"),
    ({"prompt_tokens": 50, "total_tokens": 60}, "usage.completion_tokens"),  # not an embedding: output unknown
    ({"input_tokens": 50}, "usage.output_tokens"),
    ({"output_tokens": 10, "cache_read_input_tokens": 0}, "usage.input_tokens"),
    ({"output_tokens": 10, "input_tokens_details": {"cached_tokens": 0}}, "usage.input_tokens"),
    ({"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 9}},
     "usage.prompt_tokens_details.cached_tokens"),  # a part larger than its whole
    ({"input_tokens": 5, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 4}},
     "usage.output_tokens_details.reasoning_tokens"),  # reasoning is billed inside output
    ({"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": "none"}, "usage.prompt_tokens_details"),
    ({"total_tokens": 60}, "usage"),  # no input or output count at all
])
def test_missing_or_inconsistent_counts_are_unreadable(usage: dict[str, Any], field: str) -> None:
    with pytest.raises(UnreadableUsage) as err:
        read_usage({"usage": usage})
    assert err.value.field == field


def test_no_usage_at_all_is_unreadable_and_an_embedding_has_no_output() -> None:
    bodies: list[dict[str, Any] | None] = [None, {"id": "x"}, {"usage": None}, {"usage": "50"}, {"usageMetadata": []}]
    for body in bodies:
        with pytest.raises(UnreadableUsage):
            read_usage(body)
    assert read_usage({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(input=8)
    with pytest.raises(UnreadableUsage) as err:
        read_usage({"usage": {"prompt_tokens": "abc", "completion_tokens": 1}})
    assert str(err.value) == 'usage.prompt_tokens is "abc", not a non-negative integer'
    assert err.value.value == "abc" and UnreadableUsage("usage.x", MISSING).args == ("usage.x is missing",)


# -- Anthropic streams: message_start + message_delta -----------------------------------------

def anthropic_stream(start: dict[str, Any], delta: dict[str, Any]) -> StreamMeter:
    m = StreamMeter("anthropic")
    for ev in ({"type": "message_start", "message": {"usage": start}},
               {"type": "message_delta", "delta": {}, "usage": delta}):
        m.feed(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode())
    assert m.complete
    return m


def test_anthropic_stream_usage_merges_and_a_null_final_count_is_unreadable() -> None:
    start = {"input_tokens": 50, "output_tokens": 1, "cache_read_input_tokens": 0}
    ordinary = anthropic_stream(start, {"output_tokens": 10})
    assert read_usage(ordinary.usage) == Usage(input=50, output=10)
    # a null optional count in the delta is "not applicable" (as in Anthropic's SDK): the start's stands
    lenient = anthropic_stream(start, {"output_tokens": 10, "input_tokens": None, "cache_read_input_tokens": None})
    assert read_usage(lenient.usage) == Usage(input=50, output=10)
    # the final output count must come from the delta: the start's 1 is a placeholder
    for delta, field in (({"output_tokens": None}, "usage.output_tokens"), ({}, "usage.output_tokens"),
                         ({"output_tokens": "10"}, "usage.output_tokens")):
        with pytest.raises(UnreadableUsage) as err:
            read_usage(anthropic_stream(start, delta).usage)
        assert err.value.field == field
    with pytest.raises(UnreadableUsage) as err:  # null in the start, never replaced
        read_usage(anthropic_stream({**start, "input_tokens": None}, {"output_tokens": 10}).usage)
    assert err.value.field == "usage.input_tokens"


# -- the engine charges unreadable usage conservatively ----------------------------------------

@pytest.fixture
def engine() -> Iterator[Engine]:
    store = open_ledger("memory://")
    yield Engine(parse({"budget": [{"name": "g", "usd": 5, "window": "day"}]}), store)
    store.close()


def mini(max_tokens: int = 1000) -> Request:
    return Request("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": max_tokens,
                                                      "messages": [{"role": "user", "content": "hello"}]}, Identity())


def test_unreadable_usage_is_charged_the_worst_case_or_input_plus_output_seen(engine: Engine,
                                                                              caplog: pytest.LogCaptureFixture
                                                                              ) -> None:
    d = engine.decide(mini(), now=T0)
    assert d.estimate is not None
    with caplog.at_level(logging.WARNING, logger="spendgate.engine"):
        c = engine.capture(d, {"usage": {"prompt_tokens": "abc", "completion_tokens": 10}}, now=T0)
    assert (c.cost_nanos, c.estimated, c.usage) == (d.estimate.cost_nanos, True, None)
    assert d.estimate.cost_nanos == d.estimate.input_tokens * 150 + 1000 * 600
    assert 'usage.prompt_tokens is "abc", not a non-negative integer; charged the worst case' in caplog.text
    d2 = engine.decide(mini(), now=T0)
    assert d2.estimate is not None
    c2 = engine.capture(d2, {"usage": {"prompt_tokens": 50, "completion_tokens": -3}}, output_seen=7, now=T0)
    assert c2.estimated and c2.cost_nanos == d2.estimate.input_tokens * 150 + 7 * 600
    [ev1, ev2] = engine.ledger.events(0)
    assert (ev1.kind, ev1.estimated, ev1.cost) == ("unknown", True, d.estimate.cost_nanos)
    assert (ev2.estimated, ev2.cost, ev2.output_tokens) == (True, c2.cost_nanos, 7)


def test_a_finished_stream_hands_capture_its_usage_or_the_output_it_relayed(engine: Engine) -> None:
    def stream(usage: Any) -> StreamMeter:
        m = StreamMeter("openai")
        chunks = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in ("hello", " there")]
        chunks.append({"choices": [], "usage": usage})
        m.feed(b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks))
        assert m.complete
        return m

    assert stream({"prompt_tokens": 7, "completion_tokens": 2}).capture_args(1.0) == (Usage(input=7, output=2), None)
    bad = {"prompt_tokens": 7, "completion_tokens": None}
    usage, seen = stream(bad).capture_args(1.0)
    assert usage == bad and seen == counter("o200k_base").count("hello there")
    d = engine.decide(mini(), now=T0)
    assert d.estimate is not None
    c = engine.capture(d, usage, output_seen=seen, now=T0)
    assert c.estimated and c.cost_nanos == d.estimate.input_tokens * 150 + seen * 600


def test_absurdly_large_but_well_formed_usage_is_charged_as_billed(engine: Engine) -> None:
    d = engine.decide(mini(), now=T0)
    huge = {"prompt_tokens": 10**12, "completion_tokens": 10**9}
    c = engine.capture(d, {"usage": huge}, now=T0)
    assert not c.estimated and c.cost_nanos == 10**12 * 150 + 10**9 * 600  # $150,600
    [st_] = engine.ledger.states(engine.ledger.known_buckets(), now=T0)
    assert (st_.spent, st_.held) == (c.cost_nanos, 0)


# -- through the proxy: 12 kinds of garbage × 3 APIs × JSON and SSE ---------------------------

MODEL = {"chat": "gpt-4o-mini", "responses": "gpt-4o-mini", "anthropic": "claude-opus-4-8"}
#: per API: its valid usage, its input and output count fields, and one nested count
API_SHAPE: dict[str, tuple[dict[str, Any], str, str, tuple[str, str]]] = {
    "chat": ({"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
             "prompt_tokens", "completion_tokens", ("prompt_tokens_details", "cached_tokens")),
    "responses": ({"input_tokens": 50, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 10,
                   "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 60},
                  "input_tokens", "output_tokens", ("output_tokens_details", "reasoning_tokens")),
    "anthropic": ({"input_tokens": 50, "output_tokens": 10, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0,
                   "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}},
                  "input_tokens", "output_tokens", ("cache_creation", "ephemeral_1h_input_tokens")),
}
_DROP = object()
#: (name, which field, bad value): 12 ways a usage block can be garbage
GARBAGE = [("input-string", "in", "50"), ("input-negative", "in", -5), ("input-float", "in", 50.5),
           ("input-null", "in", None), ("input-bool", "in", True), ("input-object", "in", {"tokens": 50}),
           ("output-string", "out", "10"), ("output-negative", "out", -1), ("output-null", "out", None),
           ("input-missing", "in", _DROP), ("output-missing", "out", _DROP), ("nested-string", "nested", "0")]


def garbage_usage(api: str, where: str, bad: Any) -> tuple[dict[str, Any], str]:
    base, inp, out, (outer, inner) = API_SHAPE[api]
    u = json.loads(json.dumps(base))
    node, key = (u[outer], inner) if where == "nested" else (u, inp if where == "in" else out)
    if bad is _DROP:
        del node[key]
    else:
        node[key] = bad
    return u, f"usage.{outer}.{inner}" if where == "nested" else f"usage.{key}"


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers(default_policy(), "memory://")
    yield s
    s.close()


def call(s: Servers, api: str, stream: bool, usage: dict[str, Any]) -> tuple[str, Estimate, int]:
    """Send one request whose provider reports ``usage``: its decision id, its estimate, and the
    cost of its input plus the output the stream relayed."""
    headers = {"x-mock-usage": json.dumps(usage)}
    if api == "anthropic":
        ac = anthropic.Anthropic(base_url=s.url, api_key="sk-ant-test", max_retries=0)
        raw: Any = ac.messages.with_raw_response.create(model=MODEL[api], max_tokens=200, stream=stream,
                                                        messages=[{"role": "user", "content": "hi"}],
                                                        extra_headers=headers)
        body: dict[str, Any] = {"model": MODEL[api], "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}
        route, seen_text = "/v1/messages", "hello"
    else:
        oc = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
        if api == "chat":
            body = {"model": MODEL[api], "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}
            raw = oc.chat.completions.with_raw_response.create(**body, stream=stream, extra_headers=headers)
            route, seen_text = "/v1/chat/completions", "hello there"
        else:
            body = {"model": MODEL[api], "max_output_tokens": 200, "input": "hi"}
            raw = oc.responses.with_raw_response.create(**body, stream=stream, extra_headers=headers)
            route, seen_text = "/v1/responses", "hello"
    parsed = raw.parse()
    if stream:
        list(parsed)  # the whole stream reaches the client
    else:
        assert parsed.id
    provider = "anthropic" if api == "anthropic" else "openai"
    est = s.engine.estimator.estimate(provider, route, body)
    assert usd_to_nanos(Decimal(raw.headers["x-spendgate-estimate-usd"])) == est.cost_nanos
    seen = counter("o200k_base").count(seen_text)
    if api == "anthropic":
        seen = math.ceil(seen * s.engine.estimator.anthropic_factor)
    partial = worst_case_nanos(est.price.price, est.input_tokens, seen, est.shape.cache_write)
    return raw.headers["x-spendgate-decision"], est, partial


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("api", list(API_SHAPE))
@pytest.mark.parametrize(("name", "where", "bad"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_usage_through_the_proxy_is_charged_conservatively(servers: Servers, api: str, stream: bool,
                                                                  name: str, where: str, bad: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    usage, field = garbage_usage(api, where, bad)
    with caplog.at_level(logging.WARNING, logger="spendgate.engine"):
        did, est, partial = call(servers, api, stream, usage)
        servers.settled()
    worst = est.cost_nanos
    [ev] = [e for e in servers.store.events(0) if e.decision_id == did]
    assert ev.estimated and ev.cost > 0
    if stream:
        # a stream is charged its input + the output it relayed once the proxy passes output_seen
        # to capture; the worst case until then — both conservative, both exact
        assert ev.cost == partial
    else:
        assert ev.cost == worst
    assert f"{field} is " in caplog.text, "the warning names the bad field"


def test_well_formed_usage_through_the_proxy_is_charged_exactly(servers: Servers) -> None:
    for api in API_SHAPE:
        for stream in (False, True):
            did, est, _ = call(servers, api, stream, API_SHAPE[api][0])
            servers.settled()
            [ev] = [e for e in servers.store.events(0) if e.decision_id == did]
            assert (ev.cost, ev.estimated) == (usage_nanos(est.price.price, Usage(input=50, output=10)), False)
    huge = {"prompt_tokens": 10**10, "completion_tokens": 10**8, "total_tokens": 10**10 + 10**8}
    did, _, _ = call(servers, "chat", False, huge)
    servers.settled()
    [ev] = [e for e in servers.store.events(0) if e.decision_id == did]
    assert (ev.cost, ev.estimated) == (10**10 * 150 + 10**8 * 600, False), "absurd but well formed: as billed"
