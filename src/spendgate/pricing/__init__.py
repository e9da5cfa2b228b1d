"""Prices: the bundled table, imported overrides and strict model-id resolution."""

from spendgate.pricing.table import ModelPrice, PriceTable, Rate, Resolution

__all__ = ["ModelPrice", "PriceTable", "Rate", "Resolution"]
