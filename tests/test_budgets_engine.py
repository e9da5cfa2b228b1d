"""Budgets as data in the engine — request counts, shadow rules, per-scope limits, pauses, capabilities,
a key's own budget and models — against every backend, concurrency included."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from spendgate import ledger
from spendgate.buckets import Limit
from spendgate.engine import Approval, Engine
from spendgate.errors import ConfigError
from spendgate.money import usd_to_nanos
from spendgate.policy import parse
from spendgate.policy.runtime import Pause
from spendgate.pricing.cost import Usage
from spendgate.request import Identity, Request
from tests.conftest import race

T0 = 1_800_000_000.0
CHAT = "/v1/chat/completions"


@pytest.fixture
def make(backend_url: str) -> Iterator[Any]:
    opened = []

    def build(doc: dict[str, Any]) -> Engine:
        store = ledger.open(backend_url)
        opened.append(store)
        return Engine(parse(doc), store)

    yield build
    for s in opened:
        s.close()


def chat(model: str = "gpt-4o-mini", max_tokens: int = 100, **ident: Any) -> Request:
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello"}]}
    return Request("openai", CHAT, body, Identity(**ident))


def test_requests_per_minute_admit_exactly_the_limit_under_a_race(make: Any) -> None:
    e = make({"budget": [{"name": "rpm", "requests": 10, "window": "1m", "per": "user"}]})
    results = race(30, lambda: e.decide(chat(user="alice"), now=T0))
    assert sum(d.allowed for d in results) == 10
    refused = next(d for d in results if not d.allowed)
    assert refused.trip.unit == "requests" and refused.trip.limit == 10 and refused.trip.used == 10
    assert "10 of the 10 requests" in refused.message
    body = refused.to_dict()
    assert body["limit_requests"] == 10 and body["used_requests"] == 10
    # a capture keeps the count (a request is one request whatever it cost) and bob has his own 10
    for d in results:
        if d.allowed:
            e.capture(d, Usage(input=5, output=5), now=T0)
    assert not e.decide(chat(user="alice"), now=T0 + 1).allowed
    assert e.decide(chat(user="bob"), now=T0 + 1).allowed
    # the window moves on: a minute (plus the slot it counts in) later alice may send again
    assert e.decide(chat(user="alice"), now=T0 + 62).allowed


def test_a_request_count_is_not_remedied_by_a_cheaper_model(make: Any) -> None:
    e = make({"budget": [{"name": "rpm", "requests": 1, "window": "1m", "action": "downgrade",
                          "downgrade": {"gpt-4o": "gpt-4o-mini"}}]})
    assert e.decide(chat("gpt-4o"), now=T0).allowed
    d = e.decide(chat("gpt-4o"), now=T0)
    assert not d.allowed and d.action == "block" and "model" not in d.edits


def test_64_first_requests_of_a_new_user_admit_exactly_what_fits(make: Any) -> None:
    """A default per-user rule and a user nobody has seen: the bucket is created by the first
    authorize of many racing ones, and exactly the requests that fit pass (litellm#40095)."""
    e = make({"budget": [{"name": "user-day", "usd": 1, "window": "day", "per": "user"}]})
    req = chat("gpt-4o", max_tokens=2000, user="newcomer")  # worst case $0.0200325 each
    probe = e.decide(replace(req, dry=True), now=T0)
    e.release(probe, now=T0)  # a dry run's hold is released, as the doors do
    each = probe.estimate.cost_nanos
    results = race(64, lambda: e.decide(req, now=T0))
    fits = usd_to_nanos(1) // each
    assert sum(d.allowed for d in results) == fits
    states = e.ledger.states([b.bucket() for b in e.buckets_for(e.policy.rules[0], "user=newcomer", T0)], now=T0)
    assert states[0].held == fits * each <= usd_to_nanos(1)


def test_shadow_rules_refuse_nothing_and_record_what_they_would_have(make: Any) -> None:
    e = make({"mode": "shadow", "budget": [
        {"name": "per-call", "usd": 0.001, "window": "request"},
        {"name": "user-day", "usd": 0.01, "window": "day", "per": "user"}]})
    decisions = [e.decide(chat("gpt-4o", max_tokens=500, user="alice"), now=T0 + i) for i in range(4)]
    assert all(d.allowed for d in decisions)
    would = [ev for ev in e.ledger.events(T0 - 1) if ev.kind == "would_refuse"]
    # every request breaks the per-call limit; user-day ($0.01) is broken from the 2nd ($0.00501… each)
    assert sorted((ev.rule, ev.decision_id) for ev in would) == sorted(
        [("per-call", d.id) for d in decisions] + [("user-day", d.id) for d in decisions[1:]])
    day = next(ev for ev in would if ev.rule == "user-day" and ev.decision_id == decisions[1].id)
    each = decisions[0].estimate.cost_nanos
    assert day.amounts == {"estimate_usd": each, "limit_usd": usd_to_nanos(Decimal("0.01")), "used_usd": each,
                           "request_usd": each}
    assert decisions[1].would_refuse == ("per-call", "user-day")
    # report counts each request a shadow rule would have refused once, beside what was spent
    from spendgate.report import report

    [row] = report(e.ledger, ["user"], since=T0 - 10, now=T0 + 10)
    assert (row.group, row.would_refuse, row.refused) == (("alice",), 4, 0)
    assert any('shadow: budget "user-day" would have refused' in n for n in decisions[1].notes)


def test_a_rule_in_shadow_beside_enforced_ones(make: Any) -> None:
    e = make({"budget": [{"name": "new", "usd": 0.001, "window": "request", "mode": "shadow"},
                         {"name": "old", "usd": 0.002, "window": "request"}]})
    small = chat("gpt-4o", max_tokens=50)  # ~$0.0005: under both
    mid = chat("gpt-4o", max_tokens=150)  # ~$0.0015: over new only
    big = chat("gpt-4o", max_tokens=500)  # over both: old refuses
    assert e.decide(small, now=T0).would_refuse == ()
    d = e.decide(mid, now=T0)
    assert d.allowed and d.would_refuse == ("new",)
    d = e.decide(big, now=T0)
    assert not d.allowed and d.trip.rule.name == "old"


def test_a_dry_run_records_no_would_refuse(make: Any) -> None:
    e = make({"mode": "shadow", "budget": [{"name": "per-call", "usd": 0.001, "window": "request"}]})
    d = e.decide(replace(chat("gpt-4o", max_tokens=500), dry=True), now=T0)
    assert d.allowed and d.would_refuse == ("per-call",)
    assert [ev for ev in e.ledger.events(T0 - 1) if ev.kind == "would_refuse"] == []


def test_a_scope_limit_changes_one_user_and_never_the_spend(make: Any) -> None:
    e = make({"budget": [{"name": "user-day", "usd": 0.01, "window": "day", "per": "user"}]})
    req = {u: chat("gpt-4o", max_tokens=200, user=u) for u in ("alice", "bob")}
    probe = e.decide(replace(req["alice"], dry=True), now=T0)
    e.release(probe, now=T0)
    each = probe.estimate.cost_nanos  # $0.0020…
    for u in ("alice", "bob"):
        for _ in range(3):
            e.capture(e.decide(req[u], now=T0), None, now=T0)  # charged at the hold: exact
    rule = e.policy.rules[0]

    def spent(user: str) -> int:
        [rb] = e.buckets_for(rule, f"user={user}", T0)
        return e.ledger.states([rb.bucket()], now=T0)[0].spent

    assert spent("alice") == spent("bob") == 3 * each
    # lowering alice's limit below what she spent refuses her next request; bob keeps the rule's $0.01
    e.set_overrides({("user-day", "user=alice"): Limit(usd=usd_to_nanos(Decimal("0.005")))}, ())
    d = e.decide(req["alice"], now=T0)
    assert not d.allowed and d.trip.limit == usd_to_nanos(Decimal("0.005")) and d.trip.used == 3 * each
    assert e.decide(req["bob"], now=T0).allowed
    # raising it keeps the spend: alice now has $1 - 3 requests of room
    e.set_overrides({("user-day", "user=alice"): Limit(usd=usd_to_nanos(1))}, ())
    d = e.decide(req["alice"], now=T0)
    assert d.allowed and spent("alice") == 3 * each
    assert d.tightest.remaining == usd_to_nanos(1) - 4 * each


def test_a_pause_refuses_its_scope_before_pricing_and_no_approval_lifts_it(make: Any) -> None:
    e = make({"budget": [{"name": "big", "usd": 1000, "window": "day"}]})
    key = "0123456789abcdef"
    e.set_overrides({}, (Pause(f"key={key[:8]}", "ops@host", T0 - 60, "incident 42"),))
    d = e.decide(chat(key=key), now=T0, approval=Approval(by="operator"))
    assert not d.allowed and d.action == "block" and d.refused_by == "pause" and d.estimate is None
    assert "paused by ops@host" in d.message and "incident 42" in d.message
    assert d.to_dict()["rule"] == "pause"
    assert e.decide(chat(key="fedcba9876543210"), now=T0).allowed
    refusals = [ev for ev in e.ledger.events(T0 - 1) if ev.kind == "block"]
    assert [(ev.rule, ev.decision_id) for ev in refusals] == [("pause", d.id)]
    # one model, by glob; then everything; then resumed
    e.set_overrides({}, (Pause("model=gpt-4o*", "ops", T0),))
    assert not e.decide(chat("gpt-4o-mini"), now=T0).allowed
    assert e.decide(chat("gpt-5-mini"), now=T0).allowed
    e.set_overrides({}, (Pause("global", "ops", T0),))
    assert not e.decide(chat("gpt-5-mini", user="x"), now=T0).allowed
    e.set_overrides({}, ())
    assert e.decide(chat("gpt-5-mini", user="x"), now=T0).allowed


def test_a_capability_below_the_rules_is_refused_before_pricing(make: Any) -> None:
    e = make({"budget": [{"name": "payments", "usd": 100, "window": "day", "match": {"model": "gpt-4o*"},
                          "requires_capability": "payment_initiate"}]})
    low = e.decide(chat("gpt-4o", capability="data_write"), now=T0)
    assert not low.allowed and low.refused_by == "payments" and low.estimate is None
    assert "requires capability payment_initiate" in low.message and "carries data_write" in low.message
    assert not e.decide(chat("gpt-4o"), now=T0).allowed  # none ranks below every capability
    assert e.decide(chat("gpt-4o", capability="payment_initiate"), now=T0).allowed
    assert e.decide(chat("gpt-4o", capability="payment_execute"), now=T0).allowed
    assert e.decide(chat("gpt-5-mini", capability="read_only"), now=T0).allowed  # the rule does not match it


def test_a_keys_own_budget_and_models(make: Any) -> None:
    e = make({"budget": [{"name": "team-month", "usd": 100, "window": "month", "per": "team",
                          "action": "downgrade", "downgrade": {"gpt-4o": "gpt-4o-mini"}}]})
    own = parse({"budget": [{"name": "key:k1", "usd": 0.005, "window": "total", "immutable": True}]}).rules[0]
    ident = {"key": "k1-vk", "team": "ml", "rules": (own,), "models": ("gpt-4o*",)}
    req = chat("gpt-4o", max_tokens=200, **ident)
    first = e.decide(req, now=T0)
    e.capture(first, None, now=T0)
    second = e.decide(req, now=T0)
    e.capture(second, None, now=T0)
    third = e.decide(req, now=T0, approval=Approval(by="operator"))  # immutable: no approval lifts it
    assert first.allowed and second.allowed and not third.allowed
    assert third.trip.rule.name == "key:k1" and third.trip.used == 2 * first.estimate.cost_nanos
    refused = e.decide(chat("claude-sonnet-4-5", **ident), now=T0)
    assert not refused.allowed and refused.refused_by == "key-models" and "gpt-4o*" in refused.message


def test_a_downgrade_never_lands_on_a_model_the_key_disallows(make: Any) -> None:
    e = make({"budget": [{"name": "tight", "usd": 0.001, "window": "request", "action": "downgrade",
                          "downgrade": {"gpt-4o": "gpt-4o-mini"}}]})
    d = e.decide(chat("gpt-4o", max_tokens=500), now=T0)
    assert d.allowed and d.edits == {"model": "gpt-4o-mini"}
    d = e.decide(chat("gpt-4o", max_tokens=500, models=("gpt-4o",)), now=T0)
    assert not d.allowed and d.edits == {}
    assert any("no cheaper model" in n for n in d.notes)


def test_policy_version_is_recorded_with_every_decision(make: Any) -> None:
    e = make({"version": "2026-12-03.1", "budget": [{"name": "b", "usd": 0.0001, "window": "request"}]})
    d = e.decide(chat("gpt-4o", max_tokens=500), now=T0)
    assert not d.allowed
    [ev] = [ev for ev in e.ledger.events(T0 - 1) if ev.kind == "block"]
    assert ev.dims["policy_version"] == "2026-12-03.1"


def test_set_policy_swaps_the_rules_and_the_hash(make: Any) -> None:
    e = make({"budget": [{"name": "a", "usd": 1, "window": "request"}]})
    before = e.policy_hash
    e.set_policy(parse({"budget": [{"name": "a", "usd": 0.0001, "window": "request"}]}))
    assert e.policy_hash != before
    assert not e.decide(chat("gpt-4o", max_tokens=500), now=T0).allowed


@pytest.mark.parametrize(("rule", "message"), [
    ({"name": "r", "requests": 5, "window": "request"}, 'budget[0] "r".requests: counts requests in a window'),
    ({"name": "r", "requests": -1, "window": "1m"}, 'budget[0] "r".requests: expected a whole number'),
    ({"name": "r", "usd": 1, "window": "day", "mode": "dry"}, 'budget[0] "r".mode: expected one of enforce, shadow'),
    ({"name": "r", "usd": 1, "window": "day", "requires_capability": "admin"},
     'budget[0] "r".requires_capability: expected one of read_only, data_write, payment_initiate, payment_execute'),
    ({"name": "a|b", "usd": 1, "window": "day"}, "budget[0].name: a budget name cannot contain"),
    ({"name": "r", "window": "day"}, 'budget[0] "r": a budget needs `usd`, `tokens` and/or `requests`'),
])
def test_rule_fields_are_validated_naming_the_field(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"budget": [rule]})
    assert str(err.value).startswith(message)


