"""Prices: exact money, strict model resolution, tiers, imports; nothing is ever free."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate.errors import ConfigError, UnpricedModel
from spendgate.estimate import Estimator
from spendgate.money import NANOS_PER_USD, fmt_usd, nanos_to_usd, token_cost_nanos, usd_to_nanos
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import Usage, usage_nanos, worst_case_nanos
from spendgate.pricing.litellm import import_file

# every test of counting and pricing runs with sockets blocked
pytestmark = pytest.mark.usefixtures("no_network")

TABLE = PriceTable.bundled()


def price(model: str, provider: str | None = None):  # type: ignore[no-untyped-def]
    res = TABLE.resolve(model, provider)
    assert res is not None, model
    return res


def test_gpt_4o_mini_ten_in_ten_out_is_charged_its_exact_price() -> None:
    # $0.15 / Mtok in, $0.60 / Mtok out: 10 * 0.15e-6 + 10 * 0.60e-6 = $0.0000075 exactly
    p = price("gpt-4o-mini").price
    cost = usage_nanos(p, Usage(input=10, output=10))
    assert cost == 7_500
    assert nanos_to_usd(cost) == Decimal("0.0000075")
    assert fmt_usd(cost) == "$0.0000075"


def test_money_never_goes_through_floats_and_rounds_only_up_at_the_nano() -> None:
    assert usd_to_nanos(Decimal("0.1")) * 3 == usd_to_nanos(Decimal("0.3"))
    assert token_cost_nanos(1, Decimal("0.0375")) == 38  # 37.5 nano -> 38, never down
    assert usd_to_nanos("10") == 10 * NANOS_PER_USD


@pytest.mark.parametrize(("model", "expected"), [
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-2031-01-01", "gpt-4o"),  # a dated id not in the table: its base model
    ("openai/gpt-4o", "gpt-4o"),
    ("o1-pro", "o1-pro"),
    ("o1-pro-2025-03-19", "o1-pro"),
    ("o1", "o1"),
    ("claude-opus-4-1", "claude-opus-4-1"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("anthropic/claude-sonnet-4-5", "claude-sonnet-4-5"),
    ("gemini-2.5-pro", "gemini-2.5-pro"),
])
def test_model_ids_resolve_to_their_own_price(model: str, expected: str) -> None:
    assert price(model).price.model == expected


def test_o1_pro_is_not_priced_as_o1_and_opus_4_1_has_its_own_price() -> None:
    assert price("o1-pro").price.output.base == Decimal(600)
    assert price("o1").price.output.base == Decimal(60)
    opus = price("claude-opus-4-1").price
    assert (opus.input.base, opus.output.base) == (Decimal(15), Decimal(75))
    assert price("gpt-4o-2024-08-06").price.input.base == price("gpt-4o").price.input.base == Decimal("2.5")


def test_every_listed_model_resolves_to_itself() -> None:
    """No row is shadowed by an earlier, broader match rule."""
    for ref in TABLE.models():
        provider, model = ref.split("/", 1)
        assert price(model, provider).price.model == model


def test_unknown_model_is_never_free_and_says_how_it_was_priced() -> None:
    est = Estimator(TABLE).estimate("openai", "/v1/chat/completions",
                                    {"model": "acme/unknown-model", "max_tokens": 10,
                                     "messages": [{"role": "user", "content": "hi"}]})
    assert est.cost_nanos > 0
    assert est.price.how == "dearest"
    assert est.price.warning and "acme/unknown-model" in est.price.warning
    dear = TABLE.dearest("openai")
    assert est.price.price == dear
    assert all(dear.output.top >= TABLE.resolve(m.split("/", 1)[1], "openai").price.output.top  # type: ignore[union-attr]
               for m in TABLE.models("openai"))


def test_unpriced_block_refuses() -> None:
    with pytest.raises(UnpricedModel, match="acme/x"):
        Estimator(TABLE, unpriced="block").resolve("acme/x", "openai")


def test_long_context_tier_prices_the_whole_request() -> None:
    sonnet = price("claude-sonnet-4-5").price
    small = usage_nanos(sonnet, Usage(input=200_000, output=1000))
    big = usage_nanos(sonnet, Usage(input=200_001, output=1000))
    assert small == usd_to_nanos(Decimal("0.6") + Decimal("0.015"))
    assert big == usd_to_nanos(Decimal(200_001) * 6 / 10**6 + Decimal("0.0225"))


def test_cache_reads_writes_and_reasoning_are_priced_per_their_rates() -> None:
    sonnet = price("claude-sonnet-4-5").price
    u = Usage(input=100, cache_read=1000, cache_write_5m=1000, cache_write_1h=1000, output=100)
    expected = (100 * Decimal(3) + 1000 * Decimal("0.3") + 1000 * Decimal("3.75") + 1000 * Decimal(6)
                + 100 * Decimal(15)) / 10**6
    assert usage_nanos(sonnet, u) == usd_to_nanos(expected)
    # the worst case of a request asking for a 1h cache write prices its input at the write rate
    assert worst_case_nanos(sonnet, 1000, 0, "1h") == usd_to_nanos(Decimal("0.006"))


def test_litellm_import_is_consulted_first_and_skips_incomplete_rows(tmp_path: Path) -> None:
    src = tmp_path / "litellm.json"
    src.write_text(json.dumps({
        "sample_spec": {"input_cost_per_token": 0},
        "acme/unknown-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2.5e-06,
                               "input_cost_per_token_above_200k_tokens": 2e-06,
                               "max_output_tokens": 4096, "litellm_provider": "acme", "mode": "chat"},
        "half-priced": {"input_cost_per_token": 1e-06, "mode": "chat"},
    }))
    dest = tmp_path / "prices.json"
    n, skipped = import_file(src, dest)
    assert n == 1 and len(skipped) == 1 and "half-priced" in skipped[0]
    table = PriceTable.bundled().with_overrides(dest)
    res = table.resolve("acme/unknown-model", "openai")
    assert res is not None and res.how == "imported"
    assert res.price.input.base == Decimal("1.000000")  # parsed as Decimal, not via float
    assert res.price.input.at(300_000) == Decimal(2)
    assert res.price.max_output == 4096


def test_import_of_a_non_price_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        import_file(bad, tmp_path / "out.json")


def test_table_carries_its_source_and_date() -> None:
    assert "genai-prices" in TABLE.source
    assert TABLE.built >= "2026-01-01"
    assert price("gpt-4o").price.source == TABLE.source
