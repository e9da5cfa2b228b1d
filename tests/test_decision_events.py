"""Every decision is an event: allowed, refused, remedied, approved, captured, released, expired —
each with its rule, bucket and amounts, told to the observers (the audit log) and, for refusals,
kept in the store; and the alerts a budget's thresholds fire, once per bucket, period and threshold."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from spendgate import approvals, ledger
from spendgate.engine import Approval, Engine
from spendgate.ledger import Event
from spendgate.money import usd_to_nanos
from spendgate.policy import parse, policy_hash
from spendgate.pricing.cost import Usage
from spendgate.report import event_dict, report
from spendgate.request import Identity, Request
from tests.conftest import race

T0 = 1_800_000_000.0  # 2027-01-15
CHAT = "/v1/chat/completions"


def chat(max_tokens: int = 1000, user: str = "alice", model: str = "gpt-4o") -> Request:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
    return Request("openai", CHAT, body, Identity(user=user), raw=json.dumps(body).encode())


class Heard:
    """An observer keeping what the engine told it."""

    def __init__(self) -> None:
        self.events: list[tuple[Event, str, bytes | None]] = []

    def __call__(self, event: Event, policy_hash: str, request: bytes | None) -> None:
        self.events.append((event, policy_hash, request))

    def kinds(self) -> list[str]:
        return [e.kind for e, _, _ in self.events]


@pytest.fixture
def make(backend_url: str) -> Iterator[Any]:
    opened: list[ledger.Ledger] = []

    def build(doc: dict[str, Any]) -> tuple[Engine, Heard]:
        store = ledger.open(backend_url)
        opened.append(store)
        engine = Engine(parse(doc), store)
        heard = Heard()
        engine.observers.append(heard)
        return engine, heard

    yield build
    for s in opened:
        s.close()


def budget(usd: float, action: str = "block", **more: Any) -> dict[str, Any]:
    return {"budget": [{"name": "user-day", "usd": usd, "window": "day", "per": "user", "action": action, **more}]}


def test_an_allowed_request_is_a_decision_then_a_capture(make: Any) -> None:
    engine, heard = make(budget(5))
    req = chat()
    d = engine.decide(req, now=T0)
    assert d.allowed
    engine.capture(d, Usage(input=10, output=20), now=T0 + 1)
    (allow, h1, raw), (cap, h2, raw2) = heard.events
    assert (allow.kind, cap.kind) == ("allow", "capture")
    assert allow.decision_id == cap.decision_id == d.id
    assert h1 == h2 == engine.policy_hash == policy_hash(engine.policy)
    assert raw == req.raw and raw2 is None
    assert d.estimate is not None
    assert allow.amounts == {"estimate_usd": d.estimate.cost_nanos}
    assert allow.cost == 0 and allow.dims["user"] == "alice"
    # gpt-4o: $2.50 / $10 per Mtok
    assert cap.cost == 10 * 2500 + 20 * 10_000


def test_a_refusal_names_its_rule_bucket_and_amounts_and_is_kept_in_the_store(make: Any) -> None:
    engine, heard = make(budget(0.001))
    d = engine.decide(chat(), now=T0)
    assert not d.allowed and d.action == "block"
    (ev, _, raw), = heard.events
    assert ev.kind == "block" and ev.rule == "user-day"
    assert ev.bucket == "user-day|user=alice|2027-01-15"
    assert d.estimate is not None
    assert ev.amounts == {"estimate_usd": d.estimate.cost_nanos, "limit_usd": usd_to_nanos(Decimal("0.001")),
                          "used_usd": 0, "request_usd": d.estimate.cost_nanos}
    assert raw is not None
    stored = engine.ledger.events(T0 - 1)
    assert [(e.kind, e.decision_id, e.rule) for e in stored] == [("block", d.id, "user-day")]
    shown = event_dict(stored[0])
    assert shown["amounts"]["limit_usd"] == "0.001"
    assert "cost_usd" not in shown
    rows = report(engine.ledger, ["user"], since=T0 - 10, now=T0 + 10)
    assert [(r.group, r.requests, r.cost, r.refused) for r in rows] == [(("alice",), 0, 0, 1)]


def test_a_remedy_is_logged_with_the_rule_that_applied_it(make: Any) -> None:
    engine, heard = make({"budget": [{"name": "cheap", "usd": 0.005, "window": "request", "action": "downgrade",
                                      "downgrade": {"gpt-4o": "gpt-4o-mini"}}], "defaults": False})
    d = engine.decide(chat(), now=T0)
    assert d.allowed and d.action == "downgrade"
    (ev, _, _), = heard.events
    assert ev.kind == "downgrade" and ev.rule == "cheap" and ev.model == "gpt-4o-mini"
    assert ev.dims["edits"] == "model=gpt-4o-mini"
    assert d.original is not None and d.estimate is not None
    assert ev.amounts == {"estimate_usd": d.estimate.cost_nanos, "original_estimate_usd": d.original.cost_nanos}


def test_an_approval_and_a_release_are_events(make: Any) -> None:
    engine, heard = make(budget(0.001, action="hold"))
    held = engine.decide(chat(), now=T0)
    assert held.action == "hold"
    d = engine.decide(chat(), now=T0 + 1, approval=Approval(Decimal(1), by="ops"))
    assert d.allowed
    assert engine.release(d, now=T0 + 2)
    assert heard.kinds() == ["hold", "approval", "allow", "released"]
    approval = heard.events[1][0]
    assert approval.dims["by"] == "ops" and approval.dims["granted_usd"] == "1"
    released = heard.events[3][0]
    assert released.amounts == {"held_usd": d.estimate.cost_nanos if d.estimate else -1}
    kinds = [e.kind for e in engine.ledger.events(T0 - 1)]
    assert kinds == ["hold", "approval", "released"]


def test_an_expired_hold_found_by_the_next_authorize_is_told(make: Any) -> None:
    engine, heard = make(budget(5))
    d = engine.decide(chat(), now=T0)
    ttl = engine._hold_ttl(d.estimate)  # type: ignore[arg-type]
    engine.decide(chat(user="bob"), now=T0 + ttl + 1)
    assert heard.kinds() == ["allow", "expired", "allow"]
    expired = heard.events[1][0]
    assert expired.decision_id == d.id and expired.estimated
    assert d.estimate is not None and expired.cost == d.estimate.cost_nanos


def _thresholds(store: ledger.Ledger) -> list[tuple[str, str]]:
    out = []
    for a in store.alerts():
        body = json.loads(a.body)
        out.append((body["type"], body.get("threshold", "")))
    return sorted(out)


def test_alert_at_fires_each_threshold_once_per_bucket_and_period(make: Any) -> None:
    engine, _ = make(budget(0.10, alert_at=[0.5, 0.8, 1.0]))
    est = engine.decide(chat(), now=T0)  # 8 input tokens, 1,000 output: $0.01002, so nine fit in $0.10
    assert est.estimate is not None and est.estimate.cost_nanos == usd_to_nanos(Decimal("0.01002"))
    engine.release(est, now=T0)
    admitted = 0
    for i in range(30):  # past the limit: refusals keep coming, alerts do not
        d = engine.decide(chat(), now=T0 + i)
        if d.allowed:
            admitted += 1
            engine.capture(d, Usage(input=8, output=1000), now=T0 + i)
    assert admitted == 9
    # 50 % at the 5th request ($0.0501), 80 % at the 8th ($0.0802); no request lands on 100 %, so it
    # fires when the 10th is refused
    assert _thresholds(engine.ledger) == [("refused", "1"), ("threshold", "0.5"), ("threshold", "0.8")]
    keys = sorted(a.key for a in engine.ledger.alerts())
    assert keys == [f"user-day|user=alice|2027-01-15|2027-01-15|{t}" for t in ("0.5", "0.8", "1")]
    body = json.loads(engine.ledger.alerts()[-1].body)
    assert body["rule"] == "user-day" and body["scope"] == "user=alice" and body["limit_usd"] == "0.1"
    # the next day is a new period: its thresholds fire again, once
    for i in range(30):
        d = engine.decide(chat(), now=T0 + 86400 + i)
        if d.allowed:
            engine.capture(d, Usage(input=8, output=1000), now=T0 + 86400 + i)
    assert len(engine.ledger.alerts()) == 6


def test_the_full_threshold_fires_on_the_first_refusal_when_no_request_lands_on_it(make: Any) -> None:
    engine, _ = make(budget(0.015, alert_at=[1.0]))  # one $0.01 request fits; the second would pass 100 %
    assert engine.decide(chat(), now=T0).allowed
    assert engine.ledger.alerts() == []
    for _ in range(5):
        assert not engine.decide(chat(), now=T0 + 1).allowed
    (only,) = engine.ledger.alerts()
    assert json.loads(only.body)["type"] == "refused"


def test_an_alert_rule_fires_once_when_it_goes_over(make: Any) -> None:
    engine, _ = make(budget(0.015, action="alert"))
    for i in range(5):
        assert engine.decide(chat(), now=T0 + i).allowed
    (only,) = engine.ledger.alerts()
    assert json.loads(only.body)["type"] == "over"


def test_racing_requests_fire_each_threshold_exactly_once(make: Any) -> None:
    engine, _ = make(budget(0.50, alert_at=[0.5, 0.8]))
    results = race(64, lambda: engine.decide(chat(), now=T0))
    assert sum(d.allowed for d in results) == 49  # $0.50 / $0.01002
    assert _thresholds(engine.ledger) == [("threshold", "0.5"), ("threshold", "0.8")]


def test_a_held_request_kept_for_approval_writes_its_notification_once_per_identity_and_rule(make: Any) -> None:
    engine, _ = make(budget(0.001, action="hold"))
    store = engine.ledger
    for i in range(3):
        d = engine.decide(chat(max_tokens=100 + i), now=T0 + i)
        approvals.keep(store, d, "s1", "ident-a", "openai", CHAT, "", b"{}", {}, T0 + i)
    notes = store.alerts()
    assert len(notes) == 1
    body = json.loads(notes[0].body)
    assert body["type"] == "hold" and body["rule"] == "user-day" and body["session"] == "s1"
    first = store.events(T0 - 1)[0]
    assert body["decision_id"] == first.decision_id
    d = engine.decide(chat(), now=T0 + 5)
    approvals.keep(store, d, "s2", "ident-b", "openai", CHAT, "", b"{}", {}, T0 + 5)
    assert len(store.alerts()) == 2


def test_operator_answers_are_events(make: Any) -> None:
    engine, _ = make(budget(0.001, action="hold"))
    store = engine.ledger
    d1 = engine.decide(chat(), now=T0)
    approvals.keep(store, d1, "s1", "ident-a", "openai", CHAT, "", b"{}", {}, T0)
    d2 = engine.decide(chat(user="bob"), now=T0)
    approvals.keep(store, d2, "s2", "ident-b", "openai", CHAT, "", b"{}", {}, T0)
    told: list[Event] = []
    approvals.approve(store, d1.id, Decimal(2), now=T0 + 1, by="ops", on_event=told.append)
    approvals.deny(store, d2.id, now=T0 + 2, by="ops", on_event=told.append)
    assert [(e.kind, e.decision_id) for e in told] == [("approval", d1.id), ("deny", d2.id)]
    assert [e.kind for e in store.events(T0 - 1)] == ["hold", "hold", "approval", "deny"]


def test_a_dry_run_fires_no_alert_and_leaves_no_event(make: Any) -> None:
    engine, heard = make(budget(0.015, alert_at=[0.5, 1.0]))
    dry = Request("openai", CHAT, chat().body, Identity(user="alice"), raw=b"{}", dry=True)
    d = engine.decide(dry, now=T0)
    assert d.allowed and d.dry
    engine.release(d, now=T0)
    assert engine.decide(chat(), now=T0).allowed  # a real one: $0.01002, past 50 %
    heard.events.clear()
    refused = engine.decide(dry, now=T0 + 1)
    assert not refused.allowed
    # the real request's alert is in the log; neither dry run left anything
    assert heard.events == [] and [e.kind for e in engine.ledger.events(T0 - 1)] == ["alert"]
    assert {e.decision_id for e in engine.ledger.events(T0 - 1)}.isdisjoint({d.id, refused.id})
    assert [json.loads(a.body)["threshold"] for a in engine.ledger.alerts()] == ["0.5"]


def test_a_denial_is_not_counted_as_a_second_refusal(make: Any) -> None:
    engine, _ = make(budget(0.001, action="hold"))
    d = engine.decide(chat(), now=T0)
    approvals.keep(engine.ledger, d, "s1", "ident-a", "openai", CHAT, "", b"{}", {}, T0)
    approvals.deny(engine.ledger, d.id, now=T0 + 1)
    rows = report(engine.ledger, ["user"], since=T0 - 10, now=T0 + 10)
    assert sum(r.refused for r in rows) == 1


def test_a_lone_surrogate_in_a_model_name_cannot_keep_a_decision_out_of_the_log(make: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from spendgate.events.chain import AuditLog
    from spendgate.events.verify import verify_store

    engine, _ = make(budget(5))
    key = Ed25519PrivateKey.generate()
    log = AuditLog(engine.ledger, key, flush_s=60)
    engine.observers.append(log.add)
    d = engine.decide(chat(model="gpt-4o\ud800"), now=T0)
    assert d.allowed
    engine.capture(d, Usage(input=8, output=10), now=T0 + 1)
    log.close()
    kinds = [json.loads(t)["kind"] for t in engine.ledger.audit_entries(log.chain)]
    assert kinds == ["allow", "capture"]
    assert verify_store(engine.ledger, [key.public_key()]).ok
