"""``sqlite:///path``: the embedded default, safe across threads and processes on one file.

Every ledger operation is one ``BEGIN IMMEDIATE`` transaction: SQLite takes the database's write
lock before the first read, so two processes can never both read "room for one more" and both
hold it. WAL mode lets readers (``spendgate status``) run beside a writer; ``synchronous=NORMAL``
keeps commits off fsync in WAL while a crash still loses no committed transaction's integrity.

The WAL is folded back into the database by a background thread, never inside a request's commit:
a PASSIVE checkpoint every :data:`CHECKPOINT_EVERY_COMMITS` commits (or :data:`CHECKPOINT_EVERY_S`),
which never waits. Under sustained writes PASSIVE never catches up (new frames land while it
copies, so the WAL is never restarted and grows with every request), so once the WAL holds more
than :data:`WAL_RESTART_BYTES` a RESTART checkpoint copies the little that is left and starts the
WAL over, and ``journal_size_limit`` cuts the file back. Counting commits, not seconds, keeps the
WAL near that size at any write rate.

A store whose file is deleted or replaced while in use is noticed (:meth:`SQLiteLedger._verify`):
SQLite would go on writing into the unlinked file, answering every request, and the spend would be
gone at the next start.

The buckets a request falls under are read from a *mirror* (:class:`_Known`): each bucket's live
slots, held amount and grants as this connection last read or wrote them. Every transaction starts
by reading ``PRAGMA data_version``, which changes exactly when another connection (another process,
``spendgate budgets`` …) has committed since; then the mirror is dropped and read again. So a
bucket's state is read from the file once, not on every request, while two processes on one file
stay exact: inside ``BEGIN IMMEDIATE`` nobody else can commit, and a changed version means the
mirror is not trusted. A transaction that rolls back drops the mirror too (it may have been updated
ahead of the commit). The earliest hold expiry is kept the same way, so the expiry scan runs only
when a hold can have expired.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Any

from spendgate import fastjson
from spendgate.errors import StoreError
from spendgate.ledger.base import (
    SETTLED_ALERT_STATUSES,
    SLOTS_PER_WINDOW,
    AlertMark,
    Bucket,
    BucketState,
    Event,
    LeaseEntry,
    LeaseReply,
    OutboxAlert,
    TransactionalLedger,
    _Hold,
    check_alert_status,
    deserialize_hold,
    serialize_hold,
)

log = logging.getLogger("spendgate.ledger.sqlite")
#: the background thread folds the WAL back into the database after this many commits of this
#: process (~6 MB of WAL at ~25 KB per commit), or this often, whichever comes first
CHECKPOINT_EVERY_COMMITS = 256
CHECKPOINT_EVERY_S = 0.25
PAGE_SIZE = 1024
#: above this the WAL is restarted (a RESTART checkpoint), and the file is cut back to it
WAL_RESTART_BYTES = 16 * 1024 * 1024
#: the longest a RESTART checkpoint waits for readers and writers of other processes: it blocks new
#: writers while it waits, so it gives up quickly and tries again on the next round
CHECKPOINT_BUSY_MS = 20
#: how often the request path compares the file at the store's path with the one it has open
VERIFY_EVERY_S = 0.5
#: entries of the per-bucket "slots already pruned" memo before it is dropped (memory stays bounded)
PRUNED_MEMO_MAX = 10_000
#: holds remembered by the connection that placed them (then forgotten all at once)
MINE_MAX = 100_000
#: 1: held amounts and hold counts on ``buckets``; 2: the alert outbox and the audit log (new tables,
#: which ``_SCHEMA`` creates in an older file as in a new one)
SCHEMA_VERSION = 2

# ``buckets`` lists every bucket with its limit and window, what is held on it and by how many holds:
# placing a hold updates its row (one upsert per bucket), so the listing is current in every process
# sharing the file and the sweep knows which buckets no hold names.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS slots(bucket TEXT NOT NULL, slot INTEGER NOT NULL, amount INTEGER NOT NULL,
                                 PRIMARY KEY(bucket, slot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds(id TEXT PRIMARY KEY, expires_at REAL NOT NULL, lines TEXT NOT NULL,
                                 event TEXT);
CREATE INDEX IF NOT EXISTS holds_expiry ON holds(expires_at);
CREATE TABLE IF NOT EXISTS grants(bucket TEXT NOT NULL, amount INTEGER NOT NULL, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS grants_bucket ON grants(bucket);
CREATE TABLE IF NOT EXISTS buckets(key TEXT PRIMARY KEY, lim INTEGER, window_s INTEGER, unit TEXT NOT NULL,
                                   ends_at REAL, held INTEGER NOT NULL DEFAULT 0,
                                   holds INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE TABLE IF NOT EXISTS records(kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires_at REAL,
                                   PRIMARY KEY(kind, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts(key TEXT PRIMARY KEY, created REAL NOT NULL, body TEXT NOT NULL,
                                  status TEXT NOT NULL, attempts INTEGER NOT NULL, next_at REAL NOT NULL,
                                  error TEXT NOT NULL DEFAULT '', sent_at REAL, done TEXT NOT NULL DEFAULT '[]',
                                  claimed_by TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS alerts_due ON alerts(status, next_at);
CREATE INDEX IF NOT EXISTS alerts_created ON alerts(created);
CREATE TABLE IF NOT EXISTS audit(chain TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
                                 PRIMARY KEY(chain, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases(bucket TEXT NOT NULL, hold TEXT NOT NULL, expires_at REAL NOT NULL,
                                  PRIMARY KEY(bucket, hold)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_checkpoints(chain TEXT NOT NULL, n INTEGER NOT NULL, body TEXT NOT NULL,
                                             PRIMARY KEY(chain, n)) WITHOUT ROWID;
"""
# one bucket's rows, for the mirror: its slots from a floor on (0), its held amount (1), its grants (2)
_LOAD = """
SELECT 0, slot, amount FROM slots WHERE bucket = ?1 AND slot >= ?2
UNION ALL SELECT 1, held, 0 FROM buckets WHERE key = ?1
UNION ALL SELECT 2, amount, until FROM grants WHERE bucket = ?1
"""
_ALERT_COLS = "key, created, body, status, attempts, next_at, error, sent_at, done"

