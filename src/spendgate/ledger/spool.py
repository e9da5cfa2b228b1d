"""Charges the store could not take, kept on local disk until it can.

When the store fails after a request was authorized and sent, the provider has answered and will
bill: the answer must still reach the client, and the charge must not be lost. The engine adds it
here (one SQLite file, ``spool.db`` in spendgate's home by default, created only when something
must be spooled) and :meth:`Spool.drain` applies it once the store is back.

Draining is safe to repeat and to crash in: an entry is deleted only after its capture returned,
and capturing a hold that is already gone returns False and charges nothing, so an entry applied
but not yet deleted (a crash in between, two drainers at once) is never charged twice. An entry
whose hold expired meanwhile has already been charged its worst case by the store, so it is
dropped: over-counted, never under-counted.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

from spendgate.errors import StoreError
from spendgate.ledger.base import Event, Ledger

log = logging.getLogger("spendgate.ledger.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool(seq INTEGER PRIMARY KEY AUTOINCREMENT, hold_id TEXT NOT NULL UNIQUE,
                                 actual TEXT NOT NULL, event TEXT);
"""


class Spool:
    """A durable queue of captures, keyed by hold id. Thread-safe; shareable by processes."""

    def __init__(self, path: Path | str | None = None) -> None:
        self._path = Path(path).expanduser() if path is not None else None
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The file, ``spool.db`` in :func:`spendgate.ledger.home` unless given (resolved once)."""
        if self._path is None:
            from spendgate.ledger import home

            self._path = home() / "spool.db"
        return self._path

    def _open(self, create: bool) -> sqlite3.Connection | None:
        """The connection (under the lock); None when there is no file and ``create`` is False."""
        if self._db is None:
            if not create and not self.path.exists():
                return None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # a spooled charge must survive a power cut
                db.executescript(_SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"cannot open the charge spool at {self.path}: {exc}") from exc
            self._db = db
        return self._db

    def add(self, hold_id: str, actual: Mapping[str, int], event: Event | None) -> None:
        """Keep a capture for later. A hold is captured once, so a second add of it is ignored."""
        with self._lock:
            db = self._open(create=True)
            assert db is not None
            try:
                db.execute("INSERT OR IGNORE INTO spool(hold_id, actual, event) VALUES (?, ?, ?)",
                           (hold_id, json.dumps(dict(actual)), event.to_json() if event is not None else None))
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the charge spool at {self.path}: {exc}") from exc

    def pending(self) -> int:
        """How many captures wait for the store (0, without creating the file, when none ever did)."""
        with self._lock:
            db = self._open(create=False)
            if db is None:
                return 0
            row = db.execute("SELECT COUNT(*) FROM spool").fetchone()
            return int(row[0])

    def drain(self, ledger: Ledger, now: float) -> int:
        """Apply every waiting capture to ``ledger``, oldest first; how many left the spool.

        A :class:`StoreError` stops the drain and keeps the rest for the next one."""
        with self._lock:
            db = self._open(create=False)
            if db is None:
                return 0
            rows = db.execute("SELECT seq, hold_id, actual, event FROM spool ORDER BY seq").fetchall()
        done = 0
        for seq, hold_id, actual, event in rows:
            try:
                captured = ledger.capture(hold_id, json.loads(actual), now=now,
                                          event=Event.from_json(event) if event is not None else None)
            except StoreError as exc:
                log.warning("the store is still failing (%s); %d spooled charge(s) wait", exc, len(rows) - done)
                break
            if not captured:
                log.warning("spooled charge for hold %s dropped: the hold is gone (it expired and was charged "
                            "its worst case, or this charge was applied before)", hold_id)
            with self._lock:
                db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            done += 1
        return done

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
