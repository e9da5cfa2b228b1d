"""``redis://host:port/db``: one budget shared by every proxy instance and SDK process.

Each authorize, capture, release, expiry and grant is one call of ``lua/ledger.lua`` (EVALSHA:
one round trip, all buckets or none). Keys share one hash tag (``{spendgate}:…``, or
``?prefix=NAME`` in the URL for ``{NAME}:…``) so a Redis Cluster places them in one slot. Connections
come from a blocking pool, which waits for a free connection under a burst instead of raising.
Any Redis failure is raised once as :class:`~spendgate.errors.StoreError`, naming the store.
"""

from __future__ import annotations

import json
import time
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
    audit_conflict,
    check_alert_status,
    event_of_doc,
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
        return _authorization(lines, hid, now, self._run(*_authorize_args(lines, now, ttl, event, hid)))

    def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                event: Event | None = None) -> bool:
        return bool(self._run(*_capture_args(hold_id, actual, now, event)))

    def release(self, hold_id: str, *, now: float, event: Event | None = None) -> bool:
        return bool(self._run(*_release_args(hold_id, now, event)))

    def expire(self, now: float) -> list[ExpiredHold]:
        return _expired_holds(now, self._run("expire", repr(now)))

    def sweep(self, now: float, *, retention_s: float | None = None) -> Swept:
        """Expiry, then pruning in HSCAN batches, then retention in batches: each one script call,
        so Redis serves requests between them."""
        gone = tuple(self.expire(now))
        cursor, pruned, cutoff = "0", 0, repr(now - PRUNE_GRACE_S)
        while True:
            cursor, n = self._run("prune", cursor, cutoff, str(SWEEP_BATCH), str(SLOTS_PER_WINDOW))
            pruned += int(n)
            if cursor == "0":
                break
        deleted = alerts_deleted = 0
        if retention_s is not None:
            while True:
                n = int(self._run("trim", repr(now - retention_s), str(SWEEP_BATCH)))
                deleted += n
                if n < SWEEP_BATCH:
                    break
            kept = 0  # old pending alerts stay at the front of the batches: step past them
            while True:
                trimmed, looked = self._run("trim_alerts", repr(now - retention_s), str(SWEEP_BATCH), str(kept))
                alerts_deleted += int(trimmed)
                kept += int(looked) - int(trimmed)
                if int(looked) < SWEEP_BATCH:
                    break
        return Swept(len(gone), pruned, deleted, alerts_deleted, gone)

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

    def record(self, event: Event, *, alerts: Sequence[AlertMark] = ()) -> None:
        if alerts:
            self._run("record", repr(event.ts), event.to_json(), _marks(alerts))
        else:
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

    def put_record(self, kind: str, key: str, value: str, *, expires_at: float | None = None,
                   alerts: Sequence[AlertMark] = ()) -> None:
        if alerts:
            self._run("put_record", self._p + "rec:" + kind, key, json.dumps([expires_at, value]), repr(time.time()),
                      _marks(alerts))
        else:
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

    # -- the alert outbox ---------------------------------------------------------------------

    def claim_alerts(self, now: float, owner: str, lease_s: float, limit: int) -> list[OutboxAlert]:
        if limit <= 0:
            return []
        return _alerts(self._run("claim", repr(now), owner, repr(now + lease_s), str(limit)))

    def update_alert(self, key: str, owner: str, *, status: str, attempts: int, next_at: float,
                     error: str = "", done: Sequence[str] = (), sent_at: float | None = None) -> bool:
        check_alert_status(status)
        return bool(self._run("update_alert", key, owner, status, str(attempts), repr(next_at), error,
                              json.dumps(list(done)), "" if sent_at is None else repr(sent_at)))

    def alerts(self, limit: int = 1000) -> list[OutboxAlert]:
        return _alerts(self._run("alerts", str(limit))) if limit > 0 else []

    # -- the audit log ------------------------------------------------------------------------

    def append_audit(self, chain: str, first_seq: int, entries: Sequence[str]) -> None:
        if first_seq < 1:
            raise ValueError(f"audit seqs start at 1, not {first_seq}")
        ok, have = self._run("append_audit", chain, str(first_seq), *entries)
        if not ok:
            raise audit_conflict(chain, int(have), first_seq, len(entries))

    def put_checkpoint(self, chain: str, checkpoint: str) -> None:
        self._run("checkpoint", chain, checkpoint)

    def audit_chains(self) -> list[str]:
        return sorted(self._cmd("SMEMBERS", self._p + "audit:chains"))

    def audit_entries(self, chain: str, after_seq: int = 0, limit: int | None = None) -> list[str]:
        start = max(0, after_seq)
        if limit is not None and limit <= 0:
            return []
        stop = -1 if limit is None else start + limit - 1
        return list(self._cmd("LRANGE", self._p + "audit:e:" + chain, start, stop))

    def audit_checkpoints(self, chain: str) -> list[str]:
        return list(self._cmd("LRANGE", self._p + "audit:c:" + chain, 0, -1))


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
        return _authorization(lines, hid, now, await self._run(*_authorize_args(lines, now, ttl, event, hid)))

    async def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                      event: Event | None = None) -> bool:
        return bool(await self._run(*_capture_args(hold_id, actual, now, event)))

    async def release(self, hold_id: str, *, now: float, event: Event | None = None) -> bool:
        return bool(await self._run(*_release_args(hold_id, now, event)))

    async def grant(self, bucket: Bucket, amount: int, *, now: float, until: float) -> None:
        await self._run(*_grant_args(bucket, amount, until))

    async def close(self) -> None:
        await self._r.aclose()
        await self._r.connection_pool.disconnect()


