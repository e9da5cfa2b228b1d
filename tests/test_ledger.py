"""The ledger contract, run against every backend: holds are all-or-nothing and never overspend."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from spendgate import ledger
from spendgate.errors import StoreError
from spendgate.ledger import Bucket, BucketState, Event, Ledger, Line
from tests.conftest import race
from tests.redis_server import RedisServer

T0 = 1_800_000_000.0


def test_authorize_holds_on_every_bucket_or_none(store: Ledger) -> None:
    a, b = Bucket("a", 100), Bucket("b", 50)
    ok = store.authorize([Line(a, 40), Line(b, 40)], now=T0, ttl=60)
    assert ok.ok and ok.hold_id
    refused = store.authorize([Line(a, 40), Line(b, 40)], now=T0, ttl=60)
    assert not refused.ok and refused.refused == ("b",)
    # the refused request held nothing on "a" either
    [sa, sb] = store.states([a, b], now=T0)
    assert (sa.held, sb.held) == (40, 40)


def test_capture_charges_actual_and_releases_the_rest(store: Ledger) -> None:
    a = Bucket("a", 100)
    auth = store.authorize([Line(a, 90)], now=T0, ttl=60)
    assert auth.hold_id is not None
    assert store.capture(auth.hold_id, {"usd": 30}, now=T0 + 1)
    [s] = store.states([a], now=T0 + 1)
    assert (s.spent, s.held, s.remaining) == (30, 0, 70)
    assert not store.capture(auth.hold_id, {"usd": 30}, now=T0 + 1), "a hold is captured once"


def test_release_frees_the_hold_without_charge(store: Ledger) -> None:
    a = Bucket("a", 100)
    auth = store.authorize([Line(a, 100)], now=T0, ttl=60)
    assert auth.hold_id and store.release(auth.hold_id, now=T0)
    assert store.authorize([Line(a, 100)], now=T0, ttl=60).ok


def test_expired_hold_is_charged_at_worst_case_and_flagged(store: Ledger) -> None:
    a = Bucket("a", 100)
    ev = Event(T0, "capture", "d1", "gpt-4o", "openai", 70, 10, 20, False, {"user": "u"})
    auth = store.authorize([Line(a, 70)], now=T0, ttl=60, event=ev)
    assert auth.hold_id
    expired = store.expire(T0 + 61)
    assert [e.hold_id for e in expired] == [auth.hold_id]
    [s] = store.states([a], now=T0 + 61)
    assert (s.spent, s.held) == (70, 0), "an expired hold is charged, never dropped"
    [logged] = store.events(0)
    assert logged.kind == "expired" and logged.estimated and logged.cost == 70
    assert not store.capture(auth.hold_id, {"usd": 1}, now=T0 + 62)


def test_stale_holds_expire_lazily_on_authorize(store: Ledger) -> None:
    a = Bucket("a", 100)
    store.authorize([Line(a, 100)], now=T0, ttl=10)
    # the crashed request's hold pins the bucket until its TTL, then is charged
    assert not store.authorize([Line(a, 1)], now=T0 + 5, ttl=10).ok
    late = store.authorize([Line(a, 1)], now=T0 + 11, ttl=10)
    assert not late.ok and late.state("a").spent == 100


def test_unlimited_bucket_counts_but_never_refuses(store: Ledger) -> None:
    shadow = Bucket("shadow", None)
    for _ in range(3):
        auth = store.authorize([Line(shadow, 10**12)], now=T0, ttl=60)
        assert auth.ok and auth.hold_id
        store.capture(auth.hold_id, {"usd": 10**12}, now=T0)
    assert store.states([shadow], now=T0)[0].spent == 3 * 10**12


def test_token_and_usd_lines_capture_their_own_unit(store: Ledger) -> None:
    usd, tok = Bucket("r", 1000, unit="usd"), Bucket("r#tokens", 500, unit="tokens")
    auth = store.authorize([Line(usd, 900), Line(tok, 400)], now=T0, ttl=60)
    assert auth.hold_id
    store.capture(auth.hold_id, {"usd": 123, "tokens": 45}, now=T0)
    su, stt = store.states([usd, tok], now=T0)
    assert (su.spent, stt.spent) == (123, 45)


def test_grant_raises_the_limit_until_it_ends(store: Ledger) -> None:
    a = Bucket("a", 100)
    auth = store.authorize([Line(a, 100)], now=T0, ttl=60)
    assert auth.hold_id
    store.capture(auth.hold_id, {"usd": 100}, now=T0)
    assert not store.authorize([Line(a, 10)], now=T0, ttl=60).ok
    store.grant(a, 50, now=T0, until=T0 + 100)
    assert store.authorize([Line(a, 50)], now=T0 + 1, ttl=60).ok
    assert not store.authorize([Line(a, 1)], now=T0 + 2, ttl=60).ok


@pytest.mark.parametrize("charge_at", [0.0, 0.5, 59.9, 3599.0])
def test_rolling_window_never_undercounts_at_edges(store: Ledger, charge_at: float) -> None:
    """A charge made at t is counted for at least the whole window [t, t + window)."""
    hour = Bucket("h", 1000, window_s=3600)
    t = T0 + charge_at
    auth = store.authorize([Line(hour, 600)], now=t, ttl=60)
    assert auth.hold_id
    store.capture(auth.hold_id, {"usd": 600}, now=t)
    for dt in (0, 1, 60, 1800, 3599, 3599.999):
        [s] = store.states([hour], now=t + dt)
        assert s.spent == 600, f"charge forgotten {dt}s after it was made"
        assert not store.authorize([Line(hour, 401)], now=t + dt, ttl=1).ok
    # and it does leave: at most one slot (1/60 of the window) after the window ends
    [s] = store.states([hour], now=t + 3600 + 61)
    assert s.spent == 0


def test_calendar_period_keys_reset_lazily(store: Ledger) -> None:
    """A calendar bucket's key carries its period: a new period is simply a new, empty bucket."""
    nov, dec = Bucket("team|2026-11", 100), Bucket("team|2026-12", 100)
    auth = store.authorize([Line(nov, 100)], now=T0, ttl=60)
    assert auth.hold_id
    store.capture(auth.hold_id, {"usd": 100}, now=T0)
    assert not store.authorize([Line(nov, 1)], now=T0, ttl=60).ok
    assert store.authorize([Line(dec, 100)], now=T0, ttl=60).ok


