"""Turning token counts into exact nano-dollars: the worst case before send, the actual after.

Where a table lacks a rate the request needs, the fallback is the provider's documented premium
over the input rate (cache read 1×, 5-minute write 1.25×, 1-hour write 2×), and an audio, image or
video token without its own rate costs what a text token of the same direction does — never zero.
"""

from __future__ import annotations

from bisect import bisect_left
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
        out = {}
        if self.tier is not None:
            out["service_tier"] = self.tier
        if self.speed is not None:
            out["speed"] = self.speed
        if self.processing is not None:
            out["processing"] = self.processing
        return out

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
    model's audio and text input rates) and ``output_tokens`` out can cost.

    Priced in integers from the model's rates at this input's tier, worked out once
    (:class:`_Band`); :func:`_worst_case_decimal` where that could differ from it."""
    band = _band(price, input_tokens)
    if band is not None and input_tokens >= 0 and output_tokens >= 0:
        audio = min(max(input_audio, 0), input_tokens)
        rate, audio_rate, out_rate = band.worst[_WRITE_MODE.get(cache_write, 1) if cache_write else 0]
        num = (input_tokens - audio) * rate + audio * audio_rate + output_tokens * out_rate
        if num < _EXACT_BELOW:
            return -(-num // band.scale)
    return _worst_case_decimal(price, input_tokens, output_tokens, cache_write, input_audio)


def _worst_case_decimal(price: ModelPrice, input_tokens: int, output_tokens: int,
                        cache_write: str | None = None, input_audio: int = 0) -> int:
    """:func:`worst_case_nanos` in ``Decimal`` dollars: the definition the integer path must equal."""
    rate = input_rate(price, input_tokens, cache_write)
    audio = min(max(input_audio, 0), input_tokens)
    audio_rate = max(rate, price.input_audio.at(input_tokens)) if price.input_audio is not None else rate
    usd = ((input_tokens - audio) * rate + audio * audio_rate
           + output_tokens * output_rate(price, input_tokens)) / _MTOK
    return usd_to_nanos(usd)


def usage_nanos(price: ModelPrice, usage: Usage) -> int:
    """The exact cost of ``usage``, at the tier its total input falls in.

    Priced in integers from the model's rates at that tier, worked out once (:class:`_Band`);
    :func:`_usage_decimal` where that could differ from it."""
    n = usage.total_input
    band = _band(price, n)
    if band is not None:
        u = usage
        searches = search_fees(price, u)
        if min(u.input, u.cache_read, u.cache_write_5m, u.cache_write_1h, u.input_audio, u.cache_audio_read,
               u.input_image, u.cache_image_read, u.input_video, u.output, u.reasoning, u.output_audio,
               u.output_image, searches) >= 0:
            r = band.usage
            text_out = u.output - u.reasoning - u.output_audio - u.output_image
            num = (u.input * r[0] + u.cache_read * r[1] + u.cache_write_5m * r[2] + u.cache_write_1h * r[3]
                   + u.input_audio * r[4] + u.cache_audio_read * r[5] + u.input_image * r[6]
                   + u.cache_image_read * r[7] + u.input_video * r[8] + max(text_out, 0) * r[9]
                   + u.reasoning * r[10] + u.output_audio * r[11] + u.output_image * r[12] + searches * r[13])
            if num < _EXACT_BELOW:
                return -(-num // band.scale)
    return _usage_decimal(price, usage)


def _usage_rates(price: ModelPrice, n: int) -> tuple[list[Decimal], Decimal]:
    """The per-Mtok rate of each of :class:`Usage`'s counts (in :data:`_USAGE_ORDER`) at input
    ``n``'s tier, and the fee per 1,000 searches: the one place their fallbacks are written."""
    base = price.input.at(n)
    out = price.output.at(n)
    reasoning_rate = price.reasoning.at(n) if price.reasoning is not None else out
    audio_in = _or(price.input_audio, base, n)
    image_in = _or(price.input_image, base, n)
    rates = [
        base,
        _or(price.cache_read, base, n),
        _or(price.cache_write, base * Decimal("1.25"), n),
        _or(price.cache_write_1h, base * 2, n),
        audio_in,
        _or(price.cache_audio_read, audio_in, n),
        image_in,
        _or(price.cache_image_read, image_in, n),
        _or(price.input_video, base, n),
        out,
        reasoning_rate,
        _or(price.output_audio, out, n),
        _or(price.output_image, out, n),
    ]
    fee = price.web_search_k.at(n) if price.web_search_k is not None else WEB_SEARCH_K_FALLBACK
    return rates, fee


#: The counts :func:`_usage_rates` gives a rate for, in its order (text output is ``output`` less its parts).
_USAGE_ORDER = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "input_audio", "cache_audio_read",
                "input_image", "cache_image_read", "input_video", "text_output", "reasoning", "output_audio",
                "output_image")


