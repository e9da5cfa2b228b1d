"""``sqlite:///path``: the embedded default, safe across threads and processes on one file.

Every ledger operation is one ``BEGIN IMMEDIATE`` transaction: SQLite takes the database's write
lock before the first read, so two processes can never both read "room for one more" and both
hold it. WAL mode lets readers (``spendgate status``) run beside a writer; ``synchronous=NORMAL``
keeps commits off fsync in WAL while a crash still loses no committed transaction's integrity.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from spendgate.errors import StoreError
from spendgate.ledger.base import (
    Bucket,
    BucketState,
    Event,
    TransactionalLedger,
    _Hold,
    deserialize_hold,
    serialize_hold,
)

log = logging.getLogger("spendgate.ledger.sqlite")
CHECKPOINT_EVERY_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slots(bucket TEXT NOT NULL, slot INTEGER NOT NULL, amount INTEGER NOT NULL,
                                 PRIMARY KEY(bucket, slot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds(id TEXT PRIMARY KEY, expires_at REAL NOT NULL, lines TEXT NOT NULL,
                                 event TEXT);
CREATE INDEX IF NOT EXISTS holds_expiry ON holds(expires_at);
CREATE TABLE IF NOT EXISTS held(bucket TEXT PRIMARY KEY, amount INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grants(bucket TEXT NOT NULL, amount INTEGER NOT NULL, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS grants_bucket ON grants(bucket);
CREATE TABLE IF NOT EXISTS buckets(key TEXT PRIMARY KEY, lim INTEGER, window_s INTEGER, unit TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE TABLE IF NOT EXISTS records(kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires_at REAL,
                                   PRIMARY KEY(kind, key)) WITHOUT ROWID;
"""


def path_of(url: str) -> Path:
    """``sqlite:///rel.db`` is relative, ``sqlite:////abs.db`` absolute, ``~`` expanded."""
    if not url.startswith("sqlite:///"):
        raise StoreError(f"not a sqlite URL: {url!r} (expected sqlite:///path/to/file.db)")
    rest = url[len("sqlite:///"):]
    if not rest:
        raise StoreError(f"{url!r} names no file")
    return Path(rest).expanduser()


class SQLiteLedger(TransactionalLedger):
    schemes = ("sqlite",)

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_of(url)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            # checkpoints run on a background thread, not inside a request's commit (p99)
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store at {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._pruned: dict[str, int] = {}
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="spendgate-wal-checkpoint",
                                              daemon=True)
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Fold the WAL back into the database every second, on a connection of its own."""
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except sqlite3.Error:  # pragma: no cover - the main connection just opened the same file
            return
        with db:
            while not self._stop.wait(CHECKPOINT_EVERY_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # a busy or failing disk shows up on the next request
                    log.debug("WAL checkpoint skipped: %s", exc)
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        db.close()

    def close(self) -> None:
        self._stop.set()
        self._checkpointer.join(timeout=5)
        with self._lock:
            self._db.close()

    @contextmanager
    def _txn(self) -> Iterator[None]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            try:
                yield
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    def _transaction(self) -> AbstractContextManager[None]:
        return self._txn()

    def _state(self, bucket: Bucket, now: float) -> BucketState:
        """All of a bucket's state in one statement (the request path runs this for every bucket)."""
        first = bucket.first_live_slot(now)
        spent, oldest, held, granted = self._db.execute(
            "SELECT (SELECT COALESCE(SUM(amount), 0) FROM slots WHERE bucket=?1 AND slot>=?2),"
            " (SELECT MIN(slot) FROM slots WHERE bucket=?1 AND slot>=?2),"
            " (SELECT amount FROM held WHERE bucket=?1),"
            " (SELECT COALESCE(SUM(amount), 0) FROM grants WHERE bucket=?1 AND until>?3)",
            (bucket.key, first, now),
        ).fetchone()
        frees_at = (oldest + 1) * bucket.slot_s + bucket.window_s if bucket.window_s and oldest is not None else None
        return BucketState(bucket.key, bucket.unit, bucket.limit, int(spent), int(held or 0), int(granted),
                           frees_at)

    def _held(self, key: str) -> int:
        row = self._db.execute("SELECT amount FROM held WHERE bucket=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _put_hold(self, hold: _Hold) -> None:
        lines, event = serialize_hold(hold)
        self._db.execute("INSERT INTO holds(id, expires_at, lines, event) VALUES (?,?,?,?)",
                         (hold.hold_id, hold.expires_at, lines, event))
        self._db.executemany(
            "INSERT INTO held(bucket, amount) VALUES (?, ?) "
            "ON CONFLICT(bucket) DO UPDATE SET amount = amount + excluded.amount",
            [(ln.bucket.key, ln.amount) for ln in hold.lines],
        )

    def _pop_hold(self, hold_id: str) -> _Hold | None:
        row = self._db.execute("DELETE FROM holds WHERE id=? RETURNING expires_at, lines, event",
                               (hold_id,)).fetchone()
        if row is None:
            return None
        hold = deserialize_hold(hold_id, row[0], row[1], row[2])
        self._db.executemany("UPDATE held SET amount = amount - ? WHERE bucket=?",
                             [(ln.amount, ln.bucket.key) for ln in hold.lines])
        return hold

    def _stale_holds(self, now: float) -> Iterator[str]:
        rows = self._db.execute("SELECT id FROM holds WHERE expires_at<=?", (now,)).fetchall()
        return (r[0] for r in rows)

    def _charge(self, bucket: Bucket, amount: int, now: float) -> None:
        self._db.execute(
            "INSERT INTO slots(bucket, slot, amount) VALUES (?,?,?) "
            "ON CONFLICT(bucket, slot) DO UPDATE SET amount = amount + excluded.amount",
            (bucket.key, bucket.slot_of(now), amount),
        )
        if bucket.window_s:
            first = bucket.first_live_slot(now)
            if self._pruned.get(bucket.key, -1) < first:  # once per slot period, not per charge
                self._db.execute("DELETE FROM slots WHERE bucket=? AND slot<?", (bucket.key, first))
                self._pruned[bucket.key] = first

    def _add_grant(self, key: str, amount: int, until: float) -> None:
        self._db.execute("INSERT INTO grants(bucket, amount, until) VALUES (?,?,?)", (key, amount, until))

    def _forget(self, key: str) -> None:
        for table in ("slots", "held", "grants"):
            self._db.execute(f"DELETE FROM {table} WHERE bucket=?", (key,))
        self._db.execute("DELETE FROM buckets WHERE key=?", (key,))
        self._known.discard(key)

    def _add_event(self, event: Event) -> None:
        self._db.execute("INSERT INTO events(ts, body) VALUES (?,?)", (event.ts, event.to_json()))

    def _touch(self, bucket: Bucket, now: float) -> None:
        if bucket.key in self._known:
            return
        self._db.execute("INSERT OR REPLACE INTO buckets(key, lim, window_s, unit) VALUES (?,?,?,?)",
                         (bucket.key, bucket.limit, bucket.window_s, bucket.unit))
        self._known.add(bucket.key)

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
        with self._lock:
            try:
                rows = self._db.execute(q, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: {exc}") from exc
        return [Event.from_json(r[0]) for r in rows]

    def known_buckets(self) -> list[Bucket]:
        with self._lock:
            rows = self._db.execute("SELECT key, lim, window_s, unit FROM buckets ORDER BY key").fetchall()
        return [Bucket(k, lim, win, unit) for k, lim, win, unit in rows]
