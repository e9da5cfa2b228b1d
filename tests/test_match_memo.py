"""Which rules a request falls under is remembered per (model, provider, tier) — only while no rule
matches on tags, and afresh for each policy: the answers must be the ones worked out each time."""

from __future__ import annotations

from spendgate import ledger
from spendgate.engine import Engine
from spendgate.policy import parse
from spendgate.request import Identity, Request

T0 = 1_800_000_000.0


def _held(engine: Engine) -> dict[str, int]:
    store = engine.ledger
    return {s.key.split("|")[0]: s.held for s in store.states(store.known_buckets(), now=T0)}


def counted(engine: Engine, model: str, **tags: str) -> set[str]:
    """The rules whose buckets one decision of ``model`` holds on."""
    before = _held(engine)
    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    assert engine.decide(Request("openai", "/v1/chat/completions", body, Identity(tags=tags)), now=T0).allowed
    return {rule for rule, held in _held(engine).items() if held > before.get(rule, 0)}


def test_rules_follow_the_model_each_time_and_a_new_policy_is_weighed_afresh() -> None:
    doc = {"defaults": False, "budget": [
        {"name": "mini-day", "usd": 5, "window": "day", "match": {"model": ["gpt-4o-mini*"]}},
        {"name": "all-day", "usd": 5, "window": "day"}]}
    engine = Engine(parse(doc), ledger.open("memory://"))
    for _ in range(2):  # the second time from the memo
        assert counted(engine, "gpt-4o-mini") == {"mini-day", "all-day"}
        assert counted(engine, "gpt-4o") == {"all-day"}
    doc["budget"][0]["match"] = {"model": ["gpt-4o"]}  # a reload moves the rule to gpt-4o
    engine.set_policy(parse(doc))
    assert counted(engine, "gpt-4o") == {"mini-day", "all-day"}
    assert counted(engine, "gpt-4o-mini") == {"all-day"}


def test_a_rule_matching_on_tags_is_weighed_for_each_request() -> None:
    doc = {"defaults": False, "budget": [
        {"name": "prod-day", "usd": 5, "window": "day", "match": {"tags": {"env": "prod"}}},
        {"name": "all-day", "usd": 5, "window": "day"}]}
    engine = Engine(parse(doc), ledger.open("memory://"))
    for _ in range(2):
        assert counted(engine, "gpt-4o", env="dev") == {"all-day"}
        assert counted(engine, "gpt-4o", env="prod") == {"prod-day", "all-day"}
