"""spendgate reconcile: provider cost exports read exactly, compared with the ledger per UTC day and model."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.errors import ConfigError
from spendgate.ledger import Event
from spendgate.pricing.table import PriceTable
from spendgate.reconcile import model_key, parse_export, read_export, reconcile

EXAMPLES = Path(__file__).parent.parent / "examples"
OPENAI = EXAMPLES / "reconcile-openai-costs.json"
ANTHROPIC = EXAMPLES / "reconcile-anthropic-cost-report.json"
CSV = EXAMPLES / "reconcile.csv"
D24, D25, D26 = dt.date(2026, 11, 24), dt.date(2026, 11, 25), dt.date(2026, 11, 26)
PRICES = PriceTable.bundled()
NANO = 1_000_000_000


def provider_totals(path: Path) -> dict[tuple[dt.date, str], Decimal]:
    """What the export says was billed, per day and model, compared against an empty ledger."""
    result = reconcile(read_export(path), [], PRICES, dt.date(2000, 1, 1), dt.date(2100, 1, 1))
    assert all(r.ledger_nanos == 0 for r in result.rows)
    return {(r.day, r.model): r.provider_usd for r in result.rows}


def since_examples() -> str:
    """A --since that reaches back to the examples' first day from whenever the test runs."""
    return f"{(dt.datetime.now(dt.UTC).date() - D24).days + 2}d"


def at(day: dt.date, hour: int = 12) -> float:
    return dt.datetime.combine(day, dt.time(hour), dt.UTC).timestamp()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No imported prices from the user's own SPENDGATE_HOME."""
    monkeypatch.setenv("SPENDGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPENDGATE_STORE", raising=False)
    monkeypatch.delenv("SPENDGATE_CONFIG", raising=False)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    store = ledger.open(url)
    events = [
        Event(at(D24, 1), "capture", "a", "gpt-4o-2024-08-06", "openai", 4_000_000_000),
        Event(at(D24, 9), "capture", "b", "gpt-4o", "openai", 350_000_000),
        Event(at(D24, 23), "expired", "c", "gpt-4o-mini", "openai", 166_200_000),
        Event(at(D25, 0), "capture", "d", "gpt-4o", "openai", 3_100_000_000),  # billed 3.3375: off by 7 %
        Event(at(D25, 5), "approval", "e", "gpt-4o", "openai", 0, dims={"channel": "operator"}),
        Event(at(D25, 6), "unknown", "f", "gpt-4o-mini-2024-07-18", "openai", 120_600_000),
        Event(at(D26, 2), "capture", "g", "gpt-4o", "openai", 7_700_000_000),
        Event(at(D26, 3), "capture", "h", "gpt-4o-mini", "openai", 48_960_000),  # billed 0.048: exactly +2 %
        Event(at(D24, 4), "capture", "i", "claude-sonnet-4-5", "anthropic", 9_510_000_000),
        Event(at(D24 - dt.timedelta(days=1)), "capture", "j", "gpt-4o", "openai", 1_000_000_000),
    ]
    for e in events:
        store.record(e)
    store.close()
    return url


# -- the formats ----------------------------------------------------------------------------------------

def test_openai_costs_example_parsed_exactly() -> None:
    export = read_export(OPENAI)
    assert export.format == "openai" and export.provider == "openai" and export.days == {D24, D25, D26}
    assert provider_totals(OPENAI) == {
        (D24, "gpt-4o"): Decimal("4.35"), (D24, "gpt-4o-mini"): Decimal("0.1662"),
        (D25, "gpt-4o"): Decimal("3.3375"), (D25, "gpt-4o-mini"): Decimal("0.1206"),
        (D26, "gpt-4o"): Decimal("7.7"), (D26, "gpt-4o-mini"): Decimal("0.048")}
    # the JSON floats are read from their digits, never through a binary float
    assert all(isinstance(line.usd, Decimal) for line in export.lines)
    assert export.lines[3].usd == Decimal("0.1212") and export.lines[3].model == "gpt-4o-mini-2024-07-18"


