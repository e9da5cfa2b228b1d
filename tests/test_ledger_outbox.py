"""The ledger's alert outbox and audit log, run against every backend: alerts written in the same
transaction as their cause and once per key, claimed by one sender at a time; audit chains appended
exactly once, in order."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from spendgate import ledger
from spendgate.errors import StoreError
from spendgate.ledger import AlertMark, Bucket, Event, Ledger, Line, OutboxAlert
from spendgate.ledger.base import ALERT_STATUSES
from tests.conftest import race

T0 = 1_800_000_000.0


def mark(key: str, at: int = 0, *, on_refusal: bool = False) -> AlertMark:
    return AlertMark(key, json.dumps({"alert": key}), at, on_refusal)


def keys(store: Ledger) -> list[str]:
    return sorted(a.key for a in store.alerts())


def charge(store: Ledger, bucket: Bucket, amount: int, now: float = T0) -> None:
    auth = store.authorize([Line(bucket, amount)], now=now, ttl=60)
    assert auth.ok and auth.hold_id
    assert store.capture(auth.hold_id, {bucket.unit: amount}, now=now)


# -- marks fired by authorize ------------------------------------------------------------------

def test_a_mark_fires_once_when_a_hold_crosses_it_and_not_before(store: Ledger) -> None:
    b = Bucket("team", 1000)
    marks = (mark("team:50", 500), mark("team:80", 800))
    charge(store, b, 300)
    store.authorize([Line(b, 199, marks)], now=T0, ttl=60)  # 499: below both
    assert store.alerts() == []
    store.authorize([Line(b, 1, marks)], now=T0 + 1, ttl=60)  # exactly 500: the 50 % mark
    assert keys(store) == ["team:50"]
    store.authorize([Line(b, 100, marks)], now=T0 + 2, ttl=60)  # 600: already written, nothing new
    assert keys(store) == ["team:50"]
    store.authorize([Line(b, 300, marks)], now=T0 + 3, ttl=60)  # 900
    assert keys(store) == ["team:50", "team:80"]
    [a80, a50] = store.alerts()
    assert a50 == OutboxAlert("team:50", T0 + 1, '{"alert": "team:50"}', "pending", 0, T0 + 1, "", None, ())
    assert (a80.created, a80.next_at) == (T0 + 3, T0 + 3)


def test_spent_and_held_count_toward_a_mark(store: Ledger) -> None:
    b = Bucket("b", None, unit="tokens")
    charge(store, b, 60)
    store.authorize([Line(b, 30)], now=T0, ttl=60)  # held, not captured
    assert store.authorize([Line(b, 10, (mark("b:100", 100),))], now=T0, ttl=60).ok
    assert keys(store) == ["b:100"]


def test_a_mark_at_zero_never_fires_on_a_hold(store: Ledger) -> None:
    store.authorize([Line(Bucket("b", 100), 50, (mark("zero", 0),))], now=T0, ttl=60)
    assert store.alerts() == []


def test_32_threads_crossing_a_mark_write_one_alert(store: Ledger) -> None:
    b = Bucket("shared", 10_000)
    line = Line(b, 10, (mark("shared:half", 100),))
    results = race(32, lambda: store.authorize([line], now=T0, ttl=60).ok)
    assert results == [True] * 32
    [alert] = store.alerts()
    assert (alert.key, alert.status, alert.attempts) == ("shared:half", "pending", 0)


def test_on_refusal_marks_fire_only_for_the_refused_bucket(store: Ledger) -> None:
    a, b = Bucket("a", 100), Bucket("b", 50)
    lines = [Line(a, 40, (mark("a:refused", on_refusal=True), mark("a:30", 30))),
             Line(b, 60, (mark("b:refused", on_refusal=True), mark("b:30", 30)))]
    refused = store.authorize(lines, now=T0, ttl=60)
    assert not refused.ok and refused.refused == ("b",)
    assert keys(store) == ["b:refused"], "only the refusing bucket's refusal mark; no crossing on a refusal"
    assert store.states([a, b], now=T0)[0].held == 0


def test_on_refusal_marks_do_not_fire_when_the_hold_is_placed(store: Ledger) -> None:
    b = Bucket("b", 100)
    assert store.authorize([Line(b, 100, (mark("b:refused", 1, on_refusal=True),))], now=T0, ttl=60).ok
    assert store.alerts() == []


def test_marks_are_not_kept_with_the_hold(store: Ledger) -> None:
    """An expiry or capture of a marked hold writes nothing more: marks fire at authorize only."""
    b = Bucket("b", 1000)
    auth = store.authorize([Line(b, 10, (mark("b:5", 5),))], now=T0, ttl=10)
    assert keys(store) == ["b:5"] and auth.hold_id
    [claimed] = store.claim_alerts(T0, "s", 60, 10)
    assert store.update_alert(claimed.key, "s", status="sent", attempts=1, next_at=T0, sent_at=T0)
    assert [e.hold_id for e in store.expire(T0 + 11)] == [auth.hold_id]
    assert [(a.key, a.status) for a in store.alerts()] == [("b:5", "sent")]


# -- authorize, release ------------------------------------------------------------------------

def test_authorize_returns_the_holds_it_expired(store: Ledger) -> None:
    b = Bucket("b", 1000)
    ev = Event(T0, "capture", "d1", "gpt-4o", "openai", 70, 10, 20, False, {"user": "u"})
    first = store.authorize([Line(b, 70)], now=T0, ttl=10, event=ev)
    assert first.expired == ()
    later = store.authorize([Line(b, 5)], now=T0 + 11, ttl=10)
    assert later.ok
    [gone] = later.expired
    assert gone.hold_id == first.hold_id and gone.charged == {"usd": 70}
    assert gone.event is not None
    assert (gone.event.kind, gone.event.decision_id, gone.event.cost, gone.event.ts) == ("expired", "d1", 70, T0 + 11)
    refused = store.authorize([Line(b, 2000)], now=T0 + 30, ttl=10)  # the 5 expired too, on a refusal
    assert not refused.ok and [e.hold_id for e in refused.expired] == [later.hold_id]
    assert refused.expired[0].event is None and refused.expired[0].charged == {"usd": 5}


def test_release_logs_its_event_only_when_the_hold_was_there(store: Ledger) -> None:
    b = Bucket("b", 100)
    auth = store.authorize([Line(b, 50)], now=T0, ttl=60)
    assert auth.hold_id
    ev = Event(T0 + 1, "released", "d1", "gpt-4o", "openai", 0)
    assert store.release(auth.hold_id, now=T0 + 1, event=ev)
    assert not store.release(auth.hold_id, now=T0 + 2, event=Event(T0 + 2, "released", "d1", "m", "p", 0))
    assert [(e.kind, e.decision_id, e.ts) for e in store.events(0)] == [("released", "d1", T0 + 1)]
    assert store.release(store.authorize([Line(b, 1)], now=T0, ttl=60).hold_id or "", now=T0)
    assert len(store.events(0)) == 1, "no event, nothing logged"


# -- record / put_record -----------------------------------------------------------------------

def test_record_writes_its_alerts_with_the_event_once_per_key(store: Ledger) -> None:
    ev = Event(T0, "refused", "d1", "gpt-4o", "openai", 0, rule="monthly", bucket="team:ml",
               amounts={"estimate_usd": 5_000_000, "limit_usd": 1_000_000_000})
    store.record(ev, alerts=[mark("refused:d1"), mark("daily")])
    store.record(Event(T0 + 5, "refused", "d2", "gpt-4o", "openai", 0), alerts=[mark("daily")])
    [logged, _] = store.events(0)
    assert logged == ev
    assert [(a.key, a.created, a.next_at) for a in store.alerts()] == [("refused:d1", T0, T0), ("daily", T0, T0)]


def test_put_record_writes_its_alerts_with_the_record(store: Ledger) -> None:
    before = time.time()
    store.put_record("held", "h1", "{}", alerts=[mark("held:h1")])
    store.put_record("held", "h1", '{"again": 1}', alerts=[mark("held:h1")])
    assert store.get_record("held", "h1", now=T0) == '{"again": 1}'
    [a] = store.alerts()
    assert a.key == "held:h1" and before <= a.created <= time.time() and a.next_at == a.created


def test_a_settled_key_is_not_written_again(store: Ledger) -> None:
    store.record(Event(T0, "x", "d", "m", "p", 0), alerts=[mark("k")])
    [c] = store.claim_alerts(T0, "s", 60, 10)
    assert store.update_alert(c.key, "s", status="failed", attempts=5, next_at=T0 + 9, error="boom")
    store.record(Event(T0 + 10, "x", "d", "m", "p", 0), alerts=[mark("k")])
    store.authorize([Line(Bucket("b", None), 10, (mark("k", 1),))], now=T0 + 10, ttl=60)
    [a] = store.alerts()
    assert (a.status, a.attempts, a.error, a.created) == ("failed", 5, "boom", T0)


def test_an_alert_body_and_key_keep_every_character(store: Ledger) -> None:
    body = json.dumps({"text": "budget 💸 “ml” at 80 % — ok"}, ensure_ascii=False)
    key = "rule:ml/€:😀"
    store.authorize([Line(Bucket("b", None), 5, (AlertMark(key, body, 5),))], now=T0, ttl=60)
    [a] = store.alerts()
    assert (a.key, a.body) == (key, body)


# -- claiming and updating ---------------------------------------------------------------------

def fill(store: Ledger, n: int) -> None:
    for i in range(n):
        store.record(Event(T0 + i, "x", f"d{i}", "m", "p", 0), alerts=[mark(f"a{i:03d}")])


def test_claim_takes_due_pending_alerts_oldest_first(store: Ledger) -> None:
    fill(store, 5)
    assert store.claim_alerts(T0 - 1, "s1", 30, 10) == [], "not due yet"
    got = store.claim_alerts(T0 + 2, "s1", 30, 2)
    assert [(a.key, a.next_at, a.status) for a in got] == [("a000", T0 + 32, "pending"), ("a001", T0 + 32, "pending")]
    assert [a.key for a in store.claim_alerts(T0 + 10, "s2", 30, 10)] == ["a002", "a003", "a004"]
    assert store.claim_alerts(T0 + 31, "s3", 30, 10) == [], "every claim is live"


def test_a_lapsed_claim_may_be_taken_by_another_owner(store: Ledger) -> None:
    fill(store, 1)
    [a] = store.claim_alerts(T0, "s1", 30, 10)
    assert store.claim_alerts(T0 + 29, "s2", 30, 10) == []
    [again] = store.claim_alerts(T0 + 30, "s2", 30, 10)
    assert again.key == a.key and again.next_at == T0 + 60
    assert not store.update_alert(a.key, "s1", status="sent", attempts=1, next_at=T0, sent_at=T0 + 31)
    assert store.alerts()[0].status == "pending", "the stale owner changed nothing"
    assert store.update_alert(a.key, "s2", status="sent", attempts=1, next_at=T0 + 31, done=["slack", "hook"],
                              sent_at=T0 + 31)
    assert store.alerts() == [OutboxAlert(a.key, T0, a.body, "sent", 1, T0 + 31, "", T0 + 31, ("slack", "hook"))]
    assert not store.update_alert(a.key, "s2", status="sent", attempts=2, next_at=T0, sent_at=T0), \
        "an update drops the claim"
    assert store.claim_alerts(T0 + 1000, "s3", 30, 10) == [], "a sent alert is never claimed"


def test_update_requires_the_claim_and_a_known_status(store: Ledger) -> None:
    fill(store, 1)
    assert not store.update_alert("a000", "s1", status="sent", attempts=1, next_at=T0), "never claimed"
    assert not store.update_alert("nope", "s1", status="sent", attempts=1, next_at=T0)
    store.claim_alerts(T0, "s1", 30, 10)
    with pytest.raises(ValueError, match="delivered"):
        store.update_alert("a000", "s1", status="delivered", attempts=1, next_at=T0)
    assert not store.update_alert("a000", "s2", status="sent", attempts=1, next_at=T0)
    assert store.alerts()[0].next_at == T0 + 30, "nothing changed"


def test_a_retry_is_claimed_again_once_due(store: Ledger) -> None:
    fill(store, 2)
    [first, _] = store.claim_alerts(T0 + 1, "s1", 300, 10)
    assert store.update_alert(first.key, "s1", status="pending", attempts=1, next_at=T0 + 100, error="503",
                              done=["slack"])
    assert store.claim_alerts(T0 + 99, "s2", 30, 10) == []
    [retry] = store.claim_alerts(T0 + 100, "s2", 30, 10)
    assert (retry.key, retry.attempts, retry.error, retry.done, retry.next_at) == ("a000", 1, "503", ("slack",),
                                                                                    T0 + 130)


def test_racing_senders_each_get_an_alert_exactly_once(store: Ledger) -> None:
    fill(store, 40)
    claims = race(16, lambda: store.claim_alerts(T0 + 100, f"s{threading.get_ident()}", 60, 5))
    got = [a.key for batch in claims for a in batch]
    assert sorted(got) == [f"a{i:03d}" for i in range(40)]
    assert len(got) == 40


def test_alerts_lists_newest_first_up_to_the_limit(store: Ledger) -> None:
    fill(store, 5)
    assert [a.key for a in store.alerts()] == ["a004", "a003", "a002", "a001", "a000"]
    assert [a.key for a in store.alerts(limit=2)] == ["a004", "a003"]
    assert set(ALERT_STATUSES) == {"pending", "sent", "failed", "logged"}


# -- sweep -------------------------------------------------------------------------------------

def test_sweep_deletes_only_old_settled_alerts(store: Ledger) -> None:
    fill(store, 6)  # created T0 … T0+5
    claimed = {a.key: a for a in store.claim_alerts(T0 + 10, "s", 60, 10)}
    for key, status in (("a000", "sent"), ("a001", "failed"), ("a002", "logged"), ("a004", "sent")):
        assert store.update_alert(key, "s", status=status, attempts=1, next_at=T0 + 10)
    assert "a003" in claimed  # a003 stays pending (claimed), a005 too
    swept = store.sweep(T0 + 1000 + 3.5, retention_s=1000)  # cutoff T0 + 3.5
    assert swept.alerts_deleted == 3
    assert keys(store) == ["a003", "a004", "a005"]
    assert store.sweep(T0 + 10**6, retention_s=None).alerts_deleted == 0
    assert store.sweep(T0 + 10**6, retention_s=1).alerts_deleted == 1
    assert keys(store) == ["a003", "a005"], "pending alerts are never swept"


# -- the audit log -----------------------------------------------------------------------------

def entries(first: int, n: int, tag: str = "") -> list[str]:
    return [json.dumps({"seq": s, "tag": tag}) for s in range(first, first + n)]


def test_audit_appends_in_order_and_reads_from_a_seq(store: Ledger) -> None:
    store.append_audit("w1", 1, entries(1, 3))
    store.append_audit("w1", 4, entries(4, 2))
    assert store.audit_entries("w1") == entries(1, 5)
    assert store.audit_entries("w1", after_seq=3) == entries(4, 2)
    assert store.audit_entries("w1", after_seq=1, limit=2) == entries(2, 2)
    assert store.audit_entries("w1", after_seq=5) == []
    assert store.audit_entries("nobody") == []


def test_audit_retry_of_an_applied_append_changes_nothing(store: Ledger) -> None:
    store.append_audit("w1", 1, entries(1, 3))
    store.append_audit("w1", 2, entries(2, 2))  # the answer of an earlier attempt was lost
    store.append_audit("w1", 1, entries(1, 3))
    assert store.audit_entries("w1") == entries(1, 3)


@pytest.mark.parametrize(("first", "batch"), [(5, entries(5, 1)), (3, entries(3, 2)), (2, entries(2, 2, "other"))])
def test_audit_append_that_does_not_fit_the_chain_is_refused_whole(store: Ledger, first: int,
                                                                   batch: list[str]) -> None:
    store.append_audit("w1", 1, entries(1, 3))
    with pytest.raises(StoreError, match=r"audit chain 'w1' holds 3 entries.*at seq"):
        store.append_audit("w1", first, batch)
    assert store.audit_entries("w1") == entries(1, 3)


def test_audit_chains_and_checkpoints(store: Ledger) -> None:
    assert store.audit_chains() == []
    store.append_audit("w2", 1, entries(1, 1))
    store.put_checkpoint("w1", '{"n": 1}')
    store.put_checkpoint("w1", '{"n": 2}')
    store.append_audit("w1", 1, entries(1, 2))
    assert store.audit_chains() == ["w1", "w2"]
    assert store.audit_checkpoints("w1") == ['{"n": 1}', '{"n": 2}']
    assert store.audit_checkpoints("w2") == []
    assert store.audit_entries("w1") == entries(1, 2), "checkpoints are apart from entries"
    store.sweep(T0 + 10**9, retention_s=1)
    assert store.audit_entries("w1") == entries(1, 2) and store.audit_checkpoints("w1") == ['{"n": 1}', '{"n": 2}']


def test_racing_appenders_on_one_chain_add_each_seq_once(store: Ledger) -> None:
    def append() -> bool:
        try:
            store.append_audit("w", 1, entries(1, 3, tag=str(time.perf_counter_ns())))
        except StoreError:
            return False
        return True

    assert sorted(race(16, append)) == [False] * 15 + [True]
    assert len(store.audit_entries("w")) == 3


# -- events ------------------------------------------------------------------------------------

def test_an_event_written_before_rule_bucket_and_amounts_still_reads() -> None:
    old = ('{"ts":1800000000.0,"kind":"capture","decision_id":"d1","model":"gpt-4o","provider":"openai",'
           '"cost":70,"input_tokens":10,"output_tokens":20,"estimated":false,"dims":{"user":"u"}}')
    ev = Event.from_json(old)
    assert ev == Event(T0, "capture", "d1", "gpt-4o", "openai", 70, 10, 20, False, {"user": "u"})
    assert ev.to_json() == old, "a plain charge is written as before"
    new = Event(T0, "refused", "d2", "m", "p", 0, rule="r", bucket="b", amounts={"limit_usd": 5, "used_tokens": 9})
    assert Event.from_json(new.to_json()) == new


def test_old_events_in_a_store_read_with_the_new_fields_empty(store: Ledger) -> None:
    new = Event(T0 + 1, "approved", "d2", "m", "p", 0, rule="r", bucket="b", amounts={"granted_usd": 7})
    store.record(Event(T0, "capture", "d1", "m", "p", 3))
    store.record(new)
    old, read_back = store.events(0)
    assert (old.rule, old.bucket, dict(old.amounts)) == ("", "", {})
    assert read_back == new


# -- SQLite files made by an earlier version ------------------------------------------------------

def test_a_version_1_sqlite_store_gains_the_outbox_and_audit_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE slots(bucket TEXT NOT NULL, slot INTEGER NOT NULL, amount INTEGER NOT NULL,
                           PRIMARY KEY(bucket, slot)) WITHOUT ROWID;
        CREATE TABLE holds(id TEXT PRIMARY KEY, expires_at REAL NOT NULL, lines TEXT NOT NULL, event TEXT);
        CREATE TABLE grants(bucket TEXT NOT NULL, amount INTEGER NOT NULL, until REAL NOT NULL);
        CREATE TABLE buckets(key TEXT PRIMARY KEY, lim INTEGER, window_s INTEGER, unit TEXT NOT NULL,
                             ends_at REAL, held INTEGER NOT NULL DEFAULT 0,
                             holds INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
        CREATE TABLE events(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, body TEXT NOT NULL);
        CREATE TABLE records(kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires_at REAL,
                             PRIMARY KEY(kind, key)) WITHOUT ROWID;
        INSERT INTO slots VALUES ('b', 0, 40);
        INSERT INTO buckets(key, lim, unit) VALUES ('b', 100, 'usd');
        INSERT INTO events(ts, body) VALUES (1800000000.0, '{"ts":1800000000.0,"kind":"capture","decision_id":"d",'
            || '"model":"m","provider":"p","cost":40,"input_tokens":0,"output_tokens":0,"estimated":false,"dims":{}}');
        PRAGMA user_version = 1;
    """)
    db.close()
    store = ledger.open(f"sqlite:///{path}")
    try:
        auth = store.authorize([Line(Bucket("b", 100), 30, (mark("b:70", 70),))], now=T0, ttl=60)
        assert auth.ok and auth.state("b").spent == 40
        assert keys(store) == ["b:70"]
        store.append_audit("w", 1, entries(1, 1))
        assert store.audit_entries("w") == entries(1, 1)
        assert store.events(0)[0].cost == 40
    finally:
        store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_sweep_steps_past_old_pending_alerts_batch_by_batch(store: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    from spendgate.ledger import base, redis

    monkeypatch.setattr(base, "SWEEP_BATCH", 2)
    monkeypatch.setattr(redis, "SWEEP_BATCH", 2)
    fill(store, 9)
    for a in store.claim_alerts(T0 + 10, "s", 60, 100):
        if a.key not in ("a000", "a001", "a004"):  # those stay pending, at the front of the oldest
            assert store.update_alert(a.key, "s", status="logged", attempts=0, next_at=T0 + 10)
    assert store.sweep(T0 + 100, retention_s=50).alerts_deleted == 6
    assert keys(store) == ["a000", "a001", "a004"]


# -- no marks, no extra work on the request path ----------------------------------------------------

def test_sqlite_requests_without_marks_never_touch_the_outbox(tmp_path: Path) -> None:
    from spendgate.ledger.sqlite import SQLiteLedger

    store = ledger.open(f"sqlite:///{tmp_path / 's.db'}")
    assert isinstance(store, SQLiteLedger)
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    try:
        b = Bucket("b", 100)
        auth = store.authorize([Line(b, 10)], now=T0, ttl=60)
        assert auth.hold_id and store.capture(auth.hold_id, {"usd": 5}, now=T0)
        assert not store.authorize([Line(b, 1000)], now=T0, ttl=60).ok
        assert seen and not [q for q in seen if "alerts" in q]
        store.authorize([Line(b, 10, (mark("b:1", 1),))], now=T0, ttl=60)
        assert [q for q in seen if "alerts" in q]
    finally:
        store._db.set_trace_callback(None)
        store.close()


def test_redis_marks_travel_apart_from_the_lines_and_only_when_there_are_some() -> None:
    from spendgate.ledger.redis import _authorize_args

    b = Bucket("b", 100)
    plain = _authorize_args([Line(b, 10)], T0, 60, None, "h")
    assert len(plain) == 6, "no marks: not one more argument"
    marked = _authorize_args([Line(b, 10), Line(Bucket("c", None), 1, (mark("c:1", 1),))], T0, 60, None, "h")
    assert marked[:6] == _authorize_args([Line(b, 10), Line(Bucket("c", None), 1)], T0, 60, None, "h")
    assert json.loads(marked[6]) == [[2, "c:1", '{"alert": "c:1"}', 1, False]]


def test_sweep_returns_the_holds_it_expired_with_their_events(store: Ledger) -> None:
    ev = Event(T0, "capture", "d-stale", "gpt-4o", "openai", 700)
    store.authorize([Line(Bucket("b", 10_000), 700)], now=T0, ttl=10, event=ev)
    swept = store.sweep(T0 + 60)
    assert swept.expired == 1
    (gone,) = swept.gone
    assert gone.event is not None and (gone.event.kind, gone.event.decision_id, gone.event.cost) == \
        ("expired", "d-stale", 700)
