"""Turning token counts into exact nano-dollars: the worst case before send, the actual after.

Where a table lacks a rate the request needs, the fallback is the provider's documented premium
over the input rate (cache read 1×, 5-minute write 1.25×, 1-hour write 2×), and an audio, image or
video token without its own rate costs what a text token of the same direction does — never zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from spendgate.money import usd_to_nanos
from spendgate.pricing.table import PER_PROMPT, ModelPrice, Rate

_MTOK = Decimal(1_000_000)


@dataclass(slots=True)
class Usage:
    """What a provider billed, in one shape for every provider.

    The input counts are disjoint: ``input`` is uncached text (tool-use prompts included),
    ``cache_read`` cached text, the writes are cache writes, and audio, image and video tokens are
    counted apart (``input_audio`` uncached, ``cache_audio_read`` cached). ``output`` is every
    output token; ``reasoning``, ``output_audio`` and ``output_image`` are parts of it.
    ``web_searches`` are the searches the model ran (Anthropic's ``web_search_requests``, OpenAI's
    ``web_search_call`` items, Gemini's grounding queries); ``grounded`` is 1 when the response was
    grounded with Google Search at all, which is what a model billed per grounded prompt
    (``web_search_per = "prompt"``: Gemini 2.x) is charged for, once, however many it ran.
    ``tier`` / ``speed`` / ``processing`` are what the provider says it served (None: not said);
    ``unknown`` names counts the reader did not know but that look billable.
    """

    input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    reasoning: int = 0
    input_audio: int = 0
    cache_audio_read: int = 0
    input_image: int = 0
    cache_image_read: int = 0
    input_video: int = 0
    output_audio: int = 0
    output_image: int = 0
    web_searches: int = 0
    grounded: int = 0
    tier: str | None = field(default=None, compare=False)
    speed: str | None = field(default=None, compare=False)
    processing: str | None = field(default=None, compare=False)
    unknown: tuple[str, ...] = field(default=(), compare=False)

    @property
    def total_input(self) -> int:
        return (self.input + self.cache_read + self.cache_write_5m + self.cache_write_1h
                + self.input_audio + self.cache_audio_read + self.input_image + self.cache_image_read
                + self.input_video)

    def served(self) -> dict[str, str]:
        """The price-variant context the provider reported serving (empty: it did not say)."""
        out = {"service_tier": self.tier, "speed": self.speed, "processing": self.processing}
        return {k: v for k, v in out.items() if v is not None}

    def counts(self) -> dict[str, Any]:
        names = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output", "reasoning",
                 "input_audio", "cache_audio_read", "input_image", "cache_image_read", "input_video",
                 "output_audio", "output_image", "web_searches", "grounded")
        return {n: getattr(self, n) for n in names if getattr(self, n)}

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
    """Output rate at the request's tier; a dearer reasoning, audio or image output rate bounds it,
    since any of those tokens may fill the output bound (gpt-audio: audio out at $64 vs text $10)."""
    rate = price.output.at(input_tokens)
    for other in (price.reasoning, price.output_audio, price.output_image):
        if other is not None:
            rate = max(rate, other.at(input_tokens))
    return rate


def worst_case_nanos(price: ModelPrice, input_tokens: int, output_tokens: int,
                     cache_write: str | None = None, input_audio: int = 0) -> int:
    """The most ``input_tokens`` in (``input_audio`` of them audio, held at the dearer of the
    model's audio and text input rates) and ``output_tokens`` out can cost."""
    rate = input_rate(price, input_tokens, cache_write)
    audio = min(max(input_audio, 0), input_tokens)
    audio_rate = max(rate, price.input_audio.at(input_tokens)) if price.input_audio is not None else rate
    usd = ((input_tokens - audio) * rate + audio * audio_rate
           + output_tokens * output_rate(price, input_tokens)) / _MTOK
    return usd_to_nanos(usd)


def usage_nanos(price: ModelPrice, usage: Usage) -> int:
    """The exact cost of ``usage``, at the tier its total input falls in."""
    n = usage.total_input
    base = price.input.at(n)
    out = price.output.at(n)
    reasoning_rate = price.reasoning.at(n) if price.reasoning is not None else out
    audio_in = _or(price.input_audio, base, n)
    image_in = _or(price.input_image, base, n)
    text_out = usage.output - usage.reasoning - usage.output_audio - usage.output_image
    usd = (
        usage.input * base
        + usage.cache_read * _or(price.cache_read, base, n)
        + usage.cache_write_5m * _or(price.cache_write, base * Decimal("1.25"), n)
        + usage.cache_write_1h * _or(price.cache_write_1h, base * 2, n)
        + usage.input_audio * audio_in
        + usage.cache_audio_read * _or(price.cache_audio_read, audio_in, n)
        + usage.input_image * image_in
        + usage.cache_image_read * _or(price.cache_image_read, image_in, n)
        + usage.input_video * _or(price.input_video, base, n)
        + max(text_out, 0) * out
        + usage.reasoning * reasoning_rate
        + usage.output_audio * _or(price.output_audio, out, n)
        + usage.output_image * _or(price.output_image, out, n)
    ) / _MTOK
    searches = search_fees(price, usage)
    if searches:
        fee = price.web_search_k.at(n) if price.web_search_k is not None else WEB_SEARCH_K_FALLBACK
        usd += searches * fee / 1000
    return usd_to_nanos(usd)


def search_fees(price: ModelPrice, usage: Usage) -> int:
    """How many search fees ``usage`` bills at ``price``: one per search, or — for a model billed
    per grounded prompt (Gemini 2.x) — one for a grounded response, however many searches it ran."""
    if price.web_search_per == PER_PROMPT:
        return 1 if usage.grounded or usage.web_searches else 0
    return usage.web_searches


#: A web search on a model whose fee the table does not list is charged the dearest fee listed,
#: Gemini grounding's $35 per 1,000 (Anthropic and OpenAI charge $10) — never $0.
WEB_SEARCH_K_FALLBACK = Decimal(35)
