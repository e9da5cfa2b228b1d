"""``scripts/build_prices.py``'s merging and reporting, on small LiteLLM-shaped data (the sources
themselves are read only when the table is rebuilt)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def build() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "build_prices.py"
    spec = importlib.util.spec_from_file_location("build_prices", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_prices"] = mod
    spec.loader.exec_module(mod)
    return mod


LITELLM: dict[str, Any] = {
    "gpt-image-1": {"litellm_provider": "openai", "mode": "image_generation", "input_cost_per_token": 5e-06,
                    "output_cost_per_image_token": 4e-05, "input_cost_per_image_token": 1e-05},
    "gpt-4o-audio-preview-2024-12-17": {"litellm_provider": "openai", "mode": "chat",
                                        "input_cost_per_audio_token": 4e-05, "output_cost_per_audio_token": 8e-05},
    "gpt-4o-audio-preview-2025-06-03": {"litellm_provider": "openai", "mode": "chat",
                                        "input_cost_per_audio_token": 4e-05, "output_cost_per_audio_token": 8e-05},
    "azure/gpt-4o-audio-preview": {"litellm_provider": "azure", "mode": "chat",
                                   "input_cost_per_audio_token": 9e-05},
    "gpt-5": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.25e-06,
              "search_context_cost_per_query": {"search_context_size_low": 0.01},
              "code_interpreter_cost_per_session": 0.03},
}


def test_an_image_models_output_rate_becomes_its_image_output_rate_and_its_variants_follow(
        build: ModuleType) -> None:
    periods = [{"since": None, "rates": {"input": "5", "output": "40", "input_image": "10"}}]
    variants = [{"when": {"processing": "batch"}, "since": "2026-10-14", "rates": {"input": "2.5", "output": "20"}}]
    note: list[str] = []
    merged = build._merge_units(LITELLM, "openai", ["gpt-image-1"], periods, variants, note)
    assert merged == ["output_image 40"]
    assert periods[0]["rates"]["output_image"] == "40"
    assert periods[0]["rates"]["input_image"] == "10", "a rate genai-prices has is never replaced"
    assert variants[0]["rates"]["output_image"] == "20"
    assert "litellm" in note[0]


def test_audio_rates_come_from_the_dated_snapshots_never_a_resellers_row(build: ModuleType) -> None:
    periods = [{"since": None, "rates": {"input": "2.5", "output": "10"}}]
    merged = build._merge_units(LITELLM, "openai", ["gpt-4o-audio-preview"], periods, [], [])
    assert merged == ["input_audio 40", "output_audio 80"]


def test_the_report_names_litellm_fields_the_table_has_no_rate_for(build: ModuleType) -> None:
    lines = build._unread_fields(LITELLM)
    assert any("search_context_cost_per_query" in x for x in lines)
    assert any("code_interpreter_cost_per_session" in x for x in lines)
    assert not any("output_cost_per_image_token" in x or "input_cost_per_token" in x for x in lines)


def test_a_zero_secondary_rate_is_left_out_not_the_model(build: ModuleType) -> None:
    """LiteLLM lists gemini-robotics-er-1.5-preview's cache reads at $0 beside priced text: the row is
    kept without that rate (cache reads then cost the input rate, never nothing); a $0 input or
    output price still leaves the whole row out."""
    entry = {"input_cost_per_token": 3e-07, "output_cost_per_token": 2.5e-06, "cache_read_input_token_cost": 0,
             "input_cost_per_audio_token": 1e-06, "litellm_provider": "vertex_ai-language-models", "mode": "chat",
             "max_output_tokens": 65535}
    row = build._litellm_row("gemini-robotics-er-1.5-preview", entry)
    assert isinstance(row, dict)
    assert row["prices"][0]["rates"] == {"input": "0.3", "output": "2.5", "input_audio": "1"}
    assert "cache_read listed at $0" in row["note"] and row["max_output"] == 65_536
    free = build._litellm_row("gemini-exp-1114", {**entry, "input_cost_per_token": 0})
    assert isinstance(free, str) and "$0" in free


def test_a_per_character_snapshot_at_its_base_price_is_matched_to_the_base_row(build: ModuleType) -> None:
    rows = [{"id": "tts-1", "match": {"equals": "tts-1"}, "unit": "character", "prices": {"": "0.000015"}},
            {"id": "tts-1-hd", "match": {"equals": "tts-1-hd"}, "unit": "character", "prices": {"": "0.00003"}}]
    litellm = {"tts-1-1106": {"litellm_provider": "openai", "mode": "audio_speech",
                              "input_cost_per_character": 1.5e-05},
               "tts-1-hd-1106": {"litellm_provider": "openai", "mode": "audio_speech",
                                 "input_cost_per_character": 6e-05},  # another price: never priced as its base
               "azure/tts-1-0101": {"litellm_provider": "azure", "input_cost_per_character": 1.5e-05}}
    assert build._dated_unit_aliases(rows, litellm) == ["tts-1-1106"]
    assert rows[0]["match"] == {"or": [{"equals": "tts-1"}, {"equals": "tts-1-1106"}]}
    assert rows[1]["match"] == {"equals": "tts-1-hd"}
