"""``spendgate prices update --from FILE`` merges field by field and never lowers a price silently."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import Usage, usage_nanos

pytestmark = pytest.mark.usefixtures("no_network")

#: LiteLLM 1.109.1's own claude-sonnet-4-5 row: no >200K tier at all
SONNET_45 = {"cache_creation_input_token_cost": 3.75e-06, "cache_creation_input_token_cost_above_1hr": 6e-06,
             "cache_read_input_token_cost": 3e-07, "input_cost_per_token": 3e-06,
             "cache_creation_input_token_cost_batches": 1.875e-06, "cache_read_input_token_cost_batches": 1.5e-07,
             "input_cost_per_token_batches": 1.5e-06, "output_cost_per_token": 1.5e-05,
             "output_cost_per_token_batches": 7.5e-06, "litellm_provider": "anthropic", "mode": "chat",
             "max_input_tokens": 200000, "max_output_tokens": 64000}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, rows: dict[str, Any], name: str = "litellm.json") -> Path:
    src = tmp_path / name
    src.write_text(json.dumps(rows))
    return src


def table() -> PriceTable:
    return PriceTable.bundled().with_overrides(ledger.home() / "prices.json")


def cost(model: str, usage: Usage) -> int:
    res = table().resolve(model, "anthropic")
    assert res is not None
    return usage_nanos(res.price, usage)


def test_a_litellm_import_leaves_the_long_context_tier_in_force(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    u = Usage(input=210_000, output=1_000)
    # above 200K input, Sonnet 4.5 bills $6 / $22.50 per Mtok
    expected = (210_000 * Decimal(6) + 1_000 * Decimal("22.5")) / 1_000_000
    assert cost("claude-sonnet-4-5", u) == expected * 10**9
    code, out, _ = run(capsys, "prices", "update", "--from", str(write(tmp_path, {"claude-sonnet-4-5": SONNET_45})))
    assert code == 0, out
    assert table().resolve("claude-sonnet-4-5", "anthropic").how == "imported"  # type: ignore[union-attr]
    assert cost("claude-sonnet-4-5", u) == expected * 10**9, "the tier the file lacks stays"
    p = table().resolve("claude-sonnet-4-5", "anthropic").price  # type: ignore[union-attr]
    assert p.cache_write_1h is not None and p.cache_write_1h.tiers, "cache tiers kept too"
    assert {v.label for v in p.variants} >= {"processing=batch"}


def test_rates_the_file_lacks_are_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = table().resolve("gpt-5", "openai").price  # type: ignore[union-attr]
    row = {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05, "mode": "chat",
           "litellm_provider": "openai"}
    assert run(capsys, "prices", "update", "--from", str(write(tmp_path, {"gpt-5": row})))[0] == 0
    after = table().resolve("gpt-5", "openai").price  # type: ignore[union-attr]
    assert after.cache_read == before.cache_read and after.web_search_k == before.web_search_k
    assert after.variants == before.variants and after.max_output == before.max_output


def test_a_negative_price_refuses_the_whole_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {"gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "mode": "chat"},
            "gpt-4o-mini": {"input_cost_per_token": -1.5e-07, "output_cost_per_token": 6e-07, "mode": "chat"}}
    code, _, err = run(capsys, "prices", "update", "--from", str(write(tmp_path, rows)))
    assert code != 0 and "gpt-4o-mini" in err and "input_cost_per_token" in err and "negative" in err
    assert not (ledger.home() / "prices.json").exists(), "nothing imported"


def test_a_zero_price_on_a_priced_model_is_refused_unless_allow_free(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path, {"gpt-4o": {"input_cost_per_token": 0, "output_cost_per_token": 1e-05, "mode": "chat"}})
    code, _, err = run(capsys, "prices", "update", "--from", str(src))
    assert code != 0 and "gpt-4o" in err and "input_cost_per_token" in err and "--allow-free" in err
    assert table().resolve("gpt-4o", "openai").price.input.base == Decimal("2.5")  # type: ignore[union-attr]
    code, out, _ = run(capsys, "prices", "update", "--from", str(src), "--allow-free")
    assert code == 0 and "DOWN" in out
    assert table().resolve("gpt-4o", "openai").price.input.base == 0  # type: ignore[union-attr]


def test_a_zero_priced_unknown_model_is_left_out_and_stays_unpriced(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rows = {"ollama/llama9": {"input_cost_per_token": 0, "output_cost_per_token": 0, "mode": "chat"},
            "acme/paid": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "mode": "chat"},
            "text-embedding-9": {"input_cost_per_token": 1e-07, "output_cost_per_token": 0, "mode": "embedding"}}
    code, out, _ = run(capsys, "prices", "update", "--from", str(write(tmp_path, rows)), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["free_left_out"] == ["ollama/llama9"] and doc["imported"] == 2
    assert table().resolve("ollama/llama9") is None
    emb = table().resolve("text-embedding-9")
    assert emb is not None and emb.price.output.base > 0, "an embedding's $0 output is no price, never free"


def test_every_rate_that_goes_down_is_listed_and_dry_run_writes_nothing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rows = {"gpt-4o": {"input_cost_per_token": 2e-06, "output_cost_per_token": 1.2e-05,
                       "cache_read_input_token_cost": 1.5e-06, "mode": "chat"}}
    src = write(tmp_path, rows)
    code, out, _ = run(capsys, "prices", "update", "--from", str(src), "--dry-run")
    assert code == 0 and "dry run" in out
    assert "gpt-4o input: $2.5 -> $2 (DOWN)" in out
    assert "gpt-4o output: $10 -> $12 (up)" in out
    assert not (ledger.home() / "prices.json").exists()
    code, out, _ = run(capsys, "prices", "update", "--from", str(src), "--json")
    doc = json.loads(out)
    assert {(c["model"], c["field"]) for c in doc["lowered"]} == {("gpt-4o", "input")}
    assert {(c["model"], c["field"]) for c in doc["raised_or_new"]} == {("gpt-4o", "output"),
                                                                         ("gpt-4o", "cache_read")}


def test_a_second_import_keeps_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = {"acme/a": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "mode": "chat"}}
    two = {"acme/b": {"input_cost_per_token": 3e-06, "output_cost_per_token": 4e-06, "mode": "chat"}}
    assert run(capsys, "prices", "update", "--from", str(write(tmp_path, one, "one.json")))[0] == 0
    assert run(capsys, "prices", "update", "--from", str(write(tmp_path, two, "two.json")))[0] == 0
    assert table().resolve("acme/a") is not None and table().resolve("acme/b") is not None


def test_prices_show_lists_the_variants(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prices", "show", "gpt-5")
    assert code == 0 and "service_tier=priority" in out and "service_tier=flex" in out
    assert "processing=batch" in out and "web_search_k" in out and "per 1,000 searches" in out
    code, out, _ = run(capsys, "prices", "show", "claude-opus-4-8", "--json")
    doc = json.loads(out)
    fast = [v for v in doc["variants"] if v["when"] == {"speed": "fast"}]
    assert fast and fast[0]["rates"]["input"] == "10" and fast[0]["rates"]["output"] == "50"


def test_stale_prices_are_noted_in_decisions() -> None:
    from spendgate.estimate import Estimator
    from spendgate.pricing.table import _bundled_json

    raw = dict(_bundled_json())
    raw["source"] = {**raw["source"], "built": "2020-01-01"}
    est = Estimator(PriceTable.from_json(raw)).estimate(
        "openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert est.price.warning is not None and "last checked" in est.price.warning and "gpt-4o" in est.price.warning
    fresh = Estimator(PriceTable.bundled()).estimate(
        "openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert fresh.price.warning is None


def test_audio_rates_are_imported_and_a_zero_one_means_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {"acme/voice": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                           "input_cost_per_audio_token": 3.2e-05, "output_cost_per_audio_token": 0,
                           "mode": "chat"}}
    assert run(capsys, "prices", "update", "--from", str(write(tmp_path, rows)))[0] == 0
    p = table().resolve("acme/voice").price  # type: ignore[union-attr]
    assert p.input_audio is not None and p.input_audio.base == 32 and p.output_audio is None
    u = Usage(input_audio=1000, output=1000, output_audio=1000)
    assert usage_nanos(p, u) == (1000 * 32 + 1000 * 10) * 1000, "no audio-out rate: the text rate, never $0"


def test_skip_free_imports_the_rest_and_keeps_the_price_in_force(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rows = {"gpt-4o": {"input_cost_per_token": 0, "output_cost_per_token": 0, "mode": "chat"},
            "claude-sonnet-4-5": SONNET_45}
    src = write(tmp_path, rows)
    assert run(capsys, "prices", "update", "--from", str(src))[0] != 0
    code, out, _ = run(capsys, "prices", "update", "--from", str(src), "--skip-free")
    assert code == 0 and "1 left out for a $0 price" in out
    assert table().resolve("gpt-4o", "openai").how == "exact"  # type: ignore[union-attr]
    assert table().resolve("claude-sonnet-4-5", "anthropic").how == "imported"  # type: ignore[union-attr]


def test_an_import_merges_variants_rate_by_rate_and_lists_the_variant_rates_it_lowers(tmp_path: Path) -> None:
    from spendgate.pricing.litellm import plan_import, write_import

    src = write(tmp_path, {
        "gpt-5": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.25e-06,
                  "output_cost_per_token": 1e-05, "input_cost_per_token_priority": 1.5e-06,
                  "output_cost_per_token_priority": 1.2e-05},
        "gpt-5.4": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2.5e-06,
                    "output_cost_per_token": 1.5e-05, "input_cost_per_token_flex": 1.25e-06,
                    "output_cost_per_token_flex": 7.5e-06}})
    bundled = PriceTable.bundled()
    plan = plan_import(src, bundled)
    lowered = {c.describe() for c in plan.lowered}
    assert "gpt-5 input [service_tier=priority]: $2.5 -> $1.5 (DOWN)" in lowered
    dest = tmp_path / "imported.json"
    write_import(plan, dest)
    after = PriceTable.bundled().with_overrides(dest)
    priority = after.resolve("gpt-5", "openai").price.at_variant({"service_tier": "priority"})  # type: ignore[union-attr]
    assert priority.cache_read is not None and priority.cache_read.base == Decimal("0.25"), "kept: the file lacks it"
    flex = after.resolve("gpt-5.4", "openai").price.at_variant({"service_tier": "flex"})  # type: ignore[union-attr]
    assert dict(flex.input.tiers) == {272_000: Decimal("2.5")}, "the variant's >272K tier stays in force"


def test_provider_prefixed_rows_take_effect_for_that_providers_model(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    mistral = {"input_cost_per_token": 4e-06, "output_cost_per_token": 1.2e-05, "mode": "chat",
               "litellm_provider": "mistral", "max_output_tokens": 8191}
    gemini = {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 2e-05, "mode": "chat",
              "litellm_provider": "gemini"}
    rows = {"mistral/mistral-large-latest": mistral, "gemini/gemini-2.5-pro": gemini}
    assert run(capsys, "prices", "update", "--from", str(write(tmp_path, rows)))[0] == 0
    for model, provider, rates in (("mistral-large-latest", "mistral", (4, 12)),
                                   ("mistral/mistral-large-latest", None, (4, 12)),
                                   ("gemini-2.5-pro", "google", (Decimal("2.5"), 20)),
                                   ("gemini/gemini-2.5-pro", None, (Decimal("2.5"), 20))):
        res = table().resolve(model, provider)
        assert res is not None and res.how == "imported", model
        assert (res.price.input.base, res.price.output.base) == rates
    assert table().resolve("mistral-large-latest", "mistral").price.provider == "mistral"  # type: ignore[union-attr]
    # merged over the bundled row: its long-context tier (a field the file lacks) stays
    assert table().resolve("gemini-2.5-pro", "google").price.input.tiers  # type: ignore[union-attr]


def test_a_resellers_prefixed_row_never_replaces_the_providers_own_price(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    before = table().resolve("gpt-4o", "openai").price  # type: ignore[union-attr]
    row = {"input_cost_per_token": 5e-06, "output_cost_per_token": 2e-05, "mode": "chat", "litellm_provider": "azure"}
    assert run(capsys, "prices", "update", "--from", str(write(tmp_path, {"azure/gpt-4o": row})))[0] == 0
    assert table().resolve("gpt-4o", "openai").price.input == before.input  # type: ignore[union-attr]
