"""Turning token counts into exact nano-dollars: the worst case before send, the actual after.

Where a table lacks a rate the request needs, the fallback is the provider's documented premium
over the input rate (cache read 1×, 5-minute write 1.25×, 1-hour write 2×) — never zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from spendgate.money import usd_to_nanos
from spendgate.pricing.table import ModelPrice, Rate

_MTOK = Decimal(1_000_000)


@dataclass(slots=True)
class Usage:
    """What a provider billed, in one shape for every provider.

    ``input`` excludes cached reads and cache writes; ``output`` includes ``reasoning``.
    """

    input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def total_input(self) -> int:
        return self.input + self.cache_read + self.cache_write_5m + self.cache_write_1h

    @property
    def total_tokens(self) -> int:
        return self.total_input + self.output


def _or(rate: Rate | None, fallback: Decimal, tokens: int) -> Decimal:
    return rate.at(tokens) if rate is not None else fallback


def input_rate(price: ModelPrice, input_tokens: int, cache_write: str | None) -> Decimal:
    """The per-Mtok rate of the input's worst case: the dearer of plain input and any cache write."""
    base = price.input.at(input_tokens)
    if cache_write == "1h":
        return max(base, _or(price.cache_write_1h, base * 2, input_tokens))
    if cache_write:
        return max(base, _or(price.cache_write, base * Decimal("1.25"), input_tokens))
    return base


def output_rate(price: ModelPrice, input_tokens: int) -> Decimal:
    """Output rate at the request's tier; a dearer reasoning rate bounds it, since reasoning tokens
    are part of the output bound."""
    rate = price.output.at(input_tokens)
    if price.reasoning is not None:
        rate = max(rate, price.reasoning.at(input_tokens))
    return rate


def worst_case_nanos(price: ModelPrice, input_tokens: int, output_tokens: int,
                     cache_write: str | None = None) -> int:
    usd = (input_tokens * input_rate(price, input_tokens, cache_write)
           + output_tokens * output_rate(price, input_tokens)) / _MTOK
    return usd_to_nanos(usd)


def usage_nanos(price: ModelPrice, usage: Usage) -> int:
    """The exact cost of ``usage``, at the tier its total input falls in."""
    n = usage.total_input
    base = price.input.at(n)
    out = price.output.at(n)
    reasoning_rate = price.reasoning.at(n) if price.reasoning is not None else out
    usd = (
        usage.input * base
        + usage.cache_read * _or(price.cache_read, base, n)
        + usage.cache_write_5m * _or(price.cache_write, base * Decimal("1.25"), n)
        + usage.cache_write_1h * _or(price.cache_write_1h, base * 2, n)
        + (usage.output - usage.reasoning) * out
        + usage.reasoning * reasoning_rate
    ) / _MTOK
    return usd_to_nanos(usd)
