"""``action = "truncate"``: the oldest turns go until the worst case fits; what must stay, stays."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spendgate
from spendgate import ledger
from spendgate.engine import Engine
from spendgate.errors import ConfigError
from spendgate.estimate import Estimator
from spendgate.money import nanos_to_usd
from spendgate.policy import default_policy, parse
from spendgate.pricing.table import PriceTable
from spendgate.request import Request
from spendgate.wire import truncate
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers

T0 = 1_800_000_000.0
CHAT, MESSAGES, RESPONSES = "/v1/chat/completions", "/v1/messages", "/v1/responses"
SHAPES = {"chat": ("openai", CHAT, "gpt-4o-mini"), "anthropic": ("anthropic", MESSAGES, "claude-haiku-4-5"),
          "responses": ("openai", RESPONSES, "gpt-4o-mini")}
ESTIMATOR = Estimator(PriceTable.bundled())


# -- conversations in each provider's shape -----------------------------------------------------

def user(shape: str, text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(shape: str, text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def tool_round(shape: str, call_id: str, text: str) -> list[dict[str, Any]]:
    """An assistant's tool call and its result, as the provider wants them."""
    if shape == "chat":
        return [{"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": call_id, "content": text}]
    if shape == "anthropic":
        return [{"role": "assistant", "content": [{"type": "tool_use", "id": call_id, "name": "look", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": text}]}]
    return [{"type": "function_call", "call_id": call_id, "name": "look", "arguments": "{}"},
            {"type": "function_call_output", "call_id": call_id, "output": text}]


def body_of(shape: str, items: list[Any], max_tokens: int = 10) -> dict[str, Any]:
    model = SHAPES[shape][2]
    if shape == "chat":
        return {"model": model, "messages": items, "max_tokens": max_tokens}
    if shape == "anthropic":
        return {"model": model, "system": "You are terse.", "messages": items, "max_tokens": max_tokens}
    return {"model": model, "input": items, "max_output_tokens": max_tokens}


@st.composite
def conversations(draw: st.DrawFn, shape: str) -> list[Any]:
    """A plausible conversation: system messages (OpenAI), exchanges of a user turn, tool rounds
    and an answer, ending on the latest user turn or on a tool round after it (an agent loop)."""
    words = st.text("abcdefgh ", min_size=1, max_size=60)
    items: list[Any] = []
    if shape != "anthropic" and draw(st.booleans()):
        items.append({"role": "system", "content": draw(words)})
    if shape != "anthropic" and draw(st.booleans()):
        items.append(assistant(shape, draw(words)))  # an opening the assistant wrote
    n = draw(st.integers(1, 6))
    calls = 0
    for i in range(n):
        items.append(user(shape, draw(words)))
        if i == n - 1 and draw(st.booleans()):
            break
        for _ in range(draw(st.integers(0, 2))):
            calls += 1
            items += tool_round(shape, f"call_{calls}", draw(words))
        if shape != "anthropic" and draw(st.integers(0, 4)) == 0:
            items.append({"role": "developer", "content": draw(words)})
        if i < n - 1:
            items.append(assistant(shape, draw(words)))
    return items


def non_system(items: list[Any]) -> list[Any]:
    return [m for m in items if not truncate.is_system(m)]


def check_kept(shape: str, items: list[Any], kept: list[Any]) -> None:
    """Everything a truncation promises about one shorter conversation."""
    provider = SHAPES[shape][0]
    # every system message stays, in order; the rest is a suffix of the original, in order
    assert [m for m in kept if truncate.is_system(m)] == [m for m in items if truncate.is_system(m)]
    rest, whole = non_system(kept), non_system(items)
    assert 0 < len(rest) < len(whole) and whole[-len(rest):] == rest
    # the suffix starts on a user turn (never on a tool result or an assistant turn)
    assert truncate.is_user_turn(provider, rest[0])
    # the latest user turn and all after it stay
    last = max(i for i, m in enumerate(whole) if truncate.is_user_turn(provider, m))
    assert len(rest) >= len(whole) - last
    # no tool result without the call it answers
    made = set().union(*(truncate.calls(m) for m in kept))
    answered = set().union(*(truncate.results(m) for m in kept))
    assert answered <= made


@pytest.mark.parametrize("shape", list(SHAPES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_shorter_conversation_keeps_what_must_stay(shape: str, data: st.DataObject) -> None:
    items = data.draw(conversations(shape))
    provider, route, _ = SHAPES[shape]
    body = body_of(shape, items)
    cuts = list(truncate.shorter(provider, route, body))
    assert [d for d, _ in cuts] == sorted({d for d, _ in cuts}), "fewest dropped first, each once"
    for dropped, shorter in cuts:
        name = "input" if shape == "responses" else "messages"
        assert {k: v for k, v in shorter.items() if k != name} == {k: v for k, v in body.items() if k != name}
        assert len(shorter[name]) == len(items) - dropped
        check_kept(shape, items, shorter[name])
    # every user turn but the first (with something before it) is a cut, as no result spans turns
    turns = [i for i, m in enumerate(items) if truncate.is_user_turn(provider, m)
             and non_system(items[:i])]
    assert len(cuts) == len(turns)


@pytest.mark.parametrize("shape", list(SHAPES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_engine_drops_the_fewest_turns_that_fit_or_refuses(shape: str, data: st.DataObject) -> None:
    items = data.draw(conversations(shape))
    provider, route, _ = SHAPES[shape]
    body = body_of(shape, items)
    full = ESTIMATOR.estimate(provider, route, body).cost_nanos
    costs = [(ESTIMATOR.estimate(provider, route, b).cost_nanos, b) for _, b in truncate.shorter(provider, route, body)]
    cheapest = min([c for c, _ in costs], default=full)
    limit = data.draw(st.integers(max(cheapest - 2_000, 0), full + 2_000))
    e = Engine(parse({"budget": [{"name": "per-call", "usd": str(nanos_to_usd(limit)), "window": "request",
                                  "action": "truncate"}]}), ledger.open("memory://"))
    d = e.decide(Request(provider, route, body), now=T0)
    fitting = [b for c, b in costs if c <= limit]
    if full <= limit:
        assert d.action == "allow" and d.body == body
    elif fitting:
        assert d.allowed and d.action == "truncate" and d.applied == ("per-call",)
        assert d.body == fitting[0], "the fewest turns dropped that fit"
        assert d.estimate is not None and d.estimate.cost_nanos <= limit
        name = "input" if shape == "responses" else "messages"
        assert d.edits == {name: fitting[0][name]}
        check_kept(shape, items, d.edits[name])
    else:
        assert d.action == "block" and not d.allowed
        assert "no older turns can be dropped" in " ".join(d.notes)


# -- the engine, by example ---------------------------------------------------------------------

@pytest.fixture
def engine() -> Iterator[Any]:
    opened = []

    def build(doc: dict[str, Any]) -> Engine:
        store = ledger.open("memory://")
        opened.append(store)
        return Engine(parse(doc), store)

    yield build
    for s in opened:
        s.close()


LONG = "word " * 400  # about 400 tokens a turn


def long_chat() -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first " + LONG}, {"role": "assistant", "content": "a1 " + LONG},
            *tool_round("chat", "call_1", "result " + LONG),
            {"role": "user", "content": "second " + LONG}, {"role": "assistant", "content": "a2 " + LONG},
            {"role": "user", "content": "third, the latest"}]


def test_a_day_budget_drops_older_turns_then_allows_and_holds_the_shorter_worst_case(engine: Any) -> None:
    items = long_chat()
    body = body_of("chat", items)
    last_two = [items[0], *items[5:]]  # the system prompt, the second exchange, the latest turn
    fits = ESTIMATOR.estimate("openai", CHAT, {**body, "messages": last_two}).cost_nanos
    full = ESTIMATOR.estimate("openai", CHAT, body).cost_nanos
    assert fits < full
    e = engine({"budget": [{"name": "daily", "usd": str(nanos_to_usd(fits)), "window": "day",
                            "action": "truncate"}]})
    d = e.decide(Request("openai", CHAT, body), now=T0)
    assert d.allowed and d.action == "truncate" and d.applied == ("daily",)
    assert d.edits == {"messages": last_two} and d.body["messages"] == last_two
    assert d.estimate is not None and d.estimate.cost_nanos == fits and d.original is not None
    assert d.original.cost_nanos == full
    assert "daily: dropped the 4 oldest messages to fit" in d.notes
    event = e.decision_event(d, "openai")
    assert event.kind == "truncate" and event.dims["edits"] == "messages=[4 kept]" and event.rule == "daily"
    assert event.amounts == {"estimate_usd": fits, "original_estimate_usd": full}
    # the bucket is now full: the next call keeps only its latest turn, which does not fit either
    again = e.decide(Request("openai", CHAT, body), now=T0 + 1)
    assert again.action == "block" and not again.allowed and again.trip is not None
    assert again.trip.rule.name == "daily"
    assert "daily: no older turns can be dropped to fit" in " ".join(again.notes)


def test_a_tool_round_is_dropped_with_its_call_and_anthropic_keeps_system_and_starts_on_user(engine: Any) -> None:
    items = [{"role": "user", "content": "first " + LONG},
             *tool_round("anthropic", "toolu_1", "result " + LONG),
             {"role": "assistant", "content": "a1 " + LONG},
             {"role": "user", "content": "second"},
             *tool_round("anthropic", "toolu_2", "result two")]
    body = body_of("anthropic", items)
    kept = items[4:]  # the latest user turn and its tool round, in flight
    fits = ESTIMATOR.estimate("anthropic", MESSAGES, {**body, "messages": kept}).cost_nanos
    e = engine({"budget": [{"name": "per-call", "usd": str(nanos_to_usd(fits)), "window": "request",
                            "action": "truncate"}]})
    d = e.decide(Request("anthropic", MESSAGES, body), now=T0)
    assert d.action == "truncate" and d.edits == {"messages": kept}
    assert d.body["system"] == "You are terse." and d.body["messages"][0] == {"role": "user", "content": "second"}
    # a cut at the tool result's user message would orphan it: it is not a cut point
    assert [n for n, _ in truncate.shorter("anthropic", MESSAGES, body)] == [4]


def test_responses_input_list_is_truncated_and_a_string_input_is_refused(engine: Any) -> None:
    items = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "first " + LONG},
             *tool_round("responses", "fc_1", "result " + LONG), {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "second"}]
    body = body_of("responses", items)
    kept = [items[0], items[5]]
    fits = ESTIMATOR.estimate("openai", RESPONSES, {**body, "input": kept}).cost_nanos
    e = engine({"budget": [{"name": "per-call", "usd": str(nanos_to_usd(fits)), "window": "request",
                            "action": "truncate"}]})
    d = e.decide(Request("openai", RESPONSES, body), now=T0)
    assert d.action == "truncate" and d.edits == {"input": kept}
    assert "per-call: dropped the 4 oldest input items to fit" in d.notes
    plain = e.decide(Request("openai", RESPONSES, {**body, "input": "first " + LONG}), now=T0)
    assert plain.action == "block" and "no older turns can be dropped" in " ".join(plain.notes)


def test_a_token_budget_truncates_to_its_token_headroom(engine: Any) -> None:
    body = body_of("chat", long_chat())
    cuts = [ESTIMATOR.estimate("openai", CHAT, b).tokens for _, b in truncate.shorter("openai", CHAT, body)]
    e = engine({"budget": [{"name": "tok", "tokens": cuts[0], "window": "request", "action": "truncate"}]})
    d = e.decide(Request("openai", CHAT, body), now=T0)
    assert d.action == "truncate" and d.estimate is not None and d.estimate.tokens == cuts[0]
    # the first exchange goes whole: its user turn, the answer, the tool call and its result
    assert d.body["messages"] == [body["messages"][0], *body["messages"][5:]]


def test_the_policy_accepts_truncate_and_rejects_clamp_only_keys() -> None:
    rule = parse({"budget": [{"name": "t", "usd": 1, "window": "day", "action": "truncate"}]}).rules[0]
    assert rule.action == "truncate"
    with pytest.raises(ConfigError, match="min_output"):
        parse({"budget": [{"name": "t", "usd": 1, "window": "day", "action": "truncate", "min_output": 5}]})


# -- through the proxy: the provider receives the shortened conversation --------------------------

def test_the_upstream_receives_the_shortened_messages_through_the_proxy() -> None:
    items = long_chat()
    body = body_of("chat", items)
    kept = [items[0], *items[5:]]
    fits = ESTIMATOR.estimate("openai", CHAT, {**body, "messages": kept}).cost_nanos
    s = Servers(parse({"budget": [{"name": "per-call", "usd": str(nanos_to_usd(fits)), "window": "request",
                                   "action": "truncate"}]}), "memory://")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=items,  # type: ignore[arg-type]
                                                               max_tokens=10)
        assert raw.parse().choices[0].message.content == "hello"
        assert raw.headers["x-spendgate-estimate-usd"] == str(nanos_to_usd(fits))
        assert len(s.mock.seen) == 1
        sent = s.mock.seen[0].json
        assert sent["messages"] == kept and sent["max_tokens"] == 10 and sent["model"] == "gpt-4o-mini"
        s.settled()
        # charged what the mock billed, never the original's worst case
        billed = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600  # gpt-4o-mini at $0.15/$0.60 per Mtok
        # the remedy is kept as a decision (spendgate tail, the decision list), then its charge
        assert [(e.kind, e.cost) for e in s.store.events(0)] == [("truncate", 0), ("capture", billed)]
    finally:
        s.close()


def test_the_sdk_sends_the_shortened_messages() -> None:
    items = long_chat()
    body = body_of("chat", items)
    kept = [items[0], *items[5:]]
    fits = ESTIMATOR.estimate("openai", CHAT, {**body, "messages": kept}).cost_nanos
    sent: list[Any] = []
    provider = _answering(sent)

    spendgate.configure(store="memory://", policy=parse({"budget": [
        {"name": "per-call", "usd": str(nanos_to_usd(fits)), "window": "request", "action": "truncate"}]}))
    try:
        client = spendgate.wrap(openai.OpenAI(api_key="sk-t", max_retries=0,
                                              http_client=httpx2.Client(transport=httpx2.MockTransport(provider))))
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=items, max_tokens=10)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "ok"
        assert len(sent) == 1 and sent[0]["messages"] == kept and sent[0]["max_tokens"] == 10
    finally:
        spendgate.configure(store="memory://", policy=default_policy())


def test_a_budget_block_may_truncate_too() -> None:
    items = long_chat()
    body = body_of("chat", items)
    kept = [items[0], *items[5:]]
    fits = ESTIMATOR.estimate("openai", CHAT, {**body, "messages": kept}).cost_nanos
    sent: list[Any] = []
    provider = _answering(sent)

    spendgate.configure(store="memory://", policy=parse({"defaults": False}))
    try:
        client = spendgate.wrap(openai.OpenAI(api_key="sk-t", max_retries=0,
                                              http_client=httpx2.Client(transport=httpx2.MockTransport(provider))))
        with spendgate.budget(usd=nanos_to_usd(fits), on_exceed="truncate"):
            client.chat.completions.create(model="gpt-4o-mini", messages=items, max_tokens=10)  # type: ignore[arg-type]
        assert len(sent) == 1 and sent[0]["messages"] == kept
    finally:
        spendgate.configure(store="memory://", policy=default_policy())


def _answering(sent: list[Any]) -> Any:
    """A provider that keeps each body it is sent and answers a small chat completion."""
    def provider(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        return httpx2.Response(200, json={"id": "c", "created": 1, "model": "gpt-4o-mini",
                                          "object": "chat.completion", "usage": usage, "choices": [choice]})
    return provider
