"""Every command's ``--json`` document, pinned byte for byte against a golden file.

Scripts parse these documents; how the CLI draws its tables for people may change (it prints through
``rich``), but a key, a key's order, a value's type or the JSON layout must not change with it. Each
case drives the command in-process on fixed inputs (a fresh SQLite store written deterministically,
fixed timestamps where the data carries them); what still varies between runs — temp paths, generated
ids, secrets, signatures, "seconds from now" — is replaced by a marker before the comparison.

To re-pin after a deliberate change of a document: ``SPENDGATE_UPDATE_GOLDEN=1 pytest tests/test_cli_golden.py``
(and say why in the commit).
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.ledger.base import AlertMark, Event

GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = Path(__file__).parent.parent / "examples"
#: where this checkout is (a clean clone elsewhere must read the same documents)
REPO = str(Path(__file__).resolve().parent.parent)
UPDATE = os.environ.get("SPENDGATE_UPDATE_GOLDEN") == "1"
T0 = 1_790_000_000.0  # 2026-09-21, a fixed instant for every stored timestamp that shows in a document
VOLATILE = "<volatile>"

POLICY = '''\
defaults = false

[[budget]]
name = "team-day"
usd = 5
window = "day"
per = "team"

[[budget]]
name = "per-call"
usd = 0.5
window = "request"

[[budget]]
name = "tokens-hour"
tokens = 1000000
window = "1h"
per = "user"
action = "hold"
'''

HOLD_POLICY = '''\
defaults = false

[[budget]]
name = "tiny"
usd = 0.000001
window = "1h"
per = "session"
action = "hold"
'''


@dataclass
class Case:
    """One command line; ``setup`` prepares its inputs under the test's directory and returns the argv."""

    name: str
    setup: Callable[[Path], list[str]]
    volatile: frozenset[str] = field(default_factory=frozenset)  # keys whose values vary run to run
    today: bool = False  # a bucket names today's date (a day window's): written as <today>


def _spend(url: str, policy_toml: str = POLICY) -> None:
    """Three priced requests by two users of one team, captured as the proxy would."""
    from spendgate.engine import Engine
    from spendgate.policy import parse
    from spendgate.pricing.cost import Usage
    from spendgate.request import Identity, Request

    store = ledger.open(url)
    try:
        engine = Engine(parse(tomllib.loads(policy_toml)), store)
        for user, model in [("alice", "gpt-4o"), ("alice", "gpt-4o-mini"), ("bob", "gpt-4o")]:
            d = engine.decide(Request("openai", "/v1/chat/completions",
                                      {"model": model, "max_tokens": 100,
                                       "messages": [{"role": "user", "content": "hi"}]},
                                      Identity(user=user, team="ml", tags={"project": "apollo"})))
            engine.capture(d, Usage(input=1000, output=100))
    finally:
        store.close()


def _held(url: str) -> str:
    """One request held for approval; its id."""
    from spendgate import approvals
    from spendgate.engine import Engine
    from spendgate.policy import parse
    from spendgate.request import Identity, Request

    body = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    store = ledger.open(url)
    try:
        d = Engine(parse(tomllib.loads(HOLD_POLICY)), store).decide(
            Request("openai", "/v1/chat/completions", body, Identity(session="s1")))
        p = approvals.keep(store, d, "s1", "who", "openai", "/v1/chat/completions", "", json.dumps(body).encode(),
                           {}, d.at)
    finally:
        store.close()
    return p.id


def _files(tmp: Path) -> tuple[str, Path]:
    url = f"sqlite:///{tmp / 'spend.db'}"
    policy = tmp / "policy.toml"
    policy.write_text(POLICY)
    return url, policy


