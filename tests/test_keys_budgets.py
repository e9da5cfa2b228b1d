"""Keys with budgets: a key's own budget, model allow-list, expiry, capability and rotation — through
the engine and through the real proxy (official openai client, fake upstream on loopback)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate import keys, ledger
from spendgate.buckets import rule_buckets
from spendgate.cli.main import main
from spendgate.engine import Approval, Engine
from spendgate.errors import ConfigError
from spendgate.ledger import Ledger
from spendgate.ledger import open as open_store
from spendgate.money import usd_to_nanos
from spendgate.policy import parse
from spendgate.policy.model import Policy
from spendgate.proxy.identity import Credentials, credentials, identity
from spendgate.request import NONE, Identity, Request, tool_request
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers

MSG = [{"role": "user", "content": "hi"}]
#: what the fake upstream's usage costs on gpt-4o-mini: 50 * $0.15/M + 10 * $0.60/M
MINI_COST = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600
#: a policy whose one rule lets everything through (and holds, approvably, only past $100)
ROOMY = {"approvals": {"header_max_usd": 10}, "budget": [{"name": "roomy", "usd": 100, "window": "total",
                                                            "action": "hold"}]}


@pytest.fixture(autouse=True)
def provider_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the proxy swaps a virtual key for."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-provider-key")


@pytest.fixture
def servers_for() -> Iterator[Any]:
    made: list[Servers] = []

    def make(policy: dict[str, Any] | None = None, store: str = "memory://") -> Servers:
        s = Servers(parse(policy if policy is not None else ROOMY), store)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def client(s: Servers, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=secret, max_retries=0)


def chat(s: Servers, secret: str, model: str = "gpt-4o-mini", headers: dict[str, str] | None = None) -> Any:
    return client(s, secret).chat.completions.create(model=model, messages=MSG, max_tokens=5,  # type: ignore
                                                     extra_headers=headers or {})


def refusal(exc: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    doc: dict[str, Any] = exc.value.response.json()
    return doc


def key_spent(store: Ledger, key: keys.VirtualKey) -> tuple[int, int]:
    """(spent, held) in nano-dollars of the key's own dollar budget."""
    rule = key.rule()
    assert rule is not None
    rbs = [rb for rb in rule_buckets(rule, f"global={NONE}", time.time()) if rb.unit == "usd"]
    [st] = store.states([rb.bucket() for rb in rbs], now=time.time())
    return st.spent, st.held


def who(store: Ledger, secret: str, headers: dict[str, str] | None = None, *, trust: bool = False) -> Identity:
    """The identity the proxy makes for a request with ``secret``."""
    sent = {"authorization": f"Bearer {secret}", **{k.lower(): v for k, v in (headers or {}).items()}}
    return identity("openai", sent, {}, credentials("openai", sent, store), trust_client_capability=trust)


# -- the key record -------------------------------------------------------------------------------


def test_a_key_written_by_the_previous_version_reads_as_no_budget_any_model_no_expiry() -> None:
    old = json.dumps({"id": "1a2b3c4d", "user": "ana", "team": None, "tags": {}, "preapprove_max_usd": "2.5",
                      "created": 1.0})
    key = keys.VirtualKey.from_json(old, "1a2b3c4d5e6f7a8b")
    assert (key.usd, key.tokens, key.requests, key.window, key.models, key.expires_at, key.capability) == \
        (None, None, None, None, (), None, None)
    assert key.rule() is None and key.preapprove_max_usd == Decimal("2.5")
    assert key.counted_as == "1a2b3c4d5e6f7a8b", "counted as it always was: the hash it is stored under"
    assert keys.VirtualKey.from_json(key.to_json()) == key