# a bucket may be pruned (see Bucket.ended): nothing held, no hold, no grant live after the cutoff
# (?1), and no slot inside its rolling window at the cutoff (one slot earlier than Python's floor,
# so float rounding can only keep a bucket, never drop a live one), or a calendar period over by it
_ENDED = f"""
SELECT key, held = 0 AND holds = 0
  AND NOT EXISTS (SELECT 1 FROM grants WHERE bucket = key AND until > ?1)
  AND CASE WHEN window_s > 0 THEN NOT EXISTS (
             SELECT 1 FROM slots WHERE bucket = key
             AND slot >= CAST((?1 - window_s) / MAX(1, window_s / {SLOTS_PER_WINDOW}) AS INTEGER) - 1)
           ELSE ends_at IS NOT NULL AND ends_at <= ?1 END
FROM buckets WHERE key > ?2 ORDER BY key LIMIT ?3
"""

_UPSERT_BUCKET = """
INSERT INTO buckets(key, lim, window_s, unit, ends_at, held, holds) VALUES (?,?,?,?,?,?,?)
ON CONFLICT(key) DO UPDATE SET lim = excluded.lim, window_s = excluded.window_s, unit = excluded.unit,
  ends_at = excluded.ends_at, held = held + excluded.held, holds = holds + excluded.holds
"""


def path_of(url: str) -> Path:
    """``sqlite:///rel.db`` is relative, ``sqlite:////abs.db`` absolute, ``~`` expanded; options
    after ``?`` (``leases=on``) are not part of the path."""
    if not url.startswith("sqlite:///"):
        raise StoreError(f"not a sqlite URL: {url!r} (expected sqlite:///path/to/file.db)")
    rest = url[len("sqlite:///"):].split("?", 1)[0]
    if not rest:
        raise StoreError(f"{url!r} names no file")
    return Path(rest).expanduser()


