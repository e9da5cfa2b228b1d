"""Virtual keys (``sg-…``): what an operator binds to a credential, which no request can change.

A key is stored under the hash of its secret (never the secret). It binds a user, a team, tags and
a pre-approval ceiling (``--preapprove-max``: how much ``X-Spendgate-Allow`` may grant for requests
made with it). The proxy swaps the key for the provider key configured in its environment; the
CLI, the admin API and the proxy all read keys through this module.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from spendgate.ledger import Ledger
from spendgate.request import hash_key

RECORD = "vkey"


@dataclass(frozen=True, slots=True)
class VirtualKey:
    id: str
    user: str | None = None
    team: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    #: the most ``X-Spendgate-Allow`` may grant per bucket and window for this key (None: the policy's)
    preapprove_max_usd: Decimal | None = None
    created: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "user": self.user, "team": self.team, "tags": dict(self.tags),
                           "preapprove_max_usd": None if self.preapprove_max_usd is None
                           else str(self.preapprove_max_usd), "created": self.created})

    @classmethod
    def from_json(cls, raw: str) -> VirtualKey:
        d: dict[str, Any] = json.loads(raw)
        pre = d.get("preapprove_max_usd")
        return cls(id=str(d["id"]), user=d.get("user"), team=d.get("team"), tags=dict(d.get("tags") or {}),
                   preapprove_max_usd=Decimal(pre) if pre is not None else None,
                   created=float(d.get("created", 0.0)))

    def as_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())  # type: ignore[no-any-return]


def create(store: Ledger, *, user: str | None = None, team: str | None = None,
           tags: Mapping[str, str] | None = None, preapprove_max_usd: Decimal | None = None) -> tuple[str, VirtualKey]:
    """A new key: its secret (shown once) and what it binds."""
    secret = "sg-" + secrets.token_urlsafe(24)
    key = VirtualKey(hash_key(secret)[:8], user, team, dict(tags or {}), preapprove_max_usd, time.time())
    store.put_record(RECORD, hash_key(secret), key.to_json())
    return secret, key


def lookup(store: Ledger, secret: str, *, now: float) -> VirtualKey | None:
    raw = store.get_record(RECORD, hash_key(secret), now=now)
    return VirtualKey.from_json(raw) if raw is not None else None


def list_keys(store: Ledger) -> list[VirtualKey]:
    return [VirtualKey.from_json(v) for _, v in store.records(RECORD, now=time.time())]


def revoke(store: Ledger, key_id: str) -> bool:
    for k, v in store.records(RECORD, now=time.time()):
        if VirtualKey.from_json(v).id == key_id or k.startswith(key_id):
            store.delete_record(RECORD, k)
            return True
    return False
