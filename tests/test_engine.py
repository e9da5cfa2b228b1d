"""The decision: holds, refusals, remedies, precedence, approvals, capture — against every backend."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from spendgate import ledger
from spendgate.engine import Approval, Engine
from spendgate.errors import StoreError
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.pricing.cost import Usage
from spendgate.request import Identity, Request
from tests.conftest import race

T0 = 1_800_000_000.0
CHAT = "/v1/chat/completions"


@pytest.fixture
def make(backend_url: str) -> Iterator[Any]:
    opened = []

    def build(doc: dict | None = None) -> Engine:
        store = ledger.open(backend_url)
        opened.append(store)
        return Engine(parse(doc) if doc is not None else default_policy(), store)

    yield build
    for s in opened:
        s.close()


def chat(model: str = "gpt-4o-mini", max_tokens: int | None = 100, text: str = "hello", **ident: Any) -> Request:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return Request("openai", CHAT, body, Identity(**ident))


def opus(max_tokens: int = 20_000, session: str = "s1") -> Request:
    return Request("anthropic", "/v1/messages", {"model": "claude-opus-4-8", "max_tokens": max_tokens,
                                                 "messages": [{"role": "user", "content": "x" * 2000}]},
                   Identity(session=session))


def run_until_refused(engine: Engine, req: Request, usage: Usage, now: float = T0) -> tuple[int, Any, float]:
    n = 0
    while True:
        d = engine.decide(req, now=now)
        if not d.allowed:
            return n, d, now
        engine.capture(d, usage, now=now)
        n += 1
        now += 5


def test_session_hour_holds_a_runaway_session(make: Any) -> None:
    e = make()
    usage = Usage(input=600, output=15_000)  # $0.378 each on claude-opus-4-8
    n, d, _ = run_until_refused(e, opus(), usage)
    spent = n * usd_to_nanos(Decimal("0.378"))
    assert spent <= usd_to_nanos(10), "never overspent"
    assert d.action == "hold" and d.trip.rule.name == "session-hour"
    body = d.to_dict()
    assert body["rule"] == "session-hour" and body["scope"] == "session=s1" and body["window"] == "1h"
    assert Decimal(body["limit_usd"]) == 10 and Decimal(body["spent_usd"]) == Decimal(spent) / 10**9
    assert body["retryable"] and body["resets_at"] > T0
    assert f"spendgate approve {d.id}" in d.message
    # another session is unaffected
    assert e.decide(opus(session="s2"), now=T0).allowed


def test_requests_without_a_session_are_counted_under_their_key(make: Any) -> None:
    e = make({"budget": [{"name": "sess", "usd": 0.001, "window": "1h", "per": "session", "action": "block"}]})
    a = chat(max_tokens=1000, key="k-alice")
    assert e.decide(a, now=T0).allowed
    assert not e.decide(a, now=T0).allowed, "same key, no session header: same session bucket"
    assert e.decide(chat(max_tokens=1000, key="k-bob"), now=T0).allowed
    d = e.decide(a, now=T0)
    assert d.trip.scope == "session=key:k-alice"


def test_request_soft_holds_and_request_hard_blocks_regardless_of_approval(make: Any) -> None:
    e = make()
    soft = e.decide(opus(max_tokens=500_000), now=T0)  # $12.5 output worst case
    assert soft.action == "hold" and soft.trip.rule.name == "request-soft"
    approved = e.decide(opus(max_tokens=500_000), now=T0, approval=Approval(by="test"))
    assert approved.allowed and approved.applied == ("request-soft", "session-hour")
    hard = Request("openai", "/v1/responses", {"model": "o1-pro", "input": "hi", "max_output_tokens": 100_000},
                   Identity(session="s"))  # $60 worst case
    d = e.decide(hard, now=T0, approval=Approval(max_usd=Decimal(1000), by="test"))
    assert d.action == "block" and d.trip.rule.name == "request-hard" and d.trip.rule.immutable
    assert "immutable" in d.message


def test_approval_with_max_grants_headroom_so_the_session_is_not_asked_again(make: Any) -> None:
    e = make()
    usage = Usage(input=600, output=15_000)
    cost = usd_to_nanos(Decimal("0.378"))
    n, held, now = run_until_refused(e, opus(), usage)
    assert held.action == "hold"
    d = e.decide(opus(), now=now, approval=Approval(max_usd=Decimal(5), by="alice"))
    assert d.allowed
    e.capture(d, usage, now=now)
    extra, again, _ = run_until_refused(e, opus(), usage, now + 5)
    total = (n + 1 + extra) * cost
    assert total <= usd_to_nanos(15), "the grant is $5 of headroom, no more"
    assert total > usd_to_nanos(14), "and the session used it without being asked again"
    assert again.action == "hold"


def test_an_approval_smaller_than_a_per_call_hold_approves_nothing(make: Any) -> None:
    e = make()
    d = e.decide(opus(max_tokens=500_000), now=T0, approval=Approval(max_usd=Decimal(5), by="t"))
    assert d.action == "hold"


def test_downgrade_rewrites_the_model_and_rechecks(make: Any) -> None:
    e = make({"budget": [{"name": "team", "usd": 0.01, "window": "month", "per": "team",
                          "action": "downgrade", "downgrade": ["gpt-4o", "gpt-4o-mini"]}]})
    req = chat("gpt-4o", max_tokens=400, team="ml")  # gpt-4o worst case ~ $0.004
    first = [e.decide(req, now=T0) for _ in range(2)]
    assert all(d.allowed and d.action == "allow" for d in first)
    d = e.decide(req, now=T0)
    assert d.allowed and d.action == "downgrade"
    assert d.edits == {"model": "gpt-4o-mini"} and d.body["model"] == "gpt-4o-mini"
    assert d.estimate.model == "gpt-4o-mini" and d.original.model == "gpt-4o"
    while d.allowed:
        d = e.decide(req, now=T0)
    assert d.action == "block" and "no cheaper model" in " ".join(d.notes)


def test_clamp_shrinks_max_tokens_to_what_fits_or_refuses(make: Any) -> None:
    e = make({"tiers": {"frontier": ["claude-opus-*"], "small": ["*-mini"]},
              "budget": [{"name": "per-call", "usd": 0.5, "window": "request", "match": {"tier": "frontier"},
                          "action": "clamp", "min_output": 256}]})
    d = e.decide(opus(max_tokens=64_000), now=T0)
    assert d.allowed and d.action == "clamp"
    clamped = d.edits["max_tokens"]
    assert d.body["max_tokens"] == clamped and 256 <= clamped < 64_000
    assert d.estimate.cost_nanos <= usd_to_nanos(Decimal("0.5"))
    assert d.estimate.cost_nanos + 25_000 > usd_to_nanos(Decimal("0.5")), "clamped to the largest bound that fits"
    assert e.decide(chat("gpt-4o-mini", max_tokens=64_000), now=T0).action == "allow", "other tiers untouched"
    e2 = make({"budget": [{"name": "tiny", "usd": 0.0001, "window": "request", "action": "clamp",
                           "min_output": 256}]})
    refused = e2.decide(opus(max_tokens=64_000), now=T0)
    assert refused.action == "block" and "fewer than 256" in " ".join(refused.notes)


def test_most_restrictive_outcome_wins(make: Any) -> None:
    e = make({"budget": [
        {"name": "soft", "usd": 0.0001, "window": "request", "action": "hold"},
        {"name": "hard", "usd": 0.0001, "window": "day", "action": "block"},
        {"name": "shadow", "usd": 0.0001, "window": "day", "action": "alert"},
    ]})
    d = e.decide(chat(max_tokens=1000), now=T0)
    assert d.action == "hold", "a per-call hold is decided before windows are held"
    d = e.decide(chat(max_tokens=1000), now=T0, approval=Approval(by="t"))
    assert d.action == "block" and d.trip.rule.name == "hard"


def test_alert_rules_allow_record_and_report(make: Any) -> None:
    e = make({"budget": [{"name": "shadow", "usd": 0.0001, "window": "day", "action": "alert"},
                         {"name": "watch", "usd": 1, "window": "day", "action": "block", "alert_at": [0.5]}]})
    d = e.decide(chat(max_tokens=1000), now=T0)
    assert d.allowed and d.action == "alert" and any("shadow" in a for a in d.alerts)
    big = chat("gpt-4o", max_tokens=60_000)  # $0.60 worst case crosses 50% of $1
    d2 = e.decide(big, now=T0)
    assert any("watch" in a and "50%" in a for a in d2.alerts)


def test_unknown_models_fall_into_the_strict_tier_and_are_priced_dearest(make: Any) -> None:
    e = make({"tiers": {"frontier": ["gpt-5*"], "small": ["*-mini"], "strict": "small"},
              "budget": [{"name": "small-cap", "usd": 0.02, "window": "request", "match": {"tier": "small"},
                          "action": "block"}]})
    d = e.decide(chat("acme/unknown-model", max_tokens=100), now=T0)
    assert d.action == "block" and d.trip.rule.name == "small-cap"
    assert d.estimate.price.how == "dearest" and "acme/unknown-model" in " ".join(d.notes)
    assert d.to_dict()["priced_as"].endswith("(dearest)")


@pytest.mark.parametrize(("usage", "expected_nanos"), [
    # OpenAI chat: prompt_tokens include cached reads, completion_tokens include reasoning
    ({"usage": {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400},
                "completion_tokens_details": {"reasoning_tokens": 50}}},
     600 * 150 + 400 * 75 + 100 * 600),
    # Responses API
    ({"usage": {"input_tokens": 1000, "output_tokens": 100, "input_tokens_details": {"cached_tokens": 400},
                "output_tokens_details": {"reasoning_tokens": 60}}}, 600 * 150 + 400 * 75 + 100 * 600),
    # a bare usage object
    ({"prompt_tokens": 10, "completion_tokens": 10}, 7_500),
])
def test_capture_reads_openai_usage_shapes_at_the_exact_price(make: Any, usage: dict, expected_nanos: int) -> None:
    e = make({"budget": [{"name": "g", "usd": 1, "window": "day"}]})
    d = e.decide(chat(max_tokens=1000), now=T0)
    charge = e.capture(d, usage, now=T0)
    assert charge.cost_nanos == expected_nanos and not charge.estimated and charge.captured
    [st] = e.ledger.states([b for b in e.ledger.known_buckets()], now=T0)
    assert (st.spent, st.held) == (expected_nanos, 0)


def test_capture_reads_anthropic_cache_split_and_gemini_shapes(make: Any) -> None:
    e = make({"budget": [{"name": "g", "usd": 5, "window": "day"}]})
    d = e.decide(opus(max_tokens=1000), now=T0)
    charge = e.capture(d, {"usage": {"input_tokens": 10, "cache_read_input_tokens": 1000,
                                     "cache_creation_input_tokens": 3000, "output_tokens": 200,
                                     "cache_creation": {"ephemeral_5m_input_tokens": 1000,
                                                        "ephemeral_1h_input_tokens": 2000}}}, now=T0)
    # opus 4.8: $5 in, $0.5 read, $6.25 5m write, $10 1h write, $25 out per Mtok
    assert charge.cost_nanos == 10 * 5000 + 1000 * 500 + 1000 * 6250 + 2000 * 10000 + 200 * 25000
    gem = Request("openai", CHAT, {"model": "gemini-2.5-pro", "max_tokens": 100,
                                   "messages": [{"role": "user", "content": "hi"}]}, Identity())
    d2 = e.decide(gem, now=T0)
    c2 = e.capture(d2, {"usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 10,
                                          "thoughtsTokenCount": 5}}, now=T0)
    assert c2.cost_nanos == 100 * 1250 + 15 * 10_000


def test_missing_usage_and_unknown_outcomes_are_never_charged_zero(make: Any) -> None:
    e = make({"budget": [{"name": "g", "usd": 5, "window": "day"}]})
    d = e.decide(chat(max_tokens=1000), now=T0)
    c = e.capture(d, {"id": "x", "choices": []}, now=T0)
    assert c.estimated and c.cost_nanos == d.estimate.cost_nanos > 0
    d2 = e.decide(chat(max_tokens=1000), now=T0)
    c2 = e.charge_unknown(d2, output_seen=20, now=T0)
    assert c2.estimated and c2.cost_nanos == d2.estimate.input_tokens * 150 + 20 * 600
    d3 = e.decide(chat(max_tokens=1000), now=T0)
    assert e.charge_unknown(d3, now=T0).cost_nanos == d3.estimate.cost_nanos
    kinds = [(ev.kind, ev.estimated) for ev in e.ledger.events(0)]
    assert kinds == [("unknown", True)] * 3


def test_release_charges_nothing(make: Any) -> None:
    e = make({"budget": [{"name": "g", "usd": 0.001, "window": "day"}]})
    d = e.decide(chat(max_tokens=1000), now=T0)
    assert not e.decide(chat(max_tokens=1000), now=T0).allowed
    assert e.release(d, now=T0)
    assert e.decide(chat(max_tokens=1000), now=T0).allowed


def test_free_routes_pass_without_a_hold(make: Any) -> None:
    e = make({"budget": [{"name": "g", "usd": 0, "window": "day"}]})
    d = e.decide(Request("anthropic", "/v1/messages/count_tokens", {"model": "claude-opus-4-8", "messages": []}),
                 now=T0)
    assert d.allowed and d.hold_id is None


def test_per_user_rule_counts_each_user_separately(make: Any) -> None:
    e = make({"budget": [{"name": "user-day", "usd": 0.0005, "window": "day", "per": "user"}]})
    assert e.decide(chat(max_tokens=500, user="alice"), now=T0).allowed
    assert not e.decide(chat(max_tokens=500, user="alice"), now=T0).allowed
    assert e.decide(chat(max_tokens=500, user="bob"), now=T0).allowed
    tagged = make({"budget": [{"name": "feat", "usd": 0.0005, "window": "day", "per": "tag:feature",
                               "match": {"tags": {"env": "prod"}}}]})
    prod = {"feature": "search", "env": "prod"}
    assert tagged.decide(chat(max_tokens=500, tags=prod), now=T0).allowed
    assert not tagged.decide(chat(max_tokens=500, tags=prod), now=T0).allowed
    assert tagged.decide(chat(max_tokens=500, tags={"feature": "search", "env": "dev"}), now=T0).allowed


@pytest.mark.parametrize("n_fit", [3, 10])
def test_64_threads_through_the_engine_admit_exactly_n(make: Any, n_fit: int) -> None:
    e = make({"budget": [{"name": "g", "usd": 1, "window": "day"}]})
    worst = e.decide(chat(max_tokens=1000), now=T0)
    e.release(worst, now=T0)
    cost = worst.estimate.cost_nanos
    e2 = make({"budget": [{"name": "g2", "usd": str(Decimal(cost * n_fit + cost // 2) / 10**9), "window": "day"}]})
    results = race(64, lambda: e2.decide(chat(max_tokens=1000), now=T0).allowed)
    assert results.count(True) == n_fit


@pytest.mark.parametrize("mode", ["block", "allow"])
def test_store_failure_fails_closed_by_default_and_says_which(mode: str) -> None:
    from spendgate.ledger.memory import MemoryLedger

    class Failing(MemoryLedger):
        def authorize(self, *a: Any, **k: Any) -> Any:
            raise StoreError("SQLite store /x.db: disk I/O error")

    e = Engine(parse({"on_store_error": mode, "budget": [{"name": "g", "usd": 1, "window": "day"}]}), Failing())
    if mode == "block":
        with pytest.raises(StoreError, match=r'disk I/O error.*on_store_error = "block"'):
            e.decide(chat(), now=T0)
    else:
        d = e.decide(chat(), now=T0)
        assert d.allowed and d.hold_id is None and "on_store_error" in " ".join(d.notes)


def test_asyncio_redis_client_admits_exactly_n_of_64_tasks(redis_server: Any) -> None:
    """The engine's async path over redis-py's asyncio client: same script, same buckets."""
    import asyncio
    import uuid

    from spendgate.ledger.redis import AsyncRedisLedger

    url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}"
    probe = Engine(default_policy(), ledger.open("memory://"))
    worst = probe.decide(chat(max_tokens=1000), now=T0).estimate.cost_nanos  # type: ignore[union-attr]
    n_fit = 7
    policy = parse({"budget": [{"name": "g", "usd": str(Decimal(worst * n_fit + worst // 2) / 10**9),
                                "window": "day"}]})
    sync_store = ledger.open(url)

    async def go() -> tuple[int, bool]:
        aledger = AsyncRedisLedger(url)
        engine = Engine(policy, sync_store, aledger=aledger)
        decisions = await asyncio.gather(*(engine.adecide(chat(max_tokens=1000), now=T0) for _ in range(64)))
        admitted = [d for d in decisions if d.allowed]
        charge = await engine.acapture(admitted[0], {"prompt_tokens": 10, "completion_tokens": 10}, now=T0)
        released = await engine.arelease(admitted[1], now=T0)
        await aledger.close()
        return len(admitted), charge.captured and released

    admitted, settled = asyncio.run(go())
    assert admitted == n_fit and settled
    [state] = sync_store.states(sync_store.known_buckets(), now=T0)
    assert state.held == worst * (n_fit - 2) and state.spent == 10 * 150 + 10 * 600
    sync_store.close()


def test_a_long_answer_keeps_its_hold_while_it_can_still_be_generating(make: Any) -> None:
    e = make({"hold_ttl": "10m", "budget": [{"name": "g", "usd": 100, "window": "day"}]})
    long = e.decide(opus(max_tokens=64_000), now=T0)  # 64K tokens at 20/s: 3,200 s
    short = e.decide(chat(max_tokens=100), now=T0)
    assert [x.hold_id for x in e.ledger.expire(T0 + 601)] == [short.hold_id], "the short one: at its TTL"
    assert e.ledger.expire(T0 + 3_199) == []
    assert [x.hold_id for x in e.ledger.expire(T0 + 3_201)] == [long.hold_id]
