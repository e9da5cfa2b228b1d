"""The integer pricing path equals the ``Decimal`` definition it replaced, nano-dollar for nano-dollar.

``usage_nanos`` and ``worst_case_nanos`` price from integer rates worked out once per model and
tier. The functions below are the ``Decimal`` arithmetic they replaced, kept verbatim as the
reference; every test compares the two exactly, rounding included (a sub-nano remainder rounds
up in both), over generated prices (tiers, fallbacks, 30-digit rates, variants' ratio rates) and
counts from zero to far past where the integer path hands over to ``Decimal``.
"""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.money import usd_to_nanos
from spendgate.pricing.cost import WEB_SEARCH_K_FALLBACK, Usage, _band, search_fees, usage_nanos, worst_case_nanos
from spendgate.pricing.table import PER_PROMPT, PER_SEARCH, ModelPrice, PriceTable, Rate

_MTOK = Decimal(1_000_000)


# -- the reference: the Decimal arithmetic as it was ------------------------------------------

def _or(rate: Rate | None, fallback: Decimal, tokens: int) -> Decimal:
    return rate.at(tokens) if rate is not None else fallback


def ref_input_rate(price: ModelPrice, input_tokens: int, cache_write: str | None) -> Decimal:
    base = price.input.at(input_tokens)
    if cache_write == "1h":
        return max(base, _or(price.cache_write_1h, base * 2, input_tokens))
    if cache_write:
        return max(base, _or(price.cache_write, base * Decimal("1.25"), input_tokens))
    return base


def ref_output_rate(price: ModelPrice, input_tokens: int) -> Decimal:
    rate = price.output.at(input_tokens)
    for other in (price.reasoning, price.output_audio, price.output_image):
        if other is not None:
            rate = max(rate, other.at(input_tokens))
    return rate


def ref_worst_case_nanos(price: ModelPrice, input_tokens: int, output_tokens: int,
                         cache_write: str | None = None, input_audio: int = 0) -> int:
    rate = ref_input_rate(price, input_tokens, cache_write)
    audio = min(max(input_audio, 0), input_tokens)
    audio_rate = max(rate, price.input_audio.at(input_tokens)) if price.input_audio is not None else rate
    usd = ((input_tokens - audio) * rate + audio * audio_rate
           + output_tokens * ref_output_rate(price, input_tokens)) / _MTOK
    return usd_to_nanos(usd)


def ref_usage_nanos(price: ModelPrice, usage: Usage) -> int:
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


# -- generated prices and counts ----------------------------------------------------------------

#: a rate as tables write them (0.15, 1.25, 0.0375), with trailing zeros (1.500), large or tiny
#: exponents, and now and then 30 significant digits (a variant's ratio over a tiered rate)
decimals = st.one_of(
    st.builds(lambda c, e: Decimal(c).scaleb(e), st.integers(0, 10**6), st.integers(-9, 3)),
    st.builds(lambda c, e: Decimal(f"{c}E{e}"), st.integers(0, 10**30), st.integers(-40, 2)),
    st.sampled_from([Decimal("0"), Decimal("-0"), Decimal("0.000"), Decimal("1.50000"), Decimal(1) / 3]),
)
rates = st.builds(Rate, decimals, st.lists(st.tuples(st.integers(0, 300_000), decimals), max_size=3).map(tuple))
maybe = st.one_of(st.none(), rates)


@st.composite
def prices(draw: st.DrawFn) -> ModelPrice:
    names = ("cache_read", "cache_write", "cache_write_1h", "reasoning", "input_audio", "output_audio",
             "cache_audio_read", "input_image", "output_image", "cache_image_read", "input_video", "web_search_k")
    extra = {n: draw(maybe) for n in names}
    per = draw(st.sampled_from([PER_SEARCH, PER_PROMPT]))
    return ModelPrice("p", "m", draw(rates), draw(rates), web_search_per=per, **extra)  # type: ignore[arg-type]


