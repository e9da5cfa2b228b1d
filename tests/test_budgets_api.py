"""``/spendgate/budgets…``, ``/spendgate/pause`` and ``/resume``: run-time budgets over the admin API,
against a real proxy on SQLite and Redis. Admission is checked through ``/spendgate/reserve`` with a
virtual key, so every amount is exact."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from spendgate import keys
from spendgate.policy import Policy, parse, runtime
from tests.conftest import store_url
from tests.harness import Servers

TOKEN = "admin-secret"
POLICY = {"defaults": False, "budget": [
    {"name": "user-day", "usd": 1, "window": "day", "per": "user"},
]}


class Live:
    """A stand-in for the server's live refresher: what ``refresh_now`` applies is the store's
    overlay on the file's policy, as ``serve`` does every half second."""

    def __init__(self, servers: Servers, file_policy: Policy) -> None:
        self.servers, self.file_policy, self.refreshed = servers, file_policy, 0
        self.on_change: list[Any] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def refresh_now(self) -> None:
        self.refreshed += 1
        overlay = runtime.load(self.servers.store)
        engine = self.servers.engine
        engine.set_policy(replace(self.file_policy, rules=(*self.file_policy.rules, *overlay.rules)))
        engine.set_overrides(overlay.limits, overlay.pauses)


@pytest.fixture(params=["sqlite", "redis"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Servers, Live]]:
    policy = parse(POLICY)
    s = Servers(policy, store_url(request.param, tmp_path, request))
    live = Live(s, policy)
    setattr(s.proxy, "live", live)  # noqa: B010 - a stand-in for the server's LivePolicy
    yield s, live
    s.close()


