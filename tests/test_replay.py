"""Replay: the committed runaway-agent trace under the default policy, and the trace formats."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate.cli.main import main
from spendgate.errors import ConfigError
from spendgate.policy import default_policy, parse
from spendgate.pricing import PriceTable
from spendgate.replay import read_trace, replay

TRACE = Path(__file__).parent.parent / "examples" / "runaway-agent.jsonl"
PRICES = PriceTable.bundled()


def test_session_hour_stops_the_runaway_agent() -> None:
    records = list(read_trace(TRACE, PRICES))
    result = replay(records, default_policy(), PRICES)
    assert result.requests == len(records) == 384
    assert Decimal(90) < Decimal(result.total_nanos) / 10**9 < Decimal(100)
    # the session is held once it has spent what fits in $10 within the hour, and a "no" stops it
    [first] = result.firings
    assert (first.rule, first.action, first.session) == ("session-hour", "hold", "agent-7f3a")
    assert result.forwarded_nanos <= 10 * 10**9
    assert result.stopped_sessions == ["agent-7f3a"]
    assert result.reduction > 0.85
    # every forwarded request came before the hold
    assert result.forwarded + result.refused == 384
    assert first.ts == records[result.forwarded].ts


def test_persist_keeps_judging_under_the_rolling_window() -> None:
    records = list(read_trace(TRACE, PRICES))
    result = replay(records, default_policy(), PRICES, persist=True)
    assert result.forwarded_nanos > 10 * 10**9, "the window rolled and the agent resumed"
    assert result.stopped_sessions == []
    assert all(f.rule == "session-hour" for f in result.firings)
    # yet no rolling hour of forwarded spend ever exceeds the $10 budget
    series = result.series
    for i, (t_start, _, _) in enumerate(series):
        for t_end, _, after in series[i:]:
            if t_end - t_start >= 3600:
                break
            prev = series[i - 1][2] if i else 0
            assert after - prev <= 10 * 10**9, (t_start, t_end)


def test_approve_answers_yes_and_forwards_everything() -> None:
    result = replay(read_trace(TRACE, PRICES), default_policy(), PRICES, approve=True)
    assert result.refused == 0 and result.forwarded_nanos == result.total_nanos
    assert result.firings and all(f.detail == "approved" for f in result.firings)


def test_cli_replay_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(TRACE), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("total_usd", "forwarded_usd", "refused_usd", "reduction", "firings", "rules"):
        assert key in doc
    assert Decimal(doc["forwarded_usd"]) + Decimal(doc["refused_usd"]) == Decimal(doc["total_usd"])
    assert doc["firings"][0]["rule"] == "session-hour"


def test_cli_replay_with_policy_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('defaults = false\n[[budget]]\nname = "day-cap"\nusd = 25\nwindow = "day"\naction = "block"\n')
    chart = tmp_path / "c.html"
    assert main(["replay", str(TRACE), "--policy", str(policy), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "day-cap" in out and "reduction" in out
    assert "<svg" in chart.read_text()


def test_generic_and_event_formats_and_bad_lines(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        json.dumps({"timestamp": "2026-01-01T00:00:00Z", "model": "gpt-4o-mini", "input_tokens": 10,
                    "output_tokens": 10, "session_id": "a"}) + "\n\n"
        + json.dumps({"ts": 1767225601.0, "kind": "capture", "decision_id": "d", "model": "gpt-4o-mini",
                      "provider": "openai", "cost": 7500, "input_tokens": 10, "output_tokens": 10,
                      "dims": {"session": "a"}}) + "\n")
    result = replay(read_trace(trace, PRICES), parse({}), PRICES)
    assert (result.requests, result.total_nanos) == (2, 15_000)
    trace.write_text('{"timestamp": "yesterday", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}\n')
    with pytest.raises(ConfigError, match=r"line 1.*timestamp"):
        list(read_trace(trace, PRICES))
    trace.write_text('{"timestamp": 1, "model": "gpt-4o", "input_tokens": -1, "output_tokens": 1}\n')
    with pytest.raises(ConfigError, match="input_tokens"):
        list(read_trace(trace, PRICES))


def test_the_example_trace_is_possible() -> None:
    """No request in the example produced more output than its max_tokens allowed."""
    import json

    rows = [json.loads(line) for line in TRACE.read_text().splitlines()]
    assert len(rows) == 384
    assert [r for r in rows if r["output_tokens"] > r["max_tokens"]] == []
