"""Stores stay bounded and honest (SPEC §7): the sweep expires, prunes and trims without ever changing
what a live budget counts; the SQLite WAL stays bounded under load; a lost or read-only store is
noticed, by requests and by the health probe."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate import ledger
from spendgate.engine import Engine
from spendgate.errors import StoreError
from spendgate.ledger import Bucket, Event, Ledger, Line, Swept
from spendgate.ledger import base as base_mod
from spendgate.ledger import redis as redis_mod
from spendgate.ledger import sqlite as sqlite_mod
from spendgate.ledger.base import PRUNE_GRACE_S
from spendgate.policy import parse
from spendgate.report import report, status
from spendgate.request import Identity, Request
from tests.conftest import store_url
from tests.redis_server import RedisServer

T0 = 1_800_000_000.0
LATER = T0 + 10 * 86_400  # far past every window below, and past the grace
EV = Event(T0, "capture", "d", "gpt-4o-mini", "openai", 0, 10, 20, dims={"user": "u"})


def spend(store: Ledger, bucket: Bucket, amount: int, at: float) -> None:
    auth = store.authorize([Line(bucket, amount)], now=at, ttl=60)
    assert auth.hold_id is not None
    assert store.capture(auth.hold_id, {bucket.unit: amount}, now=at)


def listed(store: Ledger) -> set[str]:
    return {b.key for b in store.known_buckets()}


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> int:
    """Sweep batches of 7 rows, so a handful of buckets and events cross several batches."""
    for mod in (base_mod, redis_mod):
        monkeypatch.setattr(mod, "SWEEP_BATCH", 7)
    return 7


# -- the sweep, on every backend ------------------------------------------------------------------

def test_sweep_expires_stale_holds_at_their_worst_case(store: Ledger) -> None:
    a = Bucket("a", 100)
    store.authorize([Line(a, 70)], now=T0, ttl=60, event=EV)
    assert store.sweep(T0 + 30) == Swept(0, 0, 0)
    assert store.sweep(T0 + 61).expired == 1
    [s] = store.states([a], now=T0 + 61)
    assert (s.spent, s.held) == (70, 0), "an expired hold is charged, never dropped"
    [e] = store.events(0)
    assert e.kind == "expired" and e.estimated and e.cost == 70


def test_sweep_prunes_a_rolling_bucket_only_once_its_window_and_the_grace_are_over(store: Ledger) -> None:
    hour = Bucket("session-hour|session=s1", 1000, window_s=3600)
    spend(store, hour, 600, T0)
    # the window ends (one slot after it, at most) at T0 + 3660: still kept for the grace
    assert store.sweep(T0 + 3660 + PRUNE_GRACE_S - 60).pruned == 0
    assert listed(store) == {hour.key}
    assert store.states([hour], now=T0 + 3599)[0].spent == 600, "still counted inside its window"
    assert store.sweep(T0 + 3660 + PRUNE_GRACE_S + 60).pruned == 1
    assert listed(store) == set()
    [s] = store.states([hour], now=T0 + 3660 + PRUNE_GRACE_S + 60)
    assert (s.spent, s.held, s.granted, s.frees_at) == (0, 0, 0, None)


def test_sweep_prunes_a_calendar_period_once_it_has_ended(store: Ledger) -> None:
    ends = T0 + 1000
    nov = Bucket("team-month|team=ml|2026-11", 100, ends_at=ends)
    legacy = Bucket("team-month|team=ml|2026-10", 100)  # listed before buckets carried ends_at
    spend(store, nov, 40, T0)
    spend(store, legacy, 40, T0)
    assert store.sweep(ends + PRUNE_GRACE_S - 1).pruned == 0
    assert store.sweep(ends + PRUNE_GRACE_S).pruned == 1
    assert listed(store) == {legacy.key}, "a bucket that does not say when it ends is never pruned"


def test_sweep_keeps_every_bucket_that_still_counts(store: Ledger) -> None:
    live = Bucket("live", 1000, window_s=3600)
    total = Bucket("total", 1000)
    held = Bucket("held", 1000, window_s=60)
    zero = Bucket("zero", 1000, window_s=60)
    granted = Bucket("granted", 100, window_s=60)
    period = Bucket("month|2026-11", 1000, ends_at=LATER + 1)
    spend(store, live, 10, LATER - 1800)
    spend(store, total, 10, T0)
    spend(store, period, 10, T0)
    spend(store, granted, 100, T0)
    store.grant(granted, 50, now=T0, until=LATER + 10)
    h1 = store.authorize([Line(held, 10)], now=T0, ttl=LATER, event=EV).hold_id
    h2 = store.authorize([Line(zero, 0)], now=T0, ttl=LATER).hold_id  # holds nothing, but will charge
    assert h1 and h2
    before = store.states([live, total, held, zero, granted, period], now=LATER)
    assert store.sweep(LATER, retention_s=None) == Swept(0, 0, 0)
    assert listed(store) == {"live", "total", "held", "zero", "granted", "month|2026-11"}
    assert store.states([live, total, held, zero, granted, period], now=LATER) == before
    assert store.capture(h2, {"usd": 7}, now=LATER)
    assert store.states([zero], now=LATER)[0].spent == 7
    assert "zero" in listed(store)


def test_sweep_prunes_every_ended_bucket_across_batches(store: Ledger, small_batches: int) -> None:
    dead = [Bucket(f"s{i:02d}", 1000, window_s=60) for i in range(3 * small_batches + 2)]
    live = [Bucket(f"s{i:02d}x", 1000, window_s=86_400) for i in range(small_batches)]
    for b in dead + live:
        spend(store, b, 5, T0)
    swept = store.sweep(T0 + 3600)
    assert swept.pruned == len(dead)
    assert listed(store) == {b.key for b in live}


def test_sweep_deletes_events_past_the_retention_in_batches(store: Ledger, small_batches: int) -> None:
    a = Bucket("a", None)
    n = 3 * small_batches + 3
    for i in range(n):
        auth = store.authorize([Line(a, 1)], now=T0 + i, ttl=60)
        assert auth.hold_id
        store.capture(auth.hold_id, {"usd": 1}, now=T0 + i,
                      event=Event(T0 + i, "capture", f"d{i}", "m", "openai", 1))
    assert store.sweep(T0 + n, retention_s=None).events_deleted == 0, "None keeps every event"
    swept = store.sweep(T0 + n + 10, retention_s=n + 10 - 20)  # keep the events of the last 20 s
    assert swept.events_deleted == 20
    assert [e.decision_id for e in store.events(0)] == [f"d{i}" for i in range(20, n)]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_bucket_pruned_then_used_again_is_listed_and_counted_again(kind: str, tmp_path: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    """Two processes on one store: one sweeps a bucket away, the other, which has spent on it
    before, spends on it again. It must be listed again (else its spend would be invisible to
    status, and never pruned)."""
    url = store_url(kind, tmp_path, request)
    a, b = ledger.open(url), ledger.open(url)
    try:
        s = Bucket("session-hour|session=s9", 1000, window_s=3600)
        spend(a, s, 100, T0)
        assert b.sweep(LATER).pruned == 1
        spend(a, s, 30, LATER)
        assert s.key in listed(a) and s.key in listed(b)
        assert a.states([s], now=LATER)[0].spent == 30
        assert b.sweep(LATER + 2 * 86_400).pruned == 1
    finally:
        a.close()
        b.close()


def test_sweeps_racing_requests_never_lose_a_charge(store: Ledger) -> None:
    """Every bucket starts prunable (its spend long out of its window); 4 threads spend on them
    while a fifth sweeps in a loop. A bucket is pruned before a hold lands on it or kept: never
    pruned with a charge in it."""
    buckets = [Bucket(f"r{i}", 10**12, window_s=60) for i in range(6)]
    for b in buckets:
        spend(store, b, 1, T0 - 100_000)
    captured: Counter[str] = Counter()
    lock, start, done = threading.Lock(), threading.Barrier(5), threading.Event()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        start.wait()
        try:
            for _ in range(60):
                b, amount = rnd.choice(buckets), rnd.randint(1, 1000)
                auth = store.authorize([Line(b, amount)], now=T0, ttl=60)
                assert auth.hold_id is not None
                assert store.capture(auth.hold_id, {"usd": amount}, now=T0)
                with lock:
                    captured[b.key] += amount
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    def sweeper() -> None:
        start.wait()
        while not done.is_set():
            store.sweep(T0)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    sweeping = threading.Thread(target=sweeper)
    for t in [*workers, sweeping]:
        t.start()
    for t in workers:
        t.join()
    done.set()
    sweeping.join()
    assert not errors, errors
    store.sweep(T0)
    assert {s.key: s.spent for s in store.states(buckets, now=T0) if s.spent} == dict(captured)
    assert set(captured) == listed(store), "every bucket with spend in its window is listed; the rest pruned"


# -- property: pruning never changes what any bucket reports ---------------------------------------

BUCKETS = [Bucket("w60", 500, 60), Bucket("w600", 500, 600), Bucket("w3600", 500, 3600),
           Bucket("t#tokens", 500, 120, "tokens"), Bucket("cal-a", 500, ends_at=T0 + 900),
           Bucket("cal-b", 500, ends_at=T0 + 5000), Bucket("total", 500)]
OPS = st.lists(st.tuples(st.sampled_from(range(len(BUCKETS))), st.integers(0, 4000), st.integers(0, 50),
                         st.sampled_from(["capture", "hold", "grant"])), max_size=12)


def _twins(kind: str, redis_url: str | None, tmp: Path) -> tuple[Ledger, Ledger]:
    if kind == "memory":
        return ledger.open("memory://"), ledger.open("memory://")
    if kind == "redis":
        assert redis_url is not None
        return (ledger.open(f"{redis_url}?prefix={uuid.uuid4().hex[:12]}"),
                ledger.open(f"{redis_url}?prefix={uuid.uuid4().hex[:12]}"))
    name = uuid.uuid4().hex[:8]
    return ledger.open(f"sqlite:///{tmp / name}-a.db"), ledger.open(f"sqlite:///{tmp / name}-b.db")


@pytest.mark.parametrize(("kind", "examples"), [("memory", 150), ("sqlite", 40), ("redis", 30)])
def test_pruning_never_changes_any_bucket_state(kind: str, examples: int, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    """Two stores given the same history; one is swept at ``at``, the other only has its stale holds
    expired (what the sweep also does). At every time from ``at`` on, every bucket reads the same."""
    redis_url = request.getfixturevalue("redis_server").url if kind == "redis" else None
    pruned = Counter[str]()

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops=OPS, pause=st.integers(0, 6000), later=st.lists(st.integers(0, 9000), min_size=1, max_size=4))
    def prop(ops: list[tuple[int, int, int, str]], pause: int, later: list[int]) -> None:
        at = max((t for _, t, _, _ in ops), default=0) + pause
        swept, kept = _twins(kind, redis_url, tmp_path)
        try:
            for store in (swept, kept):
                for i, t, amount, op in sorted(ops, key=lambda o: o[1]):
                    b = BUCKETS[i]
                    if op == "grant":
                        store.grant(b, amount, now=T0 + t, until=T0 + t + 700)
                        continue
                    auth = store.authorize([Line(b, amount)], now=T0 + t, ttl=900)
                    if auth.hold_id and op == "capture":
                        store.capture(auth.hold_id, {b.unit: amount}, now=T0 + t)
            pruned["buckets"] += swept.sweep(T0 + at).pruned
            kept.expire(T0 + at)
            for dt in sorted(later):
                now = T0 + at + dt
                # a calendar bucket is asked for only until its period ends (then the next one is)
                counting = [b for b in BUCKETS if b.ends_at is None or now < b.ends_at]
                assert swept.states(counting, now=now) == kept.states(counting, now=now), (now, listed(kept))
        finally:
            swept.close()
            kept.close()

    prop()
    assert pruned["buckets"] > 0, "some examples pruned buckets (the property is not vacuous)"


# -- SQLite: the WAL stays bounded -----------------------------------------------------------------

def test_sqlite_wal_stays_bounded_under_sustained_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 threads write without pause (several times a proxy's rate) while another connection reads
    (as ``spendgate status`` does): PASSIVE checkpoints alone never catch up and the WAL grows with
    every request (here ~150 MB; 5.1 GB after 100,000 proxied requests); restarting it past the
    threshold keeps it within what is written during one checkpoint of the threshold."""
    threshold = 1024 * 1024
    monkeypatch.setattr(sqlite_mod, "WAL_RESTART_BYTES", threshold, raising=False)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    wal = tmp_path / "w.db-wal"
    store, reader = ledger.open(url), ledger.open(url)
    sizes: list[int] = []
    start, done = threading.Barrier(5), threading.Event()

    def writer(i: int) -> None:
        start.wait()
        for j in range(800):
            lines = [Line(Bucket(f"s{i}-{j % 40}", 10**12, window_s=3600), 10), Line(Bucket("g", 10**15), 10)]
            auth = store.authorize(lines, now=T0, ttl=60, event=EV)
            assert auth.hold_id is not None
            store.capture(auth.hold_id, {"usd": 5}, now=T0, event=EV)
            sizes.append(wal.stat().st_size)

    def reading() -> None:
        start.wait()
        while not done.is_set():
            reader.states([Bucket("g", 10**15)], now=T0)
            reader.known_buckets()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    r = threading.Thread(target=reading)
    for t in [*threads, r]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    r.join()
    try:
        assert reader.states([Bucket("g", 10**15)], now=T0)[0].spent == 4 * 800 * 5
        assert max(sizes) < 32 * threshold, f"WAL reached {max(sizes):,} bytes over {len(sizes)} requests"
    finally:
        store.close()
        reader.close()


