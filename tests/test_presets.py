"""``spendgate init``: each preset is a policy that loads, checks, replays and decides as its comments say."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate import ledger
from spendgate.cli.init import PRESETS, preset_text
from spendgate.cli.main import main
from spendgate.engine import Engine
from spendgate.policy import Policy, default_policy, load
from spendgate.policy.defaults import DEFAULT_RULES
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import Usage
from spendgate.replay import ReplayResult, read_trace, replay
from spendgate.request import Identity, Request

TRACE = Path(__file__).parent.parent / "examples" / "runaway-agent.jsonl"
PRICES = PriceTable.bundled()
T0 = 1_800_000_000.0  # 2027-01-15, mid-month: a month window does not turn during a test
CHAT = "/v1/chat/completions"


def _init(tmp_path: Path, preset: str) -> Path:
    path = tmp_path / f"{preset}.toml"
    assert main(["init", "--preset", preset, "--path", str(path)]) == 0
    return path


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Any]:
    stores: list[ledger.Ledger] = []

    def build(preset: str) -> Engine:
        stores.append(ledger.open("memory://"))
        return Engine(load(_init(tmp_path, preset)), stores[-1], PRICES)

    yield build
    for s in stores:
        s.close()


def chat(model: str, max_tokens: int, **ident: Any) -> Request:
    return Request("openai", CHAT, {"model": model, "max_tokens": max_tokens,
                                    "messages": [{"role": "user", "content": "hi"}]}, Identity(**ident))


# -- every preset --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_is_written_loads_and_checks(preset: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _init(tmp_path, preset)
    assert path.read_text(encoding="utf-8") == preset_text(preset)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"wrote {path} (preset {preset})", "next:", f"  spendgate config check {path}",
                   f"  spendgate serve --config {path}"]
    policy = load(path)
    assert policy.source == str(path)
    assert main(["config", "check", str(path)]) == 0
    # the file says where it came from, and every budget is explained by the comment above it
    lines = preset_text(preset).splitlines()
    assert lines[0].startswith("# spendgate policy: ") and f"--preset {preset}" in lines[0]
    budgets = [i for i, line in enumerate(lines) if line == "[[budget]]"]
    assert len(budgets) == {"solo": 4, "team": 4, "strict-tiers": 3}[preset]
    assert all(lines[i - 1].startswith("# ") for i in budgets)


def test_the_default_preset_is_solo_at_spendgate_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--json"]) == 0
    assert capsys.readouterr().out == '{\n  "path": "./spendgate.toml",\n  "preset": "solo"\n}\n'
    assert (tmp_path / "spendgate.toml").read_text(encoding="utf-8") == preset_text("solo")


def test_solo_writes_out_exactly_the_built_in_rules(tmp_path: Path) -> None:
    """Redefining a default by name replaces it: solo's four budgets are the built-in four, in their order."""
    assert load(_init(tmp_path, "solo")).rules == DEFAULT_RULES


def test_team_and_strict_tiers_keep_the_built_in_rules(tmp_path: Path) -> None:
    team = {r.name: r for r in load(_init(tmp_path, "team")).rules}
    assert list(team) == ["user-day", "team-month-downgrade", "team-month", "key-day",
                          "request-soft", "session-hour", "request-hard"]
    assert (team["user-day"].usd, team["user-day"].window.period, team["user-day"].per,
            team["user-day"].action) == (20, "day", "user", "hold")
    assert (team["team-month"].usd, team["team-month"].window.period, team["team-month"].per,
            team["team-month"].action) == (500, "month", "team", "block")
    assert team["team-month-downgrade"].downgrade == {"gpt-5": "gpt-5-mini", "claude-opus-4-1": "claude-sonnet-4-5"}
    assert team["key-day"] == next(r for r in DEFAULT_RULES if r.name == "key-day")
    strict = load(_init(tmp_path, "strict-tiers"))
    assert [(r.name, r.usd, r.match.tiers, r.action) for r in strict.rules[:3]] == [
        ("frontier-per-call", Decimal("0.50"), ("frontier",), "block"),
        ("standard-per-call", Decimal("0.10"), ("standard",), "block"),
        ("small-per-call", Decimal("0.02"), ("small",), "block")]
    assert {r.name for r in strict.rules[3:]} == {r.name for r in DEFAULT_RULES}


