"""The SDK: the official clients over an httpx MockTransport, guarded in-process."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

import spendgate
from spendgate.errors import ConfigError
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.sdk import _runtime
from tests.harness import Servers, start_serve

MSG = [{"role": "user", "content": "hi"}]


class Provider:
    """A MockTransport handler in both providers' shapes that bills each call's full worst case
    (input counted as spendgate counts it, output = max_tokens), so no capture frees room early."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        with self.lock:
            self.calls.append(body)
        est = _runtime.engine().estimator
        anthropic_route = request.url.path.endswith("/v1/messages")
        shape = est.shape("anthropic" if anthropic_route else "openai",
                          "/v1/messages" if anthropic_route else "/v1/chat/completions", body)
        n_in, n_out = shape.input_tokens, body.get("max_tokens") or 10
        if anthropic_route:
            usage = {"input_tokens": n_in, "output_tokens": n_out}
            msg = {"id": "m", "type": "message", "role": "assistant", "model": body["model"], "stop_reason": "end_turn",
                   "stop_sequence": None, "content": [{"type": "text", "text": "hello"}], "usage": usage}
            if not body.get("stream"):
                return httpx2.Response(200, json=msg)
            events = [("message_start", {"type": "message_start", "message": {**msg, "content": [],
                                                                              "usage": {**usage, "output_tokens": 1}}}),
                      ("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}),
                      ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": "hello"}}),
                      ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                      ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                         "usage": {"output_tokens": n_out}}),
                      ("message_stop", {"type": "message_stop"})]
            sse = "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events)
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=sse.encode())
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        base = {"id": "c", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return httpx2.Response(200, json={**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]})
        chunk = {**base, "object": "chat.completion.chunk"}
        events2 = [{**chunk, "choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": "stop"}]}]
        if (body.get("stream_options") or {}).get("include_usage"):
            events2.append({**chunk, "choices": [], "usage": usage})
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events2) + "data: [DONE]\n\n"
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=sse.encode())


@pytest.fixture
def provider() -> Iterator[Provider]:
    spendgate.configure(store="memory://", policy=default_policy())
    yield Provider()
    spendgate.configure(store="memory://", policy=default_policy())


def oai(p: Provider) -> openai.OpenAI:
    return spendgate.wrap(openai.OpenAI(api_key="sk-t", max_retries=0,
                                        http_client=httpx2.Client(transport=httpx2.MockTransport(p))))


def aoai(p: Provider) -> openai.AsyncOpenAI:
    return spendgate.wrap(openai.AsyncOpenAI(api_key="sk-t", max_retries=0,
                                             http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(p))))


def ant(p: Provider) -> anthropic.Anthropic:
    return spendgate.wrap(anthropic.Anthropic(api_key="sk-a", max_retries=2,
                                              http_client=httpx2.Client(transport=httpx2.MockTransport(p))))


def worst(model: str = "gpt-4o-mini", max_tokens: int = 1000) -> int:
    return spendgate.estimate(model, MSG, max_tokens=max_tokens).cost_nanos


def charged() -> list[Any]:
    return _runtime.engine().ledger.events(0)


def test_wrap_keeps_the_clients_type_and_does_not_double_wrap(provider: Provider) -> None:
    c = oai(provider)
    assert type(c) is openai.OpenAI
    assert spendgate.wrap(c) is c
    assert type(ant(provider)) is anthropic.Anthropic
    with pytest.raises(TypeError, match="expected an OpenAI"):
        spendgate.wrap(object())


