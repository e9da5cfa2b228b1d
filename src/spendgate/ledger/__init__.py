"""The ledger of holds and charges, one interface over backends chosen by URL.

``open("memory://")``, ``open("sqlite:///~/.spendgate/spendgate.db")``,
``open("redis://127.0.0.1:6379/0")``; a backend registers the URL schemes it serves in :data:`BACKENDS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from spendgate.errors import StoreError
from spendgate.ledger.base import (
    AlertMark,
    Authorization,
    Bucket,
    BucketState,
    Event,
    ExpiredHold,
    Ledger,
    Line,
    OutboxAlert,
    Swept,
)

DEFAULT_URL = "sqlite:///~/.spendgate/spendgate.db"


def home() -> Path:
    """spendgate's own directory: ``SPENDGATE_HOME``, else ``~/.spendgate``."""
    return Path(os.environ.get("SPENDGATE_HOME", "~/.spendgate")).expanduser()


def default_url() -> str:
    """The embedded default store: ``spendgate.db`` in :func:`home`."""
    return f"sqlite:///{home() / 'spendgate.db'}"


def _memory(url: str, create: bool) -> Ledger:
    from spendgate.ledger.memory import MemoryLedger

    return MemoryLedger(url)


def _sqlite(url: str, create: bool) -> Ledger:
    from spendgate.ledger.lease import lease_settings
    from spendgate.ledger.sqlite import SQLiteLedger

    lease_settings(url)  # a bad ?leases= / lease_s option fails here, at start, not at the first request
    return SQLiteLedger(url, create=create)


def _redis(url: str, create: bool) -> Ledger:
    from spendgate.ledger.lease import lease_settings
    from spendgate.ledger.redis import RedisLedger

    lease_settings(url)  # a bad ?leases= / lease_s option fails here, at start, not at the first request
    return RedisLedger(url)


#: scheme -> factory(url, create)
BACKENDS: dict[str, Callable[[str, bool], Ledger]] = {"memory": _memory, "sqlite": _sqlite, "redis": _redis,
                                                      "rediss": _redis}


def open(url: str | None = None, *, create: bool = True) -> Ledger:
    """The ledger for ``url`` (default: :func:`default_url`); an unknown scheme is an error that
    lists the known ones. ``create=False`` is for commands that read an existing store (status,
    report, approvals): a SQLite path with no store raises :class:`StoreError` ("no spendgate store
    at PATH …") and creates nothing, instead of showing a fresh empty database as "no spend"."""
    url = url or default_url()
    scheme = url.split("://", 1)[0] if "://" in url else ""
    factory = BACKENDS.get(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise StoreError(f"unknown store URL {url!r}; expected one of {known}")
    return factory(url, create)


__all__ = [
    "BACKENDS",
    "DEFAULT_URL",
    "AlertMark",
    "Authorization",
    "Bucket",
    "BucketState",
    "Event",
    "ExpiredHold",
    "Ledger",
    "Line",
    "OutboxAlert",
    "Swept",
    "default_url",
    "home",
    "open",
]