#: URL options read by :func:`spendgate.ledger.lease.lease_settings` (``?leases=on&lease_s=2``)
LEASE_OPTIONS = ("leases", "lease_s")

POOL_OPTIONS: dict[str, Any] = {"max_connections": POOL_SIZE, "timeout": 10, "decode_responses": True,
                                "socket_timeout": 5, "socket_connect_timeout": 2, "health_check_interval": 30}


def _parse(url: str) -> tuple[str, str, str]:
    """(the URL with its password hidden, the key prefix with its hash tag, the URL for redis-py)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "spendgate")
    for key in LEASE_OPTIONS:  # spendgate's own (ledger/lease.py), never redis-py's
        query.pop(key, None)
    return _redacted(url), f"{{{prefix}}}:", urlunsplit(parts._replace(query=urlencode(query)))


def _keys(p: str) -> list[str]:
    return [p + "held", p + "holds", p + "buckets", p + "events"]


@cache
def _lua() -> str:
    return resources.files("spendgate.ledger").joinpath("lua/ledger.lua").read_text()


def _authorize_args(lines: Sequence[Line], now: float, ttl: float, event: Event | None, hid: str) -> list[str]:
    payload = json.dumps([_line(ln.bucket, ln.amount) for ln in lines])
    args = ["authorize", repr(now), repr(ttl), hid, payload, event.to_json() if event else ""]
    if any(ln.alerts for ln in lines):  # marks go apart from the lines: never stored with the hold
        args.append(json.dumps([[i, m.key, m.body, m.at, m.on_refusal]
                                for i, ln in enumerate(lines, 1) for m in ln.alerts]))
    return args


def _authorization(lines: Sequence[Line], hid: str, now: float, res: Sequence[str]) -> Authorization:
    n = 4 * len(lines)
    states = _states(lines, res[1:1 + n])
    expired = tuple(_expired_holds(now, res[2 + n:])) if len(res) > 2 + n else ()
    if res[0] == "1":
        return Authorization(True, hid, states, (), expired)
    return Authorization(False, None, states, tuple(json.loads(res[1 + n])), expired)


def _expired_holds(now: float, flat: Sequence[str]) -> list[ExpiredHold]:
    """The script's expired holds, 4 items each: hold id, usd and tokens charged, the hold's event."""
    out = []
    for i in range(0, len(flat), 4):
        hid, usd, tokens, raw = flat[i: i + 4]
        charged = {k: int(v) for k, v in (("usd", usd), ("tokens", tokens)) if int(v)}
        out.append(ExpiredHold(hid, charged, _expired_event(now, int(usd), raw) if raw else None))
    return out


def _release_args(hold_id: str, now: float, event: Event | None) -> list[str]:
    return ["release", hold_id, repr(now), event.to_json() if event else ""]


def _marks(alerts: Sequence[AlertMark]) -> str:
    return json.dumps([[m.key, m.body] for m in alerts])


def _alerts(flat: Sequence[str]) -> list[OutboxAlert]:
    """The script's alerts, 9 items each: key, created, body, status, attempts, next_at, error,
    sent_at ('' for none), done (JSON)."""
    out = []
    for i in range(0, len(flat), 9):
        key, created, body, status, attempts, next_at, error, sent_at, done = flat[i: i + 9]
        out.append(OutboxAlert(key, float(created), body, status, int(attempts), float(next_at), error,
                               float(sent_at) if sent_at else None, tuple(json.loads(done or "[]"))))
    return out


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
    return event_of_doc(doc)
