"""``spendgate budgets …``, ``pause`` and ``resume``: run-time budgets kept in the store, and what an
engine deciding under them does — on SQLite and Redis, with exact nano-dollar amounts."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.engine import Engine
from spendgate.ledger import Ledger
from spendgate.money import usd_to_nanos
from spendgate.policy import Policy, load, runtime
from spendgate.request import Identity, tool_request
from tests.conftest import store_url

POLICY = '''\
defaults = false

[[budget]]
name = "user-day"
usd = 1
window = "day"
per = "user"

[[budget]]
name = "prepaid"
usd = 1
window = "total"
per = "user"
'''

KEY_ALICE = "a1b2c3d4" + "0" * 56


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_url(request.param, tmp_path, request)


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "spendgate.toml"
    path.write_text(POLICY)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """One command: its exit code, its stdout (parsed when --json) and its stderr."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out) if "--json" in argv and code == 0 else out, err


def engine(url: str, policy: Policy) -> tuple[Engine, Ledger]:
    """An engine deciding under the file's policy with the store's overlay applied, as serve does."""
    store = ledger.open(url)
    overlay = runtime.load(store)
    e = Engine(replace(policy, rules=(*policy.rules, *overlay.rules)), store)
    e.set_overrides(overlay.limits, overlay.pauses)
    return e, store


def spend(e: Engine, nanos: int, **ident: Any) -> bool:
    """Decide a request of exactly ``nanos`` and, if allowed, charge it whole."""
    d = e.decide(tool_request(nanos, Identity(**ident)), now=time.time())
    if d.allowed:
        e.capture_amount(d, nanos)
    return d.allowed


# -- rules --------------------------------------------------------------------------------------------


def test_a_bad_field_is_refused_naming_it_as_the_file_would(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "budgets", "add", "x", "--usd", "$10", "--window", "day", "--store", url)
    assert code == 2
    assert err.strip() == ("spendgate: error: budget \"x\".usd: expected a number of dollars such as 10 or 0.50, "
                           "got '$10'")
    code, _, err = run(capsys, "budgets", "add", "x", "--usd", "1", "--window", "fortnight", "--store", url)
    assert code == 2 and 'budget "x".window: expected request, total, day' in err
    code, _, err = run(capsys, "budgets", "add", "x", "--usd", "1", "--window", "day", "--match", "colour=red",
                       "--store", url)
    assert code == 2 and 'budget "x".match.colour: unknown key' in err
    code, _, err = run(capsys, "budgets", "add", "x", "--table", 'usd = 1\nwindow = "day"\nper = "planet"',
                       "--store", url)
    assert code == 2 and 'budget "x".per: expected one of' in err and "'planet'" in err
    code, out, _ = run(capsys, "budgets", "list", "--store", url, "--json")
    assert [b["name"] for b in out["budgets"]] == ["request-soft", "session-hour", "key-day", "request-hard"]


def test_a_file_rule_name_is_refused(url: str, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "budgets", "add", "user-day", "--usd", "5", "--window", "day", "--store", url,
                       "--config", config)
    assert code == 2 and 'budget "user-day".name: a budget of this name is in the policy file' in err
    # the built-in defaults are the file's too when no file is given
    code, _, err = run(capsys, "budgets", "add", "request-hard", "--usd", "5", "--window", "day", "--store", url)
    assert code == 2 and 'budget "request-hard".name' in err
    code, _, err = run(capsys, "budgets", "set", "user-day", "--usd", "5", "--store", url, "--config", config)
    assert code == 2 and "it is in the policy file" in err
    code, _, err = run(capsys, "budgets", "remove", "user-day", "--store", url, "--config", config)
    assert code == 2 and "remove it there" in err


