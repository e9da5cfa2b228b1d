"""Virtual keys (``sg-…``): what an operator binds to a credential, which no request can change.

A key is stored under the hash of its secret (never the secret). It binds a user, a team, tags and
a pre-approval ceiling (``--preapprove-max``: how much ``X-Spendgate-Allow`` may grant for requests
made with it); and, optionally, its own budget (``--usd``/``--tokens``/``--requests`` per
``--window``), the models it may call (``--models``), when it stops working (``--expires``) and the
capability its requests carry (``--capability``). The proxy swaps the key for the provider key
configured in its environment; the CLI, the admin API and the proxy all read keys through this
module.

**What a key is counted as.** Requests made with a key count under ``key`` = :attr:`VirtualKey.counted_as`:
the hash of the key's *first* secret (16 hex, starting with the key id, so ``pause key=<id>``
names it). Rotating the secret keeps it, so ``per = "key"`` budgets go on counting the same
bucket; a key written before rotation existed is counted as the hash it is stored under, which is
what it was always counted as.

**AWS credentials.** A stock AWS SDK (boto3's ``bedrock-runtime``) signs each request with SigV4
and sends no bearer token to a plain-HTTP endpoint, so ``keys create --aws`` also issues a key an
access key id and secret (:func:`create_aws`). The proxy recomputes the client's signature, so it
needs the secret itself: it is kept as-is in the store's ``vkey-aws`` record, under the access key
id — the store must be trusted as the provider keys in spendgate's environment are (anyone who
reads it can sign as that key). The record names the key's record; revoking the key ends it.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from spendgate.errors import ConfigError
from spendgate.ledger import Ledger
from spendgate.policy.model import CAPABILITIES, Rule
from spendgate.policy.parse import parse_duration, parse_window
from spendgate.request import hash_key

RECORD = "vkey"
#: access key id -> ``{"record": <the key's record name>, "id": <key id>, "secret": <AWS secret>}``
AWS_RECORD = "vkey-aws"


def rule_name(key_id: str) -> str:
    """The name of a key's own budget (its buckets are ``key:<id>|global=(none)…``)."""
    return f"key:{key_id}"


def utc_text(ts: float) -> str:
    """``2026-12-03 14:05:42 UTC``: an instant as every reader of an error sees it the same way."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


@dataclass(frozen=True, slots=True)
class VirtualKey:
    id: str
    user: str | None = None
    team: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    #: the most ``X-Spendgate-Allow`` may grant per bucket and window for this key (None: the policy's)
    preapprove_max_usd: Decimal | None = None
    created: float = 0.0
    #: the key's own budget (None: no limit in that unit), counted over ``window``
    usd: Decimal | None = None
    tokens: int | None = None
    requests: int | None = None
    #: a window as a budget's (``total``, ``day``, ``month``, ``1h``…); None when the key has no budget
    window: str | None = None
    #: model globs the key may call (empty: any model)
    models: tuple[str, ...] = ()
    #: when the key stops working (epoch seconds; None: never)
    expires_at: float | None = None
    #: what its requests may be trusted with (:data:`spendgate.policy.model.CAPABILITIES`)
    capability: str | None = None
    #: what its requests count under as ``key``: the hash of its first secret (kept across rotation)
    counted_as: str | None = None

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "user": self.user, "team": self.team, "tags": dict(self.tags),
                           "preapprove_max_usd": _text(self.preapprove_max_usd), "created": self.created,
                           "usd": _text(self.usd), "tokens": self.tokens, "requests": self.requests,
                           "window": self.window, "models": list(self.models), "expires_at": self.expires_at,
                           "capability": self.capability, "counted_as": self.counted_as})

    @classmethod
    def from_json(cls, raw: str, stored_as: str | None = None) -> VirtualKey:
        """A key as stored; a field a previous version did not write is None (no limit, any model,
        no expiry). ``stored_as`` (the record's name) is what a key that never rotated counts as."""
        d: dict[str, Any] = json.loads(raw)
        pre, usd, exp = d.get("preapprove_max_usd"), d.get("usd"), d.get("expires_at")
        return cls(id=str(d["id"]), user=d.get("user"), team=d.get("team"), tags=dict(d.get("tags") or {}),
                   preapprove_max_usd=Decimal(pre) if pre is not None else None,
                   created=float(d.get("created", 0.0)),
                   usd=Decimal(usd) if usd is not None else None,
                   tokens=_int_or_none(d.get("tokens")), requests=_int_or_none(d.get("requests")),
                   window=d.get("window"), models=tuple(str(m) for m in d.get("models") or ()),
                   expires_at=float(exp) if exp is not None else None, capability=d.get("capability"),
                   counted_as=d.get("counted_as") or stored_as)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())  # type: ignore[no-any-return]

    @property
    def has_budget(self) -> bool:
        return self.usd is not None or self.tokens is not None or self.requests is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def rule(self) -> Rule | None:
        """The key's own budget as a rule: global to the key (its bucket scope is ``global=(none)``
        under a name of its own), a block, immutable — no approval lifts it — and enforced even when
        the policy is in shadow mode: it is what the operator gave this key, whatever other rules say."""
        if not self.has_budget:
            return None
        return Rule(name=rule_name(self.id), window=parse_window(self.window or "total", "--window"),
                    usd=self.usd, tokens=self.tokens, requests=self.requests, per="global", action="block",
                    immutable=True, mode="enforce")


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- reading what an operator typed ----------------------------------------------------------------