def test_every_model_a_preset_names_is_priced(tmp_path: Path) -> None:
    """A downgrade to a model the price table does not know would be charged as the dearest model."""
    team = load(_init(tmp_path, "team"))
    for rule in team.rules:
        for a, b in rule.downgrade.items():
            for model in (a, b):
                res = PRICES.resolve(model)
                assert res is not None and res.price.model == model, model


# -- replaying the runaway agent -----------------------------------------------------------------

def _replay(policy: Policy, **kw: Any) -> ReplayResult:
    return replay(read_trace(TRACE, PRICES), policy, PRICES, **kw)


def _summary(r: ReplayResult) -> tuple[int, int, int, Counter[tuple[str, str]]]:
    return r.forwarded, r.refused, r.forwarded_nanos, Counter((f.rule, f.action) for f in r.firings)


def test_solo_replays_the_runaway_agent_as_the_built_in_policy_does(tmp_path: Path) -> None:
    solo = load(_init(tmp_path, "solo"))
    got, built_in = _replay(solo), _replay(default_policy())
    assert _summary(got) == _summary(built_in) == (38, 346, 9_041_514_900, Counter({("session-hour", "hold"): 1}))
    assert got.stopped_sessions == ["agent-7f3a"]
    kept_sending, built_in = _replay(solo, persist=True), _replay(default_policy(), persist=True)
    assert _summary(kept_sending) == _summary(built_in)
    assert (kept_sending.forwarded, kept_sending.refused) == (79, 305)


def test_team_adds_a_daily_hold_per_user_to_the_runaway_agent(tmp_path: Path) -> None:
    team = load(_init(tmp_path, "team"))
    stopped = _replay(team)  # a "no" to the first hold stops the session before $20 are spent
    assert (stopped.forwarded, stopped.refused, stopped.forwarded_nanos) == (38, 346, 9_041_514_900)
    persisted = _replay(team, persist=True)  # the agent keeps sending: past its $20 the user's day is held
    assert (persisted.forwarded, persisted.refused) == (79, 305)
    held = Counter(f.rule for f in persisted.firings if f.action == "hold")
    assert held == {"session-hour": 252, "user-day": 53}
    assert persisted.forwarded_nanos == 19_338_393_750 <= 20 * 10**9


def test_strict_tiers_refuses_every_call_of_the_runaway_agent(tmp_path: Path) -> None:
    """claude-sonnet-4-5 is a standard model; each call's max_tokens (16K or 32K) puts it above 10¢."""
    result = _replay(load(_init(tmp_path, "strict-tiers")))
    assert (result.requests, result.forwarded, result.refused, result.forwarded_nanos) == (384, 0, 384, 0)
    assert Counter((f.rule, f.action) for f in result.firings) == {("standard-per-call", "block"): 384}
    assert result.stopped_sessions == []  # a block refuses the call; it does not wait for anyone


# -- strict-tiers: the engine's decisions ---------------------------------------------------------

def test_strict_tiers_places_real_models_and_unknown_ones_in_the_strictest_tier(tmp_path: Path) -> None:
    tiers = load(_init(tmp_path, "strict-tiers")).tiers
    placed = {m: tiers.tier_of(m) for m in (
        "gpt-5", "gpt-5-2025-08-07", "o3", "claude-opus-4-1", "openai/gpt-5",
        "gpt-4o", "gpt-4.1", "claude-sonnet-4-5",
        "gpt-5-mini", "gpt-4o-mini", "o4-mini", "gpt-4.1-nano", "claude-haiku-4-5",
        "acme-llm-9")}
    assert placed == {"gpt-5": "frontier", "gpt-5-2025-08-07": "frontier", "o3": "frontier",
                      "claude-opus-4-1": "frontier", "openai/gpt-5": "frontier",
                      "gpt-4o": "standard", "gpt-4.1": "standard", "claude-sonnet-4-5": "standard",
                      "gpt-5-mini": "small", "gpt-4o-mini": "small", "o4-mini": "small",
                      "gpt-4.1-nano": "small", "claude-haiku-4-5": "small", "acme-llm-9": "small"}