def status(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    _spend(url)
    return ["status", "--store", url, "--config", str(policy), "--json"]


def status_fresh(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    ledger.open(url).close()
    return ["status", "--store", url, "--config", str(policy), "--json"]


def report(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    _spend(url)
    return ["report", "--store", url, "--config", str(policy), "--by", "user,model", "--since", "1h", "--json"]


def report_by_tag(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    _spend(url)
    return ["--json", "report", "--store", url, "--by", "project", "--since", "7d"]


def report_empty(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    ledger.open(url).close()
    return ["report", "--store", url, "--json"]


def report_with_approval(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    hold = _held(url)
    assert main(["approve", hold, "--max", "2", "--store", url]) == 0
    return ["report", "--store", url, "--by", "session", "--json"]


def approvals_pending(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    _held(url)
    return ["approvals", "--store", url, "--json"]


def approvals_none(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    ledger.open(url).close()
    return ["approvals", "--store", url, "--json"]


def approve_max(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    return ["approve", _held(url), "--max", "2.5", "--store", url, "--json"]


def approve_once(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    return ["approve", _held(url), "--store", url, "--json"]


def deny(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    return ["deny", _held(url), "--store", url, "--json"]


def keys_create(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    return ["keys", "create", "--user", "ana", "--team", "ml", "--tag", "project=apollo", "--preapprove-max", "2.5",
            "--store", url, "--json"]


def keys_list(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    # one key: two would list in the order of their random ids
    assert main(["keys", "create", "--user", "ana", "--team", "ml", "--tag", "project=apollo", "--tag", "env=ci",
                 "--preapprove-max", "2.5", "--store", url]) == 0
    return ["keys", "list", "--store", url, "--json"]


def keys_list_empty(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    ledger.open(url).close()
    return ["keys", "list", "--store", url, "--json"]


def keys_revoke(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    from spendgate import keys

    store = ledger.open(url)
    try:
        _, key = keys.create(store, user="ana")
    finally:
        store.close()
    return ["keys", "revoke", key.id, "--store", url, "--json"]


def keys_create_budget(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    return ["keys", "create", "--user", "ana", "--usd", "50", "--window", "month", "--tokens", "2000000",
            "--models", "gpt-4o*,claude-*", "--expires", "2030-01-01T00:00:00+00:00", "--capability", "data_write",
            "--store", url, "--json"]


def keys_list_budget(tmp: Path) -> list[str]:
    """A key with its own budget, part spent: spent, held and remaining from its buckets."""
    from spendgate import keys
    from spendgate.engine import Engine
    from spendgate.policy import parse
    from spendgate.request import Identity, tool_request

    url, _ = _files(tmp)
    store = ledger.open(url)
    try:
        _, key = keys.create(store, user="ana", usd=Decimal("0.05"), requests=10, models=("gpt-4o-mini",),
                             expires_at=1_893_456_000.0, capability="read_only")
        engine = Engine(parse({"defaults": False}), store)
        rule = key.rule()
        assert rule is not None
        ident = Identity(key=key.counted_as, user="ana", rules=(rule,))
        engine.capture_amount(engine.decide(tool_request(12_345_678, ident)), 12_345_678)
        engine.decide(tool_request(1_000_000, ident))  # held, not yet settled
    finally:
        store.close()
    return ["keys", "list", "--store", url, "--json"]


def keys_rotate(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    from spendgate import keys

    store = ledger.open(url)
    try:
        _, key = keys.create(store, user="ana", usd=Decimal(1))
    finally:
        store.close()
    return ["keys", "rotate", key.id, "--store", url, "--json"]


def estimate(tmp: Path) -> list[str]:
    body = tmp / "req.json"
    body.write_text(json.dumps({"model": "claude-opus-4-8", "max_tokens": 1000,
                                "messages": [{"role": "user", "content": "hello"}]}))
    return ["estimate", str(body), "--json"]


def estimate_unpriced(tmp: Path) -> list[str]:
    body = tmp / "req.json"
    body.write_text(json.dumps({"model": "acme/unknown", "max_tokens": 10,
                                "messages": [{"role": "user", "content": "hi"}]}))
    return ["estimate", str(body), "--route", "/v1/chat/completions", "--json"]


def replay(tmp: Path) -> list[str]:
    return ["replay", str(EXAMPLES / "runaway-agent.jsonl"), "--json"]


def replay_policy(tmp: Path) -> list[str]:
    policy = tmp / "policy.toml"
    policy.write_text(HOLD_POLICY.replace("0.000001", "0.5"))
    return ["replay", str(EXAMPLES / "runaway-agent.jsonl"), "--config", str(policy), "--approve", "--json"]


def init(tmp: Path) -> list[str]:
    return ["init", "--preset", "strict-tiers", "--path", str(tmp / "spendgate.toml"), "--json"]


def config_check(tmp: Path) -> list[str]:
    return ["config", "check", str(EXAMPLES / "spendgate.toml"), "--json"]


def config_check_failing(tmp: Path) -> list[str]:
    bad = tmp / "bad.toml"
    bad.write_text('[[budget]]\nname = "b"\nusd = "$10"\nwindow = "day"\n')
    return ["config", "check", str(bad), "--json"]


def prices_show(tmp: Path) -> list[str]:
    return ["prices", "show", "claude-sonnet-4-5", "--json"]


def prices_show_alias(tmp: Path) -> list[str]:
    return ["prices", "show", "gpt-4o-2024-08-06", "--json"]


def prices_show_unknown(tmp: Path) -> list[str]:
    return ["prices", "show", "acme/unknown-model", "--json"]


def prices_update(tmp: Path) -> list[str]:
    src = tmp / "litellm.json"
    src.write_text(json.dumps({
        "acme/new": {"input_cost_per_token": 2e-06, "output_cost_per_token": 4e-06, "mode": "chat"},
        "gpt-4o": {"input_cost_per_token": 2e-06, "output_cost_per_token": 1.2e-05, "mode": "chat",
                   "litellm_provider": "openai"},
        "acme/free": {"input_cost_per_token": 0, "output_cost_per_token": 0, "mode": "chat"},
        "acme/partial": {"input_cost_per_token": 1e-06, "mode": "chat"}}))
    return ["prices", "update", "--from", str(src), "--skip-free", "--dry-run", "--json"]


def prices_update_written(tmp: Path) -> list[str]:
    src = tmp / "litellm.json"
    src.write_text(json.dumps({"acme/new": {"input_cost_per_token": 2e-06, "output_cost_per_token": 4e-06,
                                            "mode": "chat"}}))
    return ["prices", "update", "--from", str(src), "--json"]


def _reconcile_store(tmp: Path) -> str:
    import datetime as dt

    url, _ = _files(tmp)
    store = ledger.open(url)
    try:
        for n, (day, model, nanos) in enumerate([("2026-11-24", "gpt-4o-2024-08-06", 4_350_000_000),
                                                 ("2026-11-24", "gpt-4o-mini", 166_200_000),
                                                 ("2026-11-25", "gpt-4o", 3_100_000_000)]):
            ts = dt.datetime.fromisoformat(day).replace(hour=12, tzinfo=dt.UTC).timestamp()
            store.record(Event(ts, "capture", f"r{n}", model, "openai", nanos))
    finally:
        store.close()
    return url


def reconcile(tmp: Path) -> list[str]:
    url = _reconcile_store(tmp)
    return ["reconcile", str(EXAMPLES / "reconcile.csv"), "--store", url, "--since", "36500d", "--json"]


def reconcile_openai(tmp: Path) -> list[str]:
    url = _reconcile_store(tmp)
    return ["reconcile", str(EXAMPLES / "reconcile-openai-costs.json"), "--store", url, "--since", "36500d",
            "--json"]


def alerts(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    store = ledger.open(url)
    threshold = json.dumps({"type": "threshold", "ts": T0, "rule": "team-month", "bucket": "team-month|team=ml",
                            "scope": "team=ml", "window": "month", "decision_id": "d-1", "model": "gpt-4o",
                            "threshold": "0.8", "limit_usd": "200", "period": "2026-12"})
    hold = json.dumps({"type": "hold", "ts": T0, "rule": "session-hourly", "bucket": "session-hourly|session=s1",
                       "scope": "session=s1", "window": "1h", "decision_id": "dec-42", "model": "gpt-4o",
                       "estimate_usd": "0.42", "session": "s1", "message": "held: over $5/h", "expires_at": T0 + 600})
    try:
        for n, (key, body) in enumerate([("team-month|team=ml|2026-12|0.8", threshold), ("hold|dec-42", hold)]):
            store.record(Event(T0 + n, "refused", f"d-{key}", "gpt-4o", "openai", 0), alerts=[AlertMark(key, body)])
        [a, b] = store.claim_alerts(T0 + 3, "t", 60, 10)
        assert store.update_alert(a.key, "t", status="sent", attempts=1, next_at=T0 + 3, done=("abc",),
                                  sent_at=T0 + 3)
        assert store.update_alert(b.key, "t", status="failed", attempts=9, next_at=T0 + 3,
                                  error="https://hooks.slack.com: timed out")
    finally:
        store.close()
    return ["alerts", "--store", url, "--json"]


def alerts_empty(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    ledger.open(url).close()
    return ["alerts", "--store", url, "--status", "pending", "--json"]


def _audited(tmp: Path) -> str:
    from spendgate.events.chain import AuditLog
    from spendgate.events.signing import load_key

    url, _ = _files(tmp)
    store = ledger.open(url)
    try:
        log = AuditLog(store, load_key(None), flush_s=3600, checkpoint_entries=10)
        for i in range(25):
            log.add(Event(T0 + i, "allow" if i % 2 else "capture", f"d-{i}", "gpt-4o", "openai", 1000, 1, 2,
                          dims={"user": "zoé"}), "ef" * 32, b"{}")
        log.close()
    finally:
        store.close()
    return url


def audit_verify(tmp: Path) -> list[str]:
    return ["audit", "verify", "--store", _audited(tmp), "--json"]


def audit_verify_export(tmp: Path) -> list[str]:
    url = _audited(tmp)
    out = tmp / "audit.jsonl"
    assert main(["audit", "export", "--store", url, "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    doc = json.loads(lines[3])
    doc["model"] = "gpt-5"  # an edited entry: its signature no longer holds
    lines[3] = json.dumps(doc)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["audit", "verify", "--from", str(out), "--json"]


def audit_verify_nothing(tmp: Path) -> list[str]:
    from spendgate.events.signing import load_key

    load_key(None)
    url, _ = _files(tmp)
    ledger.open(url).close()
    return ["audit", "verify", "--store", url, "--json"]


def audit_export(tmp: Path) -> list[str]:
    return ["audit", "export", "--store", _audited(tmp), "--out", str(tmp / "out.jsonl"), "--json"]


def audit_pubkey(tmp: Path) -> list[str]:
    return ["audit", "pubkey", "--json"]


def demo(tmp: Path) -> list[str]:
    return ["demo", "--json"]


def _budget(url: str, *extra: str) -> None:
    """A run-time budget kept by ``ops``: a prepaid $5 per user."""
    assert main(["budgets", "add", "prepaid", "--usd", "5", "--window", "total", "--per", "user", "--by", "ops",
                 *extra, "--store", url]) == 0


def budgets_add(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    return ["budgets", "add", "gpt-day", "--usd", "10", "--window", "day", "--per", "user", "--match",
            "model=gpt-4o*,tag:env=prod", "--action", "hold", "--alert-at", "0.5,0.8", "--by", "ops", "--store", url,
            "--config", str(policy), "--json"]


def budgets_set(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    _budget(url)
    return ["budgets", "set", "prepaid", "--usd", "7.5", "--mode", "shadow", "--by", "ana", "--store", url,
            "--config", str(policy), "--json"]


def budgets_remove(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    _budget(url)
    return ["budgets", "remove", "prepaid", "--by", "ops", "--store", url, "--json"]


def budgets_list(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    _budget(url)
    assert main(["budgets", "limit", "tokens-hour", "user=alice", "--tokens", "5000", "--by", "ops", "--store", url,
                 "--config", str(policy)]) == 0
    return ["budgets", "list", "--store", url, "--config", str(policy), "--json"]


def budgets_limit(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    _spend(url)  # alice: 2,200 tokens this hour
    return ["budgets", "limit", "tokens-hour", "user=alice", "--tokens", "2000", "--by", "ops", "--store", url,
            "--config", str(policy), "--json"]


def budgets_topup(tmp: Path) -> list[str]:
    url, policy = _files(tmp)
    _budget(url)
    return ["budgets", "topup", "prepaid", "user=alice", "--usd", "2.5", "--by", "ops", "--store", url,
            "--config", str(policy), "--json"]


def pause(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    return ["pause", "user=alice", "--reason", "incident 42", "--by", "ops", "--store", url, "--json"]


def resume(tmp: Path) -> list[str]:
    url, _ = _files(tmp)
    assert main(["pause", "user=alice", "--by", "ops", "--store", url]) == 0
    return ["resume", "user=alice", "--by", "ops", "--store", url, "--json"]


CASES = [
    Case("status", status, today=True),
    Case("status_fresh", status_fresh),
    Case("report", report, today=True),
    Case("report_by_tag", report_by_tag, today=True),
    Case("report_empty", report_empty),
    Case("report_with_approval", report_with_approval, frozenset({"ts", "bucket", "decision_id"})),
    Case("approvals", approvals_pending, frozenset({"id", "expires_in_s"})),
    Case("approvals_none", approvals_none),
    Case("approve_max", approve_max, frozenset({"id"})),
    Case("approve_once", approve_once, frozenset({"id"})),
    Case("deny", deny, frozenset({"id"})),
    Case("keys_create", keys_create, frozenset({"key", "id", "created", "counted_as"})),
    Case("keys_create_budget", keys_create_budget, frozenset({"key", "id", "created", "counted_as"})),
    Case("keys_list", keys_list, frozenset({"id", "created", "counted_as"})),
    Case("keys_list_budget", keys_list_budget, frozenset({"id", "created", "counted_as"})),
    Case("keys_rotate", keys_rotate, frozenset({"key", "id", "created", "counted_as"})),
    Case("keys_list_empty", keys_list_empty),
    Case("keys_revoke", keys_revoke, frozenset({"revoked"})),
    Case("estimate", estimate),
    Case("estimate_unpriced", estimate_unpriced),
    Case("replay", replay),
    Case("replay_policy", replay_policy),
    Case("init", init),
    Case("config_check", config_check),
    Case("config_check_failing", config_check_failing),
    Case("prices_show", prices_show),
    Case("prices_show_alias", prices_show_alias),
    Case("prices_show_unknown", prices_show_unknown),
    Case("prices_update", prices_update),
    Case("prices_update_written", prices_update_written),
    Case("reconcile", reconcile, frozenset({"last_day", "first_day"})),
    Case("reconcile_openai", reconcile_openai, frozenset({"last_day", "first_day"})),
    Case("alerts", alerts),
    Case("alerts_empty", alerts_empty),
    Case("audit_verify", audit_verify, frozenset({"chain", "key"})),
    Case("audit_verify_export", audit_verify_export, frozenset({"chain", "key"})),
    Case("audit_verify_nothing", audit_verify_nothing),
    Case("audit_export", audit_export, frozenset({"chains"})),
    Case("audit_pubkey", audit_pubkey, frozenset({"pubkey"})),
    Case("demo", demo, frozenset({"decision_ids", "held_message"})),
    Case("budgets_add", budgets_add, frozenset({"at"})),
    Case("budgets_set", budgets_set, frozenset({"at"})),
    Case("budgets_remove", budgets_remove),
    Case("budgets_list", budgets_list, frozenset({"at"})),
    Case("budgets_limit", budgets_limit),
    Case("budgets_topup", budgets_topup),
    Case("pause", pause, frozenset({"at"})),
    Case("resume", resume),
]


def _normalise(doc: Any, volatile: frozenset[str], tmp: str, today: str | None) -> Any:
    """``doc`` with the values that vary run to run replaced by a marker (the key stays, and so does
    whether the value was null), and the test's own directory written as ``<tmp>``."""
    if isinstance(doc, dict):
        return {k: (VOLATILE if k in volatile and v is not None
                    else v.replace(today, "<today>") if k == "bucket" and today and isinstance(v, str)
                    else _normalise(v, volatile, tmp, today))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [_normalise(v, volatile, tmp, today) for v in doc]
    if isinstance(doc, str):
        return doc.replace(tmp, "<tmp>").replace(REPO, "<repo>")
    return doc


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_json_output_is_unchanged(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = case.setup(tmp_path)
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr().out
    doc = json.loads(out)  # the whole of stdout is one document
    # the layout itself is pinned: two-space indent, ASCII escapes, one trailing newline
    assert out == json.dumps(doc, indent=2) + "\n"
    # an id made by the setup (a hold's, a key's) is in the argv too
    shown = [VOLATILE if re.fullmatch("[0-9a-f]{8}|[0-9a-f]{16}", a)
             else a.replace(str(tmp_path), "<tmp>").replace(REPO, "<repo>") for a in argv]
    today = time.strftime("%Y-%m-%d", time.gmtime()) if case.today else None
    got = json.dumps({"argv": shown, "exit": code,
                      "stdout": _normalise(doc, case.volatile, str(tmp_path), today)}, indent=2) + "\n"
    path = GOLDEN / f"{case.name}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got, encoding="utf-8")
    assert got == path.read_text(encoding="utf-8"), f"{case.name}: the --json document changed"


def test_every_json_command_has_a_golden_case() -> None:
    """A command added to the CLI gets a golden case here (``serve`` prints no document: it runs the proxy;
    ``tail`` prints JSON lines, one per event: tests/test_tail.py)."""
    from spendgate.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(getattr(sub, "choices", {}))
    assert commands - {"serve", "tail"} == {c.name.split("_")[0] for c in CASES}


# -- text output through rich: plain for a pipe, drawn for a person ------------------------------

class _Terminal:
    """A stream that says it is a terminal (what rich checks before drawing in colour)."""

    def __init__(self) -> None:
        import io

        self.buf = io.StringIO()

    def write(self, text: str) -> int:
        return self.buf.write(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("not a real terminal")


def test_plain_tables_keep_the_hand_made_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured stdout is plain text even under FORCE_COLOR: a header, a rule of dashes as wide as each
    column, columns two spaces apart, no trailing blanks, no ANSI codes, no folding at 80 columns."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    url, policy = _files(tmp_path)
    _spend(url)
    assert main(["status", "--store", url, "--config", str(policy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert lines == [
        "bucket                         spent      held   limit          use",
        "-----------------------------  ---------  -----  -------------  ----------------------",
        f"team-day|team=ml|{day}    $0.0072    $0.00  $5.00          [....................]",
        "tokens-hour|user=alice#tokens  2,200 tok  0 tok  1,000,000 tok  [....................]",
        "tokens-hour|user=bob#tokens    1,100 tok  0 tok  1,000,000 tok  [....................]",
        "per-call (each request)        -          -      $0.50",
    ]


def test_a_table_wider_than_80_columns_is_not_folded_in_a_pipe() -> None:
    import io

    from spendgate.cli.output import table

    out = io.StringIO()
    table(("name", "detail"), [("a", "x" * 300), ("[bold]b[/]", "y")], out=out)
    assert out.getvalue().splitlines() == ["name        detail", "----------  " + "-" * 300,
                                           "a           " + "x" * 300, "[bold]b[/]  y"]


def test_a_terminal_gets_colour_and_no_color_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from spendgate.cli.output import REFUSED, bar, say, styled, table

    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = _Terminal()
    table(("rule", "refused", "use"), [("tiny", styled("3", REFUSED), bar(1.5))], out=tty)  # type: ignore[arg-type]
    say("denied abc", REFUSED, out=tty)  # type: ignore[arg-type]
    drawn = tty.buf.getvalue()
    assert "\x1b[" in drawn and "━" in drawn and "denied abc" in drawn and "[####" not in drawn
    monkeypatch.setenv("NO_COLOR", "1")
    tty = _Terminal()
    table(("rule", "refused"), [("tiny", styled("3", REFUSED))], out=tty)  # type: ignore[arg-type]
    say("denied abc", REFUSED, out=tty)  # type: ignore[arg-type]
    assert "\x1b[3" not in tty.buf.getvalue() and "denied abc" in tty.buf.getvalue()  # no colour codes


def test_progress_draws_only_on_a_terminal() -> None:
    import io

    from spendgate.cli.output import Progress

    pipe = io.StringIO()
    with Progress(2000, "replaying", out=pipe) as p:
        for done in range(0, 2001, 500):
            p(done)
    assert not p.enabled and pipe.getvalue() == ""
    tty = _Terminal()
    with Progress(2000, "replaying", out=tty) as p:  # type: ignore[arg-type]
        for done in range(0, 2001, 500):
            p(done)
    assert p.enabled and "replaying" in tty.buf.getvalue() and "2000/2000" in tty.buf.getvalue()
