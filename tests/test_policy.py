"""The policy file: strict validation that names the key, the spec's example, the defaults."""

from __future__ import annotations

import datetime as dt
import tomllib
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.errors import ConfigError
from spendgate.policy import default_policy, load, parse
from spendgate.policy.model import Window
from spendgate.policy.parse import BUDGET_KEYS

SPEC_EXAMPLE = Path(__file__).parent.parent / "examples" / "spendgate.toml"


def test_spec_example_parses_into_what_it_says() -> None:
    p = load(SPEC_EXAMPLE)
    month, per_call, *kept = p.rules
    assert [r.name for r in kept] == ["request-soft", "session-hour", "key-day", "request-hard"], "defaults stay on"
    assert (month.name, month.usd, month.window.period, month.per, month.action) == \
        ("team-month", Decimal(200), "month", "team", "downgrade")
    assert month.timezone == "Europe/Berlin" and month.downgrade["gpt-4o"] == "gpt-4o-mini"
    assert month.alert_at == (Decimal("0.5"), Decimal("0.8"), Decimal("1.0"))
    assert (per_call.usd, per_call.window.kind, per_call.min_output) == (Decimal("0.5"), "request", 256)
    assert per_call.match.tiers == ("frontier",)
    assert p.tiers.tier_of("gpt-5.1") == "frontier" and p.tiers.tier_of("totally-new-model") == "small"
    assert p.unpriced == "dearest" and p.on_store_error == "block"


def test_defaults_are_the_four_rules_of_the_spec() -> None:
    rules = {r.name: r for r in default_policy().rules}
    assert set(rules) == {"request-soft", "session-hour", "key-day", "request-hard"}
    assert (rules["key-day"].per, rules["key-day"].window.seconds, rules["key-day"].usd, rules["key-day"].action) == \
        ("key", 86400, Decimal(100), "hold")
    assert (rules["request-soft"].usd, rules["request-soft"].tokens, rules["request-soft"].action) == \
        (Decimal(10), 500_000, "hold")
    assert (rules["session-hour"].per, rules["session-hour"].window.seconds) == ("session", 3600)
    assert rules["request-hard"].immutable and rules["request-hard"].action == "block"


def _budget(**kw: object) -> dict:
    return {"budget": [{"name": "b", "usd": 1, "window": "day", **kw}]}