def call(s: Servers, method: str, path: str, body: Any = None, token: str | None = TOKEN,
         raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(s.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def key_for(s: Servers, user: str) -> str:
    secret, _ = keys.create(s.store, user=user)
    return secret


def reserve(s: Servers, secret: str, usd: str) -> int:
    """Reserve ``usd`` as ``secret``'s holder and capture it whole: the status of the reservation."""
    code, doc = call(s, "POST", "/spendgate/reserve", {"usd": usd}, token=secret)
    if code == 200:
        assert call(s, "POST", doc["capture"], {"usd": usd}, token=secret)[0] == 200
    return code


def test_the_admin_token_guards_every_route(served: tuple[Servers, Live], tmp_path: Path) -> None:
    s, _ = served
    for method, path in [("GET", "/spendgate/budgets"), ("GET", "/spendgate/budgets/user-day"),
                         ("PUT", "/spendgate/budgets/x"), ("DELETE", "/spendgate/budgets/x"),
                         ("PUT", "/spendgate/budgets/user-day/limits/user=a"),
                         ("DELETE", "/spendgate/budgets/user-day/limits/user=a"),
                         ("POST", "/spendgate/budgets/user-day/topup"), ("POST", "/spendgate/pause"),
                         ("POST", "/spendgate/resume")]:
        body = {"usd": "1", "window": "day"} if method in ("PUT", "POST") else None
        assert call(s, method, path, body, token=None)[0] == 401, path
        code, doc = call(s, method, path, body, token="wrong")
        assert code == 401 and doc["error"]["message"].startswith("admin token missing or wrong"), path
    assert runtime.load(s.store).fingerprint == runtime.load(s.store).fingerprint
    assert runtime.load(s.store).rules == () and runtime.load(s.store).pauses == ()
    off = Servers(parse(POLICY), "memory://", admin_token=None)
    try:
        code, doc = call(off, "GET", "/spendgate/budgets")
        assert code == 403 and "the admin API is off" in doc["error"]["message"]
    finally:
        off.close()


def test_put_get_delete_a_budget(served: tuple[Servers, Live]) -> None:
    s, live = served
    code, doc = call(s, "PUT", "/spendgate/budgets/team-month",
                     {"usd": "500", "window": "month", "per": "team", "action": "hold", "alert_at": [0.8]})
    assert code == 201 and doc["change"] == "add" and live.refreshed == 1
    b = doc["budget"]
    assert (b["name"], b["source"], b["usd"], b["window"], b["per"], b["action"], b["by"]) == \
        ("team-month", "store", "500", "month", "team", "hold", "admin API")
    code, doc = call(s, "PUT", "/spendgate/budgets/team-month",
                     {"name": "team-month", "usd": "600", "window": "month", "per": "team"})
    assert code == 200 and doc["change"] == "set" and doc["budget"]["usd"] == "600"
    assert doc["budget"]["action"] == "block", "a PUT is the whole table"
    code, doc = call(s, "GET", "/spendgate/budgets")
    assert code == 200 and [(b["name"], b["source"]) for b in doc["budgets"]] == \
        [("user-day", "file"), ("team-month", "store")]
    code, doc = call(s, "GET", "/spendgate/budgets/user-day")
    assert code == 200 and doc["source"] == "file" and doc["usd"] == "1" and doc["by"] is None
    assert call(s, "GET", "/spendgate/budgets/nope")[0] == 404
    # refusals: a bad field (named), a name the file owns, a body naming another budget, not JSON
    code, doc = call(s, "PUT", "/spendgate/budgets/x", {"usd": "$10", "window": "day"})
    assert code == 400
    assert doc["error"]["message"] == ("budget \"x\".usd: expected a number of dollars such as 10 or 0.50, "
                                       "got '$10'")
    code, doc = call(s, "PUT", "/spendgate/budgets/x", {"usd": 1, "window": "day", "colour": "red"})
    assert code == 400 and doc["error"]["message"].startswith('budget "x".colour: unknown key')
    code, doc = call(s, "PUT", "/spendgate/budgets/user-day", {"usd": 5, "window": "day"})
    assert code == 409 and "in the policy file" in doc["error"]["message"]
    code, doc = call(s, "PUT", "/spendgate/budgets/x", {"name": "y", "usd": 5, "window": "day"})
    assert code == 400 and doc["error"]["message"].startswith('budget "x".name: the body names \'y\'')
    assert call(s, "PUT", "/spendgate/budgets/x", raw=b"usd = 5")[0] == 400
    assert call(s, "PUT", "/spendgate/budgets/x", [1, 2])[0] == 400
    # delete
    assert call(s, "DELETE", "/spendgate/budgets/user-day")[0] == 409
    assert call(s, "DELETE", "/spendgate/budgets/team-month") == (200, {"change": "remove", "removed": "team-month"})
    assert call(s, "DELETE", "/spendgate/budgets/team-month")[0] == 404
    assert [(e.dims["change"], e.rule, e.dims["by"]) for e in s.store.events(0) if e.kind == "budget"] == [
        ("add", "team-month", "admin API"), ("set", "team-month", "admin API"),
        ("remove", "team-month", "admin API")]


def test_a_budget_put_refuses_on_the_serving_instance_at_once(served: tuple[Servers, Live]) -> None:
    s, _ = served
    alice = key_for(s, "alice")
    assert call(s, "PUT", "/spendgate/budgets/tight", {"usd": "0.25", "window": "1h", "per": "user"})[0] == 201
    assert reserve(s, alice, "0.25") == 200
    assert reserve(s, alice, "0.000000001") == 402, "the run-time budget's $0.25 is spent, nano-exact"


def test_a_limit_for_one_user_changes_only_that_user(served: tuple[Servers, Live]) -> None:
    s, live = served
    alice, bob = key_for(s, "alice"), key_for(s, "bob")
    assert reserve(s, alice, "0.1") == 200
    code, doc = call(s, "PUT", "/spendgate/budgets/user-day/limits/user=alice", {"usd": "0.3"})
    assert code == 200 and live.refreshed == 1
    [row] = doc["buckets"]
    assert (row["limit"], row["spent"], row["held"], row["remaining"], doc["refuses"]) == \
        ("0.3", "0.1", "0", "0.2", False)
    assert reserve(s, alice, "0.2") == 200
    assert reserve(s, alice, "0.000000001") == 402, "alice refused at her new limit"
    assert reserve(s, bob, "1") == 200, "bob keeps the rule's $1"
    # lowered below what is spent: said in the reply
    code, doc = call(s, "PUT", "/spendgate/budgets/user-day/limits/user=alice", {"usd": "0.05"})
    assert code == 200 and doc["refuses"] is True and doc["buckets"][0]["spent"] == "0.3"
    # cleared: the rule's $1 again, spend kept
    code, doc = call(s, "DELETE", "/spendgate/budgets/user-day/limits/user=alice")
    assert code == 200 and doc["buckets"][0]["limit"] == "1" and doc["buckets"][0]["remaining"] == "0.7"
    assert reserve(s, alice, "0.7") == 200 and reserve(s, alice, "0.000000001") == 402
    assert call(s, "DELETE", "/spendgate/budgets/user-day/limits/user=alice")[0] == 404
    code, doc = call(s, "PUT", "/spendgate/budgets/user-day/limits/team=ml", {"usd": "1"})
    assert code == 400 and "counts per user" in doc["error"]["message"]
    code, doc = call(s, "PUT", "/spendgate/budgets/user-day/limits/user=alice", {"usd": "lots"})
    assert code == 400 and doc["error"]["message"].startswith("--usd: expected a number of dollars")
    code, doc = call(s, "PUT", "/spendgate/budgets/user-day/limits/user=alice", {"euros": "1"})
    assert code == 400 and doc["error"]["message"].startswith("euros: unknown field")
    assert call(s, "PUT", "/spendgate/budgets/nope/limits/user=alice", {"usd": "1"})[0] == 404


def test_topup_on_a_total_budget(served: tuple[Servers, Live]) -> None:
    s, _ = served
    alice = key_for(s, "alice")
    assert call(s, "PUT", "/spendgate/budgets/prepaid", {"usd": "1", "window": "total", "per": "user"})[0] == 201
    # the file's user-day ($1) would refuse first: alice gets $10 there, so only prepaid weighs
    assert call(s, "PUT", "/spendgate/budgets/user-day/limits/user=alice", {"usd": "10"})[0] == 200
    assert reserve(s, alice, "0.9") == 200
    assert reserve(s, alice, "0.2") == 402
    code, doc = call(s, "POST", "/spendgate/budgets/prepaid/topup", {"scope": "user=alice", "usd": "0.1"})
    assert code == 200
    assert (doc["bucket"], doc["topup_usd"], doc["limit_usd"], doc["spent_usd"], doc["remaining_usd"]) == \
        ("prepaid|user=alice", "0.1", "1.1", "0.9", "0.2")
    assert reserve(s, alice, "0.200000001") == 402
    assert reserve(s, alice, "0.2") == 200
    code, doc = call(s, "POST", "/spendgate/budgets/user-day/topup", {"scope": "user=alice", "usd": "5"})
    assert code == 400 and 'window = "day"; a top-up is headroom on a window = "total"' in doc["error"]["message"]
    code, doc = call(s, "POST", "/spendgate/budgets/prepaid/topup", {"scope": "user=alice"})
    assert code == 400 and doc["error"]["message"].startswith("usd: missing")
    assert call(s, "POST", "/spendgate/budgets/nope/topup", {"scope": "user=alice", "usd": "1"})[0] == 404


def test_pause_and_resume(served: tuple[Servers, Live]) -> None:
    s, live = served
    alice, bob = key_for(s, "alice"), key_for(s, "bob")
    alice_id = keys.lookup(s.store, alice, now=0.0)
    assert alice_id is not None
    code, doc = call(s, "POST", "/spendgate/pause", {"scope": f"key={alice_id.id}", "reason": "incident 42"})
    assert code == 200 and (doc["scope"], doc["by"], doc["reason"]) == (f"key={alice_id.id}", "admin API",
                                                                        "incident 42")
    assert reserve(s, alice, "0.01") == 402 and reserve(s, bob, "0.01") == 200
    assert call(s, "POST", "/spendgate/pause", {})[0] == 200  # everything
    assert reserve(s, bob, "0.01") == 402
    assert call(s, "POST", "/spendgate/resume", {"scope": "global"})[0] == 200
    assert reserve(s, bob, "0.01") == 200 and reserve(s, alice, "0.01") == 402
    assert call(s, "POST", "/spendgate/resume", {"scope": f"key={alice_id.id}"})[0] == 200
    assert reserve(s, alice, "0.01") == 200
    code, doc = call(s, "POST", "/spendgate/resume", {"scope": "global"})
    assert code == 404 and doc["error"]["message"] == "global is not paused"
    code, doc = call(s, "POST", "/spendgate/pause", {"scope": "planet=mars"})
    assert code == 400 and doc["error"]["message"].startswith("scope: expected global or name=value")
    assert live.refreshed == 4


def test_without_a_live_refresher_the_change_is_kept_for_the_next_read(tmp_path: Path) -> None:
    s = Servers(parse(POLICY), f"sqlite:///{tmp_path / 'spend.db'}")
    try:
        code, _ = call(s, "PUT", "/spendgate/budgets/extra", {"usd": "2", "window": "day"})
        assert code == 201 and [r.name for r in runtime.load(s.store).rules] == ["extra"]
        code, doc = call(s, "GET", "/spendgate/budgets")
        assert [(b["name"], b["source"]) for b in doc["budgets"]] == [("user-day", "file"), ("extra", "store")]
    finally:
        s.close()
