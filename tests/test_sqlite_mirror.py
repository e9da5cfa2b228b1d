"""The SQLite store's mirror of bucket states (``ledger/sqlite.py``) always says what the file says.

Two connections (two processes, in effect: ``PRAGMA data_version`` tells a connection that another
one committed) take random turns at every write the request path, the operator and the sweep make
— holds, captures, releases, grants, expiry, the sweep, the clock moving either way —, and after
each step both report exactly the states that a plain read of the file gives.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from spendgate.ledger import Bucket, BucketState, Line
from spendgate.ledger.base import Capture, HoldRequest
from spendgate.ledger.sqlite import SQLiteLedger

T0 = 1_800_000_000.0


def file_state(db: sqlite3.Connection, bucket: Bucket, now: float) -> BucketState:
    """A bucket's state read straight from the file's tables (no mirror)."""
    first = bucket.first_live_slot(now)
    spent, oldest, held, granted = db.execute(
        "SELECT (SELECT COALESCE(SUM(amount), 0) FROM slots WHERE bucket=?1 AND slot>=?2),"
        " (SELECT MIN(slot) FROM slots WHERE bucket=?1 AND slot>=?2),"
        " (SELECT held FROM buckets WHERE key=?1),"
        " (SELECT COALESCE(SUM(amount), 0) FROM grants WHERE bucket=?1 AND until>?3)",
        (bucket.key, first, now)).fetchone()
    frees = (oldest + 1) * bucket.slot_s + bucket.window_s if bucket.window_s and oldest is not None else None
    return BucketState(bucket.key, bucket.unit, bucket.limit, int(spent), int(held or 0), int(granted), frees)


class TwoConnections(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self._dir = tempfile.TemporaryDirectory()
        url = f"sqlite:///{self._dir.name}/m.db"
        self.stores = [SQLiteLedger(url), SQLiteLedger(url)]
        self.reader = sqlite3.connect(Path(self._dir.name) / "m.db")
        self.now = T0
        self.buckets = [Bucket("g", 1000), Bucket("s1", 400, window_s=60), Bucket("s2", 600, window_s=600),
                        Bucket("t#tokens", 5000, unit="tokens")]
        self.holds: dict[str, tuple[int, int]] = {}
        self.placed = 0

    def teardown(self) -> None:
        for s in self.stores:
            s.close()
        self.reader.close()
        self._dir.cleanup()

    @rule(who=st.integers(0, 1), amount=st.integers(1, 500), tokens=st.integers(0, 3000),
          which=st.sampled_from([(0,), (0, 1), (0, 2), (1, 2)]), ttl=st.integers(1, 120), batch=st.booleans())
    def authorize(self, who: int, amount: int, tokens: int, which: tuple[int, ...], ttl: int, batch: bool) -> None:
        lines = [Line(self.buckets[i], amount) for i in which] + [Line(self.buckets[3], tokens)]
        if batch:  # the proxy's group commit: two holds in one transaction
            auths, _ = self.stores[who].commit([HoldRequest(lines, self.now, ttl, None, None)] * 2, [])
        else:
            auths = [self.stores[who].authorize(lines, now=self.now, ttl=ttl)]
        for auth in auths:
            if auth.ok:
                assert auth.hold_id is not None
                self.holds[auth.hold_id] = (amount, tokens)
                self.placed += 1

    @rule(who=st.integers(0, 1), data=st.data(), frac=st.floats(0, 1.5), batch=st.booleans())
    def capture(self, who: int, data: st.DataObject, frac: float, batch: bool) -> None:
        if not self.holds:
            return
        hid = list(self.holds)[data.draw(st.integers(0, len(self.holds) - 1))]
        usd, tokens = self.holds.pop(hid)
        actual = {"usd": math.floor(usd * frac), "tokens": math.floor(tokens * frac)}
        if batch:
            self.stores[who].commit([], [Capture(hid, actual, self.now, None)])
        else:
            self.stores[who].capture(hid, actual, now=self.now)

    @rule(who=st.integers(0, 1), data=st.data())
    def release(self, who: int, data: st.DataObject) -> None:
        if self.holds:
            hid = list(self.holds)[data.draw(st.integers(0, len(self.holds) - 1))]
            self.holds.pop(hid)
            self.stores[who].release(hid, now=self.now)

    @rule(who=st.integers(0, 1), i=st.integers(0, 3), amount=st.integers(1, 300), for_s=st.integers(1, 200))
    def grant(self, who: int, i: int, amount: int, for_s: int) -> None:
        self.stores[who].grant(self.buckets[i], amount, now=self.now, until=self.now + for_s)

    @rule(step=st.sampled_from([0.5, 1, 7, 30, 61, 300, -5, -70]))
    def tick(self, step: float) -> None:
        self.now += step  # (a clock set back, too: the mirror must read slots it never loaded)

    @rule(who=st.integers(0, 1))
    def expire(self, who: int) -> None:
        for e in self.stores[who].expire(self.now):
            self.holds.pop(e.hold_id, None)

    @rule(who=st.integers(0, 1))
    def sweep(self, who: int) -> None:
        for e in self.stores[who].sweep(self.now).gone:
            self.holds.pop(e.hold_id, None)

    @invariant()
    def both_say_what_the_file_says(self) -> None:
        if not hasattr(self, "stores"):
            return
        for store in self.stores:
            got = store.states(self.buckets, now=self.now)
            want = [file_state(self.reader, b, self.now) for b in self.buckets]
            assert got == want


TestTwoConnections = TwoConnections.TestCase
TestTwoConnections.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


def test_another_connections_commit_is_seen_at_once(tmp_path: Path) -> None:
    """A grant written by another process (``spendgate budgets top-up``) is weighed by the very next
    hold of a connection that has the bucket mirrored."""
    url = f"sqlite:///{tmp_path}/g.db"
    proxy, operator = SQLiteLedger(url), SQLiteLedger(url)
    b = Bucket("day", 1000)
    assert proxy.authorize([Line(b, 900)], now=T0, ttl=60).ok
    assert not proxy.authorize([Line(b, 200)], now=T0, ttl=60).ok
    operator.grant(b, 100, now=T0, until=T0 + 60)
    assert proxy.authorize([Line(b, 100)], now=T0, ttl=60).ok, "the other connection's grant counts"
    assert [s.held for s in operator.states([b], now=T0)] == [1000]
    proxy.close()
    operator.close()

