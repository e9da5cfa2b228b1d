"""What a search fee counts, in the price table: Gemini 1.x/2.x grounding is billed once per grounded
prompt (``web_search_per = "prompt"``), every other fee per search; the mark survives an import and
the build sets it; a row that misspells it is refused rather than priced low."""

from __future__ import annotations

import importlib.util
import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.errors import ConfigError
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import Usage, search_fees, usage_nanos
from spendgate.pricing.table import PER_PROMPT, PER_SEARCH, _bundled_json

pytestmark = pytest.mark.usefixtures("no_network")


def price(model: str, provider: str = "google") -> Any:
    res = PriceTable.bundled().with_overrides(ledger.home() / "prices.json").resolve(model, provider)
    assert res is not None
    return res.price


@pytest.mark.parametrize(("model", "per", "fee"), [
    ("gemini-2.0-flash", PER_PROMPT, "35"), ("gemini-2.5-flash", PER_PROMPT, "35"),
    ("gemini-2.5-pro", PER_PROMPT, "35"), ("gemini-2.5-flash-lite", PER_PROMPT, "35"),
    ("gemini-3-flash-preview", PER_SEARCH, "14"), ("gemini-3-pro-preview", PER_SEARCH, "14"),
    ("gemini-3.1-pro-preview", PER_SEARCH, "14")])
def test_the_bundled_table_says_what_each_gemini_grounding_fee_counts(model: str, per: str, fee: str) -> None:
    p = price(model)
    assert p.web_search_per == per and p.web_search_k is not None and p.web_search_k.base == Decimal(fee)


def test_anthropic_and_openai_search_fees_stay_per_search() -> None:
    for model, provider in (("claude-sonnet-4-5", "anthropic"), ("gpt-5", "openai")):
        p = price(model, provider)
        assert p.web_search_per == PER_SEARCH
        assert search_fees(p, Usage(web_searches=3)) == 3
        assert usage_nanos(p, Usage(web_searches=3)) == 30_000_000  # $10 per 1,000


def test_a_per_prompt_model_bills_one_fee_however_many_queries() -> None:
    p = price("gemini-2.5-flash")
    assert search_fees(p, Usage(web_searches=4, grounded=1)) == 1
    assert search_fees(p, Usage(grounded=1)) == 1, "grounded without a query listed: still one grounded prompt"
    assert search_fees(p, Usage()) == 0
    assert usage_nanos(p, Usage(web_searches=4, grounded=1)) == 35_000_000
    per_query = price("gemini-3-flash-preview")
    assert search_fees(per_query, Usage(web_searches=4, grounded=1)) == 4
    assert usage_nanos(per_query, Usage(web_searches=4, grounded=1)) == 56_000_000  # 4 x $0.014


def test_a_litellm_import_keeps_the_per_prompt_mark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = {"input_cost_per_token": 3e-07, "output_cost_per_token": 2.5e-06, "litellm_provider": "gemini",
           "mode": "chat", "max_output_tokens": 65535}
    src = tmp_path / "litellm.json"
    src.write_text(json.dumps({"gemini/gemini-2.5-flash": row}))
    assert main(["prices", "update", "--from", str(src)]) == 0, capsys.readouterr()
    res = PriceTable.bundled().with_overrides(ledger.home() / "prices.json").resolve("gemini-2.5-flash", "google")
    assert res is not None and res.how == "imported"
    p = res.price
    assert p.web_search_per == PER_PROMPT
    assert p.web_search_k is not None and p.web_search_k.base == 35


def test_a_row_with_an_unknown_unit_is_refused() -> None:
    raw = json.loads(json.dumps(_bundled_json()))
    google = next(p for p in raw["providers"] if p["id"] == "google")
    row = next(m for m in google["models"] if m["id"] == "gemini-2.5-flash")
    row["web_search_per"] = "prompts"
    with pytest.raises(ConfigError, match="web_search_per"):
        PriceTable.from_json(raw).resolve("gemini-2.5-flash", "google")


def test_the_build_marks_gemini_1_and_2_per_prompt_only() -> None:
    path = Path(__file__).resolve().parent.parent / "scripts" / "build_prices.py"
    spec = importlib.util.spec_from_file_location("build_prices_grounding", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_prices_grounding"] = mod
    spec.loader.exec_module(mod)
    yes = ["gemini-2.5-flash", "gemini-2.0-flash-lite", "gemini-1.5-pro", "gemini-2.5-pro-tts", "gemini-2"]
    no = ["gemini-3-pro-preview", "gemini-3.1-flash-lite", "gemini-20-flash", "gemini-flash-latest", "gemini-pro"]
    assert all(mod._grounding_per_prompt("google", m) for m in yes)
    assert not any(mod._grounding_per_prompt("google", m) for m in no)
    assert not mod._grounding_per_prompt("anthropic", "gemini-2.5-flash")