def test_the_keys_own_budget_is_an_immutable_global_block_named_by_its_id() -> None:
    store = open_store("memory://")
    _, key = keys.create(store, usd=Decimal("50"), tokens=1000, window="month")
    rule = key.rule()
    assert rule is not None
    assert (rule.name, rule.per, rule.action, rule.immutable, rule.window.text, rule.usd, rule.tokens,
            rule.requests) == (f"key:{key.id}", "global", "block", True, "month", Decimal("50"), 1000, None)
    _, plain = keys.create(store, requests=3)
    assert plain.window == "total" and plain.rule() is not None and plain.rule().requests == 3  # type: ignore


@pytest.mark.parametrize(("kw", "names"), [
    ({"window": "day"}, "--window"),
    ({"usd": Decimal(1), "window": "request"}, "--window"),
    ({"usd": Decimal(1), "window": "fortnight"}, "--window"),
    ({"tokens": -1}, "--tokens"),
    ({"capability": "root"}, "--capability: expected one of read_only, data_write, payment_initiate"),
    ({"expires_at": 1.0}, "--expires"),
])
def test_bad_key_settings_are_refused_naming_the_flag(kw: dict[str, Any], names: str) -> None:
    store = open_store("memory://")
    with pytest.raises(ConfigError, match=names):
        keys.create(store, **kw)
    assert keys.list_keys(store) == []


def test_expires_takes_a_duration_or_a_date_time_with_its_offset() -> None:
    now = 1_800_000_000.0
    assert keys.parse_expires("30d", now) == now + 30 * 86400
    assert keys.parse_expires("12h", now) == now + 12 * 3600
    assert keys.parse_expires("2027-01-31T18:00:00+01:00", now) == 1801414800.0
    for bad, why in (("2027-01-31T18:00:00", "offset"), ("soon", "duration"), ("2020-01-01T00:00:00Z", "past")):
        with pytest.raises(ConfigError, match=f"--expires: .*{why}"):
            keys.parse_expires(bad, now)


# -- the key's own budget --------------------------------------------------------------------------


def test_engine_refuses_a_key_once_its_own_budget_is_spent_even_with_an_approval() -> None:
    store = open_store("memory://")
    engine = Engine(parse(ROOMY), store)
    secret, key = keys.create(store, usd=Decimal("0.05"), preapprove_max_usd=Decimal(5))
    other, _ = keys.create(store)
    d = engine.decide(tool_request(usd_to_nanos("0.03"), who(store, secret)))
    assert d.allowed
    engine.capture_amount(d, usd_to_nanos("0.03"))
    assert key_spent(store, key) == (30_000_000, 0)
    for approval in (None, Approval(Decimal(5), by="X-Spendgate-Allow", channel="header", ceiling_usd=Decimal(5)),
                     Approval(None, by="operator")):
        d = engine.decide(tool_request(usd_to_nanos("0.03"), who(store, secret)), approval=approval)
        assert not d.allowed and d.action == "block" and d.trip is not None
        assert (d.trip.rule.name, d.trip.limit, d.trip.used, d.trip.amount) == \
            (f"key:{key.id}", 50_000_000, 30_000_000, 30_000_000)
    # what fits still passes: exactly the $0.02 left
    d = engine.decide(tool_request(usd_to_nanos("0.02"), who(store, secret)))
    assert d.allowed
    engine.capture_amount(d, usd_to_nanos("0.02"))
    assert key_spent(store, key) == (50_000_000, 0)
    assert not engine.decide(tool_request(1, who(store, secret))).allowed
    # another key has nothing to do with it
    assert engine.decide(tool_request(usd_to_nanos("0.03"), who(store, other))).allowed


def test_a_shadow_policy_does_not_turn_off_a_keys_own_budget() -> None:
    store = open_store("memory://")
    engine = Engine(parse({**ROOMY, "mode": "shadow"}), store)
    secret, key = keys.create(store, requests=1)
    d = engine.decide(tool_request(1, who(store, secret)))
    engine.capture_amount(d, 1)
    d = engine.decide(tool_request(1, who(store, secret)))
    assert not d.allowed and d.trip is not None and d.trip.rule.name == f"key:{key.id}"