def test_anthropic_cost_report_example_is_in_cents() -> None:
    export = read_export(ANTHROPIC)
    assert export.format == "anthropic" and export.provider == "anthropic" and export.days == {D24, D25}
    assert provider_totals(ANTHROPIC) == {
        (D24, "claude-haiku-4-5"): Decimal("1.272"),  # "31.2" + "96.0" cents
        (D24, "claude-sonnet-4-5"): Decimal("9.51"),  # "225.0" + "13.5" + "712.5" cents
        (D25, "claude-sonnet-4-5"): Decimal("7.2735"),
        (D25, "(web_search)"): Decimal("0.2")}


def test_csv_example_parsed_exactly() -> None:
    export = read_export(CSV)
    assert export.format == "csv" and export.provider is None and export.days == {D24, D25, D26}
    totals = provider_totals(CSV)
    assert totals[(D25, "claude-sonnet-4-5")] == Decimal("7.2735")  # two rows, one day and model
    assert totals[(D25, "gpt-4o")] == Decimal("3.3375") and len(totals) == 8


def test_a_list_of_pages_and_a_page_with_more_to_fetch() -> None:
    one = json.loads(OPENAI.read_text())
    first = {**one, "data": one["data"][:2], "has_more": True, "next_page": "page_2"}
    second = {**one, "data": one["data"][2:]}
    both = parse_export(json.dumps([first, second]), "pages.json")
    assert both.days == {D24, D25, D26} and not both.notes
    partial = parse_export(json.dumps(first), "p1.json")
    assert partial.days == {D24, D25} and "has_more" in partial.notes[0] and "page_2" in partial.notes[0]
    with pytest.raises(ConfigError, match=r"\[1\]data\[0\]: a second bucket for 2026-11-24"):
        parse_export(json.dumps([first, first]), "twice.json")


def test_an_export_without_models_is_compared_per_day() -> None:
    doc = {"object": "page", "data": [{"object": "bucket", "start_time": int(at(D24, 0)),
                                       "end_time": int(at(D25, 0)), "results": [
        {"object": "organization.costs.result", "amount": {"value": 4.5, "currency": "usd"},
         "line_item": None, "project_id": None}]}], "has_more": False, "next_page": None}
    events = [Event(at(D24, 1), "capture", "a", "gpt-4o", "openai", 4_000_000_000),
              Event(at(D24, 2), "capture", "b", "o3", "openai", 500_000_000)]
    result = reconcile(parse_export(json.dumps(doc)), events, PRICES, D24, D24)
    [row] = result.rows
    assert (row.model, row.ledger_nanos, row.provider_usd, row.flagged) == ("(all models)", 4_500_000_000,
                                                                            Decimal("4.5"), False)
    assert any("per day only" in n for n in result.notes)


def test_model_names_compare_on_the_price_tables_model() -> None:
    assert model_key("gpt-4o-2024-08-06", PRICES) == "gpt-4o"
    assert model_key("claude-sonnet-4-5-20250929", PRICES) == "claude-sonnet-4-5"
    assert model_key("  acme-private-model ", PRICES) == "acme-private-model"


# -- against a ledger -----------------------------------------------------------------------------------