@dataclass(slots=True)
class _Known:
    """One bucket's rows as the file holds them (see the module's doc): every slot from ``floor`` on,
    what is held on it, every grant (spent, run out or not: ``until`` is compared when asked)."""

    floor: int
    slots: dict[int, int]
    held: int
    grants: list[tuple[int, float]]

    def state(self, bucket: Bucket, first: int) -> tuple[int, int | None]:
        """(spent, oldest live slot) from ``first`` (>= ``floor``) on; older slots are dropped."""
        if first > self.floor:
            self.floor = first
            for slot in [s for s in self.slots if s < first]:
                del self.slots[slot]
        if not self.slots:
            return 0, None
        return sum(self.slots.values()), min(self.slots)


class SQLiteLedger(TransactionalLedger):
    schemes = ("sqlite",)

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.path = path_of(url)
        self._abs = Path(os.path.abspath(self.path))
        if not create and not self._abs.exists():
            raise StoreError(f"no spendgate store at {self.path} (nothing was created there; check --store "
                             "or SPENDGATE_STORE, or start one with spendgate serve)")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # mode=rw never creates the file (a path that vanished since the check above fails)
            uri = f"{self._abs.as_uri()}?mode={'rwc' if create else 'rw'}"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                       timeout=30.0)
            # a new file gets 1 KiB pages (an existing one keeps its own): every commit writes each page
            # it touches to the WAL whole, a request's two commits touch ~17 pages, and the checkpoint copies
            # them back — with 1 KiB instead of 4 KiB pages the proxy spends ~10 % less CPU per request
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            _into_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            # checkpoints run on a background thread, not inside a request's commit (p99)
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_RESTART_BYTES}")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._ident = self._identity()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store at {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        #: the mirror (module doc): valid while ``PRAGMA data_version`` reads ``_version``
        self._known: dict[str, _Known] = {}
        self._version: int | None = None
        #: no hold expires before this (a lower bound; -inf: unknown, scan)
        self._next_expiry = float("-inf")
        self._pruned: dict[str, int] = {}
        #: holds this connection placed and has not yet taken back: a capture need not parse its row
        self._mine: dict[str, _Hold] = {}
        self._lost: str | None = None
        self._verify_at = monotonic() + VERIFY_EVERY_S
        self._stop = threading.Event()
        self._commits = 0
        self._wake = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="spendgate-wal-checkpoint",
                                              daemon=True)
        self._checkpointer.start()

    def _migrate(self) -> None:
        """Bring a store made by an earlier version up to :data:`SCHEMA_VERSION`, once, under the
        write lock (another process may be opening the same old file)."""
        if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return  # (a read-only copy of a current store opens without a write)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:
                cols = {r[1] for r in self._db.execute("PRAGMA table_info(buckets)")}
                if "held" not in cols:  # v0: held amounts in a table of their own, no hold counts
                    for col in ("ends_at REAL", "held INTEGER NOT NULL DEFAULT 0",
                                "holds INTEGER NOT NULL DEFAULT 0"):
                        self._db.execute(f"ALTER TABLE buckets ADD COLUMN {col}")
                    self._db.execute("INSERT INTO buckets(key, unit, held) SELECT bucket, 'usd', amount FROM held "
                                     "WHERE true ON CONFLICT(key) DO UPDATE SET held = excluded.held")
                    counts = Counter(ln[0] for (raw,) in self._db.execute("SELECT lines FROM holds")
                                     for ln in json.loads(raw))
                    self._db.executemany("UPDATE buckets SET holds = ? WHERE key = ?",
                                         [(n, k) for k, n in counts.items()])
                    self._db.execute("DROP TABLE held")
            # v1 -> v2: the alerts, audit and audit_checkpoints tables, already made by _SCHEMA
            if version < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        self._drop_mirror()
        if self._db.in_transaction:  # (SQLite rolls back by itself after some errors)
            self._db.execute("ROLLBACK")

    # -- the file under the store ---------------------------------------------------------------

    def _identity(self) -> tuple[tuple[int, int] | None, ...]:
        """(device, inode) of the database, its WAL and its shared-memory index; None: missing."""
        out: list[tuple[int, int] | None] = []
        for suffix in ("", "-wal", "-shm"):
            try:
                st = os.stat(f"{self._abs}{suffix}")
            except FileNotFoundError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino))
        return tuple(out)

    def _verify(self) -> None:
        """Raise (and stay failed) if the files at the store's path are not the ones it has open:
        deleted (with their directory, or a stray ``rm *-wal``) or replaced. Never reopen: a new
        empty file would silently forget every budget's spend. Called under the lock."""
        if self._lost is None:
            self._verify_at = monotonic() + VERIFY_EVERY_S
            if self._identity() == self._ident:
                return
            self._lost = (f"the SQLite store file {self._abs} (or its -wal/-shm) was removed or replaced while "
                          "in use; refusing to write into a file nobody will read again. Restore it or restart "
                          "spendgate against the right path (spend recorded since is in the lost file)")
            log.error("%s", self._lost)
        raise StoreError(self._lost)

    def check(self, now: float) -> None:
        """The file is still the store's, and takes a write (a one-row upsert in its own transaction):
        a read-only file or a full disk fails here as it would fail the next request."""
        with self._lock:
            self._verify_at = 0.0
        with self._txn():
            self._db.execute("INSERT OR REPLACE INTO records(kind, key, value, expires_at) "
                             "VALUES ('spendgate', 'health', '', ?)", (now,))

    # -- the WAL --------------------------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        """Fold the WAL back into the database on a connection of its own (see the module's doc)."""
        try:
            db = sqlite3.connect(f"{self._abs.as_uri()}?mode=rw", uri=True, isolation_level=None,
                                 timeout=CHECKPOINT_BUSY_MS / 1000)
            frame = db.execute("PRAGMA page_size").fetchone()[0] + 24
        except sqlite3.Error:  # pragma: no cover - the main connection just opened the same file
            return
        with db:
            while not self._stop.is_set():
                self._wake.wait(CHECKPOINT_EVERY_S)
                self._wake.clear()
                if self._lost is None:
                    self._checkpoint(db, frame)
        db.close()

    def _checkpoint(self, db: sqlite3.Connection, frame: int) -> None:
        try:
            _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames * frame > WAL_RESTART_BYTES:
                # this process's requests wait on the lock (woken the moment it is free), not in
                # SQLite's sleeping busy handler; the RESTART only copies what PASSIVE left
                with self._lock:
                    db.execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.Error as exc:  # busy, or a failing disk: that shows on the next request
            log.debug("WAL checkpoint skipped: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._checkpointer.join(timeout=5)
        with self._lock:
            self._db.close()

    @contextmanager
    def _txn(self) -> Iterator[None]:
        with self._lock:
            if monotonic() >= self._verify_at or self._lost is not None:
                self._verify()
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            try:
                version = self._db.execute("PRAGMA data_version").fetchone()[0]
                if version != self._version:  # another connection committed: read the file again
                    self._drop_mirror()
                    self._version = version
                yield
                self._db.execute("COMMIT")
                self._commits += 1
                if self._commits >= CHECKPOINT_EVERY_COMMITS:  # an increment per commit; no statement
                    self._commits = 0
                    self._wake.set()
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _transaction(self) -> AbstractContextManager[None]:
        return self._txn()

    # -- the mirror (module doc) ------------------------------------------------------------------

    def _drop_mirror(self) -> None:
        self._known.clear()
        self._version = None
        self._next_expiry = float("-inf")

    def _known_of(self, bucket: Bucket, first: int) -> _Known:
        k = self._known.get(bucket.key)
        if k is None or first < k.floor:  # (a clock set back asks for slots never read)
            k = _Known(first, {}, 0, [])
            for part, a, b in self._db.execute(_LOAD, (bucket.key, first)):
                if part == 0:
                    k.slots[int(a)] = int(b)
                elif part == 1:
                    k.held = int(a or 0)
                else:
                    k.grants.append((int(a), float(b)))
            self._known[bucket.key] = k
        return k

    def _state(self, bucket: Bucket, now: float) -> BucketState:
        """A bucket's state from the mirror, read from the file on first sight (one statement)."""
        first = bucket.first_live_slot(now)
        k = self._known_of(bucket, first)
        spent, oldest = k.state(bucket, first)
        granted = sum(a for a, until in k.grants if until > now) if k.grants else 0
        frees_at = (oldest + 1) * bucket.slot_s + bucket.window_s if bucket.window_s and oldest is not None else None
        return BucketState(bucket.key, bucket.unit, bucket.limit, spent, k.held, granted, frees_at)

    def _held(self, key: str) -> int:
        row = self._db.execute("SELECT held FROM buckets WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _put_hold(self, hold: _Hold) -> None:
        lines, event = serialize_hold(hold)
        self._db.execute("INSERT INTO holds(id, expires_at, lines, event) VALUES (?,?,?,?)",
                         (hold.hold_id, hold.expires_at, lines, event))
        if len(self._mine) >= MINE_MAX:  # (a memo: a hold forgotten here is read back from its row)
            self._mine.clear()
        self._mine[hold.hold_id] = hold
        self._db.executemany(_UPSERT_BUCKET, [(b.key, b.limit, b.window_s, b.unit, b.ends_at, ln.amount, 1)
                                              for ln in hold.lines for b in (ln.bucket,)])
        for ln in hold.lines:
            if (k := self._known.get(ln.bucket.key)) is not None:
                k.held += ln.amount
        if hold.expires_at < self._next_expiry:
            self._next_expiry = hold.expires_at

    def _pop_hold(self, hold_id: str, *, event: bool = True) -> _Hold | None:
        hold = self._mine.pop(hold_id, None)
        if hold is not None and not event:
            # placed by this connection: its lines are known; the row decides whether it is still there
            # (another process may have expired it, or the transaction that placed it rolled back)
            if self._db.execute("DELETE FROM holds WHERE id=?", (hold_id,)).rowcount != 1:
                return None
        else:
            row = self._db.execute("DELETE FROM holds WHERE id=? RETURNING expires_at, lines"
                                   + (", event" if event else ""), (hold_id,)).fetchone()
            if row is None:
                return None
            hold = deserialize_hold(hold_id, row[0], row[1], row[2] if event else None)
        self._db.executemany("UPDATE buckets SET held = held - ?, holds = holds - 1 WHERE key=?",
                             [(ln.amount, ln.bucket.key) for ln in hold.lines])
        for ln in hold.lines:
            if (k := self._known.get(ln.bucket.key)) is not None:
                k.held -= ln.amount
        return hold

    def _stale_holds(self, now: float) -> Iterator[str]:
        if now < self._next_expiry:  # no hold in the file expires before then
            return iter(())
        rows = self._db.execute("SELECT id FROM holds WHERE expires_at<=?", (now,)).fetchall()
        # the caller pops these; the next expiry is the earliest of the rest
        nxt = self._db.execute("SELECT MIN(expires_at) FROM holds WHERE expires_at>?", (now,)).fetchone()[0]
        self._next_expiry = float("inf") if nxt is None else float(nxt)
        return (r[0] for r in rows)

    def _charge(self, charges: Sequence[tuple[Bucket, int]], now: float) -> None:
        rows = [(bucket.key, bucket.slot_of(now), amount) for bucket, amount in charges]
        self._db.executemany("INSERT INTO slots(bucket, slot, amount) VALUES (?,?,?) "
                             "ON CONFLICT(bucket, slot) DO UPDATE SET amount = amount + excluded.amount", rows)
        for (bucket, _), (key, slot, amount) in zip(charges, rows, strict=True):
            if (k := self._known.get(key)) is not None:
                if slot >= k.floor:
                    k.slots[slot] = k.slots.get(slot, 0) + amount
                else:  # a clock set back: read it again when asked
                    del self._known[key]
            if bucket.window_s:
                first = bucket.first_live_slot(now)
                if self._pruned.get(key, -1) < first:  # once per slot period, not per charge
                    # (the mirror keeps no slot below its floor, which the next state moves up to first)
                    self._db.execute("DELETE FROM slots WHERE bucket=? AND slot<?", (key, first))
                    if len(self._pruned) >= PRUNED_MEMO_MAX:  # a memo: forgetting costs one more DELETE
                        self._pruned.clear()
                    self._pruned[key] = first

    # -- budget leases (ledger/lease.py): this store's side of a batch ---------------------------

    def lease_sync(self, now: float, ttl: float, hold_id: str, expect: bool, entries: Sequence[LeaseEntry],
                   hold_event: str, events: Sequence[tuple[float, str]]) -> LeaseReply:
        """One transaction: renew the instance's lease hold, expire stale holds, charge each slice's
        new captures, resize each slice, fire the marks reached, log ``events``, write the hold
        back. The same rules as ``lua/lease.lua`` (its comments say why), on this file's tables:
        the lease is one ordinary row in ``holds`` (so an instance that stops renewing has every
        slice charged in full when it expires), ``leases`` lists the lease holds on each bucket,
        and the cumulative totals already charged are a record beside the hold."""
        with self._txn():
            row = self._db.execute("SELECT lines FROM holds WHERE id=?", (hold_id,)).fetchone()
            if row is not None:  # alive: renewed before expiry runs
                self._db.execute("UPDATE holds SET expires_at=? WHERE id=?", (now + ttl, hold_id))
            expired = self._expire_locked(now)
            if expect and row is None:
                return LeaseReply(True, [], expired)
            old = {ln[0]: ln for ln in json.loads(row[0])} if row is not None else {}
            done = json.loads(self._get_record("lease", hold_id, now) or "{}") if row is not None else {}
            rows: list[tuple[int, int, int, int, float | None]] = []
            parts: list[list[Any]] = []
            totals: dict[str, int] = {}
            for e in entries:
                b = e.bucket
                line = old.pop(b.key, None)
                have = int(line[4]) if line is not None else 0
                c = e.total - int(done.get(b.key, 0))
                if c > 0:
                    self._charge([(b, c)], now)
                else:
                    c = 0
                keep = max(e.floor, min(e.want, max(have - c, 0)))
                st = self._state(b, now)
                others = st.held - have
                new = keep
                if e.want > keep:
                    new = e.want
                    if b.limit is not None:
                        self._db.execute("DELETE FROM leases WHERE bucket=? AND expires_at<=?", (b.key, now))
                        n, mine = self._db.execute("SELECT COUNT(*), COALESCE(SUM(hold = ?), 0) FROM leases "
                                                   "WHERE bucket=?", (hold_id, b.key)).fetchone()
                        n = int(n) + (0 if mine else 1)
                        room = b.limit + st.granted - st.spent - others
                        new = max(keep, min(e.want, room // (2 * n)))
                    base = st.spent + others
                    nxt = min((int(m[2]) for m in e.marks if int(m[2]) > base + keep), default=None)
                    if nxt is not None and base + new >= nxt:
                        new = max(keep, nxt - 1 - base)
                if e.need > 0 and new < e.need:
                    new = e.floor
                fire = [AlertMark(m[0], m[1], int(m[2])) for m in e.marks if 0 < int(m[2]) <= st.spent + others + new]
                if fire:
                    self._add_alerts(fire, now)
                if new != have:
                    grew = 1 if have == 0 else (-1 if new == 0 else 0)
                    self._db.execute(_UPSERT_BUCKET, (b.key, b.limit, b.window_s, b.unit, b.ends_at, new - have, grew))
                    if (k := self._known.get(b.key)) is not None:
                        k.held += new - have
                if new > 0:
                    parts.append([b.key, b.limit, b.window_s, b.unit, new])
                    totals[b.key] = e.total
                    self._db.execute("INSERT OR REPLACE INTO leases(bucket, hold, expires_at) VALUES (?,?,?)",
                                     (b.key, hold_id, now + ttl))
                else:
                    self._db.execute("DELETE FROM leases WHERE bucket=? AND hold=?", (b.key, hold_id))
                rows.append((new, st.spent, others + new, st.granted, st.frees_at))
            for key, line in old.items():  # a line the instance did not name is kept as it is
                parts.append(line)
                totals[key] = int(done.get(key, 0))
            if events:
                self._db.executemany("INSERT INTO events(ts, body) VALUES (?,?)", events)
            self._db.execute("DELETE FROM holds WHERE id=?", (hold_id,))
            self._mine.pop(hold_id, None)
            if parts:
                self._db.execute("INSERT INTO holds(id, expires_at, lines, event) VALUES (?,?,?,?)",
                                 (hold_id, now + ttl, fastjson.dumps(parts), hold_event))
                self._put_record("lease", hold_id, json.dumps(totals), now + ttl)
                self._next_expiry = min(self._next_expiry, now + ttl)
            else:
                self._delete_record("lease", hold_id)
            return LeaseReply(False, rows, expired)

    def _add_grant(self, key: str, amount: int, until: float) -> None:
        self._db.execute("INSERT INTO grants(bucket, amount, until) VALUES (?,?,?)", (key, amount, until))
        if (k := self._known.get(key)) is not None:
            k.grants.append((amount, until))

    def _forget(self, key: str) -> None:
        for table in ("slots", "grants"):
            self._db.execute(f"DELETE FROM {table} WHERE bucket=?", (key,))
        self._db.execute("DELETE FROM buckets WHERE key=?", (key,))
        self._pruned.pop(key, None)
        self._known.pop(key, None)

    def _ended_buckets(self, after: str, cutoff: float, n: int) -> tuple[list[str], str | None]:
        if not after:  # once a sweep: grants that ran out (of buckets that stay, too)
            self._db.execute("DELETE FROM grants WHERE until <= ?", (cutoff,))
            self._known.clear()
        rows = self._db.execute(_ENDED, (cutoff, after, n)).fetchall()
        return [k for k, ended in rows if ended], rows[-1][0] if len(rows) == n else None

    def _delete_events(self, before: float, n: int) -> int:
        return self._db.execute("DELETE FROM events WHERE seq IN "
                                "(SELECT seq FROM events WHERE ts < ? ORDER BY ts LIMIT ?)", (before, n)).rowcount

    def _add_alerts(self, marks: Sequence[AlertMark], now: float) -> None:
        self._db.executemany("INSERT INTO alerts(key, created, body, status, attempts, next_at) "
                             "VALUES (?, ?, ?, 'pending', 0, ?) ON CONFLICT(key) DO NOTHING",
                             [(m.key, now, m.body, now) for m in marks])

    def _delete_alerts(self, before: float, n: int) -> int:
        settled = ",".join("?" * len(SETTLED_ALERT_STATUSES))
        return self._db.execute(f"DELETE FROM alerts WHERE key IN (SELECT key FROM alerts WHERE created < ? AND "
                                f"status IN ({settled}) ORDER BY created, key LIMIT ?)",
                                (before, *SETTLED_ALERT_STATUSES, n)).rowcount

    def claim_alerts(self, now: float, owner: str, lease_s: float, limit: int) -> list[OutboxAlert]:
        with self._txn():
            rows = self._db.execute(
                f"UPDATE alerts SET claimed_by = ?, next_at = ? WHERE key IN (SELECT key FROM alerts "
                f"WHERE status = 'pending' AND next_at <= ? ORDER BY created, key LIMIT ?) RETURNING {_ALERT_COLS}",
                (owner, now + lease_s, now, max(0, limit))).fetchall()
        return sorted((_alert(r) for r in rows), key=lambda a: (a.created, a.key))

    def update_alert(self, key: str, owner: str, *, status: str, attempts: int, next_at: float,
                     error: str = "", done: Sequence[str] = (), sent_at: float | None = None) -> bool:
        check_alert_status(status)
        with self._txn():
            n = self._db.execute(
                "UPDATE alerts SET status = ?, attempts = ?, next_at = ?, error = ?, done = ?, sent_at = ?, "
                "claimed_by = '' WHERE key = ? AND claimed_by = ? AND claimed_by != ''",
                (status, attempts, next_at, error, json.dumps(list(done)), sent_at, key, owner)).rowcount
        return n == 1

    def alerts(self, limit: int = 1000) -> list[OutboxAlert]:
        rows = self._read(f"SELECT {_ALERT_COLS} FROM alerts ORDER BY created DESC, key DESC LIMIT ?",
                          (max(0, limit),))
        return [_alert(r) for r in rows]

    def _audit_len(self, chain: str) -> int:
        # seqs run 1 … n with no gap (append_audit only ever extends), so the last one is the count
        row = self._db.execute("SELECT MAX(seq) FROM audit WHERE chain = ?", (chain,)).fetchone()
        return int(row[0] or 0)

    def _audit_range(self, chain: str, after_seq: int, limit: int | None) -> list[str]:
        rows = self._db.execute("SELECT body FROM audit WHERE chain = ? AND seq > ? ORDER BY seq LIMIT ?",
                                (chain, after_seq, -1 if limit is None else max(0, limit))).fetchall()
        return [r[0] for r in rows]

    def _audit_add(self, chain: str, first_seq: int, entries: Sequence[str]) -> None:
        self._db.executemany("INSERT INTO audit(chain, seq, body) VALUES (?, ?, ?)",
                             [(chain, first_seq + i, body) for i, body in enumerate(entries)])

    def _add_checkpoint(self, chain: str, checkpoint: str) -> None:
        self._db.execute("INSERT INTO audit_checkpoints(chain, n, body) SELECT ?1, COALESCE(MAX(n), 0) + 1, ?2 "
                         "FROM audit_checkpoints WHERE chain = ?1", (chain, checkpoint))

    def audit_chains(self) -> list[str]:
        rows = self._read("SELECT DISTINCT chain FROM audit UNION SELECT DISTINCT chain FROM audit_checkpoints "
                          "ORDER BY 1", ())
        return [r[0] for r in rows]

    def audit_entries(self, chain: str, after_seq: int = 0, limit: int | None = None) -> list[str]:
        rows = self._read("SELECT body FROM audit WHERE chain = ? AND seq > ? ORDER BY seq LIMIT ?",
                          (chain, after_seq, -1 if limit is None else max(0, limit)))
        return [r[0] for r in rows]

    def audit_checkpoints(self, chain: str) -> list[str]:
        rows = self._read("SELECT body FROM audit_checkpoints WHERE chain = ? ORDER BY n", (chain,))
        return [r[0] for r in rows]

    def _add_event(self, event: Event) -> None:
        self._db.execute("INSERT INTO events(ts, body) VALUES (?,?)", (event.ts, event.to_json()))

    def _touch(self, bucket: Bucket, now: float) -> None:
        self._db.execute(_UPSERT_BUCKET, (bucket.key, bucket.limit, bucket.window_s, bucket.unit, bucket.ends_at,
                                          0, 0))

    def _put_record(self, kind: str, key: str, value: str, expires_at: float | None) -> None:
        self._db.execute("INSERT OR REPLACE INTO records(kind, key, value, expires_at) VALUES (?,?,?,?)",
                         (kind, key, value, expires_at))

    def _get_record(self, kind: str, key: str, now: float) -> str | None:
        row = self._db.execute("SELECT value FROM records WHERE kind=? AND key=? AND "
                               "(expires_at IS NULL OR expires_at>?)", (kind, key, now)).fetchone()
        return row[0] if row else None

    def _delete_record(self, kind: str, key: str) -> None:
        self._db.execute("DELETE FROM records WHERE kind=? AND key=?", (kind, key))

    def records(self, kind: str, *, now: float) -> list[tuple[str, str]]:
        with self._txn():
            self._db.execute("DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at<=?", (now,))
            rows = self._db.execute("SELECT key, value FROM records WHERE kind=? ORDER BY key", (kind,)).fetchall()
        return [(k, v) for k, v in rows]

    def events(self, since: float, until: float | None = None) -> list[Event]:
        q = "SELECT body FROM events WHERE ts>=?" + (" AND ts<?" if until is not None else "") + " ORDER BY seq"
        args = (since,) if until is None else (since, until)
        return [Event.from_json(r[0]) for r in self._read(q, args)]

    def known_buckets(self) -> list[Bucket]:
        rows = self._read("SELECT key, lim, window_s, unit, ends_at FROM buckets ORDER BY key", ())
        return [Bucket(*row) for row in rows]

    def _read(self, query: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            if monotonic() >= self._verify_at or self._lost is not None:
                self._verify()
            try:
                return self._db.execute(query, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc


def _into_wal(db: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch the file to WAL (a no-op once it is). Switching takes an exclusive lock, and SQLite
    answers "database is locked" at once rather than through the busy handler, so processes
    opening a new store together (``serve --workers``, their audit writers) would fail at random:
    try again for up to ``wait_s``."""
    deadline = monotonic() + wait_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _alert(row: tuple[Any, ...]) -> OutboxAlert:
    key, created, body, status, attempts, next_at, error, sent_at, done = row
    return OutboxAlert(key, created, body, status, attempts, next_at, error, sent_at, tuple(json.loads(done)))