def test_20_threads_under_a_budget_admit_exactly_the_calls_that_fit(provider: Provider) -> None:
    c = oai(provider)
    w = worst("gpt-4o")
    n_fit = int(usd_to_nanos(Decimal("0.05")) // w)
    assert 1 < n_fit < 20
    refused: list[Exception] = []
    with spendgate.budget(usd=0.05):
        start = threading.Barrier(20)

        def call() -> None:
            start.wait()
            try:
                c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
            except spendgate.BudgetExceeded as e:
                refused.append(e)

        threads = [threading.Thread(target=spendgate.bind(call)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(provider.calls) == n_fit and len(refused) == 20 - n_fit
    assert sum(e.cost for e in charged()) == n_fit * w <= usd_to_nanos(Decimal("0.05"))


def test_20_asyncio_tasks_under_a_budget_admit_exactly_the_calls_that_fit(provider: Provider) -> None:
    c = aoai(provider)
    n_fit = int(usd_to_nanos(Decimal("0.05")) // worst("gpt-4o"))

    async def go() -> list[str]:
        @spendgate.budget(usd=0.05)
        async def burst() -> list[str]:
            async def one() -> str:
                try:
                    await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
                    return "ok"
                except spendgate.BudgetExceeded:
                    return "refused"
            return list(await asyncio.gather(*(one() for _ in range(20))))
        return await burst()

    outcomes = asyncio.run(go())
    assert outcomes.count("ok") == n_fit == len(provider.calls)


def test_a_refused_call_never_reaches_the_transport_and_carries_the_402_fields(provider: Provider) -> None:
    c = oai(provider)
    with spendgate.budget(usd=0.000001), pytest.raises(spendgate.BudgetExceeded) as err:
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1000)
    assert provider.calls == []
    e = err.value
    for field in ("decision_id", "action", "rule", "scope", "window", "limit_usd", "spent_usd", "estimate_usd",
                  "remaining_usd", "resets_at", "retryable", "recovery"):
        assert field in e.details
    assert e.action == "block" and e.limit_usd == "0.000001" and isinstance(e, openai.OpenAIError)


def test_streams_are_charged_from_their_final_usage(provider: Provider) -> None:
    c = oai(provider)
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=50, stream=True))
    assert provider.calls[-1]["stream_options"] == {"include_usage": True}
    assert all(ch.choices for ch in chunks), "the usage chunk the caller did not ask for is withheld"
    a = ant(provider)
    with a.messages.stream(model="claude-opus-4-8", max_tokens=50, messages=MSG) as s:  # type: ignore[arg-type]
        assert s.get_final_text() == "hello"
    evs = charged()
    assert [e.kind for e in evs] == ["capture", "capture"] and not any(e.estimated for e in evs)
    assert evs[0].cost == worst("gpt-4o-mini", 50)
    assert evs[1].output_tokens == 50


@pytest.mark.parametrize(("outer_usd", "inner_usd", "downgrades"), [
    ("0.025", "0.012", True),   # the inner budget downgrades gpt-4o; the outer one still holds
    ("0.015", "0.012", False),  # both trip on the second call: the block wins
    ("0.015", "0.05", False),   # the outer trips first
])
def test_an_inner_downgrade_never_lets_an_outer_block_budget_be_exceeded(
        provider: Provider, outer_usd: str, inner_usd: str, downgrades: bool) -> None:
    c = oai(provider)
    outer = spendgate.budget(usd=outer_usd, on_exceed="block")
    inner = spendgate.budget(usd=inner_usd, on_exceed="downgrade", downgrade={"gpt-4o": "gpt-4o-mini"})
    with outer, inner, pytest.raises(spendgate.BudgetExceeded):
        for _ in range(500):
            c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
    models = [b["model"] for b in provider.calls]
    assert ("gpt-4o-mini" in models) is downgrades
    assert sum(e.cost for e in charged()) <= usd_to_nanos(Decimal(outer_usd))


def test_decorated_function_gets_a_fresh_budget_per_call_and_windowed_ones_share(provider: Provider) -> None:
    c = oai(provider)
    w = worst()

    @spendgate.budget(usd=Decimal(w * 2) / 10**9)
    def twice() -> int:
        n = 0
        try:
            for _ in range(5):
                c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
                n += 1
        except spendgate.BudgetExceeded:
            pass
        return n

    assert (twice(), twice()) == (2, 2)

    @spendgate.budget(usd=Decimal(w * 3) / 10**9, window="1h", name="shared-hour")
    def once() -> None:
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]

    once(), once(), once()
    with pytest.raises(spendgate.BudgetExceeded):
        once()


def test_on_exceed_callable_decides(provider: Provider) -> None:
    c = oai(provider)
    asked: list[str] = []

    def ask(err: Exception) -> bool:
        asked.append(str(err))
        return len(asked) == 1

    with spendgate.budget(usd=0.000001, on_exceed=ask):
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10)
        with pytest.raises(spendgate.BudgetExceeded):
            c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10)
    assert len(asked) == 2 and len(provider.calls) == 1


