"""The first hour of a new user, driven through the command line as they would type it:
what each command prints and the status it exits with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from spendgate.cli.main import main

CLI = [sys.executable, "-m", "spendgate.cli.main"]


def sg(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``spendgate ARGV…`` in a child process, as a shell would run it."""
    return subprocess.run([*CLI, *argv], input=stdin, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- item 7: missing basics -------------------------------------------------------------------

def test_version_names_the_installed_distribution() -> None:
    r = sg("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"spendgate {version('spendgate')}"


def test_estimate_reads_the_body_from_stdin() -> None:
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    r = sg("estimate", "-", "--json", stdin=json.dumps(body))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == "gpt-4o" and doc["output_tokens"] == 100 and doc["route"] == "/v1/chat/completions"
    bad = sg("estimate", "-", stdin="not json")
    assert bad.returncode != 0 and bad.stderr.startswith("spendgate: error: stdin: not JSON")


# -- item 1: the approve hint works as printed -------------------------------------------------

HOLD_POLICY = '''\
defaults = false

[[budget]]
name = "tiny"
usd = 0.000001
window = "1h"
per = "session"
action = "hold"
'''


def _post(port: int, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x",
                                          "X-Spendgate-Session": "s1"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_402_hint_approves_from_another_shell(tmp_path: Path) -> None:
    """``serve --store sqlite:///rel.db`` from one directory; the hint run verbatim from another."""
    import shlex

    from tests.harness import start_serve

    server_dir, other_dir = tmp_path / "server", tmp_path / "elsewhere"
    server_dir.mkdir()
    other_dir.mkdir()
    (server_dir / "policy.toml").write_text(HOLD_POLICY)
    cwd = Path.cwd()
    os.chdir(server_dir)  # the relative store path is the server's, as a user would start it
    try:
        proc, port = start_serve(tmp_path, 9, "--store", "sqlite:///spend.db", "--config", "policy.toml")
    finally:
        os.chdir(cwd)
    try:
        status, doc = _post(port, {"model": "gpt-4o-mini", "max_tokens": 50,
                                   "messages": [{"role": "user", "content": "hi"}]})
        assert status == 402, doc
        message = str(doc["error"]["message"])  # type: ignore[index]
        hint = message.split("run `", 1)[1].split("`", 1)[0]
        assert hint.startswith("spendgate approve ") and "--store sqlite:////" in hint, hint
        argv = shlex.split(hint)[1:]
        done = sg(*argv, cwd=other_dir, env={"SPENDGATE_HOME": str(tmp_path / "other-home")})
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("approved ")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_memory_store_hint_names_the_admin_api_not_the_command() -> None:
    """A hold in memory:// cannot be reached by a command in another process: no command is offered."""
    import tomllib

    from spendgate import ledger
    from spendgate.engine import Engine
    from spendgate.policy import parse
    from spendgate.request import Identity, Request

    store = ledger.open("memory://")
    try:
        d = Engine(parse(tomllib.loads(HOLD_POLICY)), store).decide(
            Request("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 50,
                                                       "messages": [{"role": "user", "content": "hi"}]},
                    Identity(session="s1")))
    finally:
        store.close()
    assert d.action == "hold"
    assert "run `spendgate approve" not in d.message
    assert f"approve it through the admin API (POST /spendgate/approvals/{d.id})" in d.message


# -- item 2: one flag for the policy -----------------------------------------------------------

TRACE = Path(__file__).parent.parent / "examples" / "runaway-agent.jsonl"


@pytest.mark.parametrize("flag", ["--config", "--policy"])
def test_replay_judges_by_the_policy_given_with_either_flag(tmp_path: Path, flag: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "strict.toml"
    policy.write_text(HOLD_POLICY)
    code, out, err = run(capsys, "replay", str(TRACE), flag, str(policy))
    assert code == 0, err
    assert f"under {policy}" in out.splitlines()[0] and "built-in" not in out
    assert "tiny" in out  # the file's only rule is what fired


# -- item 5: the common flags on either side of the command ------------------------------------

def test_common_flags_before_the_command(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'spend.db'}"
    assert sg("keys", "create", "--user", "ana", "--store", store).returncode == 0
    before = sg("--store", store, "--json", "keys", "list")
    assert before.returncode == 0, before.stderr
    assert [k["user"] for k in json.loads(before.stdout)["keys"]] == ["ana"]
    after = sg("keys", "list", "--store", store, "--json")
    assert json.loads(after.stdout) == json.loads(before.stdout)
    # a flag after the command wins over the same flag before it, and an omitted one resets nothing
    other = sg("--store", store, "status", "--store", "memory://", "--json")
    assert other.returncode == 0 and json.loads(other.stdout)["store"] == "memory://"


def test_config_before_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "strict.toml"
    policy.write_text(HOLD_POLICY)
    code, out, err = run(capsys, "--config", str(policy), "replay", str(TRACE))
    assert code == 0, err
    assert f"under {policy}" in out.splitlines()[0]


# -- item 3: an expected failure is one line; --debug shows the traceback ----------------------

def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("spendgate: error: ")
    return lines[0]


def test_serve_on_a_busy_port_is_one_line_and_never_says_guarding(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = sg("serve", "--port", str(port), "--store", "memory://", env={"SPENDGATE_HOME": str(tmp_path)})
        line = _one_error_line(r)
        assert line == (f"spendgate: error: cannot listen on 127.0.0.1:{port}: address already in use "
                        "(is another server on that port? choose one with --port)")
        debug = sg("--debug", "serve", "--port", str(port), "--store", "memory://",
                   env={"SPENDGATE_HOME": str(tmp_path)})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "guarding" not in debug.stderr


def test_prices_update_from_a_missing_file(tmp_path: Path) -> None:
    r = sg("prices", "update", "--from", "missing.json", cwd=tmp_path, env={"SPENDGATE_HOME": str(tmp_path)})
    assert _one_error_line(r) == "spendgate: error: prices update: missing.json: No such file or directory"
    assert "Traceback" in sg("prices", "update", "--from", "missing.json", "--debug", cwd=tmp_path,
                             env={"SPENDGATE_HOME": str(tmp_path)}).stderr


def test_replay_chart_into_a_missing_directory(tmp_path: Path) -> None:
    r = sg("replay", str(TRACE), "--chart", "/no/such/dir/x.html", env={"SPENDGATE_HOME": str(tmp_path)})
    assert _one_error_line(r) == ("spendgate: error: --chart /no/such/dir/x.html: cannot write the chart "
                                  "(no directory /no/such/dir)")


# -- item 4: loose input refused --------------------------------------------------------------

def _spend(store_url: str) -> None:
    """One priced request on a store, tagged project=apollo, as the proxy would record it."""
    from spendgate import ledger
    from spendgate.engine import Engine
    from spendgate.policy import default_policy
    from spendgate.pricing.cost import Usage
    from spendgate.request import Identity, Request

    store = ledger.open(store_url)
    try:
        engine = Engine(default_policy(), store)
        d = engine.decide(Request("openai", "/v1/chat/completions",
                                  {"model": "gpt-4o-mini", "max_tokens": 10,
                                   "messages": [{"role": "user", "content": "hi"}]},
                                  Identity(user="ana", tags={"project": "apollo"})))
        engine.capture(d, Usage(input=8, output=10))
    finally:
        store.close()


def test_report_by_an_unknown_field_names_the_allowed_ones(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'spend.db'}"
    _spend(store)
    bad = sg("report", "--by", "colour", "--store", store)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "spendgate: error: --by colour: not a field spendgate records, nor a tag on any request in the window; "
        "fields: model, provider, kind, key, user, team, session, agent, feature, route, tier; "
        "tags seen: project")
    by_tag = sg("report", "--by", "project,user", "--store", store, "--json")
    assert by_tag.returncode == 0, by_tag.stderr
    assert [(r["project"], r["user"]) for r in json.loads(by_tag.stdout)["rows"]] == [("apollo", "ana")]


@pytest.mark.parametrize(("toml", "error"), [
    ('store = "postgres://x"\n',
     "store: spendgate serves memory://, redis://, rediss://, sqlite://; got 'postgres://x'"),
    ('[tiers]\nfrontier = ["gpt-5*"]\nsmall = ["*-mini"]\n\n[[budget]]\nname = "b"\nusd = 1\nwindow = "day"\n'
     'match = { tier = "nonexistent" }\n',
     "budget[0] \"b\".match.tier: names no declared tier (frontier, small); got 'nonexistent'"),
])
def test_config_check_refuses_what_no_command_could_run(tmp_path: Path, toml: str, error: str) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(toml)
    r = sg("config", "check", str(policy))
    assert r.returncode == 2 and r.stderr.strip() == f"spendgate: error: {policy}: {error}"
    as_json = sg("config", "check", str(policy), "--json")
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout) == {"ok": False, "file": str(policy), "errors": [f"{policy}: {error}"]}


# -- item 6: messages written for people -------------------------------------------------------

def test_a_refusal_says_all_requests_and_when_room_frees_up() -> None:
    import calendar
    import tomllib

    from spendgate import ledger
    from spendgate.engine import Engine
    from spendgate.policy import parse
    from spendgate.request import Identity, Request

    policy = parse(tomllib.loads('defaults = false\n[[budget]]\nname = "daily"\nusd = 0.000001\n'
                                 'window = "day"\ntimezone = "UTC"\naction = "block"\n'))
    now = calendar.timegm((2026, 12, 3, 8, 3, 0))  # 15 h 57 min before midnight UTC
    store = ledger.open("memory://")
    try:
        d = Engine(policy, store).decide(
            Request("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 50,
                                                       "messages": [{"role": "user", "content": "hi"}]},
                    Identity(user="ana")), now=now)
    finally:
        store.close()
    assert not d.allowed
    assert 'by budget "daily" (all requests, window day)' in d.message and "(none)" not in d.message
    assert "Room frees up in 15 h 57 min (at 2026-12-04 00:00 UTC)." in d.message


def test_keys_create_shows_the_id_and_list_leaves_unset_fields_blank(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'spend.db'}"
    made = sg("keys", "create", "--user", "ana", "--preapprove-max", "2.5", "--store", store)
    assert made.returncode == 0, made.stderr
    secret, note = made.stdout.splitlines()
    key_id = json.loads(sg("keys", "list", "--store", store, "--json").stdout)["keys"][0]["id"]
    assert secret.startswith("sg-") and note.startswith(f"(key id {key_id}, ")
    listing = sg("keys", "list", "--store", store).stdout.splitlines()
    assert listing[0].split() == ["id", "user", "team", "tags", "preapprove", "max", "created"]
    row = listing[2]
    assert "None" not in row and row.split()[:3] == [key_id, "ana", "$2.50"]


def test_report_footer_names_the_start_and_the_window(tmp_path: Path) -> None:
    import re

    store = f"sqlite:///{tmp_path / 'spend.db'}"
    _spend(store)
    r = sg("report", "--since", "7d", "--store", store)
    assert r.returncode == 0, r.stderr
    footer = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"total \$0\.0000\d+ since \d{4}-\d\d-\d\d \d\d:\d\d \S+ \(7d\)", footer), footer