#: counts: mostly what responses carry, some past the integer path's bound, a few negative
counts = st.one_of(st.integers(0, 2_000_000), st.integers(0, 10**32), st.integers(-5, 5))
usages = st.builds(Usage, *(counts for _ in range(15)))


@settings(max_examples=600, deadline=None)
@given(prices(), usages)
def test_usage_cost_equals_the_decimal_definition(price: ModelPrice, usage: Usage) -> None:
    assert usage_nanos(price, usage) == ref_usage_nanos(price, usage)


@settings(max_examples=600, deadline=None)
@given(prices(), counts, counts, st.sampled_from([None, "", "5m", "1h", "24h"]), counts)
def test_worst_case_equals_the_decimal_definition(price: ModelPrice, inp: int, out: int,
                                                  cache_write: str | None, audio: int) -> None:
    assert worst_case_nanos(price, inp, out, cache_write, audio) == ref_worst_case_nanos(price, inp, out, cache_write,
                                                                                         audio)


def test_rounding_is_up_at_the_nano_dollar() -> None:
    """A sub-nano remainder rounds up on both paths: a token at $0.0005/Mtok is half a nano-dollar."""
    price = ModelPrice("p", "m", Rate(Decimal("0.0005")), Rate(Decimal("0.0035")))
    for tokens, nanos in ((1, 1), (2, 1), (3, 2), (1_000_001, 500_001)):
        assert usage_nanos(price, Usage(input=tokens)) == ref_usage_nanos(price, Usage(input=tokens)) == nanos
    assert worst_case_nanos(price, 1, 1) == ref_worst_case_nanos(price, 1, 1) == 4  # 0.5 + 3.5: exact
    assert worst_case_nanos(price, 1, 0) == ref_worst_case_nanos(price, 1, 0) == 1


def test_every_bundled_price_and_variant_is_priced_in_integers_and_alike() -> None:
    """Every row of the bundled table, at each of its tiers and variants: the integer path is the
    one taken for a typical request, and gives the reference's nano-dollars."""
    table = PriceTable.bundled()
    checked = 0
    for prov, rows in table.entries.items():
        for row in rows:
            base = row.price("2026-12-03", table.source)
            variants = [base] + [base.at_variant(dict(v.when), "2026-12-03") for v in base.variants]
            for price in variants:
                starts = sorted({s for r in price.rates().values() for s, _ in r.tiers})
                for n in [0, 1, 1_234, *[s + 1 for s in starts], *starts]:
                    usage = Usage(input=n, cache_read=n // 3, cache_write_5m=n // 5, cache_write_1h=n // 7,
                                  output=2_345, reasoning=1_000, input_audio=11, output_audio=13, input_image=17,
                                  output_image=19, cache_audio_read=5, cache_image_read=3, input_video=29,
                                  web_searches=3, grounded=1)
                    if price.variant is None:
                        assert _band(price, usage.total_input) is not None, f"{prov}/{row.model}"
                    assert usage_nanos(price, usage) == ref_usage_nanos(price, usage), f"{prov}/{row.model}"
                    for cw in (None, "5m", "1h"):
                        assert worst_case_nanos(price, n, 4_096, cw, n // 2) == \
                            ref_worst_case_nanos(price, n, 4_096, cw, n // 2), f"{prov}/{row.model} {cw}"
                    checked += 1
    assert checked > 500


def test_a_table_reload_prices_from_the_new_rates() -> None:
    """The rates are remembered per price object: a new price with other rates is priced anew."""
    cheap = ModelPrice("p", "m", Rate(Decimal("1")), Rate(Decimal("2")))
    dear = ModelPrice("p", "m", Rate(Decimal("10")), Rate(Decimal("20")))
    assert usage_nanos(cheap, Usage(input=1_000_000, output=1_000_000)) == 3_000_000_000
    assert usage_nanos(dear, Usage(input=1_000_000, output=1_000_000)) == 30_000_000_000