def test_reconcile_openai_export_against_a_ledger(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "reconcile", str(OPENAI), "--store", store_url, "--since", since_examples(), "--json")
    assert code == 0
    doc = json.loads(out)
    rows = {(r["day"], r["model"]): r for r in doc["rows"]}
    assert set(rows) == {(d.isoformat(), m) for d in (D24, D25, D26) for m in ("gpt-4o", "gpt-4o-mini")}
    # 2026-11-24: a dated id and an alias of the same model add up; the expired hold counts as spend
    assert rows[("2026-11-24", "gpt-4o")] == {
        "day": "2026-11-24", "model": "gpt-4o", "ledger_usd": "4.35", "provider_usd": "4.35", "diff_usd": "0",
        "ratio": "1.0000", "flagged": False, "ledger_requests": 2}
    assert rows[("2026-11-24", "gpt-4o-mini")]["diff_usd"] == "0"
    off = rows[("2026-11-25", "gpt-4o")]  # 3.10 seen, 3.3375 billed; the approval is not spend
    assert (off["ledger_usd"], off["provider_usd"], off["diff_usd"], off["ratio"], off["flagged"],
            off["ledger_requests"]) == ("3.1", "3.3375", "-0.2375", "0.9288", True, 1)
    edge = rows[("2026-11-26", "gpt-4o-mini")]  # exactly 2 % over is not "more than 2 %"
    assert (edge["diff_usd"], edge["ratio"], edge["flagged"]) == ("0.00096", "1.0200", False)
    assert doc["flagged"] == 1 and doc["flagged_days"] == 1
    days = {d["day"]: d for d in doc["days"]}
    assert days["2026-11-25"]["diff_usd"] == "-0.2375" and days["2026-11-25"]["flagged"] is True
    # the anthropic event is another provider's; the day before the export is not compared (but said)
    assert doc["ledger_total_usd"] == "15.48576" and doc["provider_total_usd"] == "15.7223"
    assert doc["diff_total_usd"] == "-0.23654" and doc["ratio_total"] == "0.9850"
    assert any("2026-11-23" in n and "does not cover" in n for n in doc["notes"])


def test_reconcile_prints_a_table_and_strict_fails_on_a_flag(store_url: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "reconcile", str(OPENAI), "--store", store_url, "--since", since_examples())
    assert code == 0
    assert out.splitlines()[1].split() == ["day", "model", "ledger", "provider", "diff", "ratio", "flag"]
    flagged = [line for line in out.splitlines() if "off >2%" in line and line.startswith("2026-11-25  gpt-4o ")]
    assert flagged and "$3.10" in flagged[0] and "-$0.2375" in flagged[0] and "0.9288" in flagged[0]
    assert "total: ledger $15.49, provider $15.72, diff -$0.2365" in out and "1 of 6 row(s)" in out
    assert "does not cover" in err
    code, _, _ = run(capsys, "reconcile", str(OPENAI), "--store", store_url, "--since", since_examples(), "--strict")
    assert code == 1
    code, _, _ = run(capsys, "reconcile", str(ANTHROPIC), "--store", store_url, "--since", since_examples(),
                     "--strict", "--json")
    assert code == 1  # 2026-11-25: claude-sonnet-4-5 billed, nothing in the ledger


def test_reconcile_anthropic_and_csv(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "reconcile", str(ANTHROPIC), "--store", store_url, "--since", since_examples(),
                       "--json")
    rows = {(r["day"], r["model"]): r for r in json.loads(out)["rows"]}
    assert code == 0 and set(rows) == {("2026-11-24", "claude-haiku-4-5"), ("2026-11-24", "claude-sonnet-4-5"),
                                       ("2026-11-25", "claude-sonnet-4-5"), ("2026-11-25", "(web_search)")}
    assert rows[("2026-11-24", "claude-sonnet-4-5")]["diff_usd"] == "0"
    assert rows[("2026-11-24", "claude-haiku-4-5")]["ratio"] == "0.0000"
    code, out, _ = run(capsys, "reconcile", str(CSV), "--store", store_url, "--since", since_examples(), "--json")
    doc = json.loads(out)
    rows = {(r["day"], r["model"]): r for r in doc["rows"]}
    assert rows[("2026-11-24", "claude-sonnet-4-5")]["flagged"] is False  # a CSV compares every provider
    code, out, _ = run(capsys, "reconcile", str(CSV), "--store", store_url, "--since", since_examples(), "--json",
                       "--provider", "openai")
    assert ("2026-11-24", "claude-sonnet-4-5") in {(r["day"], r["model"]) for r in json.loads(out)["rows"]}
    assert json.loads(out)["ledger_total_usd"] == "15.48576"


