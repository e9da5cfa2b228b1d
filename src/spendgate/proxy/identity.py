"""Who sent a request: credentials, session, user and tags from headers and body.

The client's own provider key is forwarded and counted under ``key`` = a hash of it, never stored
raw. A spendgate virtual key (``sg-…``, stored hashed) is swapped for the provider key configured
in the environment (``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``), and brings its user and team.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendgate.ledger import Ledger
from spendgate.request import Identity, hash_key

SESSION_HEADERS = ("x-spendgate-session", "x-claude-code-session-id", "session-id")
PROVIDER_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
RECORD = "vkey"


@dataclass(frozen=True, slots=True)
class Credentials:
    """The credential a client sent, and the header value to forward upstream (None: none)."""

    key_hash: str | None
    forward: str | None
    virtual: Mapping[str, Any] | None = None


def credentials(provider: str, headers: Mapping[str, str], store: Ledger) -> Credentials:
    raw = headers.get("x-api-key") if provider == "anthropic" else None
    auth = headers.get("authorization", "")
    if not raw and auth.lower().startswith("bearer "):
        raw = auth[7:].strip()
    if not raw:
        return Credentials(None, None)
    if raw.startswith("sg-"):
        rec = store.get_record(RECORD, hash_key(raw), now=time.time())
        if rec is None:
            raise PermissionError("unknown or revoked spendgate key")
        info = json.loads(rec)
        real = os.environ.get(PROVIDER_KEY_ENV.get(provider, ""), "")
        if not real:
            raise LookupError(f"virtual key accepted, but no {PROVIDER_KEY_ENV.get(provider)} is configured "
                              "for spendgate to forward")
        return Credentials(hash_key(raw), real, info)
    return Credentials(hash_key(raw), raw)


def parse_tags(value: str) -> dict[str, str]:
    """``feature=search, team=ml`` -> {"feature": "search", "team": "ml"}; malformed parts raise."""
    tags: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ValueError(f"X-Spendgate-Tags: expected key=value pairs, got {part.strip()!r}")
        tags[k.strip()] = v.strip()
    return tags


def identity(provider: str, headers: Mapping[str, str], body: Mapping[str, Any], creds: Credentials) -> Identity:
    tags = parse_tags(headers.get("x-spendgate-tags", ""))
    virtual = creds.virtual or {}
    user = headers.get("x-spendgate-user") or virtual.get("user") or tags.get("user")
    if not user:
        if provider == "openai" and isinstance(body.get("user"), str):
            user = body["user"]
        meta = body.get("metadata")
        if provider == "anthropic" and isinstance(meta, Mapping) and isinstance(meta.get("user_id"), str):
            user = meta["user_id"][:200]
    session = next((headers[h] for h in SESSION_HEADERS if headers.get(h)), None)
    return Identity(key=creds.key_hash, user=user or None, team=virtual.get("team") or tags.get("team"),
                    session=session, agent=headers.get("x-spendgate-agent") or tags.get("agent"),
                    feature=tags.get("feature"), tags=tags)


def create_virtual_key(store: Ledger, user: str | None, team: str | None) -> str:
    key = "sg-" + secrets.token_urlsafe(24)
    info = {"user": user, "team": team, "created": time.time(), "id": hash_key(key)[:8]}
    store.put_record(RECORD, hash_key(key), json.dumps(info))
    return key


def list_virtual_keys(store: Ledger) -> list[dict[str, Any]]:
    return [json.loads(v) for _, v in store.records(RECORD, now=time.time())]


def revoke_virtual_key(store: Ledger, key_id: str) -> bool:
    for k, v in store.records(RECORD, now=time.time()):
        if json.loads(v).get("id") == key_id or k.startswith(key_id):
            store.delete_record(RECORD, k)
            return True
    return False
