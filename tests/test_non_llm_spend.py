"""Non-LLM spend (``spendgate.charge`` / ``reserve`` / ``tool``) under the same budgets and rules."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import spendgate
from spendgate import keys
from spendgate.engine import bucket_key
from spendgate.ledger import Bucket, Event
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy
from spendgate.policy.parse import parse
from spendgate.request import NONE, usd_arg
from spendgate.sdk import _runtime
from tests.conftest import BACKENDS, store_url
from tests.harness import Servers

TOOLS_RULE = "tools-total"


def policy(usd: str, **match: Any) -> Any:
    rule: dict[str, Any] = {"name": TOOLS_RULE, "usd": usd, "window": "total",
                            "match": match or {"provider": "tool"}}
    return parse({"budget": [rule]})


@pytest.fixture
def tools() -> Iterator[None]:
    """A memory store under one policy rule on tools, $100 (roomy) unless a test says otherwise."""
    spendgate.configure(store="memory://", policy=policy("100"))
    yield
    spendgate.configure(store="memory://", policy=default_policy())


def rule_spent(name: str = TOOLS_RULE) -> tuple[int, int]:
    """(spent, held) of a global rule's dollar bucket."""
    [st] = _runtime.engine().ledger.states([Bucket(bucket_key(name, f"global={NONE}"), None)], now=time.time())
    return st.spent, st.held


def events(kind: str | None = None) -> list[Event]:
    return [e for e in _runtime.engine().ledger.events(0) if kind is None or e.kind == kind]