def test_proxy_refuses_a_key_past_its_budget_with_exact_numbers_whatever_the_approval(servers_for: Any) -> None:
    s = servers_for()
    secret, key = keys.create(s.store, usd=Decimal("0.00003"), preapprove_max_usd=Decimal(5))
    other, _ = keys.create(s.store)
    chat(s, secret)
    chat(s, secret)
    s.settled()
    assert key_spent(s.store, key) == (2 * MINI_COST, 0) == (27_000, 0)
    reached = s.mock.reached()
    with pytest.raises(openai.APIStatusError) as exc:
        chat(s, secret, headers={"X-Spendgate-Allow": "max=5"})
    doc = refusal(exc)["spendgate"]
    assert exc.value.status_code == 402
    assert (doc["rule"], doc["action"], doc["limit_usd"], doc["spent_usd"]) == \
        (f"key:{key.id}", "block", "0.00003", "0.000027")
    assert s.mock.reached() == reached, "nothing sent upstream"
    chat(s, other)  # another key is unaffected
    s.settled()
    assert key_spent(s.store, key) == (27_000, 0)


# -- models ----------------------------------------------------------------------------------------


def test_proxy_allows_only_the_keys_models_before_pricing(servers_for: Any) -> None:
    s = servers_for()
    secret, _ = keys.create(s.store, models=keys.parse_models("gpt-4o-mini*, claude-*"))
    assert chat(s, secret).choices[0].message.content == "hello"
    reached = s.mock.reached()
    with pytest.raises(openai.APIStatusError) as exc:
        chat(s, secret, model="gpt-4o")
    assert exc.value.status_code == 402
    message = refusal(exc)["error"]["message"]
    assert "may call only gpt-4o-mini*, claude-*" in message and "'gpt-4o'" in message
    assert s.mock.reached() == reached


def test_a_downgrade_never_lands_on_a_model_the_key_does_not_allow() -> None:
    store = open_store("memory://")
    engine = Engine(parse({"budget": [{"name": "cheaper", "usd": "0.00001", "window": "request",
                                       "action": "downgrade", "downgrade": {"gpt-4o": "gpt-4o-mini"}}]}), store)
    body = {"model": "gpt-4o", "max_tokens": 5, "messages": MSG}
    narrow, _ = keys.create(store, models=("gpt-4o",))
    wide, _ = keys.create(store, models=("gpt-4o*",))
    d = engine.decide(Request("openai", "/v1/chat/completions", body, who(store, wide)))
    assert d.allowed and d.action == "downgrade" and d.body["model"] == "gpt-4o-mini"
    d = engine.decide(Request("openai", "/v1/chat/completions", body, who(store, narrow)))
    assert not d.allowed and d.trip is not None and d.trip.rule.name == "cheaper"
    assert d.body["model"] == "gpt-4o"


# -- expiry ----------------------------------------------------------------------------------------