def test_events_are_logged_atomically_with_capture(store: Ledger) -> None:
    a = Bucket("a", None)
    for i in range(3):
        auth = store.authorize([Line(a, 1)], now=T0 + i, ttl=60)
        assert auth.hold_id
        ev = Event(T0 + i, "capture", f"d{i}", "m", "openai", i, dims={"user": f"u{i}"})
        store.capture(auth.hold_id, {"usd": i}, now=T0 + i, event=ev)
    assert [e.decision_id for e in store.events(T0 + 1)] == ["d1", "d2"]
    assert [e.dims["user"] for e in store.events(0, T0 + 1)] == ["u0"]


def test_known_buckets_lists_what_was_touched(store: Ledger) -> None:
    store.authorize([Line(Bucket("x", 5, 60), 1), Line(Bucket("y#tokens", 9, None, "tokens"), 1)], now=T0, ttl=5)
    assert {(b.key, b.window_s, b.unit) for b in store.known_buckets()} == {("x", 60, "usd"),
                                                                            ("y#tokens", None, "tokens")}


def test_unknown_store_url_names_the_known_schemes() -> None:
    with pytest.raises(StoreError, match=r"memory://, redis://, rediss://, sqlite://"):
        ledger.open("postgres://x")


def test_sqlite_store_that_cannot_be_opened_says_where(tmp_path: object) -> None:
    with pytest.raises(StoreError, match="cannot open the SQLite store"):
        ledger.open("sqlite:////proc/no/such/dir/x.db")