def run_threads(n: int, work: Any) -> None:
    """``work(i)`` on ``n`` threads started together, under the caller's budgets (``bind``)."""
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        work(i)

    threads = [threading.Thread(target=spendgate.bind(one), args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- charge --------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def spend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store: a charge past a limit must leave each backend's buckets exact."""
    return store_url(request.param, tmp_path, request)


def test_64_concurrent_charges_count_exactly_under_a_budget_and_a_rule_even_past_their_limits(spend_url: str) -> None:
    spendgate.configure(store=spend_url, policy=policy("0.5"))
    amounts = [Decimal("0.0123456789") + Decimal(i) / 10**9 for i in range(64)]
    total = sum(usd_to_nanos(a) for a in amounts)
    assert total > usd_to_nanos("0.5")  # past both limits: every charge is recorded all the same
    spents: list[spendgate.Spent] = []

    @spendgate.budget(usd="0.3")
    def agent() -> tuple[tuple[int, int], spendgate.BudgetExceeded]:
        run_threads(64, lambda i: spents.append(spendgate.charge(usd=amounts[i], feature="search")))
        # the budget is now over: even a one-nano-dollar reservation under it is refused
        with pytest.raises(spendgate.BudgetExceeded) as refused, spendgate.reserve(usd="0.000000001"):
            pass
        return rule_spent(), refused.value

    try:
        (spent, held), refused = agent()
        assert (spent, held) == (total, 0)
        assert sum(usd_to_nanos(s.usd) for s in spents) == total
        assert sum(e.cost for e in events("capture")) == total
        assert all(not e.estimated and e.provider == "tool" and e.model == "tool" for e in events("capture"))
        assert {e.dims.get("feature") for e in events("capture")} == {"search"}
        over = [s for s in spents if s.over_budget]
        # a charge is over once either limit is passed: the budget's at $0.30, the rule's at $0.50
        assert len(over) == 64 - int(usd_to_nanos("0.3") // usd_to_nanos(amounts[0]))
        assert all(s.over[0].startswith("sdk:") or s.over[0] == TOOLS_RULE for s in over)
        assert refused.details["action"] == "block"
        # the rule's bucket still shows its limit, though it is over it
        bucket = next(b for b in _runtime.engine().ledger.known_buckets() if b.key.startswith(TOOLS_RULE))
        assert bucket.limit == usd_to_nanos("0.5")
    finally:
        spendgate.configure(store="memory://", policy=default_policy())


def test_a_charge_is_attributed_by_name_and_tags_and_a_rule_may_match_its_name() -> None:
    spendgate.configure(store="memory://", policy=policy("1", model="serpapi"))
    try:
        with spendgate.tags(user="alice"):
            a = spendgate.charge(usd="0.25", name="serpapi", team="ml")
            b = spendgate.charge(usd=0.1)  # another tool: the rule does not match it
        assert (a.usd, b.usd, a.over, b.over) == (Decimal("0.25"), Decimal("0.1"), (), ())
        assert rule_spent() == (usd_to_nanos("0.25"), 0)
        report = spendgate.report(group_by=["model", "user"], since="1h")
        assert report.usd(model="serpapi", user="alice") == Decimal("0.25")
        assert report.usd(model="tool", user="alice") == Decimal("0.1")
        cap = next(e for e in events("capture") if e.model == "serpapi")
        assert cap.dims["team"] == "ml" and cap.dims["route"] == "tool"
    finally:
        spendgate.configure(store="memory://", policy=default_policy())


@pytest.mark.parametrize("bad", [-1, "-0.01", float("nan"), float("inf"), "Infinity", "ten", True, None, [1]])
def test_amounts_are_validated_by_name(tools: None, bad: Any) -> None:
    with pytest.raises(ValueError, match="usd"):
        spendgate.charge(usd=bad)
    with pytest.raises(ValueError, match="usd"):
        spendgate.reserve(usd=bad)
    with pytest.raises(ValueError, match="usd"):
        spendgate.tool(usd=bad)
    assert events() == []


def test_amounts_are_exact_decimals() -> None:
    assert usd_arg(0.1) == 100_000_000
    assert usd_arg("0.000000001") == 1
    assert usd_arg(Decimal("1.0000000001")) == 1_000_000_001  # a sub-nano remainder rounds up
    assert usd_arg(3) == 3_000_000_000


# -- reserve -------------------------------------------------------------------------------------


@pytest.mark.parametrize("binding", ["budget", "rule"])
def test_64_concurrent_reservations_admit_exactly_those_that_fit(binding: str, spend_url: str) -> None:
    """A limit that fits N reservations admits exactly N of 64, whichever of the @budget and the
    policy rule is the tighter; the captures then count to the nano-dollar."""
    each, actual = Decimal("0.13"), Decimal("0.1234567891")
    budget_usd, rule_usd = ("1", "100") if binding == "budget" else ("100", "0.8")
    n_fit = int(usd_to_nanos(min(Decimal(budget_usd), Decimal(rule_usd))) // usd_to_nanos(each))
    spendgate.configure(store=spend_url, policy=policy(rule_usd))
    all_tried = threading.Barrier(64)
    held: list[int] = []
    refused: list[spendgate.BudgetExceeded] = []

    def work(i: int) -> None:
        try:
            with spendgate.reserve(usd=each) as r:
                held.append(i)
                all_tried.wait()  # every reservation stands while the others are decided
                r.capture(actual)
        except spendgate.BudgetExceeded as exc:
            refused.append(exc)
            all_tried.wait()

    @spendgate.budget(usd=budget_usd)
    def agent() -> None:
        run_threads(64, work)

    try:
        agent()
        assert (len(held), len(refused)) == (n_fit, 64 - n_fit)
        rules = {str(e.details["rule"]) for e in refused}
        assert rules == {TOOLS_RULE} if binding == "rule" else all(r.startswith("sdk:") for r in rules)
        assert all(e.details["action"] == "block" and e.details["model"] == "tool" for e in refused)
        assert rule_spent() == (n_fit * usd_to_nanos(actual), 0)
        assert sum(e.cost for e in events("capture")) == n_fit * usd_to_nanos(actual)
        assert len(events("block")) == 64 - n_fit
    finally:
        spendgate.configure(store="memory://", policy=default_policy())


def test_a_reservation_is_released_when_its_block_raises(tools: None) -> None:
    with pytest.raises(RuntimeError, match="search API down"), spendgate.reserve(usd="0.5") as r:
        assert rule_spent() == (0, usd_to_nanos("0.5"))
        raise RuntimeError("search API down")
    assert rule_spent() == (0, 0)
    assert r.charged_usd == 0
    assert [e.kind for e in events() if e.kind in ("capture", "released")] == ["released"]


def test_a_reservation_never_captured_is_charged_in_full_flagged_estimated(tools: None) -> None:
    with spendgate.reserve(usd="0.5", name="render") as r:
        pass
    assert r.charged_usd == Decimal("0.5")
    assert rule_spent() == (usd_to_nanos("0.5"), 0)
    [cap] = events("capture")
    assert (cap.cost, cap.estimated, cap.model) == (usd_to_nanos("0.5"), True, "render")


def test_a_capture_above_the_reservation_is_refused_and_the_reservation_charged(tools: None) -> None:
    with pytest.raises(ValueError, match=r"\$0\.75 is above the reservation of \$0\.5"), \
            spendgate.reserve(usd="0.5") as r:
        r.capture("0.75")
    assert r.charged_usd == Decimal("0.5")
    assert rule_spent() == (usd_to_nanos("0.5"), 0)


def test_a_reservation_settles_once(tools: None) -> None:
    with spendgate.reserve(usd="0.5") as r:
        assert r.capture("0.2") == Decimal("0.2")
        with pytest.raises(RuntimeError, match="already settled"):
            r.capture("0.1")
        with pytest.raises(RuntimeError, match="already settled"):
            r.release()
    assert rule_spent() == (usd_to_nanos("0.2"), 0)
    [cap] = events("capture")
    assert not cap.estimated


def test_a_reservation_can_be_released_explicitly(tools: None) -> None:
    with spendgate.reserve(usd="0.5") as r:
        r.release()
    assert rule_spent() == (0, 0) and r.charged_usd == 0


def test_async_reservations_under_a_budget() -> None:
    spendgate.configure(store="memory://", policy=policy("100"))

    async def one() -> bool:
        try:
            async with spendgate.reserve(usd="0.3") as r:
                await asyncio.sleep(0)
                r.capture("0.25")
            return True
        except spendgate.BudgetExceeded:
            return False

    @spendgate.budget(usd=1)
    async def agent() -> list[bool]:
        return list(await asyncio.gather(*(one() for _ in range(10))))

    try:
        assert sum(asyncio.run(agent())) == 3
        assert rule_spent() == (3 * usd_to_nanos("0.25"), 0)
    finally:
        spendgate.configure(store="memory://", policy=default_policy())


def test_an_on_exceed_callable_may_let_a_reservation_through(tools: None) -> None:
    asked: list[Exception] = []

    def ask(err: Exception) -> bool:
        asked.append(err)
        return True

    with spendgate.budget(usd="0.1", on_exceed=ask), spendgate.reserve(usd="0.2") as r:
        r.capture("0.2")
    assert len(asked) == 1 and rule_spent() == (usd_to_nanos("0.2"), 0)


# -- @tool ---------------------------------------------------------------------------------------


def test_tool_decorator_charges_its_price_on_return_and_nothing_on_failure(tools: None) -> None:
    calls: list[str] = []

    @spendgate.tool(usd="0.05")
    def search(q: str) -> str:
        calls.append(q)
        if q == "fail":
            raise ConnectionError("upstream down")
        return q.upper()

    with spendgate.budget(usd="0.12"):
        assert search("a") == "A"
        with pytest.raises(ConnectionError):
            search("fail")
        assert search("b") == "B"
        with pytest.raises(spendgate.BudgetExceeded):
            search("c")  # $0.10 spent, $0.05 more does not fit: not run at all
    assert calls == ["a", "fail", "b"]
    assert rule_spent() == (usd_to_nanos("0.1"), 0)
    assert {e.model for e in events("capture")} == {"search"}
    assert not any(e.estimated for e in events("capture"))


def test_tool_decorator_on_a_coroutine_function(tools: None) -> None:
    @spendgate.tool(usd="0.05", name="geocode", feature="maps")
    async def geocode(place: str) -> str:
        await asyncio.sleep(0)
        return place

    async def main() -> list[str]:
        return list(await asyncio.gather(*(geocode(str(i)) for i in range(4))))

    assert asyncio.run(main()) == ["0", "1", "2", "3"]
    assert rule_spent() == (4 * usd_to_nanos("0.05"), 0)
    assert {(e.model, e.dims.get("feature")) for e in events("capture")} == {("geocode", "maps")}


# -- HTTP: tools in other processes, with the caller's own key -----------------------------------


def http(s: Servers, path: str, doc: Any = None, key: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    body = json.dumps(doc).encode() if doc is not None else b""
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    req = urllib.request.Request(s.url + path, data=body, method="POST", headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def team_policy(action: str = "block") -> Any:
    return parse({"budget": [{"name": "team-tools", "usd": "1", "window": "total", "per": "team",
                              "action": action, "match": {"provider": "tool"}}]})


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers(team_policy(), "memory://")
    yield s
    s.close()


def team_spent(s: Servers, team: str) -> tuple[int, int]:
    [st] = s.store.states([Bucket(bucket_key("team-tools", f"team={team}"), None)], now=time.time())
    return st.spent, st.held


def test_http_charge_counts_under_the_virtual_keys_bindings(servers: Servers) -> None:
    secret, _ = keys.create(servers.store, team="ml", tags={"feature": "search"})
    status, doc = http(servers, "/spendgate/charge", {"usd": "0.25", "name": "serpapi",
                                                       "tags": {"team": "other", "user": "bob"}}, secret)
    assert status == 200 and doc["charged_usd"] == "0.25" and doc["over"] == [] and doc["model"] == "serpapi"
    assert team_spent(servers, "ml") == (usd_to_nanos("0.25"), 0)  # the key's team, not the body's
    [cap] = [e for e in servers.store.events(0) if e.kind == "capture"]
    assert (cap.model, cap.provider, cap.dims["user"], cap.dims["team"], cap.dims["feature"]) == \
        ("serpapi", "tool", "bob", "ml", "search")
    # past the limit it is recorded all the same, and said
    status, doc = http(servers, "/spendgate/charge", {"usd": "0.9"}, secret)
    assert status == 200 and doc["over"] == ["team-tools"]
    assert team_spent(servers, "ml") == (usd_to_nanos("1.15"), 0)


def test_http_reserve_capture_release_and_refusal(servers: Servers) -> None:
    secret, _ = keys.create(servers.store, team="ml")
    status, first = http(servers, "/spendgate/reserve", {"usd": "0.5"}, secret)
    assert status == 200 and first["reserved_usd"] == "0.5"
    rid = first["reservation_id"]
    assert team_spent(servers, "ml") == (0, usd_to_nanos("0.5"))
    status, second = http(servers, "/spendgate/reserve", {"usd": "0.6"}, secret)
    assert status == 402
    assert second["spendgate"]["rule"] == "team-tools" and second["spendgate"]["action"] == "block"
    assert second["error"]["spendgate"] == second["spendgate"] and second["error"]["code"] == "spendgate_blocked"
    assert second["spendgate"]["remaining_usd"] == "0.5"
    # only the key that reserved may settle it
    other, _ = keys.create(servers.store, team="ml")
    assert http(servers, f"/spendgate/reserve/{rid}/capture", {"usd": "0.1"}, other)[0] == 404
    status, doc = http(servers, f"/spendgate/reserve/{rid}/capture", {"usd": "0.4"}, secret)
    assert status == 200 and doc["charged_usd"] == "0.4" and doc["captured"] is True
    assert http(servers, f"/spendgate/reserve/{rid}/capture", {"usd": "0.4"}, secret)[0] == 404  # once
    assert team_spent(servers, "ml") == (usd_to_nanos("0.4"), 0)
    # released: nothing charged
    status, doc = http(servers, "/spendgate/reserve", {"usd": "0.3"}, secret)
    assert http(servers, f"/spendgate/reserve/{doc['reservation_id']}/release", None, secret)[0] == 200
    assert team_spent(servers, "ml") == (usd_to_nanos("0.4"), 0)
    # above the reservation: refused by name, the reservation charged
    status, doc = http(servers, "/spendgate/reserve", {"usd": "0.3"}, secret)
    status, over = http(servers, f"/spendgate/reserve/{doc['reservation_id']}/capture", {"usd": "0.35"}, secret)
    assert status == 400 and "$0.35 is above the reservation of $0.3" in over["error"]["message"]
    assert team_spent(servers, "ml") == (usd_to_nanos("0.7"), 0)


def test_http_spend_needs_the_callers_own_key_and_a_valid_amount(servers: Servers) -> None:
    assert http(servers, "/spendgate/charge", {"usd": "0.1"})[0] == 401
    assert http(servers, "/spendgate/charge", {"usd": "0.1"}, "sg-not-a-key")[0] == 401
    # a provider key is never checked here (nothing calls the provider): it could be any string
    status, doc = http(servers, "/spendgate/charge", {"usd": "0.1"}, "sk-made-up")
    assert status == 401 and "virtual key" in doc["error"]["message"]
    mine, _ = keys.create(servers.store, user="ana")
    for bad, names in (({"usd": "-1"}, "usd"), ({"usd": "NaN"}, "usd"), ({}, "usd"),
                       ({"usd": "0.1", "tags": {"a": 1}}, "tags"), ({"usd": 1, "name": ""}, "name")):
        status, doc = http(servers, "/spendgate/charge", bad, mine)
        assert status == 400 and doc["error"]["message"].startswith(f"spendgate: {names}"), bad
    assert http(servers, "/spendgate/reserve/nope/release", None, mine)[0] == 404
    assert [e for e in servers.store.events(0) if e.kind == "capture"] == []


def test_64_concurrent_http_reservations_admit_exactly_those_that_fit(servers: Servers) -> None:
    secret, _ = keys.create(servers.store, team="ml")
    codes: list[int] = []
    ids: list[str] = []
    start = threading.Barrier(64)

    def one() -> None:
        start.wait()
        status, doc = http(servers, "/spendgate/reserve", {"usd": "0.13"}, secret)
        codes.append(status)
        if status == 200:
            ids.append(doc["reservation_id"])

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 7 + [402] * 57
    for rid in ids:
        assert http(servers, f"/spendgate/reserve/{rid}/capture", {"usd": "0.1234567891"}, secret)[0] == 200
    assert team_spent(servers, "ml") == (7 * usd_to_nanos("0.1234567891"), 0)


def test_a_held_http_reservation_passes_on_retry_once_approved() -> None:
    s = Servers(team_policy(action="hold"), "memory://")
    try:
        secret, _ = keys.create(s.store, team="ml")
        assert http(s, "/spendgate/charge", {"usd": "0.9"}, secret)[0] == 200
        status, held = http(s, "/spendgate/reserve", {"usd": "0.5"}, secret)
        assert status == 402 and held["spendgate"]["action"] == "hold"
        hold_id = held["spendgate"]["approval"]["id"]
        status, _ = http(s, f"/spendgate/approvals/{hold_id}", {"approve": True}, "admin-secret")
        assert status == 200
        status, doc = http(s, "/spendgate/reserve", {"usd": "0.5"}, secret)
        assert status == 200 and doc["reserved_usd"] == "0.5"
    finally:
        s.close()
