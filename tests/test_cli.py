"""The command line through its entry point: exit codes, tables, and one JSON document with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.engine import Engine
from spendgate.policy import parse
from spendgate.request import Identity, Request


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prices_show_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prices", "show", "gpt-4o-2024-08-06")
    assert code == 0 and "openai/gpt-4o" in out and "$2.5" in out and "genai-prices" in out
    code, out, _ = run(capsys, "prices", "show", "claude-sonnet-4-5", "--json")
    doc = json.loads(out)
    assert doc["rates_usd_per_mtok"]["input"] == {"base": "3", "tiers": [[200000, "6"]]}
    assert doc["rates_usd_per_mtok"]["cache_write_1h"]["base"] == "6"
    code, out, _ = run(capsys, "prices", "show", "acme/unknown-model", "--json")
    assert code == 1 and json.loads(out)["charged_as"] == "openai/o1-pro"


def test_prices_update_then_show_uses_the_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "l.json"
    src.write_text(json.dumps({"acme/new": {"input_cost_per_token": 2e-06, "output_cost_per_token": 4e-06,
                                            "mode": "chat"}}))
    code, out, _ = run(capsys, "prices", "update", "--from", str(src), "--json")
    assert code == 0 and json.loads(out)["imported"] == 1
    code, out, _ = run(capsys, "prices", "show", "acme/new", "--json")
    doc = json.loads(out)
    assert doc["how"] == "imported" and doc["rates_usd_per_mtok"]["input"] == "2.000000"
    code, out, _ = run(capsys, "prices", "show", "acme/new")
    assert "$2.00 per Mtok" in out and "$4.00 per Mtok" in out and "2.000000" not in out, "as people read money"


def test_config_check_ok_and_failing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).parent.parent / "examples" / "spendgate.toml"
    code, out, _ = run(capsys, "config", "check", str(example))
    assert code == 0 and "team-month" in out and "frontier-per-call" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[budget]]\nname = "b"\nusd = "$10"\nwindow = "day"\n')
    code, out, err = run(capsys, "config", "check", str(bad))
    assert code == 2 and 'budget[0] "b".usd' in err and "$10" in err


def test_estimate_a_request_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = tmp_path / "req.json"
    body.write_text(json.dumps({"model": "claude-opus-4-8", "max_tokens": 1000,
                                "messages": [{"role": "user", "content": "hello"}]}))
    code, out, _ = run(capsys, "estimate", str(body), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["route"] == "/v1/messages" and doc["output_tokens"] == 1000
    assert doc["worst_case_usd"].startswith("0.025")
    body.write_text("{not json")
    code, _, err = run(capsys, "estimate", str(body))
    assert code == 1 and "not JSON" in err


def test_status_and_report_read_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = ledger.open(url)
    engine = Engine(parse({"budget": [{"name": "team-day", "usd": 5, "window": "day", "per": "team"}]}), store)
    for user, model in [("alice", "gpt-4o"), ("alice", "gpt-4o-mini"), ("bob", "gpt-4o")]:
        d = engine.decide(Request("openai", "/v1/chat/completions",
                                  {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
                                  Identity(user=user, team="ml")))
        engine.capture(d, {"usage": {"prompt_tokens": 1000, "completion_tokens": 100}})
    store.close()
    code, out, _ = run(capsys, "status", "--store", url)
    assert code == 0 and "team-day|team=ml" in out and "$5.00" in out
    code, out, _ = run(capsys, "status", "--store", url, "--json")
    [bucket] = json.loads(out)["buckets"]
    assert bucket["limit"] == "5" and bucket["held"] == "0"
    code, out, _ = run(capsys, "report", "--store", url, "--by", "user,model", "--since", "1h", "--json")
    rows = {(r["user"], r["model"]): r for r in json.loads(out)["rows"]}
    assert rows[("alice", "gpt-4o")]["usd"] == "0.0035"  # 1000 * $2.5/M + 100 * $10/M
    assert rows[("alice", "gpt-4o-mini")]["usd"] == "0.00021"
    assert json.loads(out)["total_usd"] == "0.00721"
    code, out, _ = run(capsys, "report", "--store", url, "--by", "user")
    assert code == 0 and "alice" in out and "bob" in out


def test_bad_store_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "--store", "mysql://x")
    assert code == 1 and "unknown store URL" in err


def test_a_malformed_tag_names_the_flag_it_came_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "keys", "create", "--user", "ana", "--tag", "search", "--store",
                       f"sqlite:///{tmp_path / 's.db'}")
    assert code == 2 and "--tag: expected key=value pairs, got 'search'" in err
    assert "X-Spendgate-Tags" not in err


def test_a_malformed_tags_header_names_the_header() -> None:
    from spendgate.proxy.identity import Credentials, identity

    with pytest.raises(ValueError, match=r"^X-Spendgate-Tags: expected key=value pairs, got 'search'$"):
        identity("openai", {"x-spendgate-tags": "search"}, {}, Credentials("k", "sk"))


@pytest.mark.parametrize("argv", [
    ["keys", "--store", "STORE", "list", "--json"],
    ["keys", "list", "--store", "STORE", "--json"],
    ["--store", "STORE", "keys", "--json", "list"],
    ["budgets", "--store", "STORE", "--json", "list"],
])
def test_a_group_takes_the_common_flags_before_its_action(argv: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`spendgate keys --store X list` means what `spendgate keys list --store X` does."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    ledger.open(url).close()
    assert main([url if a == "STORE" else a for a in argv]) == 0
    assert json.loads(capsys.readouterr().out) is not None