def test_strict_tiers_refuses_a_frontier_call_above_50_cents(engine: Any) -> None:
    e = engine("strict-tiers")
    # gpt-5: $10 per Mtok of output, so 60,000 tokens are a $0.60 worst case and 40,000 a $0.40 one
    d = e.decide(chat("gpt-5", 60_000, session="s1"), now=T0)
    assert (d.allowed, d.action, d.trip.rule.name, d.dims["tier"]) == (False, "block", "frontier-per-call", "frontier")
    assert (d.trip.limit, d.trip.amount) == (500_000_000, d.estimate.cost_nanos)
    assert d.estimate.cost_nanos > 600_000_000
    ok = e.decide(chat("gpt-5", 40_000, session="s1"), now=T0)
    assert (ok.allowed, ok.action, ok.dims["tier"]) == (True, "allow", "frontier")
    assert ok.estimate.cost_nanos < 500_000_000


def test_strict_tiers_caps_an_unknown_model_at_2_cents(engine: Any) -> None:
    """An unknown model is charged as the dearest known one (o1-pro, $600 per Mtok of output) and
    capped as a small model: 20 output tokens fit in 2¢, 40 do not (though they would fit in 10¢)."""
    e = engine("strict-tiers")
    ok = e.decide(chat("acme-llm-9", 20, session="s2"), now=T0)
    assert (ok.allowed, ok.dims["tier"]) == (True, "small")
    assert ok.estimate.cost_nanos < 20_000_000
    d = e.decide(chat("acme-llm-9", 40, session="s2"), now=T0)
    assert (d.allowed, d.action, d.trip.rule.name, d.trip.limit) == (False, "block", "small-per-call", 20_000_000)
    assert 20_000_000 < d.estimate.cost_nanos < 100_000_000


# -- team: downgrade, then block ------------------------------------------------------------------

def test_team_downgrades_frontier_models_past_450_then_blocks_at_500(engine: Any) -> None:
    e = engine("team")
    # $460 of gpt-5 spent by one user of team ml (each user and key gets its own daily buckets)
    d = e.decide(chat("gpt-5", 1000, user="a", team="ml", key="ka"), now=T0)
    assert d.action == "allow"
    e.capture(d, Usage(input=0, output=46_000_000), now=T0)
    down = e.decide(chat("gpt-5", 1000, user="b", team="ml", key="kb"), now=T0 + 1)
    assert (down.allowed, down.action, down.edits, down.applied) == (
        True, "downgrade", {"model": "gpt-5-mini"}, ("team-month-downgrade",))
    e.capture(down, Usage(input=0, output=1000), now=T0 + 1)
    # the cheaper model is not counted by the downgrade budget, only by the team's $500
    mini = e.decide(chat("gpt-5-mini", 1000, user="c", team="ml", key="kc"), now=T0 + 2)
    assert (mini.allowed, mini.action) == (True, "allow")
    e.capture(mini, Usage(input=0, output=20_000_000), now=T0 + 2)  # $40 more: $500.0x in all
    for n, model in enumerate(("gpt-5", "gpt-5-mini", "claude-haiku-4-5")):
        refused = e.decide(chat(model, 100, user=f"d{n}", team="ml", key=f"kd{n}"), now=T0 + 3)
        assert (refused.allowed, refused.action, refused.trip.rule.name) == (False, "block", "team-month"), model
    other = e.decide(chat("gpt-5", 1000, user="z", team="infra", key="kz"), now=T0 + 3)
    assert (other.allowed, other.action) == (True, "allow")


# -- writing the file -----------------------------------------------------------------------------

def test_an_existing_file_is_kept_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spendgate.toml"
    path.write_text("# mine\n", encoding="utf-8")
    assert main(["init", "--path", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"spendgate: error: {path} already exists; pass --force to overwrite it\n"
    assert path.read_text(encoding="utf-8") == "# mine\n"
    assert main(["init", "--preset", "team", "--path", str(path), "--force", "--json"]) == 0
    assert capsys.readouterr().out == f'{{\n  "path": "{path}",\n  "preset": "team"\n}}\n'
    assert path.read_text(encoding="utf-8") == preset_text("team")


def test_an_unknown_preset_is_an_argparse_error_naming_the_choices(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["init", "--preset", "enterprise", "--path", str(tmp_path / "x.toml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --preset: invalid choice: 'enterprise'" in err
    assert "'solo', 'team', 'strict-tiers'" in err
    assert not (tmp_path / "x.toml").exists()


def test_a_path_with_spaces_is_quoted_in_the_next_commands(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "my policy.toml"
    assert main(["init", "--path", str(path)]) == 0
    assert f"  spendgate config check '{path}'" in capsys.readouterr().out.splitlines()