# -- SQLite: a lost, replaced or read-only store is noticed ----------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The monotonic clock the SQLite store checks its file by."""
    c = Clock()
    monkeypatch.setattr(sqlite_mod, "monotonic", c)
    return c


@pytest.fixture
def sqlite_store(tmp_path: Path, clock: Clock) -> Iterator[tuple[Ledger, Path]]:
    """A SQLite store on the fake clock."""
    path = tmp_path / "store" / "spend.db"
    store = ledger.open(f"sqlite:///{path}")
    yield store, path
    store.close()


def test_a_deleted_store_directory_is_refused_within_half_a_second(sqlite_store: tuple[Ledger, Path],
                                                                   clock: Clock) -> None:
    store, path = sqlite_store
    a = Bucket("a", 10**9)
    spend(store, a, 5, T0)
    shutil.rmtree(path.parent)
    clock.t += 0.5
    with pytest.raises(StoreError, match=rf"the SQLite store file {path} .*was removed or replaced while in use"):
        store.authorize([Line(a, 5)], now=T0, ttl=60)
    # an empty store at the same path later is not silently adopted: the spend is in the lost file
    path.parent.mkdir()
    ledger.open(f"sqlite:///{path}").close()
    clock.t += 10
    for call in (lambda: store.authorize([Line(a, 5)], now=T0, ttl=60), lambda: store.check(T0),
                 lambda: store.states([a], now=T0), lambda: store.events(0), store.known_buckets):
        with pytest.raises(StoreError, match="was removed or replaced"):
            call()


