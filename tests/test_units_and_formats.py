"""Models priced per image, character or minute; audio rates merged into genai-prices' rows and held
for input audio; structured-output schemas counted with their references written out."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate.cli.main import main
from spendgate.estimate import Estimator, openai
from spendgate.estimate.shape import dumps
from spendgate.estimate.tokens import counter
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import worst_case_nanos

pytestmark = pytest.mark.usefixtures("no_network")

TABLE = PriceTable.bundled()
MTOK = Decimal(1_000_000)
DATA = Path(__file__).parent / "data"
SCHEMA = json.loads((DATA / "pydantic_order_schema.json").read_text(encoding="utf-8"))
TC = counter("o200k_base")


def nanos(usd: Decimal) -> int:
    n = usd * 1_000_000_000
    assert n == n.to_integral_value(), usd
    return int(n)


# -- per-unit prices ------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "unit", "option", "usd"), [
    ("tts-1", "character", "", "0.000015"),        # $15 per 1M characters
    ("tts-1-hd", "character", "", "0.00003"),      # $30 per 1M characters
    ("whisper-1", "minute", "", "0.006"),          # $0.36 per hour
    ("dall-e-3", "image", "hd/1024x1792", "0.12"),
    ("dall-e-3", "image", "standard/1024x1024", "0.04"),
    ("dall-e-2", "image", "standard/256x256", "0.016"),
])
def test_models_priced_per_unit_carry_their_published_unit_prices(model: str, unit: str, option: str,
                                                                  usd: str) -> None:
    found = TABLE.unit_price(model, "openai")
    assert found is not None and found.unit == unit
    assert found.price_of(option) == Decimal(usd)
    assert found.source
    assert TABLE.resolve(model, "openai") is None  # never mistaken for a per-token price


def test_prices_show_lists_a_per_unit_model_with_its_route(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "show", "dall-e-3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["unit"], doc["prices"]["hd/1792x1024"]) == ("image", "0.12")
    assert doc["route"].startswith("/v1/images/generations")
    assert main(["prices", "show", "whisper-1"]) == 0
    out = capsys.readouterr().out
    assert "$0.0060 per minute of audio" in out and "flat_holds" in out


# -- audio rates ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "rates"), [
    ("gpt-4o-audio-preview", ("2.5", "10", "40", "80")),
    ("gpt-4o-audio-preview-2025-06-03", ("2.5", "10", "40", "80")),
    ("gpt-4o-mini-audio-preview", ("0.15", "0.6", "10", "20")),
])
def test_audio_preview_models_carry_their_audio_rates(model: str, rates: tuple[str, ...]) -> None:
    res = TABLE.resolve(model, "openai")
    assert res is not None
    p = res.price
    assert p.input_audio is not None and p.output_audio is not None
    assert (str(p.input.base), str(p.output.base), str(p.input_audio.base), str(p.output_audio.base)) == rates


def _wav_part(seconds: float) -> dict[str, object]:
    data = base64.b64encode(b"RIFF" + b"\0" * int(16_000 * seconds)).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def test_input_audio_in_a_chat_request_is_held_at_the_audio_input_rate() -> None:
    body = {"model": "gpt-4o-audio-preview", "max_completion_tokens": 100, "modalities": ["text"],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is said?"}, _wav_part(1)]}]}
    shape = openai.chat(body)
    audio = TC.count(dumps(body["messages"][0]["content"][1]))  # type: ignore[index]
    assert shape.input_audio == audio > 0
    est = Estimator(TABLE).estimate("openai", "/v1/chat/completions", body)
    text = shape.input_tokens - audio
    # text at $2.50, audio at $40, output bound at the dearest output rate ($80 audio)
    assert est.cost_nanos == nanos((text * Decimal("2.5") + audio * Decimal(40) + 100 * Decimal(80)) / MTOK)
    # the base64 JSON bounds the audio: a second of audio bills about 10 tokens
    assert audio > 10 * 100


def test_worst_case_never_holds_audio_below_the_text_rate() -> None:
    p = TABLE.resolve("gpt-4o", "openai").price  # type: ignore[union-attr]
    assert worst_case_nanos(p, 1000, 0, None, 500) == worst_case_nanos(p, 1000, 0)


# -- structured output schemas ----------------------------------------------------------------------

MSGS = [{"role": "user", "content": "hi"}]
#: the schema as OpenAI renders it, written out by hand in tests/data: 431 o200k tokens
RENDERED = TC.count((DATA / "pydantic_order_rendered.txt").read_text(encoding="utf-8"))


def test_a_response_format_schema_with_refs_counts_its_references_written_out() -> None:
    base = openai.chat({"model": "gpt-4o", "messages": MSGS}).input_tokens
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "strict": True, "schema": SCHEMA}}
    counted = openai.chat({"model": "gpt-4o", "messages": MSGS, "response_format": fmt}).input_tokens - base
    as_sent = TC.count(dumps(fmt))
    assert counted > as_sent  # before: only the JSON as sent (the $defs once, each $ref a pointer)
    assert counted >= RENDERED


def test_a_responses_text_format_schema_with_refs_counts_its_references_written_out() -> None:
    base = openai.responses({"model": "gpt-5", "input": "hi"}).input_tokens
    fmt = {"type": "json_schema", "name": "order", "strict": True, "schema": SCHEMA}
    counted = openai.responses({"model": "gpt-5", "input": "hi", "text": {"format": fmt}}).input_tokens - base
    assert counted > TC.count(dumps(fmt))
    assert counted >= RENDERED


def test_a_flat_response_format_counts_its_json_as_before() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}
    base = openai.chat({"model": "gpt-4o", "messages": MSGS}).input_tokens
    assert openai.chat({"model": "gpt-4o", "messages": MSGS, "response_format": fmt}).input_tokens - base == \
        TC.count(dumps(fmt))