def test_policy_rollout_fields() -> None:
    import datetime as dt

    p = parse({"mode": "shadow", "version": 7, "trust_client_capability": True,
               "effective_from": dt.datetime(2026, 12, 4, 9, tzinfo=dt.UTC), "budget": []})
    assert (p.mode, p.version, p.trust_client_capability) == ("shadow", "7", True)
    assert p.effective_from == dt.datetime(2026, 12, 4, 9, tzinfo=dt.UTC).timestamp()
    with pytest.raises(ConfigError, match="effective_from: expected a date-time with an offset"):
        parse({"effective_from": dt.datetime(2026, 12, 4, 9)})
    with pytest.raises(ConfigError, match=r"^mode: expected one of enforce, shadow"):
        parse({"mode": "audit"})


def test_an_approved_request_leaves_the_buckets_limit_as_the_rule_says(make: Any) -> None:
    """An approval lets one request past a rule, so its hold is placed without that rule's limit;
    the bucket must still show the rule's limit afterwards (status, /me, the dashboard read it)."""
    e = make({"budget": [{"name": "user-day", "usd": 0.01, "window": "day", "per": "user", "action": "hold"}]})
    req = chat("gpt-4o", max_tokens=400, user="alice")  # ~$0.004 each
    for _ in range(2):
        e.capture(e.decide(req, now=T0), None, now=T0)
    assert e.decide(req, now=T0).action == "hold"
    d = e.decide(req, now=T0, approval=Approval(by="operator"))
    assert d.allowed
    [rb] = e.buckets_for(e.policy.rules[0], "user=alice", T0)
    [state] = e.ledger.states([rb.bucket()], now=T0)
    assert state.limit == usd_to_nanos(Decimal("0.01"))
    stored = {b.key: b for b in e.ledger.known_buckets()}
    assert stored[rb.key].limit == usd_to_nanos(Decimal("0.01"))