def test_since_leaves_older_days_out(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    older = (dt.datetime.now(dt.UTC).date() - D26).days  # the window starts the day after 2026-11-26
    code, out, err = run(capsys, "reconcile", str(OPENAI), "--store", store_url, "--since", f"{older - 1}d")
    assert code == 0 and "nothing to compare" in out and "widen --since" in err


# -- bad files ------------------------------------------------------------------------------------------

BAD_CSV = [
    ("date,model\n2026-11-24,gpt-4o\n", "line 1: the header lacks usd"),
    ("date,model,usd\n2026-11-24,gpt-4o,1\n\n2026-11-25,gpt-4o,abc\n",
     "reconcile.csv line 4: usd: expected a number of dollars, got 'abc'"),
    ("date,model,usd\n2026-11-24,gpt-4o,-1.5\n", "line 2: usd: expected a non-negative number of dollars, got '-1.5'"),
    ("date,model,usd\n2026-11-24,gpt-4o,\n", "line 2: usd: expected a number of dollars, got ''"),
    ("date,model,usd\n2026-11-24,gpt-4o,NaN\n", "line 2: usd: expected a number of dollars, got 'NaN'"),
    ("date,model,usd\n24/11/2026,gpt-4o,1\n", "line 2: date: expected a UTC day YYYY-MM-DD, got '24/11/2026'"),
    ("date,model,usd\n2026-11-24,gpt-4o\n", "line 2: expected 3 fields (date,model,usd), got 2"),
    ("date,model,usd\n2026-11-24,,1\n", "line 2: model: empty"),
    ("date,model,usd\n", "no cost rows"),
    ("date,model,usd,usd\n2026-11-24,gpt-4o,1,2\n", "column 'usd' appears twice"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CSV)
def test_bad_csv_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                  message: str) -> None:
    path = tmp_path / "reconcile.csv"
    path.write_text(text)
    code, out, err = run(capsys, "reconcile", str(path), "--store", f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 2 and not out and message in err, err


def _openai(**result: object) -> dict[str, object]:
    return {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": 1795478400, "end_time": 1795564800,
         "results": [{"object": "organization.costs.result", "amount": {"value": 1.5, "currency": "usd"},
                      "line_item": "gpt-4o, input", "project_id": None, **result}]}]}


def _anthropic(**result: object) -> dict[str, object]:
    return {"has_more": False, "next_page": None, "data": [
        {"starting_at": "2026-11-24T00:00:00Z", "ending_at": "2026-11-25T00:00:00Z",
         "results": [{"currency": "USD", "amount": "150", "model": "claude-sonnet-4-5", "cost_type": "tokens",
                      **result}]}]}


BAD_JSON: list[tuple[object, str]] = [
    (_openai(amount={"value": "abc", "currency": "usd"}),
     "data[0].results[0].amount.value: expected a number of dollars, got 'abc'"),
    (_openai(amount={"value": -0.5, "currency": "usd"}),
     "data[0].results[0].amount.value: expected a non-negative number of dollars"),
    (_openai(amount={"value": True, "currency": "usd"}), "data[0].results[0].amount.value: expected a number"),
    (_openai(amount={"value": 1, "currency": "eur"}), "data[0].results[0].amount.currency: expected \"usd\""),
    (_openai(amount=None), "data[0].results[0].amount: expected"),
    (_openai(object="organization.usage.completions.result"), "a usage export?"),
    ({"object": "page", "data": [{"object": "bucket", "start_time": 1795478400, "end_time": 1795482000,
                                  "results": []}]}, "data[0]: a bucket from 2026-11-24T00:00:00Z to "
                                                    "2026-11-24T01:00:00Z; expected whole UTC days"),
    ({"object": "page", "data": [{"object": "bucket", "start_time": "yesterday", "end_time": 1,
                                  "results": []}]}, "data[0].start_time: expected Unix seconds"),
    ({"object": "page", "data": [{"object": "bucket", "start_time": 10**20, "end_time": 1,
                                  "results": []}]}, "data[0].start_time: 100000000000000000000 is not a time"),
    ({"object": "page", "data": [{"object": "bucket", "start_time": 1795478400, "end_time": 1795564800}]},
     "data[0].results: expected a list of costs, got null"),
    (_anthropic(amount="-12"), "data[0].results[0].amount: expected a non-negative number of cents"),
    (_anthropic(amount="twelve"), "data[0].results[0].amount: expected a number of cents"),
    (_anthropic(currency="EUR"), "data[0].results[0].currency: expected \"USD\""),
    ({"data": [{"starting_at": "2026-11-24", "ending_at": "2026-11-25T00:00:00Z", "results": []}]},
     "data[0].starting_at: expected an RFC 3339 time"),
    ({"usage": []}, "data: expected a list of time buckets, got null"),
    ({"data": [{"when": 1}]}, "data: neither OpenAI nor Anthropic buckets: expected OpenAI costs buckets"),
    ({"data": []}, "data: no cost buckets"),
    ([], "an empty list"),
    ({"object": "page", "data": []}, "no cost buckets"),
    ([_openai(), "page two"], "[1]: expected a cost export page"),
]


