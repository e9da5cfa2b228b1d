"""``redis://host:port/db``: one budget shared by every proxy instance and SDK process.

Each authorize, capture, release, expiry and grant is one call of ``lua/ledger.lua`` (EVALSHA:
one round trip, all buckets or none). Keys share one hash tag (``{spendgate}:…``, or
``?prefix=NAME`` in the URL for ``{NAME}:…``) so a Redis Cluster places them in one slot. Connections
come from a blocking pool, which waits for a free connection under a burst instead of raising.
Any Redis failure is raised once as :class:`~spendgate.errors.StoreError`, naming the store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio

from spendgate.errors import StoreError
from spendgate.ledger.base import (
    PRUNE_GRACE_S,
    SLOTS_PER_WINDOW,
    SWEEP_BATCH,
    Authorization,
    Bucket,
    BucketState,
    Event,
    ExpiredHold,
    Ledger,
    Line,
    Swept,
    new_hold_id,
)

POOL_SIZE = 64


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _meta(bucket: Bucket) -> str:
    """A bucket's listing (the sweep prunes by its window and ``ends_at``)."""
    return json.dumps([bucket.limit, bucket.window_s, bucket.unit, bucket.ends_at])


def _line(bucket: Bucket, amount: int) -> list[Any]:
    meta = _meta(bucket)
    return [bucket.key, -1 if bucket.limit is None else bucket.limit, bucket.window_s or 0, bucket.unit, amount,
            bucket.slot_s, meta]


class RedisLedger(Ledger):
    schemes = ("redis", "rediss")
    networked = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._name, self._p, clean = _parse(url)
        try:
            pool = redis.BlockingConnectionPool.from_url(clean, **POOL_OPTIONS)
        except ValueError as exc:
            raise StoreError(f"bad Redis URL {self._name}: {exc}") from exc
        self._r = redis.Redis(connection_pool=pool)
        self._script = self._r.register_script(_lua())
        self._keys = _keys(self._p)

    def _run(self, op: str, *args: Any) -> Any:
        try:
            return self._script(keys=self._keys, args=[op, self._p, *args])
        except redis.RedisError as exc:
            raise StoreError(f"Redis store {self._name}: {exc}") from exc

    def _cmd(self, name: str, *args: Any) -> Any:
        try:
            return self._r.execute_command(name, *args)  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            raise StoreError(f"Redis store {self._name}: {exc}") from exc

    def close(self) -> None:
        self._r.close()
        self._r.connection_pool.disconnect()

    # -- the ledger ---------------------------------------------------------------------------

    def authorize(self, lines: Sequence[Line], *, now: float, ttl: float,
                  event: Event | None = None, hold_id: str | None = None) -> Authorization:
        hid = hold_id or new_hold_id()
        return _authorization(lines, hid, self._run(*_authorize_args(lines, now, ttl, event, hid)))

    def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                event: Event | None = None) -> bool:
        return bool(self._run(*_capture_args(hold_id, actual, now, event)))

    def release(self, hold_id: str, *, now: float) -> bool:
        return bool(self._run("release", hold_id))

    def expire(self, now: float) -> list[ExpiredHold]:
        flat = self._run("expire", repr(now))
        out = []
        for i in range(0, len(flat), 4):
            hid, usd, tokens, raw = flat[i: i + 4]
            charged = {k: int(v) for k, v in (("usd", usd), ("tokens", tokens)) if int(v)}
            ev = _expired_event(now, int(usd), raw) if raw else None
            out.append(ExpiredHold(hid, charged, ev))
        return out

    def sweep(self, now: float, *, retention_s: float | None = None) -> Swept:
        """Expiry, then pruning in HSCAN batches, then retention in batches: each one script call,
        so Redis serves requests between them."""
        expired = len(self.expire(now))
        cursor, pruned, cutoff = "0", 0, repr(now - PRUNE_GRACE_S)
        while True:
            cursor, n = self._run("prune", cursor, cutoff, str(SWEEP_BATCH), str(SLOTS_PER_WINDOW))
            pruned += int(n)
            if cursor == "0":
                break
        deleted = 0
        if retention_s is not None:
            while True:
                n = int(self._run("trim", repr(now - retention_s), str(SWEEP_BATCH)))
                deleted += n
                if n < SWEEP_BATCH:
                    break
        return Swept(expired, pruned, deleted)

    def check(self, now: float) -> None:
        """A SET with a short expiry: fails on a read-only replica, at maxmemory, or unreachable."""
        self._cmd("SET", self._p + "health", repr(now), "PX", "60000")

    def grant(self, bucket: Bucket, amount: int, *, now: float, until: float) -> None:
        self._run(*_grant_args(bucket, amount, until))

    def states(self, buckets: Sequence[Bucket], *, now: float) -> list[BucketState]:
        lines = [Line(b, 0) for b in buckets]
        flat = self._run("states", repr(now), json.dumps([_line(b, 0) for b in buckets]))
        return list(_states(lines, flat))

    def forget(self, keys: Sequence[str]) -> None:
        self._run("forget", *keys)

    def record(self, event: Event) -> None:
        self._cmd("ZADD", self._keys[3], repr(event.ts), event.to_json())

    def events(self, since: float, until: float | None = None) -> list[Event]:
        hi = f"({until!r}" if until is not None else "+inf"
        rows = self._cmd("ZRANGEBYSCORE", self._keys[3], repr(since), hi)
        return [_event_of(r) for r in rows]

    def known_buckets(self) -> list[Bucket]:
        rows = self._cmd("HGETALL", self._keys[2])
        out = []
        for key, meta in sorted(rows.items()):
            out.append(Bucket(key, *json.loads(meta)))  # (stores made before ends_at have 3 fields)
        return out

    # -- records ------------------------------------------------------------------------------

    def put_record(self, kind: str, key: str, value: str, *, expires_at: float | None = None) -> None:
        self._cmd("HSET", self._p + "rec:" + kind, key, json.dumps([expires_at, value]))

    def get_record(self, kind: str, key: str, *, now: float) -> str | None:
        raw = self._cmd("HGET", self._p + "rec:" + kind, key)
        return _live(raw, now)

    def take_record(self, kind: str, key: str, *, now: float) -> str | None:
        raw = self._run("take", self._p + "rec:" + kind, key, repr(now))
        return _live(raw, now) if raw else None

    def delete_record(self, kind: str, key: str) -> None:
        self._cmd("HDEL", self._p + "rec:" + kind, key)

    def records(self, kind: str, *, now: float) -> list[tuple[str, str]]:
        rows = self._cmd("HGETALL", self._p + "rec:" + kind)
        out = []
        for k, raw in sorted(rows.items()):
            value = _live(raw, now)
            if value is None:
                self._cmd("HDEL", self._p + "rec:" + kind, k)
            else:
                out.append((k, value))
        return out