def test_an_expired_key_is_a_401_naming_its_expiry_and_keys_list_shows_it(
        servers_for: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    s = servers_for(store=url)
    past = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
    secret, key = keys.create(s.store, usd=Decimal(1), expires_at=past, now=past - 60)
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(s, secret)
    assert f"spendgate key {key.id} expired at 2026-09-21 14:13:20 UTC" in exc.value.response.json()["error"]["message"]
    # the spend routes read keys the same way
    from tests.test_non_llm_spend import http

    status, doc = http(s, "/spendgate/charge", {"usd": "0.01"}, secret)
    assert status == 401 and f"spendgate key {key.id} expired at 2026-09-21 14:13:20 UTC" in doc["error"]["message"]
    assert s.mock.reached() == 0
    capsys.readouterr()
    assert main(["keys", "list", "--store", url, "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)["keys"]
    assert (listed["id"], listed["status"], listed["expires_at"]) == (key.id, "expired", past)
    assert main(["keys", "list", "--store", url]) == 0
    assert "expired " in capsys.readouterr().out


# -- rotation --------------------------------------------------------------------------------------


def test_rotate_keeps_the_key_its_budget_and_its_per_key_buckets(servers_for: Any, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    policy = {**ROOMY, "budget": [*ROOMY["budget"],
                                  {"name": "key-day", "usd": 1, "window": "day", "per": "key"}]}
    s = servers_for(policy, store=url)
    secret, key = keys.create(s.store, user="ana", usd=Decimal("0.00003"))
    chat(s, secret)
    s.settled()
    capsys.readouterr()
    assert main(["keys", "rotate", key.id, "--store", url, "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    new = rotated["key"]
    assert new != secret and rotated["id"] == key.id and rotated["usd"] == "0.00003"
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(s, secret)
    assert "unknown or revoked spendgate key" in exc.value.response.json()["error"]["message"]
    chat(s, new)
    s.settled()
    assert key_spent(s.store, key) == (2 * MINI_COST, 0), "the key's own budget carried over"
    # the file's per-key budget counted both requests in one bucket
    day = next(r for r in s.engine.policy.rules if r.name == "key-day")
    [rb] = rule_buckets(day, f"key={key.counted_as}", time.time())
    [st] = s.store.states([rb.bucket()], now=time.time())
    assert st.spent == 2 * MINI_COST
    assert {e.dims["key"] for e in s.store.events(0) if e.kind == "capture"} == {key.counted_as}
    # ... and the next request is refused by the key's budget, spent as before the rotation
    with pytest.raises(openai.APIStatusError) as refused:
        chat(s, new)
    assert refusal(refused)["spendgate"]["spent_usd"] == "0.000027"
    assert main(["keys", "list", "--store", url, "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)["keys"]
    assert listed["budget"] == {"usd": {"limit": "0.00003", "spent": "0.000027", "held": "0",
                                        "remaining": "0.000003"}}


def test_pause_by_key_id_still_names_a_rotated_key() -> None:
    from spendgate.policy import runtime

    store = open_store("memory://")
    engine = Engine(parse(ROOMY), store)
    secret, key = keys.create(store)
    got = keys.rotate(store, key.id)
    assert got is not None
    new, _ = got
    assert keys.lookup(store, secret, now=time.time()) is None
    ident = who(store, new)
    assert ident.key == key.counted_as and str(ident.key).startswith(key.id)
    runtime.pause(store, f"key={key.id}", by="ops")
    engine.set_overrides({}, runtime.load(store).pauses)
    d = engine.decide(tool_request(1, ident))
    assert not d.allowed and d.refused_by == "pause"


def test_rotate_and_revoke_of_an_unknown_key_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    open_store(url).close()
    assert main(["keys", "rotate", "deadbeef", "--store", url]) != 0
    assert "no key with id 'deadbeef'" in capsys.readouterr().err


# -- capability ------------------------------------------------------------------------------------

PAYMENTS = {"budget": [{"name": "payments", "usd": 100, "window": "total", "requires_capability": "payment_initiate",
                        "match": {"provider": "tool"}}]}


def _decide(policy: Policy, store: Ledger, ident: Identity) -> str:
    d = Engine(policy, store).decide(tool_request(1, ident))
    return "allow" if d.allowed else d.refused_by


def test_capability_comes_from_the_key_and_a_header_only_where_trusted_and_the_key_binds_none() -> None:
    store = open_store("memory://")
    strict, trusting = parse(PAYMENTS), parse({**PAYMENTS, "trust_client_capability": True})
    paying, _ = keys.create(store, capability="payment_initiate")
    writing, _ = keys.create(store, capability="data_write")
    bare, _ = keys.create(store)
    header = {"X-Spendgate-Capability": "payment_execute"}
    assert _decide(strict, store, who(store, paying)) == "allow"
    assert _decide(strict, store, who(store, writing)) == "payments"
    # a header never widens what a key binds, trusted or not
    assert who(store, writing, header, trust=True).capability == "data_write"
    assert _decide(trusting, store, who(store, writing, header, trust=True)) == "payments"
    # a key that binds none: the header counts only where the policy trusts clients
    assert _decide(strict, store, who(store, bare, header)) == "payments"
    assert _decide(trusting, store, who(store, bare, header, trust=True)) == "allow"
    with pytest.raises(ValueError, match="X-Spendgate-Capability: expected one of read_only, data_write"):
        who(store, bare, {"X-Spendgate-Capability": "root"}, trust=True)
    assert who(store, bare, {"X-Spendgate-Capability": "root"}).capability is None, "untrusted: ignored"
    assert who(store, bare).capability is None


def test_the_proxy_reads_the_header_under_the_policys_trust(servers_for: Any) -> None:
    rule = {"name": "payments", "usd": 100, "window": "total", "requires_capability": "payment_initiate"}
    header = {"X-Spendgate-Capability": "payment_initiate"}
    untrusting = servers_for({"budget": [rule]})
    secret, _ = keys.create(untrusting.store)
    with pytest.raises(openai.APIStatusError) as exc:
        chat(untrusting, secret, headers=header)
    assert exc.value.status_code == 402 and "requires capability payment_initiate" in str(refusal(exc))
    trusting = servers_for({"budget": [rule], "trust_client_capability": True})
    secret, _ = keys.create(trusting.store)
    assert chat(trusting, secret, headers=header).choices[0].message.content == "hello"
    with pytest.raises(openai.BadRequestError) as bad:
        chat(trusting, secret, headers={"X-Spendgate-Capability": "everything"})
    assert "X-Spendgate-Capability" in bad.value.response.json()["error"]["message"]


def test_identity_carries_the_keys_rules_models_and_capability() -> None:
    store = open_store("memory://")
    secret, key = keys.create(store, usd=Decimal(1), models=("gpt-4o*",), capability="read_only")
    ident = who(store, secret)
    assert ident.rules == (key.rule(),) and ident.models == ("gpt-4o*",) and ident.capability == "read_only"
    assert ident.key == key.counted_as
    plain = identity("openai", {}, {}, Credentials("abc", "abc"))
    assert (plain.rules, plain.models, plain.capability) == ((), (), None)


def test_keys_list_adds_a_column_only_when_some_key_sets_it(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(url)
    try:
        keys.create(store, user="bob", now=1.0)
        capsys.readouterr()
        assert main(["keys", "list", "--store", url]) == 0
        assert capsys.readouterr().out.splitlines()[0].split() == \
            ["id", "user", "team", "tags", "preapprove", "max", "created"]
        _, key = keys.create(store, user="ana", usd=Decimal("0.05"), requests=100, window="month",
                             capability="data_write", now=2.0)
        engine = Engine(parse({"defaults": False}), store)
        ident = Identity(key=key.counted_as, rules=(key.rule(),))  # type: ignore[arg-type]
        engine.capture_amount(engine.decide(tool_request(usd_to_nanos("0.0125"), ident)), usd_to_nanos("0.0125"))
    finally:
        store.close()
    assert main(["keys", "list", "--store", url]) == 0
    head, _, bob, ana = capsys.readouterr().out.splitlines()
    assert head.split() == ["id", "user", "team", "budget", "spent", "remaining", "capability", "tags",
                            "preapprove", "max", "created"]
    assert "$0.05 + 100 req / month  $0.0125 + 1 req  $0.0375 + 99 req  data_write" in ana
    assert bob.split()[:2] == [bob.split()[0], "bob"] and "$" not in bob


def test_keys_list_shows_the_aws_access_key_id_of_an_aws_key_and_never_its_secret(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    assert main(["keys", "create", "--user", "bob", "--store", url, "--json"]) == 0
    bob = json.loads(capsys.readouterr().out)
    assert main(["keys", "create", "--user", "ana", "--aws", "--store", url, "--json"]) == 0
    ana = json.loads(capsys.readouterr().out)
    akid, secret = ana["aws_access_key_id"], ana["aws_secret_access_key"]
    assert akid.startswith("SGAK") and len(akid) == 20
    assert main(["keys", "list", "--store", url, "--json"]) == 0
    out = capsys.readouterr().out
    listed = {k["id"]: k for k in json.loads(out)["keys"]}
    assert listed[ana["id"]]["aws_access_key_ids"] == [akid]
    assert "aws_access_key_ids" not in listed[bob["id"]]
    assert secret not in out and "aws_secret_access_key" not in out
    assert main(["keys", "list", "--store", url]) == 0
    table = capsys.readouterr().out
    head, _, *rows = table.splitlines()
    assert head.split() == ["id", "user", "team", "aws", "access", "key", "id", "tags", "preapprove", "max",
                            "created"]
    [ana_row] = [r for r in rows if r.split()[0] == ana["id"]]
    [bob_row] = [r for r in rows if r.split()[0] == bob["id"]]
    assert ana_row.split()[1:3] == ["ana", akid] and akid not in bob_row
    assert secret not in table
    # revoking the key takes its AWS credentials out of the store with it
    assert main(["keys", "revoke", ana["id"], "--store", url]) == 0
    store = ledger.open(url)
    try:
        assert store.records(keys.AWS_RECORD, now=1e10) == []
    finally:
        store.close()


# -- the spend routes ------------------------------------------------------------------------------


def test_the_spend_routes_apply_a_keys_own_budget_and_count_it_across_a_rotate(servers_for: Any) -> None:
    """/spendgate/reserve is weighed against the key's own budget like a proxied call, and its
    per-key buckets are the key's, not one secret's."""
    from tests.test_non_llm_spend import http

    s = servers_for({"budget": [{"name": "per-key", "usd": 100, "window": "day", "per": "key"}]})
    secret, key = keys.create(s.store, usd=Decimal("0.05"))
    status, doc = http(s, "/spendgate/reserve", {"usd": "0.06"}, secret)
    assert status == 402 and doc["spendgate"]["rule"] == f"key:{key.id}", doc
    status, doc = http(s, "/spendgate/charge", {"usd": "0.03"}, secret)
    assert status == 200, doc
    assert key_spent(s.store, key)[0] == usd_to_nanos(Decimal("0.03"))
    rotated = keys.rotate(s.store, key.id)
    assert rotated is not None
    new_secret = rotated[0]
    status, doc = http(s, "/spendgate/reserve", {"usd": "0.03"}, new_secret)
    assert status == 402 and doc["spendgate"]["rule"] == f"key:{key.id}", doc  # 0.03 + 0.03 > 0.05
    status, doc = http(s, "/spendgate/reserve", {"usd": "0.02"}, new_secret)
    assert status == 200, doc
    per_key = [b for b in s.store.known_buckets() if b.key.startswith("per-key|")]
    assert len(per_key) == 1, per_key  # one key, one bucket, whichever secret it used


def test_concurrent_rotations_leave_one_working_secret_and_a_revoke_is_never_undone() -> None:
    from tests.conftest import race

    store = open_store("memory://")
    secret, key = keys.create(store, usd=Decimal(1))
    results = race(8, lambda: keys.rotate(store, key.id))
    # rotations that overlap lose to one another; the ones in turn each replace the last: either
    # way one record is left, and exactly one secret handed out opens it
    assert [k.id for k in keys.list_keys(store)] == [key.id]
    working = [r for r in results if r is not None and keys.lookup(store, r[0], now=time.time()) is not None]
    assert len(working) == 1
    assert keys.lookup(store, secret, now=time.time()) is None
    won = working
    # a revoke between a rotation's read and its write: the rotation withdraws its new secret
    old_key = won[0][1]
    real_take = store.take_record

    def revoked_first(kind: str, k: str, *, now: float) -> str | None:
        keys.revoke(store, old_key.id)  # lands first, on whichever record it finds
        return real_take(kind, k, now=now)

    store.take_record = revoked_first  # type: ignore[method-assign]
    assert keys.rotate(store, old_key.id) is None
    store.take_record = real_take  # type: ignore[method-assign]
    assert keys.list_keys(store) == []