# -- concurrency ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_fit", [1, 5, 17])
def test_64_threads_admit_exactly_the_holds_that_fit(store: Ledger, n_fit: int) -> None:
    worst = 7_000_000  # $0.007 each
    bucket = Bucket("global", worst * n_fit + worst // 2)
    results = race(64, lambda: store.authorize([Line(bucket, worst)], now=T0, ttl=60).ok)
    assert results.count(True) == n_fit
    [s] = store.states([bucket], now=T0)
    assert s.held == worst * n_fit and s.spent == 0


# -- property: random interleavings keep captured + held <= limit ------------------------------

class LedgerMachine(RuleBasedStateMachine):
    """Random authorize / capture / release / expire / time steps over overlapping buckets."""

    url = "memory://"

    @initialize()
    def setup(self) -> None:
        self.store = ledger.open(self.url)
        self.now = T0
        self.buckets = [Bucket("g", 1000), Bucket("s1", 400, window_s=60), Bucket("s2", 600, window_s=600),
                        Bucket("t#tokens", 5000, unit="tokens")]
        self.holds: dict[str, dict[str, int]] = {}

    def teardown(self) -> None:
        self.store.close()

    @rule(amount=st.integers(1, 500), tokens=st.integers(0, 3000),
          which=st.sampled_from([(0,), (0, 1), (0, 2), (1, 2)]), ttl=st.integers(1, 120))
    def authorize(self, amount: int, tokens: int, which: tuple[int, ...], ttl: int) -> None:
        lines = [Line(self.buckets[i], amount) for i in which] + [Line(self.buckets[3], tokens)]
        auth = self.store.authorize(lines, now=self.now, ttl=ttl)
        if auth.ok:
            assert auth.hold_id
            self.holds[auth.hold_id] = {"usd": amount, "tokens": tokens}
        else:
            assert auth.refused

    @rule(data=st.data(), frac=st.floats(0, 1))
    def capture(self, data: st.DataObject, frac: float) -> None:
        if not self.holds:
            return
        hid = list(self.holds)[data.draw(st.integers(0, len(self.holds) - 1))]  # insertion order: reproducible
        worst = self.holds.pop(hid)
        self.store.capture(hid, {k: math.floor(v * frac) for k, v in worst.items()}, now=self.now)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.holds:
            hid = list(self.holds)[data.draw(st.integers(0, len(self.holds) - 1))]
            self.holds.pop(hid)
            self.store.release(hid, now=self.now)

    @rule(step=st.sampled_from([0.5, 1, 7, 30, 61, 300]))
    def tick(self, step: float) -> None:
        self.now += step

    @rule()
    def expire(self) -> None:
        for e in self.store.expire(self.now):
            self.holds.pop(e.hold_id, None)

    @invariant()
    def never_overspent(self) -> None:
        if not hasattr(self, "store"):
            return
        for s in self.store.states(self.buckets, now=self.now):
            assert s.held >= 0 and s.spent >= 0
            assert s.limit is not None and s.spent + s.held <= s.limit + s.granted, s


class SQLiteLedgerMachine(LedgerMachine):
    url = ""

    @initialize()
    def setup(self) -> None:
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        self.url = f"sqlite:///{self._dir.name}/p.db"
        super().setup()

    def teardown(self) -> None:
        super().teardown()
        self._dir.cleanup()


TestLedgerProperties = LedgerMachine.TestCase
TestLedgerProperties.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestSQLiteLedgerProperties = SQLiteLedgerMachine.TestCase
TestSQLiteLedgerProperties.settings = settings(max_examples=20, stateful_step_count=30, deadline=None)


def test_records_expire_and_are_taken_exactly_once(store: Ledger) -> None:
    store.put_record("approval", "a1", '{"max": 5}', expires_at=T0 + 10)
    store.put_record("key", "k1", "alice")
    assert store.get_record("approval", "a1", now=T0) == '{"max": 5}'
    assert store.get_record("approval", "a1", now=T0 + 10) is None, "expired"
    assert sorted(store.records("key", now=T0)) == [("k1", "alice")]
    store.put_record("approval", "a2", "once")
    taken = race(16, lambda: store.take_record("approval", "a2", now=T0))
    assert taken.count("once") == 1, "a one-time approval is consumed by exactly one taker"
    store.delete_record("key", "k1")
    assert store.records("key", now=T0) == []


def test_redis_ledger_properties(redis_server: RedisServer) -> None:
    """The same random interleavings against the Redis Lua scripts."""

    class RedisLedgerMachine(LedgerMachine):
        @initialize()
        def setup(self) -> None:
            self.url = f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}"
            super().setup()

    run_state_machine_as_test(RedisLedgerMachine, settings=settings(max_examples=25, stateful_step_count=30,
                                                                    deadline=None))


def test_redis_authorize_and_capture_are_one_round_trip_each(redis_server: RedisServer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.connection

    from spendgate.engine import Engine
    from spendgate.policy import default_policy
    from spendgate.request import Identity, Request

    store = ledger.open(f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}")
    engine = Engine(default_policy(), store)
    req = Request("openai", "/v1/chat/completions",
                  {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
                  Identity(session="s"))
    engine.capture(engine.decide(req, now=T0), {"prompt_tokens": 5, "completion_tokens": 5}, now=T0)  # load script
    sent: list[bytes] = []
    real = redis.connection.Connection.send_packed_command

    def counting(self: redis.connection.Connection, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    d = engine.decide(req, now=T0 + 1)
    assert len(sent) == 1 and b"EVALSHA" in sent[0], "authorize: one round trip"
    engine.capture(d, {"prompt_tokens": 5, "completion_tokens": 5}, now=T0 + 1)
    assert len(sent) == 2 and b"EVALSHA" in sent[1], "capture: one round trip"
    store.close()


def test_forget_drops_a_settled_bucket_but_never_one_with_holds(store: Ledger) -> None:
    done, busy = Bucket("sdk:a|global=(none)", 100), Bucket("sdk:b|global=(none)", 100)
    auth = store.authorize([Line(done, 10)], now=T0, ttl=60)
    assert auth.hold_id and store.capture(auth.hold_id, {"usd": 10}, now=T0)
    store.grant(done, 5, now=T0, until=T0 + 100)
    pending = store.authorize([Line(busy, 10)], now=T0, ttl=60)
    store.forget([done.key, busy.key])
    assert {b.key for b in store.known_buckets()} == {busy.key}
    assert store.states([done], now=T0)[0] == BucketState(done.key, "usd", 100, 0, 0, 0, None)
    assert store.states([busy], now=T0)[0].held == 10 and pending.hold_id