@pytest.mark.parametrize("lose", ["wal", "replace", "directory"])
def test_health_check_notices_a_lost_store_at_once(sqlite_store: tuple[Ledger, Path], clock: Clock,
                                                   lose: str, tmp_path: Path) -> None:
    store, path = sqlite_store
    store.check(T0)
    if lose == "wal":
        os.remove(f"{path}-wal")
    elif lose == "replace":
        other = ledger.open(f"sqlite:///{tmp_path / 'other.db'}")
        other.close()
        os.replace(tmp_path / "other.db", path)
    else:
        shutil.rmtree(path.parent)
    with pytest.raises(StoreError, match="was removed or replaced while in use"):
        store.check(T0)  # no clock step: the probe always looks


def test_health_check_fails_when_the_store_takes_no_writes(sqlite_store: tuple[Ledger, Path]) -> None:
    """A file that turned read-only (as a read-only remount does: tests run as root, where file modes
    stop nothing, so the connection is made read-only the way SQLite sees it)."""
    store, _ = sqlite_store
    store.check(T0)
    assert isinstance(store, sqlite_mod.SQLiteLedger)
    store._db.execute("PRAGMA query_only=1")
    with pytest.raises(StoreError, match="readonly"):
        store.check(T0)


def test_health_check_fails_on_a_full_disk(tmp_path: Path) -> None:
    """RLIMIT_FSIZE=0 makes every write(2) fail with EFBIG, as a full disk fails them with ENOSPC: in a
    child process, since it would fail this process's own output too."""
    code = f"""
import resource, signal
from spendgate import ledger
store = ledger.open("sqlite:///{tmp_path / 'full.db'}")
store.check(1.0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
try:
    store.check(2.0)
    outcome = "ok"
except Exception as exc:
    outcome = type(exc).__name__
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(outcome)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "StoreError", out.stderr


def test_check_is_a_write_on_every_backend(store: Ledger) -> None:
    store.check(T0)  # memory: nothing to fail; SQLite: a write transaction; Redis: a SET


def test_redis_check_fails_when_redis_refuses_writes(redis_server: RedisServer) -> None:
    store = ledger.open(f"{redis_server.url}?prefix={uuid.uuid4().hex[:12]}")
    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.config_set("min-replicas-to-write", 1)  # and no replica: Redis refuses every write
        with pytest.raises(StoreError, match="NOREPLICAS"):
            store.check(T0)
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.close()
    store.check(T0)
    store.close()


def test_open_without_create_refuses_a_missing_store_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "spend.db"
    with pytest.raises(StoreError, match=rf"no spendgate store at {path}"):
        ledger.open(f"sqlite:///{path}", create=False)
    assert not path.parent.exists(), "neither the file nor its directory is created"
    ledger.open(f"sqlite:///{path}").close()
    existing = ledger.open(f"sqlite:///{path}", create=False)
    existing.check(T0)
    existing.close()
    ledger.open("memory://", create=False).close()


# -- SQLite: a store made by the previous version keeps its holds and spend ------------------------

V0_SCHEMA = """
CREATE TABLE slots(bucket TEXT NOT NULL, slot INTEGER NOT NULL, amount INTEGER NOT NULL,
                   PRIMARY KEY(bucket, slot)) WITHOUT ROWID;
