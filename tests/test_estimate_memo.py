"""What the estimate remembers between requests gives what working it out again would.

A model's resolution is remembered per provider, table, day and ``unpriced`` policy; a price
variant is one object per price, context and day; short texts' token counts and each model's
encoding are remembered; the cache-control walk checks dicts and lists by type first. Each is
checked against the answer it stands for, including after a table reload and at a new day.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.estimate import Estimator
from spendgate.estimate.anthropic import _cache_ttl
from spendgate.estimate.tokens import TokenCounter, counter, encoding
from spendgate.pricing import table as price_table
from spendgate.pricing.table import ModelPrice, PriceTable, Rate


def test_a_resolution_is_remembered_for_the_same_table_and_asked_again_of_a_reloaded_one() -> None:
    bundled = PriceTable.bundled()
    est = Estimator(bundled)
    first = est.resolve("gpt-4o-mini", "openai")
    assert est.resolve("gpt-4o-mini", "openai") is first
    assert first.price.input.base == Decimal("0.15")
    # a reloaded table (an import that reprices the model) is a new object: asked again
    est.prices = PriceTable(bundled.source, bundled.built, bundled.entries,
                            {"gpt-4o-mini": ModelPrice("openai", "gpt-4o-mini", Rate(Decimal("1.00")),
                                                       Rate(Decimal("2.00")), source="a test import")},
                            bundled.owners, bundled.units)
    again = est.resolve("gpt-4o-mini", "openai")
    assert again.how == "imported"
    assert again.price.input.base == Decimal("1.00")
    priced = est.estimate("openai", "/v1/chat/completions", {
        "model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert priced.input_tokens == 8  # 3 per message, "user", "hi", 3 to prime the reply
    assert priced.cost_nanos == 8 * 1_000 + 10 * 2_000  # $1/Mtok in, $2/Mtok out


def test_a_resolution_is_asked_again_on_a_new_day(monkeypatch: pytest.MonkeyPatch) -> None:
    est = Estimator(PriceTable.bundled())
    asked: list[str] = []
    real = est.prices.resolve

    def spy(model: str, provider: str | None = None, today: dt.date | None = None) -> Any:
        asked.append(model)
        return real(model, provider, today)

    monkeypatch.setattr(est.prices, "resolve", spy)
    est.resolve("claude-haiku-4-5", "anthropic")
    est.resolve("claude-haiku-4-5", "anthropic")
    assert asked == ["claude-haiku-4-5"]
    monkeypatch.setattr(price_table, "_today", lambda: dt.date.today() + dt.timedelta(days=1))
    est.resolve("claude-haiku-4-5", "anthropic")
    assert asked == ["claude-haiku-4-5"] * 2
    est.unpriced = "block"  # another policy: asked again
    est.resolve("claude-haiku-4-5", "anthropic")
    assert asked == ["claude-haiku-4-5"] * 3


def test_a_variant_is_one_object_per_price_context_and_day() -> None:
    price = PriceTable.bundled().resolve("gpt-4o-mini", "openai")
    assert price is not None
    std = price.price
    priority = std.at_variant({"service_tier": "priority"}, "2026-12-03")
    assert priority is not std and priority.variant == "service_tier=priority"
    assert priority.input.base > std.input.base
    assert std.at_variant({"service_tier": "priority"}, "2026-12-03") is priority
    assert std.at_variant({"service_tier": "default"}) is std
    assert std.at_variant(MappingProxyType({"service_tier": "priority"}), "2026-12-03") is priority
    # another day may have other variants in force: worked out again, to the same rates today
    later = std.at_variant({"service_tier": "priority"}, "2026-12-04")
    assert later is not priority and later == priority


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=15))
def test_short_texts_count_as_the_encoder_does(text: str) -> None:
    tc = counter("o200k_base")
    expected = len(encoding("o200k_base").encode_ordinary(text))
    assert tc.count(text) == expected
    assert tc.count(text) == expected  # remembered


def test_the_short_count_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from spendgate.estimate import tokens

    monkeypatch.setattr(tokens, "_SHORT_ENTRIES", 3)
    tc = TokenCounter("o200k_base")
    assert [tc.count(w) for w in ("a", "bb", "cat", "dog", "hello there")] == [1, 1, 1, 1, 2]
    assert len(tc._short) == 3


def _reference_cache_ttl(node: Any) -> str | None:
    """The walk as it was: every Mapping and list by the ABC."""
    found: str | None = None
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, Mapping):
            cc = cur.get("cache_control")
            if isinstance(cc, Mapping):
                if cc.get("ttl") == "1h":
                    return "1h"
                found = "5m"
            stack.extend(v for v in cur.values() if isinstance(v, list | Mapping))
        elif isinstance(cur, list):
            stack.extend(v for v in cur if isinstance(v, list | Mapping))
    return found


leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=3), st.sampled_from(["1h", "5m"]))
cache_marks = st.fixed_dictionaries({"type": st.just("ephemeral")}, optional={"ttl": st.sampled_from(["1h", "5m", 3])})
bodies = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["type", "text", "content", "messages", "system", "tools", "x"]), inner,
                        max_size=4),
        st.fixed_dictionaries({"cache_control": st.one_of(cache_marks, leaves)}, optional={"content": inner}),
        st.builds(lambda d: MappingProxyType(d), st.dictionaries(st.sampled_from(["content", "cache_control"]),
                                                                 st.one_of(inner, cache_marks), max_size=2)),
    ),
    max_leaves=25,
)


@settings(max_examples=1500, deadline=None)
@given(bodies)
def test_the_cache_control_walk_finds_what_the_abc_walk_did(body: Any) -> None:
    assert _cache_ttl(body) == _reference_cache_ttl(body)