@pytest.mark.parametrize(("doc", "message"), BAD_JSON)
def test_bad_json_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: object,
                                   message: str) -> None:
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(doc))
    code, out, err = run(capsys, "reconcile", str(path), "--json")
    assert code == 2 and not out and f"{path}: " in err and message in err, err


@pytest.mark.parametrize(("text", "message"), [
    ('{"data": [1,\n 2', "costs.json line 2: not valid JSON"),
    ('{"object": "page", "data": [{"object": "bucket", "start_time": 1795478400, "end_time": 1795564800, '
     '"results": [{"amount": {"value": NaN}}]}]}', "NaN is not a number of dollars"),
    ("", "empty file"),
    ("[" * 100_000, "nested too deeply"),
])
def test_unreadable_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    path = tmp_path / "costs.json"
    path.write_text(text)
    code, _, err = run(capsys, "reconcile", str(path))
    assert code == 2 and message in err, err


def test_missing_file_and_bad_since(tmp_path: Path, capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    code, _, err = run(capsys, "reconcile", str(tmp_path / "nope.csv"))
    assert code == 2 and "nope.csv: cannot read" in err
    code, _, err = run(capsys, "reconcile", str(CSV), "--store", store_url, "--since", "a while")
    assert code == 2 and "--since" in err
    code, _, err = run(capsys, "reconcile", str(CSV), "--store", store_url, "--since", "9999999999d")
    assert code == 2 and "--since: '9999999999d' reaches back" in err


# -- the property ---------------------------------------------------------------------------------------

MODELS = ["gpt-4o", "gpt-4o-2024-08-06", "claude-sonnet-4-5-20250929", "acme-model", "gemini-2.5-pro"]
amounts = st.builds(lambda n, places: Decimal(n).scaleb(-places), st.integers(0, 10**12 - 1), st.integers(0, 15))
rows = st.lists(st.tuples(st.dates(dt.date(2026, 1, 1), dt.date(2026, 1, 20)), st.sampled_from(MODELS), amounts),
                min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows)
def test_csv_provider_totals_are_the_exact_sums_of_the_rows(
        rows: list[tuple[dt.date, str, Decimal]]) -> None:
    text = "date,model,usd\n" + "".join(f"{d.isoformat()},{m},{usd:f}\n" for d, m, usd in rows)
    result = reconcile(parse_export(text, "random.csv"), [], PRICES, dt.date(2026, 1, 1), dt.date(2026, 1, 20))
    expected: dict[tuple[dt.date, str], Fraction] = {}
    for d, m, usd in rows:  # summed as fractions: exact whatever the digits
        key = (d, model_key(m, PRICES))
        expected[key] = expected.get(key, Fraction(0)) + Fraction(usd)
    got = {(r.day, r.model): Fraction(r.provider_usd) for r in result.rows}
    assert got == expected
    assert Fraction(result.provider_total_usd) == sum((Fraction(usd) for *_, usd in rows), Fraction(0))