class AsyncRedisLedger:
    """The engine's calls on the same Redis ledger through redis-py's asyncio client, for a proxy's
    event loop: the same script, the same keys, so it is interchangeable with :class:`RedisLedger`.
    Create it inside the running loop that will use it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._name, self._p, clean = _parse(url)
        pool = redis.asyncio.BlockingConnectionPool.from_url(clean, **POOL_OPTIONS)
        self._r = redis.asyncio.Redis(connection_pool=pool)
        self._script = self._r.register_script(_lua())
        self._keys = _keys(self._p)

    async def _run(self, op: str, *args: Any) -> Any:
        try:
            return await self._script(keys=self._keys, args=[op, self._p, *args])
        except redis.RedisError as exc:
            raise StoreError(f"Redis store {self._name}: {exc}") from exc

    async def authorize(self, lines: Sequence[Line], *, now: float, ttl: float,
                        event: Event | None = None, hold_id: str | None = None) -> Authorization:
        hid = hold_id or new_hold_id()
        return _authorization(lines, hid, await self._run(*_authorize_args(lines, now, ttl, event, hid)))

    async def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                      event: Event | None = None) -> bool:
        return bool(await self._run(*_capture_args(hold_id, actual, now, event)))

    async def release(self, hold_id: str, *, now: float) -> bool:
        return bool(await self._run("release", hold_id))

    async def grant(self, bucket: Bucket, amount: int, *, now: float, until: float) -> None:
        await self._run(*_grant_args(bucket, amount, until))

    async def close(self) -> None:
        await self._r.aclose()
        await self._r.connection_pool.disconnect()


POOL_OPTIONS: dict[str, Any] = {"max_connections": POOL_SIZE, "timeout": 10, "decode_responses": True,
                                "socket_timeout": 5, "socket_connect_timeout": 2, "health_check_interval": 30}


def _parse(url: str) -> tuple[str, str, str]:
    """(the URL with its password hidden, the key prefix with its hash tag, the URL for redis-py)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "spendgate")
    return _redacted(url), f"{{{prefix}}}:", urlunsplit(parts._replace(query=urlencode(query)))


def _keys(p: str) -> list[str]:
    return [p + "held", p + "holds", p + "buckets", p + "events"]


@cache
def _lua() -> str:
    return resources.files("spendgate.ledger").joinpath("lua/ledger.lua").read_text()


def _authorize_args(lines: Sequence[Line], now: float, ttl: float, event: Event | None, hid: str) -> list[str]:
    payload = json.dumps([_line(ln.bucket, ln.amount) for ln in lines])
    return ["authorize", repr(now), repr(ttl), hid, payload, event.to_json() if event else ""]


def _authorization(lines: Sequence[Line], hid: str, res: Sequence[str]) -> Authorization:
    states = _states(lines, res[1:-1])
    if res[0] == "1":
        return Authorization(True, hid, states)
    return Authorization(False, None, states, tuple(json.loads(res[-1])))


def _capture_args(hold_id: str, actual: Mapping[str, int], now: float, event: Event | None) -> list[str]:
    usd, tokens = actual.get("usd"), actual.get("tokens")
    return ["capture", hold_id, repr(now), "" if usd is None else str(usd), "" if tokens is None else str(tokens),
            event.to_json() if event else ""]


def _grant_args(bucket: Bucket, amount: int, until: float) -> list[str]:
    return ["grant", bucket.key, str(amount), repr(until), _meta(bucket)]


def _states(lines: Sequence[Line], flat: Sequence[str]) -> tuple[BucketState, ...]:
    out = []
    for i, ln in enumerate(lines):
        spent, held, granted, frees = flat[4 * i: 4 * i + 4]
        b = ln.bucket
        out.append(BucketState(b.key, b.unit, b.limit, int(spent), int(held), int(granted),
                               None if float(frees) < 0 else float(frees)))
    return tuple(out)


def _live(raw: str | None, now: float) -> str | None:
    if raw is None:
        return None
    expires_at, value = json.loads(raw)
    return value if expires_at is None or expires_at > now else None


def _expired_event(now: float, usd: int, raw: str) -> Event:
    e = Event.from_json(raw)
    return Event(now, "expired", e.decision_id, e.model, e.provider, usd or e.cost, e.input_tokens,
                 e.output_tokens, True, e.dims)


def _event_of(raw: str) -> Event:
    doc = json.loads(raw)
    if "expired_at" in doc:
        return _expired_event(doc["expired_at"], doc["cost"], json.dumps(doc["event"]))
    return Event(**doc)