def test_status_on_a_fresh_store_lists_the_limits_in_force(tmp_path: Path) -> None:
    from spendgate import ledger

    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    ledger.open(fresh).close()  # what serve leaves before its first request
    (tmp_path / "p.toml").write_text('defaults = false\n[[budget]]\nname = "team-month"\nusd = 200\n'
                                     'window = "month"\nper = "team"\n[[budget]]\nname = "per-call"\n'
                                     'usd = 0.5\nwindow = "request"\n')
    r = sg("status", "--store", fresh, "--config", str(tmp_path / "p.toml"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"no budget has been used yet in {fresh}; the limits in force:"
    assert lines[3].split()[:6] == ["team-month", "(each", "team,", "month)", "$0.00", "$0.00"]
    assert lines[3].split()[6] == "$200.00"
    assert lines[4].split() == ["per-call", "(each", "request)", "-", "-", "$0.50"]
    doc = json.loads(sg("status", "--store", fresh, "--config", str(tmp_path / "p.toml"), "--json").stdout)
    assert doc["buckets"] == [] and [u["rule"] for u in doc["unused_budgets"]] == ["team-month", "per-call"]


def test_estimate_warns_once(tmp_path: Path) -> None:
    body = {"model": "acme/unknown", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    r = sg("estimate", "-", stdin=json.dumps(body), env={"SPENDGATE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("no price is known for 'acme/unknown'") == 1


# -- item 7: demo --json ----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [("demo", "--json"), ("--json", "demo")])
def test_demo_json_prints_one_document(tmp_path: Path, argv: tuple[str, ...]) -> None:
    r = sg(*argv, env={"SPENDGATE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout is the one document
    assert doc["budget"] == "session-hour" and doc["refused"] >= 1 and doc["requests_sent"] > 20


def test_approvals_list_the_model_held(tmp_path: Path) -> None:
    import tomllib

    from spendgate import approvals, ledger
    from spendgate.engine import Engine
    from spendgate.policy import parse
    from spendgate.request import Identity, Request

    url = f"sqlite:///{tmp_path / 'spend.db'}"
    body = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    store = ledger.open(url)
    try:
        d = Engine(parse(tomllib.loads(HOLD_POLICY)), store).decide(
            Request("openai", "/v1/chat/completions", body, Identity(session="s1")))
        approvals.keep(store, d, "s1", "who", "openai", "/v1/chat/completions", "", json.dumps(body).encode(), {},
                       d.at)
    finally:
        store.close()
    listing = sg("approvals", "--store", url).stdout.splitlines()
    assert listing[0].split()[:3] == ["id", "session", "model"]
    assert listing[2].split()[:4] == [d.id, "s1", "gpt-4o-mini", "tiny"]
    doc = json.loads(sg("approvals", "--store", url, "--json").stdout)
    assert [p["model"] for p in doc["pending"]] == ["gpt-4o-mini"]