def parse_models(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``'gpt-4o*, claude-*'`` -> ("gpt-4o*", "claude-*"); an empty list is refused (it would read
    as "any model")."""
    if text is None:
        return ()
    parts = text.split(",") if isinstance(text, str) else list(text)
    globs = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not globs:
        raise ConfigError(f"--models: expected model names or globs separated by commas such as "
                          f"'gpt-4o*,claude-*', got {text!r}")
    return globs


def parse_expires(text: str, now: float) -> float:
    """``--expires``: a duration from now (``30d``, ``12h``) or an ISO date-time with its offset
    (``2027-01-31T18:00:00+01:00``); a time already past is refused."""
    text = text.strip()
    try:
        return now + parse_duration(text, "--expires")
    except ConfigError:
        pass
    try:
        at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--expires: expected a duration such as 30d or 12h, or a date-time with its offset "
                          f"such as 2027-01-31T18:00:00+01:00; got {text!r}") from None
    if at.tzinfo is None:
        raise ConfigError(f"--expires: give the date-time's offset (2027-01-31T18:00:00+01:00, or Z for UTC), "
                          f"got {text!r}")
    ts = at.timestamp()
    if ts <= now:
        raise ConfigError(f"--expires: {text!r} is already past")
    return ts


def check_capability(value: str, where: str = "--capability") -> str:
    if value not in CAPABILITIES:
        raise ConfigError(f"{where}: expected one of {', '.join(CAPABILITIES)}; got {value!r}")
    return value


def _count(value: int | None, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{where}: expected a whole number ≥ 0, got {value!r}")
    return value


def check_budget(usd: Decimal | None, tokens: int | None, requests: int | None, window: str | None) -> str | None:
    """The window of a key's own budget: ``total`` when limits are given without one; a window with
    no limit, or ``request`` (a key's budget counts many calls), is refused naming ``--window``."""
    if usd is not None and (not usd.is_finite() or usd < 0):
        raise ConfigError(f"--usd: expected a non-negative number of dollars, got {usd!r}")
    _count(tokens, "--tokens")
    _count(requests, "--requests")
    limited = usd is not None or tokens is not None or requests is not None
    if window is None:
        return "total" if limited else None
    if not limited:
        raise ConfigError(f"--window: {window!r} is the window of the key's own budget; give --usd, --tokens "
                          "and/or --requests with it")
    if parse_window(window, "--window").kind == "request":
        raise ConfigError("--window: a key's budget counts many requests; use total, day, week, month or a "
                          "duration such as 24h (a per-call limit is a policy budget's window = \"request\")")
    return window


# -- the store -------------------------------------------------------------------------------------


def create(store: Ledger, *, user: str | None = None, team: str | None = None,
           tags: Mapping[str, str] | None = None, preapprove_max_usd: Decimal | None = None,
           usd: Decimal | None = None, tokens: int | None = None, requests: int | None = None,
           window: str | None = None, models: Iterable[str] = (), expires_at: float | None = None,
           capability: str | None = None, now: float | None = None) -> tuple[str, VirtualKey]:
    """A new key: its secret (shown once) and what it binds. Bad values raise ConfigError naming
    the flag (``--window``, ``--usd`` …) and the value."""
    now = time.time() if now is None else now
    window = check_budget(usd, tokens, requests, window)
    if capability is not None:
        check_capability(capability)
    if expires_at is not None and expires_at <= now:
        raise ConfigError(f"--expires: {utc_text(expires_at)} is already past")
    taken = {k.id for k in list_keys(store)}
    while True:  # a key is named by the first 8 hex of its hash: two keys never share a name (or a budget)
        secret = "sg-" + secrets.token_urlsafe(24)
        stored = hash_key(secret)
        if stored[:8] not in taken:
            break
    key = VirtualKey(stored[:8], user, team, dict(tags or {}), preapprove_max_usd, now, usd, tokens, requests,
                     window, tuple(models), expires_at, capability, stored)
    store.put_record(RECORD, stored, key.to_json())
    return secret, key


def lookup(store: Ledger, secret: str, *, now: float) -> VirtualKey | None:
    """The key ``secret`` opens (None: unknown or revoked). An expired key raises PermissionError
    naming it and when it expired: every door that takes a key answers 401 with that."""
    stored = hash_key(secret)
    raw = store.get_record(RECORD, stored, now=now)
    if raw is None:
        return None
    key = VirtualKey.from_json(raw, stored)
    if key.expired(now):
        assert key.expires_at is not None
        raise PermissionError(f"spendgate key {key.id} expired at {utc_text(key.expires_at)}")
    return key


def list_keys(store: Ledger) -> list[VirtualKey]:
    return [VirtualKey.from_json(v, k) for k, v in store.records(RECORD, now=time.time())]


def _find(store: Ledger, key_id: str) -> tuple[str, VirtualKey] | None:
    """The record of the key with id ``key_id`` (or whose stored hash starts with it)."""
    for k, v in store.records(RECORD, now=time.time()):
        key = VirtualKey.from_json(v, k)
        if key.id == key_id or (len(key_id) >= 8 and k.startswith(key_id)):
            return k, key
    return None


def rotate(store: Ledger, key_id: str, *, now: float | None = None) -> tuple[str, VirtualKey] | None:
    """A new secret for the key ``key_id`` (None: no such key). The key keeps its id, what it binds,
    its budget's buckets and what it counts as; the old secret stops working at once (its record is
    taken once the new one is written, so the key is never without a working secret). The old
    record is read and deleted in one step: when a ``revoke`` or another ``rotate`` took it first,
    the new secret is withdrawn and the answer is None — a revoked key never comes back, and two
    rotations never leave two working secrets."""
    now = time.time() if now is None else now
    found = _find(store, key_id)
    if found is None:
        return None
    old, key = found
    if key.expired(now):
        assert key.expires_at is not None
        raise ConfigError(f"key {key.id} expired at {utc_text(key.expires_at)}; a new secret would not work. "
                          "Create a new key (spendgate keys create)")
    key = replace(key, counted_as=key.counted_as or old)
    secret = "sg-" + secrets.token_urlsafe(24)
    store.put_record(RECORD, hash_key(secret), key.to_json())
    if store.take_record(RECORD, old, now=now) is None:
        store.delete_record(RECORD, hash_key(secret))
        return None
    return secret, key


def revoke(store: Ledger, key_id: str) -> bool:
    """Revoke the key and every AWS credential made for it (a revoked key's secrets must not stay in
    the store: they could sign nothing, but a credential is not kept past its use)."""
    found = _find(store, key_id)
    if found is None:
        return False
    store.delete_record(RECORD, found[0])
    for access_key_id in aws_access_key_ids(store, now=time.time()).get(key_id, ()):
        store.delete_record(AWS_RECORD, access_key_id)
    return True


# -- AWS credentials for a key (SigV4-signing clients) -------------------------------------------------


def create_aws(store: Ledger, key: VirtualKey) -> tuple[str, str]:
    """An AWS access key id and secret access key for ``key`` (module docstring: kept as-is)."""
    record = key.counted_as or ""
    found = _find(store, key.id)
    if found is not None:
        record = found[0]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    access_key_id = "SGAK" + "".join(secrets.choice(alphabet) for _ in range(16))
    secret = secrets.token_urlsafe(30)
    store.put_record(AWS_RECORD, access_key_id, json.dumps({"record": record, "id": key.id, "secret": secret}))
    return access_key_id, secret


def aws_access_key_ids(store: Ledger, *, now: float) -> dict[str, list[str]]:
    """Each key id's AWS access key ids (``keys create --aws``), sorted: what ``keys list`` shows so
    an operator can tell which key a boto3 client's ``aws_access_key_id`` is. The secrets are
    never returned."""
    found: dict[str, list[str]] = {}
    for access_key_id, raw in store.records(AWS_RECORD, now=now):
        try:
            key_id = json.loads(raw).get("id")
        except (ValueError, AttributeError):
            continue  # a record this version cannot read names no key it lists
        if isinstance(key_id, str) and key_id:
            found.setdefault(key_id, []).append(access_key_id)
    return {k: sorted(v) for k, v in found.items()}


def lookup_aws(store: Ledger, access_key_id: str, *, now: float) -> tuple[VirtualKey, str] | None:
    """The key an AWS access key id belongs to and its secret (None: unknown, or its key revoked).
    An expired key raises PermissionError as :func:`lookup` does."""
    raw = store.get_record(AWS_RECORD, access_key_id, now=now)
    if raw is None:
        return None
    d = json.loads(raw)
    record, key_id, secret = str(d.get("record", "")), str(d.get("id", "")), d.get("secret")
    if not isinstance(secret, str) or not secret:
        return None
    stored = store.get_record(RECORD, record, now=now) if record else None
    if stored is not None:
        key = VirtualKey.from_json(stored, record)
    else:  # rotated since: the key's record moved (a revoked key has none, so it is None here)
        found = _find(store, key_id)
        if found is None:
            return None
        key = found[1]
    if key.expired(now):
        assert key.expires_at is not None
        raise PermissionError(f"spendgate key {key.id} expired at {utc_text(key.expires_at)}")
    return key, secret