def test_a_remedy_is_kept_in_the_store_like_a_refusal(make: Any) -> None:
    """A downgraded request is a decision another process can see (spendgate tail, the decision
    list), with what was changed; a plain allow is kept only as its charge."""
    e = make({"budget": [{"name": "tight", "usd": 0.001, "window": "request", "action": "downgrade",
                          "downgrade": {"gpt-4o": "gpt-4o-mini"}}]})
    plain = e.decide(chat("gpt-4o-mini", max_tokens=100), now=T0)
    cheaper = e.decide(chat("gpt-4o", max_tokens=500), now=T0)
    assert plain.action == "allow" and cheaper.action == "downgrade"
    [ev] = e.ledger.events(T0 - 1)
    assert (ev.kind, ev.decision_id, ev.rule, ev.dims["edits"]) == ("downgrade", cheaper.id, "tight",
                                                                    "model=gpt-4o-mini")


def test_a_client_tag_named_global_never_opens_a_fresh_global_bucket(make: Any) -> None:
    """``per = "global"`` is one bucket for every request: a tag a client names ``global`` (as a
    key's own budget is a global rule) must not count it under a bucket of its own choosing."""
    e = make({"budget": [{"name": "all", "requests": 1, "window": "day"}]})
    own = parse({"budget": [{"name": "key:k1", "requests": 1, "window": "day", "immutable": True}]}).rules[0]
    assert e.decide(chat(rules=(own,)), now=T0).allowed
    for i in range(3):
        d = e.decide(chat(rules=(own,), tags={"global": f"x{i}"}), now=T0)
        assert not d.allowed and d.trip.rule.name in ("all", "key:k1")