def test_add_set_list_remove(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "budgets", "add", "gpt-day", "--usd", "10", "--window", "day", "--per", "user",
                       "--match", "model=gpt-4o*,tier=frontier,tag:env=prod", "--action", "hold", "--alert-at",
                       "0.5,0.8,1", "--mode", "shadow", "--by", "ops@host", "--store", url, "--json")
    assert code == 0 and out["change"] == "add"
    b = out["budget"]
    assert (b["name"], b["source"], b["usd"], b["window"], b["per"], b["action"], b["mode"], b["by"]) == \
        ("gpt-day", "store", "10", "day", "user", "hold", "shadow", "ops@host")
    assert b["table"]["match"] == {"model": "gpt-4o*", "tier": "frontier", "tags": {"env": "prod"}}
    code, _, err = run(capsys, "budgets", "add", "gpt-day", "--usd", "1", "--window", "day", "--store", url)
    assert code == 2 and "already exists; change it with spendgate budgets set" in err
    # set overlays only the flags given on the stored table
    code, out, _ = run(capsys, "budgets", "set", "gpt-day", "--usd", "12.5", "--mode", "enforce", "--by", "ana",
                       "--store", url, "--json")
    b = out["budget"]
    assert (b["usd"], b["window"], b["per"], b["action"], b["mode"], b["by"]) == \
        ("12.5", "day", "user", "hold", "enforce", "ana")
    assert b["table"]["alert_at"] == ["0.5", "0.8", "1"]
    code, _, err = run(capsys, "budgets", "set", "nope", "--usd", "1", "--store", url)
    assert code == 2 and "no run-time budget of this name; add it with spendgate budgets add" in err
    code, out, _ = run(capsys, "budgets", "list", "--store", url, "--json")
    assert [(b["name"], b["source"]) for b in out["budgets"]] == [
        ("request-soft", "default"), ("session-hour", "default"), ("key-day", "default"),
        ("request-hard", "default"), ("gpt-day", "store")]
    code, text, _ = run(capsys, "budgets", "list", "--store", url)
    assert "gpt-day" in text and "store (ana, " in text and "default" in text
    assert main(["budgets", "limit", "gpt-day", "user=ana", "--usd", "1", "--store", url]) == 0
    assert run(capsys, "budgets", "remove", "gpt-day", "--store", url, "--json")[1] == \
        {"change": "remove", "removed": "gpt-day"}
    store = ledger.open(url)
    try:
        assert runtime.load(store).limits == {}, "its per-scope limits go with it"
    finally:
        store.close()
    code, _, err = run(capsys, "budgets", "remove", "gpt-day", "--store", url)
    assert code == 1 and "no run-time budget of this name" in err
    store = ledger.open(url)
    try:
        changes = [(e.dims["change"], e.rule, e.dims["by"]) for e in store.events(0) if e.kind == "budget"]
    finally:
        store.close()
    assert changes[:2] == [("add", "gpt-day", "ops@host"), ("set", "gpt-day", "ana")]
    assert [c[:2] for c in changes[2:]] == [("limit", "gpt-day"), ("remove", "gpt-day")]


def test_a_runtime_rule_refuses_like_a_file_rule(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["budgets", "add", "tiny", "--usd", "0.000001", "--window", "1h", "--per", "user",
                 "--store", url]) == 0
    e, store = engine(url, Policy(rules=()))
    try:
        assert spend(e, 1000, user="alice")
        assert not spend(e, 1, user="alice"), "alice's $0.000001 is spent, nano-exact"
        assert spend(e, 1000, user="bob")
    finally:
        store.close()


# -- per-scope limits --------------------------------------------------------------------------------