def test_anthropic_refusals_are_not_retried_or_wrapped(provider: Provider) -> None:
    a = ant(provider)  # max_retries=2: a refusal must still be raised once, as itself
    with spendgate.budget(usd=0.000001), pytest.raises(spendgate.BudgetExceeded) as err:
        a.messages.create(model="claude-opus-4-8", max_tokens=100, messages=MSG)  # type: ignore[arg-type]
    assert isinstance(err.value, anthropic.AnthropicError) and provider.calls == []


def test_tags_attribute_spend_and_report_asserts_it(provider: Provider) -> None:
    c = oai(provider)
    with spendgate.tags(feature="search", user="alice"):
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10)
    with spendgate.tags(feature="support", user="bob"):
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1000)
    rep = spendgate.report(group_by=["feature", "user"], since="1h")
    small, big = worst(max_tokens=10), worst(max_tokens=1000)
    assert rep.usd(feature="search") == Decimal(small) / 10**9
    rep.assert_under(usd=0.05, feature="search").assert_under(usd=Decimal(small + big) / 10**9)
    with pytest.raises(AssertionError, match="feature=support"):
        rep.assert_under(usd=Decimal(big - 1) / 10**9, feature="support")
    with pytest.raises(ValueError, match="model"):
        rep.usd(model="gpt-4o")


def test_estimate_makes_no_call(provider: Provider) -> None:
    est = spendgate.estimate("claude-sonnet-4-5", MSG, max_tokens=500)
    assert est.provider == "anthropic" and est.output_tokens == 500 and est.cost_nanos > 0
    assert spendgate.estimate("gpt-4o", MSG, max_tokens=5).provider == "openai"
    assert provider.calls == []


def test_budget_arguments_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match="usd"):
        spendgate.budget(usd="$1")
    with pytest.raises(ConfigError, match="on_exceed"):
        spendgate.budget(usd=1, on_exceed="nag")
    with pytest.raises(ConfigError, match="downgrade"):
        spendgate.budget(usd=1, on_exceed="downgrade")


def test_public_surface_is_deliberate() -> None:
    assert spendgate.__all__ == sorted(spendgate.__all__)
    assert all(hasattr(spendgate, n) for n in spendgate.__all__)


def test_sdk_and_a_running_proxy_share_one_bucket(provider: Provider, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    w = worst()
    policy = tmp_path / "p.toml"
    policy.write_text(f'[[budget]]\nname = "team-day"\nusd = "{Decimal(w * 3 + w // 2) / 10**9}"\n'
                      'window = "day"\nper = "team"\n')
    spendgate.configure(store=url, policy=policy)
    upstream = Servers(default_policy(), "memory://")
    # the proxy's provider bills full worst cases too, so every call counts exactly w
    upstream.mock.bill_input = lambda body: _runtime.engine().estimator.shape(
        "openai", "/v1/chat/completions", body).input_tokens
    upstream.mock.completion_tokens = 1000
    proc, port = start_serve(tmp_path, upstream.upstream_port, "--store", url, "--config", str(policy))
    try:
        c = oai(provider)
        with spendgate.tags(team="ml"):
            for _ in range(2):
                c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]

        def via_proxy() -> int:
            body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": MSG}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json", "Authorization": "Bearer sk",
                                                  "X-Spendgate-Tags": "team=ml"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert via_proxy() == 200, "the third worst case still fits the shared bucket"
        assert via_proxy() == 402, "the proxy sees what the SDK spent"
        with spendgate.tags(team="ml"), pytest.raises(spendgate.BudgetExceeded):
            c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        upstream.close()


def test_a_per_entry_budget_leaves_no_bucket_behind(provider: Provider, tmp_path: Path) -> None:
    spendgate.configure(store=f"sqlite:///{tmp_path / 'sdk.db'}", policy=parse({}))
    c = oai(provider)

    @spendgate.budget(usd=1)
    def call() -> None:
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10)  # type: ignore[arg-type]

    for _ in range(5):
        call()
    store = _runtime.engine().ledger
    assert store.known_buckets() == [], "five calls, five budgets, nothing left in the store"
    assert len(store.events(0)) == 5, "the spend itself is still in the log"
