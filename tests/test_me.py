"""``GET /spendgate/me``: the caller's own budgets, with the numbers ``spendgate status --json`` shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate import keys
from spendgate.policy import load
from spendgate.request import hash_key
from tests.harness import Servers

POLICY = """
defaults = false

[[budget]]
name = "global-day"
usd = 100
window = "day"

[[budget]]
name = "user-day"
usd = 5
window = "day"
per = "user"

[[budget]]
name = "key-rpm"
requests = 100
window = "1m"
per = "key"

[[budget]]
name = "model-day"
usd = 50
window = "day"
per = "model"

[[budget]]
name = "per-call"
usd = 2
window = "request"
"""
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Servers, Path, str]]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-operator")  # what a virtual key is swapped for
    path = tmp_path / "spendgate.toml"
    path.write_text(POLICY)
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    s = Servers(load(path), url)
    yield s, path, url
    s.close()


def _me(s: Servers, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"{s.url}/spendgate/me", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _call(s: Servers, key: str, user: str | None = None, n: int = 1) -> None:
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0)
    for _ in range(n):
        client.chat.completions.create(**BODY, extra_headers={"X-Spendgate-User": user} if user else {})
    s.settled()


def _status(tmp_path: Path, url: str, path: Path) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "HOME": str(tmp_path), "SPENDGATE_HOME": str(tmp_path / ".spendgate")}
    out = subprocess.run([sys.executable, "-m", "spendgate.cli.main", "status", "--json", "--store", url,
                          "--config", str(path)], capture_output=True, text=True, timeout=120, env=env, check=True)
    return {b["bucket"]: b for b in json.loads(out.stdout)["buckets"]}


def _same_as_status(budgets: list[dict[str, Any]], status: dict[str, dict[str, Any]]) -> None:
    for b in budgets:
        if b["bucket"] is None:
            continue
        st = status[b["bucket"]]
        assert (b["unit"], b["spent"], b["held"], b["limit"]) == (st["unit"], st["spent"], st["held"], st["limit"])


def test_me_with_a_provider_key_shows_its_own_budgets_with_the_numbers_of_status(
        served: tuple[Servers, Path, str], tmp_path: Path) -> None:
    s, path, url = served
    _call(s, "sk-a", n=2)
    _call(s, "sk-a", user="alice")
    _call(s, "sk-b", user="bob")
    code, doc = _me(s, {"Authorization": "Bearer sk-a", "X-Spendgate-User": "bob"})
    assert code == 200
    mine = hash_key("sk-a")
    assert doc["key"] == mine and doc["virtual_key"] is None and doc["policy_hash"] == s.engine.policy_hash
    by = {(b["rule"], b["scope"], b["unit"]): b for b in doc["budgets"]}
    assert sorted(by) == [
        ("global-day", "all requests (numbers shown to spendgate keys)", None),
        ("key-rpm", f"key={mine}", "requests"),
        ("model-day", "per request's model", None),
        ("per-call", "each request", "usd"),
        ("user-day", "user=(none)", "usd"),
    ]
    rpm = by[("key-rpm", f"key={mine}", "requests")]
    assert (rpm["limit"], rpm["spent"], rpm["held"], rpm["remaining"], rpm["window"]) == (100, 3, 0, 97, "1m")
    assert rpm["resets_at"] is not None  # when the oldest request leaves the minute
    call = by[("per-call", "each request", "usd")]
    assert (call["limit"], call["spent"], call["remaining"]) == ("2", None, None)
    model = by[("model-day", "per request's model", None)]
    assert model["limit"] is None and model["spent"] is None and model["window"] == "day"
    # a provider key is any string to spendgate (only the provider checks it): the total every caller
    # shares is listed, but what others spent is not shown to whoever reaches the port
    day = by[("global-day", "all requests (numbers shown to spendgate keys)", None)]
    assert day["limit"] is None and day["spent"] is None and day["remaining"] is None
    status = _status(tmp_path, url, path)
    _same_as_status(doc["budgets"], status)
    # nothing of another user's or key's: a header claiming bob is not read here
    text = json.dumps(doc)
    assert "user=bob" not in text and "user=alice" not in text and hash_key("sk-b") not in text


def test_me_with_a_virtual_key_shows_what_the_key_binds(served: tuple[Servers, Path, str], tmp_path: Path) -> None:
    s, path, url = served
    secret, vkey = keys.create(s.store, user="carol", team="ml")
    _call(s, secret, n=2)
    _call(s, "sk-a", user="dave")
    code, doc = _me(s, {"Authorization": f"Bearer {secret}"})
    assert code == 200 and doc["virtual_key"] == vkey.id and doc["user"] == "carol" and doc["team"] == "ml"
    by = {(b["rule"], b["scope"]): b for b in doc["budgets"] if b["bucket"] is not None}
    carol = by[("user-day", "user=carol")]
    status = _status(tmp_path, url, path)
    assert carol["spent"] == status[carol["bucket"]]["spent"] and carol["spent"] != "0"
    assert by[("key-rpm", f"key={doc['key']}")]["spent"] == 2
    _same_as_status(doc["budgets"], status)
    text = json.dumps(doc)
    assert "user=dave" not in text and "user=(none)" not in text and hash_key("sk-a") not in text


def test_me_needs_the_callers_own_credentials(served: tuple[Servers, Path, str]) -> None:
    s, _, _ = served
    code, doc = _me(s, {})
    assert code == 401 and "send your own credentials" in doc["error"]["message"]
    code, doc = _me(s, {"Authorization": "Bearer sg-not-a-key"})
    assert code == 401 and "unknown or revoked spendgate key" in doc["error"]["message"]
    code, doc = _me(s, {"x-api-key": "sk-ant-a"})  # the Anthropic form is read as an Anthropic key
    assert code == 200 and doc["key"] == hash_key("sk-ant-a")


def test_me_shows_a_virtual_key_even_where_no_provider_key_is_configured(
        served: tuple[Servers, Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s, _, _ = served
    monkeypatch.delenv("OPENAI_API_KEY")
    secret, _ = keys.create(s.store, user="erin")
    code, doc = _me(s, {"Authorization": f"Bearer {secret}"})
    assert code == 200 and any(b["scope"] == "user=erin" for b in doc["budgets"])


def test_me_shows_a_keys_own_budget_as_status_does(served: tuple[Servers, Path, str], tmp_path: Path) -> None:
    from decimal import Decimal

    s, path, url = served
    secret, vkey = keys.create(s.store, user="frank", usd=Decimal("0.05"), window="day")
    _call(s, secret, n=3)
    code, doc = _me(s, {"Authorization": f"Bearer {secret}"})
    assert code == 200
    (own,) = [b for b in doc["budgets"] if b["rule"] == keys.rule_name(vkey.id)]
    assert (own["scope"], own["unit"], own["limit"], own["window"], own["action"]) == \
        ("global=(none)", "usd", "0.05", "day", "block")
    status = _status(tmp_path, url, path)
    assert own["spent"] == status[own["bucket"]]["spent"] and Decimal(own["spent"]) > 0
    assert Decimal(own["remaining"]) == Decimal("0.05") - Decimal(own["spent"])
    _same_as_status(doc["budgets"], status)