def test_a_user_limit_changes_only_that_user(url: str, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    policy = load(config)
    code, out, _ = run(capsys, "budgets", "limit", "user-day", "user=alice", "--usd", "0.25", "--store", url,
                       "--config", config, "--json")
    assert code == 0 and out["refuses"] is False
    [row] = out["buckets"]
    assert (row["limit"], row["spent"], row["held"], row["remaining"]) == ("0.25", "0", "0", "0.25")
    e, store = engine(url, policy)
    try:
        quarter = usd_to_nanos("0.25")
        assert spend(e, quarter, user="alice")
        assert not spend(e, 1, user="alice"), "alice is refused at her own limit"
        assert spend(e, quarter * 4, user="bob"), "bob keeps the rule's $1"
        assert not spend(e, 1, user="bob")
    finally:
        store.close()
    # the limit shows under its rule, with who set it
    code, out, _ = run(capsys, "budgets", "list", "--store", url, "--config", config, "--json")
    [user_day] = [b for b in out["budgets"] if b["name"] == "user-day"]
    assert user_day["source"] == "file"
    assert [(lim["scope"], lim["usd"]) for lim in user_day["limits"]] == [("user=alice", "0.25")]
    code, _, err = run(capsys, "budgets", "limit", "user-day", "team=ml", "--usd", "1", "--store", url,
                       "--config", config)
    assert code == 2 and "counts per user; name one user" in err
    code, _, err = run(capsys, "budgets", "limit", "nope", "user=alice", "--usd", "1", "--store", url)
    assert code == 1 and 'budget "nope": no such budget' in err


def test_raising_a_limit_keeps_the_spend_and_lowering_it_refuses(url: str, config: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    policy = load(config)
    e, store = engine(url, policy)
    try:
        assert spend(e, usd_to_nanos("0.6"), user="alice")
        before = store.states(store.known_buckets(), now=time.time())
    finally:
        store.close()
    code, out, _ = run(capsys, "budgets", "limit", "user-day", "user=alice", "--usd", "5", "--store", url,
                       "--config", config, "--json")
    [row] = out["buckets"]
    assert (row["limit"], row["spent"], row["remaining"], out["refuses"]) == ("5", "0.6", "4.4", False)
    store = ledger.open(url)
    try:
        after = store.states(store.known_buckets(), now=time.time())
    finally:
        store.close()
    assert [(s.key, s.spent, s.held) for s in after] == [(s.key, s.spent, s.held) for s in before]
    e, store = engine(url, policy)
    try:
        assert spend(e, usd_to_nanos("0.3"), user="alice"), "$0.90 of $5 (and of prepaid's $1)"
    finally:
        store.close()
    # below what is spent: said plainly, and the next request in that bucket is refused
    code, text, _ = run(capsys, "budgets", "limit", "user-day", "user=alice", "--usd", "0.5", "--store", url,
                        "--config", config)
    assert code == 0
    assert "limit $0.5, spent $0.9, held $0, remaining $0" in text
    assert "further requests in this bucket are refused until the day window frees room" in text
    e, store = engine(url, policy)
    try:
        assert not spend(e, 1, user="alice")
        assert spend(e, usd_to_nanos("1"), user="bob")
    finally:
        store.close()
    # cleared: the rule's $1 again, the $0.90 still counted
    code, out, _ = run(capsys, "budgets", "limit", "user-day", "user=alice", "--clear", "--store", url,
                       "--config", config, "--json")
    assert out["cleared"] is True and out["buckets"][0]["limit"] == "1" and out["buckets"][0]["spent"] == "0.9"


# -- top-ups ---------------------------------------------------------------------------------------------


def test_a_topup_adds_exactly_its_headroom(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(tmp_path / "prepaid.toml")
    prepaid_alone = POLICY[POLICY.index('[[budget]]\nname = "prepaid"'):]
    Path(config).write_text("defaults = false\n\n" + prepaid_alone)
    policy = load(config)
    assert [r.name for r in policy.rules] == ["prepaid"]
    e, store = engine(url, policy)
    try:
        assert spend(e, usd_to_nanos("0.9"), user="alice")
        assert not spend(e, usd_to_nanos("0.2"), user="alice"), "$1.10 does not fit $1"
    finally:
        store.close()
    code, out, _ = run(capsys, "budgets", "topup", "prepaid", "user=alice", "--usd", "0.1", "--store", url,
                       "--config", config, "--json")
    assert code == 0
    assert (out["topup_usd"], out["limit_usd"], out["spent_usd"], out["held_usd"], out["remaining_usd"]) == \
        ("0.1", "1.1", "0.9", "0", "0.2")
    assert out["bucket"] == "prepaid|user=alice"
    e, store = engine(url, policy)
    try:
        assert not spend(e, usd_to_nanos("0.2") + 1, user="alice"), "one nano-dollar more than the top-up"
        assert spend(e, usd_to_nanos("0.2"), user="alice"), "exactly the top-up fits"
        assert not spend(e, 1, user="alice")
        assert spend(e, usd_to_nanos("1"), user="bob"), "bob's bucket is not topped up, nor touched"
        [ev] = [x for x in store.events(0) if x.kind == "budget"]
        assert (ev.dims["change"], ev.rule, ev.dims["scope"], ev.bucket, ev.amounts) == \
            ("topup", "prepaid", "user=alice", "prepaid|user=alice",
             {"topup_usd": usd_to_nanos("0.1"), "limit_usd": usd_to_nanos("1.1")})
    finally:
        store.close()


def test_a_topup_is_only_for_total_budgets(url: str, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "budgets", "topup", "user-day", "user=alice", "--usd", "5", "--store", url,
                       "--config", config)
    assert code == 2
    assert 'budget "user-day": window = "day"; a top-up is headroom on a window = "total"' in err
    assert "spendgate budgets limit" in err
    code, _, err = run(capsys, "budgets", "topup", "prepaid", "user=alice", "--usd", "-1", "--store", url,
                       "--config", config)
    assert code == 2 and "--usd: expected a non-negative number of dollars, got '-1'" in err


# -- pause and resume ----------------------------------------------------------------------------------------


def test_pause_a_key_then_everything_then_resume(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    policy = Policy(rules=())
    code, out, _ = run(capsys, "pause", "key=a1b2c3d4", "--reason", "incident 42", "--by", "ops", "--store", url,
                       "--json")
    assert code == 0 and (out["scope"], out["by"], out["reason"]) == ("key=a1b2c3d4", "ops", "incident 42")
    e, store = engine(url, policy)
    try:
        d = e.decide(tool_request(1, Identity(key=KEY_ALICE)), now=time.time())
        assert not d.allowed and "paused by ops" in d.message
        assert spend(e, 1, key="b" * 64), "another key goes through"
    finally:
        store.close()
    code, text, _ = run(capsys, "pause", "--by", "ops", "--store", url)
    assert "paused everything (ops, " in text and "refuses it within a second" in text
    e, store = engine(url, policy)
    try:
        assert not spend(e, 1, key="b" * 64) and not spend(e, 1, user="carol")
    finally:
        store.close()
    assert run(capsys, "resume", "--store", url, "--json")[1]["scope"] == "global"
    assert run(capsys, "resume", "key=a1b2c3d4", "--store", url, "--json")[1]["scope"] == "key=a1b2c3d4"
    e, store = engine(url, policy)
    try:
        assert spend(e, 1, key=KEY_ALICE) and spend(e, 1, key="b" * 64)
        assert [(x.dims["change"], x.dims["scope"]) for x in store.events(0) if x.kind == "budget"] == [
            ("pause", "key=a1b2c3d4"), ("pause", "global"), ("resume", "global"), ("resume", "key=a1b2c3d4")]
    finally:
        store.close()
    code, _, err = run(capsys, "resume", "--store", url)
    assert code == 1 and "global is not paused; paused now: nothing" in err
    code, _, err = run(capsys, "pause", "key=abc", "--store", url)
    assert code == 2 and "name a key by its id" in err


def test_changes_are_in_the_audit_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    assert main(["budgets", "add", "b", "--usd", "1", "--window", "total", "--per", "user", "--by", "ops",
                 "--store", url]) == 0
    assert main(["budgets", "topup", "b", "user=ana", "--usd", "2", "--by", "ops", "--store", url]) == 0
    assert main(["pause", "--by", "ops", "--store", url]) == 0
    out = tmp_path / "audit.jsonl"
    assert main(["audit", "export", "--store", url, "--out", str(out)]) == 0
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    budget = sorted((x for x in entries if x.get("kind") == "budget"), key=lambda x: x["ts"])  # a chain each
    assert [x["dims"]["change"] for x in budget] == ["add", "topup", "pause"]
    assert budget[1]["amounts"]["topup_usd"] == "2"  # the audit log writes dollars as text
    assert main(["audit", "verify", "--store", url]) == 0


def test_a_key_is_named_by_its_id_for_limits_and_topups(url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from spendgate import keys

    config = tmp_path / "keys.toml"
    config.write_text('defaults = false\n\n[[budget]]\nname = "key-total"\nusd = 1\nwindow = "total"\nper = "key"\n'
                      '\n[[budget]]\nname = "all"\nusd = 100\nwindow = "day"\n')
    policy = load(str(config))
    store = ledger.open(url)
    try:
        _, vkey = keys.create(store, user="ana")
    finally:
        store.close()
    assert vkey.counted_as is not None
    code, out, _ = run(capsys, "budgets", "limit", "key-total", f"key={vkey.id}", "--usd", "0.5", "--store", url,
                       "--config", str(config), "--json")
    assert code == 0 and out["scope"] == f"key={vkey.counted_as}"
    assert out["buckets"][0]["bucket"] == f"key-total|key={vkey.counted_as}"
    code, out, _ = run(capsys, "budgets", "topup", "key-total", f"key={vkey.id}", "--usd", "0.25", "--store", url,
                       "--config", str(config), "--json")
    assert (out["limit_usd"], out["remaining_usd"]) == ("0.75", "0.75")
    e, store = engine(url, policy)
    try:
        assert spend(e, usd_to_nanos("0.75"), key=vkey.counted_as)
        assert not spend(e, 1, key=vkey.counted_as), "its own $0.50 plus the $0.25 top-up, nano-exact"
        assert spend(e, usd_to_nanos("1"), key="c" * 64), "another key keeps the rule's $1"
    finally:
        store.close()
    code, _, err = run(capsys, "budgets", "limit", "all", "global", "--usd", "5", "--store", url,
                       "--config", str(config))
    assert code == 2 and 'budget "all" is one budget for everyone (per = "global"); it has no per-scope' in err