@pytest.mark.parametrize(("doc", "key"), [
    ({"stor": "memory://"}, "stor"),
    (_budget(usd="$10"), 'budget[0] "b".usd'),
    (_budget(usd=-1), 'budget[0] "b".usd'),
    (_budget(usd=True), 'budget[0] "b".usd'),
    (_budget(usd=float("nan")), 'budget[0] "b".usd'),
    (_budget(window="1 hour"), 'budget[0] "b".window'),
    (_budget(window="0m"), 'budget[0] "b".window'),
    (_budget(action="nag"), 'budget[0] "b".action'),
    (_budget(per="department"), 'budget[0] "b".per'),
    (_budget(timezone="Mars/Olympus"), 'budget[0] "b".timezone'),
    (_budget(tokens=1.5), 'budget[0] "b".tokens'),
    (_budget(limit=5), 'budget[0] "b".limit'),
    (_budget(match={"modle": "x"}), 'budget[0] "b".match.modle'),
    (_budget(action="downgrade"), 'budget[0] "b".downgrade'),
    (_budget(action="clamp", min_output=0), 'budget[0] "b".min_output'),
    (_budget(alert_at=[0.5, "lots"]), 'budget[0] "b".alert_at[1]'),
    (_budget(immutable="yes"), 'budget[0] "b".immutable'),
    ({"budget": [{"usd": 1, "window": "day"}]}, "budget[0].name"),
    ({"unpriced": "free"}, "unpriced"),
    ({"on_store_error": "ignore"}, "on_store_error"),
    ({"upstream": {"openai": "api.openai.com"}}, "upstream.openai"),
    ({"upstream": {"cohere": "https://x"}}, "upstream.cohere"),
    ({"tiers": {"small": ["*-mini"], "strict": "tiny"}}, "tiers.strict"),
    ({"hold_ttl": "forever"}, "hold_ttl"),
    (_budget(alert_at=[0.5, 80]), 'budget[0] "b".alert_at'),
    (_budget(alert_at=[0]), 'budget[0] "b".alert_at'),
    ({"alerts": {"webhooks": ["hooks.slack.com/services/x"]}}, "alerts.webhooks[0]"),
    ({"alerts": {"webhooks": ["https://ok.example/x", "ftp://files.example/x"]}}, "alerts.webhooks[1]"),
    ({"alerts": {"webhooks": ["https://host:port/x"]}}, "alerts.webhooks[0]"),
    ({"alerts": {"webhooks": "https://one.example/x"}}, "alerts.webhooks"),
    ({"alerts": {"webhook": ["https://one.example/x"]}}, "alerts.webhook"),
    ({"alerts": {"admin_url": "localhost:8787"}}, "alerts.admin_url"),
    ({"audit_key": "/etc/spendgate/audit.key"}, "audit_key"),
    ({"audit": {"enabled": "no"}}, "audit.enabled"),
    ({"audit": {"checkpoint_entries": 0}}, "audit.checkpoint_entries"),
    ({"audit": {"checkpoint_seconds": -1}}, "audit.checkpoint_seconds"),
    ({"budget": [{"name": "x", "usd": 1, "window": "day"}, {"name": "x", "usd": 2, "window": "day"}]}, '"x"'),
])
def test_a_bad_key_or_value_is_an_error_that_names_it(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(doc)
    assert key in str(err.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[[budget]]\nname = "b"\nusd = "$10"\nwindow = "day"\n')
    with pytest.raises(ConfigError, match=r"p\.toml: budget\[0\] \"b\"\.usd"):
        load(f)
    f.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")


def test_calendar_windows_follow_the_time_zone() -> None:
    month = Window("calendar", period="month")
    berlin = ZoneInfo("Europe/Berlin")
    # 23:30 UTC on Oct 31 is already November in Berlin
    t = dt.datetime(2026, 10, 31, 23, 30, tzinfo=dt.UTC).timestamp()
    label, reset = month.period_of(t, berlin)
    assert label == "2026-11"
    assert reset == dt.datetime(2026, 12, 1, tzinfo=berlin).timestamp()
    assert month.period_of(t, ZoneInfo("UTC"))[0] == "2026-10"
    day, _ = Window("calendar", period="day").period_of(t, berlin)
    week, _ = Window("calendar", period="week").period_of(t, berlin)
    assert (day, week) == ("2026-11-01", "2026-W44")


# -- properties -------------------------------------------------------------------------------

durations = st.builds(lambda n, u: f"{n}{u}", st.integers(1, 999), st.sampled_from("smhdw"))
windows = st.one_of(st.sampled_from(["request", "total", "day", "week", "month"]), durations)
money = st.one_of(st.integers(0, 10**6), st.decimals(0, 10**6, places=4).map(str))


@settings(max_examples=300, deadline=None)
@given(usd=money, window=windows, action=st.sampled_from(["block", "hold", "alert"]),
       tokens=st.none() | st.integers(0, 10**9))
def test_any_valid_budget_parses_to_exactly_its_values(usd: object, window: str, action: str,
                                                       tokens: int | None) -> None:
    raw = {"name": "b", "usd": usd, "window": window, "action": action}
    if tokens is not None:
        raw["tokens"] = tokens
    [rule] = parse({"budget": [raw]}).rules
    assert rule.usd == Decimal(str(usd))
    assert rule.tokens == tokens and rule.window.text == window and rule.action == action


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text().filter(lambda s: not _is_number(s)), st.booleans(), st.lists(st.integers()),
                       st.floats(max_value=-1e-9), st.just(float("inf"))))
def test_no_unparseable_usd_value_ever_becomes_a_budget(value: object) -> None:
    with pytest.raises(ConfigError, match="usd"):
        parse({"budget": [{"name": "b", "usd": value, "window": "day"}]})


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=12).filter(lambda k: k not in BUDGET_KEYS))
def test_every_unknown_budget_key_is_refused(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"budget": [{"name": "b", "usd": 1, "window": "day", key: 1}]})
    assert key in str(err.value)


def _is_number(s: str) -> bool:
    try:
        return Decimal(s.strip()).is_finite() and Decimal(s.strip()) >= 0
    except Exception:
        return False


def test_example_file_is_valid_toml() -> None:
    tomllib.loads(SPEC_EXAMPLE.read_text())
