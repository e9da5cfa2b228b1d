"""AWS Bedrock: its prices, its Converse wire format, virtual AWS credentials and a stock boto3 client."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendgate.pricing.table import PriceTable


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.bundled()


@pytest.mark.parametrize(("model", "row", "input_usd"), [
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("eu.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("apac.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "global.anthropic.claude-sonnet-4-5-20250929-v1:0", "3"),
    ("eu.anthropic.claude-haiku-4-5-20251001-v1:0", "regional.anthropic.claude-haiku-4-5-20251001-v1:0", "1.1"),
    ("amazon.nova-pro-v1:0", "amazon.nova-pro-v1:0", "0.8"),
    ("bedrock/us.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0",
     "3.3"),
])
def test_bedrock_ids_resolve_to_bedrock_rows(table: PriceTable, model: str, row: str, input_usd: str) -> None:
    for provider in (None, "bedrock", "anthropic", "google"):
        found = table.resolve(model, provider)
        assert found is not None
        assert (found.price.provider, found.price.model) == ("bedrock", row)
        assert found.price.input.base == Decimal(input_usd)
        assert found.price.source.startswith("genai-prices")


def test_an_unknown_bedrock_id_is_unpriced_never_another_providers(table: PriceTable) -> None:
    assert table.resolve("us.anthropic.claude-nonexistent-v1:0") is None
    assert table.resolve("us.anthropic.claude-nonexistent-v1:0", "anthropic") is None
    assert table.dearest("bedrock").provider == "bedrock"


def test_bedrock_rows_are_not_borrowed_by_other_ids(table: PriceTable) -> None:
    found = table.resolve("claude-sonnet-4-5-20250929")
    assert found is not None and found.price.provider == "anthropic"
    found = table.resolve("gpt-6-astra-law")
    assert found is not None and found.price.provider == "openai"