def test_a_downgrade_never_lands_on_a_paused_model_or_one_needing_a_capability(make: Any) -> None:
    doc = {"budget": [{"name": "tight", "usd": 0.001, "window": "request", "action": "downgrade",
                       "downgrade": {"gpt-4o": "gpt-4o-mini"}}]}
    e = make(doc)
    e.set_overrides({}, (Pause("model=gpt-4o-mini", "ops", T0),))
    d = e.decide(chat("gpt-4o", max_tokens=500), now=T0)
    assert not d.allowed and d.edits == {} and any("gpt-4o-mini" in n for n in d.notes)
    gated = make({"budget": [*doc["budget"], {"name": "mini-pay", "usd": 100, "window": "day",
                                               "match": {"model": "gpt-4o-mini"},
                                               "requires_capability": "payment_initiate"}]})
    d = gated.decide(chat("gpt-4o", max_tokens=500, capability="read_only"), now=T0)
    assert not d.allowed and d.edits == {}
    assert gated.decide(chat("gpt-4o", max_tokens=500, capability="payment_initiate"), now=T0).edits == {
        "model": "gpt-4o-mini"}


def test_a_pause_by_tier_applies_to_the_models_in_it(make: Any) -> None:
    e = make({"tiers": {"frontier": ["gpt-4o"], "small": ["gpt-4o-mini"]},
              "budget": [{"name": "big", "usd": 100, "window": "day"}]})
    e.set_overrides({}, (Pause("tier=frontier", "ops", T0),))
    assert not e.decide(chat("gpt-4o"), now=T0).allowed
    assert not e.decide(chat("gpt-4o", tags={"tier": "small"}), now=T0).allowed  # a tag is no tier
    assert e.decide(chat("gpt-4o-mini"), now=T0).allowed


def test_a_reload_that_changes_unpriced_takes_effect(make: Any) -> None:
    from spendgate.errors import UnpricedModel

    e = make({"budget": [{"name": "big", "usd": 1000, "window": "day"}]})
    assert e.decide(chat("no-such-model-xyz"), now=T0).allowed  # priced as the dearest
    e.set_policy(parse({"unpriced": "block", "budget": [{"name": "big", "usd": 1000, "window": "day"}]}))
    with pytest.raises(UnpricedModel):
        e.decide(chat("no-such-model-xyz"), now=T0)


def test_a_capability_rule_on_the_tool_tier_applies_to_tool_spend(make: Any) -> None:
    from spendgate.request import tool_request

    e = make({"budget": [{"name": "tools", "usd": 100, "window": "day", "match": {"tier": "tool"},
                          "requires_capability": "payment_initiate"}]})
    d = e.decide(tool_request(usd_to_nanos(1), Identity(capability="data_write"), "stripe"), now=T0)
    assert not d.allowed and d.refused_by == "tools"
    assert e.decide(tool_request(usd_to_nanos(1), Identity(capability="payment_execute"), "stripe"), now=T0).allowed