CREATE TABLE holds(id TEXT PRIMARY KEY, expires_at REAL NOT NULL, lines TEXT NOT NULL, event TEXT);
CREATE TABLE held(bucket TEXT PRIMARY KEY, amount INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE grants(bucket TEXT NOT NULL, amount INTEGER NOT NULL, until REAL NOT NULL);
CREATE TABLE buckets(key TEXT PRIMARY KEY, lim INTEGER, window_s INTEGER, unit TEXT NOT NULL);
CREATE TABLE events(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, body TEXT NOT NULL);
"""


def test_a_previous_version_store_keeps_its_holds_and_spend(tmp_path: Path) -> None:
    path = tmp_path / "v0.db"
    db = sqlite3.connect(path)
    db.executescript(V0_SCHEMA)
    db.execute("INSERT INTO buckets VALUES ('a', 100, NULL, 'usd'), ('z', NULL, 60, 'usd')")
    db.execute("INSERT INTO slots VALUES ('a', 0, 30)")
    db.execute("INSERT INTO holds VALUES ('h1', ?, ?, NULL)",
               (T0 + 60, json.dumps([["a", 100, None, "usd", 50], ["z", None, 60, "usd", 0]])))
    db.execute("INSERT INTO held VALUES ('a', 50), ('z', 0)")
    db.commit()
    db.close()
    store = ledger.open(f"sqlite:///{path}")
    try:
        a, z = Bucket("a", 100), Bucket("z", None, 60)
        assert [(s.spent, s.held) for s in store.states([a], now=T0)] == [(30, 50)]
        assert not store.authorize([Line(a, 21)], now=T0, ttl=60).ok, "the old hold still counts"
        assert store.sweep(T0 + 30).pruned == 0, "the held bucket, and the one its hold names, stay"
        assert store.capture("h1", {"usd": 40}, now=T0 + 30)
        assert [(s.spent, s.held) for s in store.states([a, z], now=T0 + 30)] == [(70, 0), (40, 0)]
        assert listed(store) == {"a", "z"}
    finally:
        store.close()


# -- the engine says when a calendar bucket ends; status and report expire stale holds -------------

def test_calendar_buckets_carry_when_their_period_ends(backend_url: str) -> None:
    store = ledger.open(backend_url)
    try:
        engine = Engine(parse({"budget": [
            {"name": "team-month", "usd": 100, "window": "month", "timezone": "UTC", "per": "team"},
            {"name": "team-hour", "usd": 100, "window": "1h", "per": "team"}]}), store)
        req = Request("openai", "/v1/chat/completions",
                      {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
                      Identity(team="ml"))
        now = 1_793_000_000.0  # 2026-10-26 UTC
        assert engine.decide(req, now=now).allowed
        ends = {b.key.split("|")[0]: b.ends_at for b in store.known_buckets()}
        assert ends == {"team-month": 1_793_491_200.0, "team-hour": None}  # 2026-11-01 00:00 UTC
    finally:
        store.close()


def test_status_and_report_charge_holds_left_by_a_crash(store: Ledger) -> None:
    a = Bucket("a", 100)
    store.authorize([Line(a, 70)], now=T0, ttl=60, event=Event(T0, "capture", "d1", "gpt-4o", "openai", 70))
    [(_, s)] = status(store, now=T0 + 61)
    assert (s.spent, s.held) == (70, 0), "the crashed request's hold is charged, not shown held forever"
    [row] = report(store, ["model"], since=T0 - 1, now=T0 + 61)
    assert (row.group, row.cost, row.estimated) == (("gpt-4o",), 70, 1)
