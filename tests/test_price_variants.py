"""Issue 9: every dollar the provider bills — service tiers, fast mode, cache writes, tool fees,
audio, embeddings — held before send and captured from the response, to the nano-dollar."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendgate.pricing import PriceTable

pytestmark = pytest.mark.usefixtures("no_network")

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