def _usage_decimal(price: ModelPrice, usage: Usage) -> int:
    """:func:`usage_nanos` in ``Decimal`` dollars: the definition the integer path must equal."""
    n = usage.total_input
    r, fee = _usage_rates(price, n)
    text_out = usage.output - usage.reasoning - usage.output_audio - usage.output_image
    usd = (
        usage.input * r[0]
        + usage.cache_read * r[1]
        + usage.cache_write_5m * r[2]
        + usage.cache_write_1h * r[3]
        + usage.input_audio * r[4]
        + usage.cache_audio_read * r[5]
        + usage.input_image * r[6]
        + usage.cache_image_read * r[7]
        + usage.input_video * r[8]
        + max(text_out, 0) * r[9]
        + usage.reasoning * r[10]
        + usage.output_audio * r[11]
        + usage.output_image * r[12]
    ) / _MTOK
    searches = search_fees(price, usage)
    if searches:
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


#: A numerator (nano-dollars × :attr:`_Band.scale`) below which every step of the ``Decimal``
#: definition is exact at the default 28-digit context: see :class:`_Band`.
_EXACT_BELOW = 10 ** 30
#: ``cache_write`` -> the index of its rates in :attr:`_Band.worst` (0: none, 1: any other write)
_WRITE_MODE = {"1h": 2}


class _Band:
    """A model's rates at one input tier as integers: nano-dollars per token (per search for the
    fee) times :attr:`scale`, ``10 ** d`` for the most decimal places ``d`` any of them has, so a
    request's exact cost is ``ceil(Σ count × rate / scale)`` in integer arithmetic. Worked out once
    per price and tier instead of a dozen ``Decimal`` products and fallbacks on every request.

    Why the integer result is the ``Decimal`` one: every rate is ``c × 10**e`` with ``e ≥ -d``, and
    counts and rates are non-negative (else the caller takes the ``Decimal`` path), so every
    product, partial sum and quotient the ``Decimal`` definition forms is a non-negative multiple of
    ``10**-(d + 6)`` dollars no larger than the total, and its coefficient is at most
    ``total × 10**(d + 6)`` = numerator / 1000 < 10**27: each step is exact in 28 digits, the
    × 10**9 to nano-dollars only adds trailing zeros, and ``ROUND_CEILING`` is the ceiling that
    ``-(-num // scale)`` takes. Past :data:`_EXACT_BELOW` (or for a rate that is not a finite,
    non-negative ``Decimal``) the ``Decimal`` definition itself is used, rounding included.
    """

    __slots__ = ("scale", "usage", "worst")

    def __init__(self, scale: int, usage: tuple[int, ...], worst: tuple[tuple[int, int, int], ...]) -> None:
        self.scale = scale
        #: per :data:`_USAGE_ORDER` count, then the fee per search
        self.usage = usage
        #: (input, audio input, output) of the worst case, by :data:`_WRITE_MODE`
        self.worst = worst

    @classmethod
    def of(cls, price: ModelPrice, n: int) -> _Band | None:
        """``price``'s rates at input ``n``'s tier, or None when one cannot be an exact integer."""
        rates, fee = _usage_rates(price, n)
        ins = [input_rate(price, n, None), input_rate(price, n, "5m"), input_rate(price, n, "1h")]
        audio = [max(r, price.input_audio.at(n)) if price.input_audio is not None else r for r in ins]
        out = output_rate(price, n)
        every = [*rates, fee, *ins, *audio, out]
        if not all(isinstance(x, Decimal) and x.is_finite() and x >= 0 for x in every):
            return None
        d = max(0, *(-int(x.as_tuple().exponent) for x in every))

        def scaled(x: Decimal, places: int) -> int:  # x × 10**places × 10**d, exactly
            _, digits, exp = x.as_tuple()
            return int("".join(map(str, digits))) * int(10 ** (int(exp) + d + places))

        usage = (*(scaled(r, 3) for r in rates), scaled(fee, 6))
        worst = tuple((scaled(i, 3), scaled(a, 3), scaled(out, 3)) for i, a in zip(ins, audio, strict=True))
        return cls(10 ** d, usage, worst)


#: id(price) -> (price, its tier starts, tier index -> band); the price is held so its id stays its own
_BANDS: dict[int, tuple[ModelPrice, tuple[int, ...], dict[int, _Band | None]]] = {}


def _band(price: ModelPrice, n: int) -> _Band | None:
    """The integer rates of ``price`` at input ``n``'s tier, worked out on first use. A rate's tier
    depends only on how many tier starts ``n`` exceeds, so that count keys the band."""
    memo = _BANDS.get(id(price))
    if memo is None or memo[0] is not price:
        if len(_BANDS) >= 4096:  # prices made per request (a per-unit price) come and go
            _BANDS.clear()
        starts = tuple(sorted({start for rate in price.rates().values() for start, _ in rate.tiers}))
        memo = _BANDS[id(price)] = (price, starts, {})
    _, starts, bands = memo
    k = bisect_left(starts, n) if starts else 0
    if k in bands:
        return bands[k]
    band = bands[k] = _Band.of(price, n)
    return band
