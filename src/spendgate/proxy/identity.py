"""Who sent a request: credentials, session, user and tags from headers and body.

The client's own provider key is forwarded and counted under ``key`` = a hash of it, never stored
raw. A spendgate virtual key (``sg-…``, :mod:`spendgate.keys`) is swapped for the provider key
configured in the environment (``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``).

**Who controls what.** What a virtual key binds (user, team, tags) is the operator's word and no
header or body field overrides it. A client fills only what the key leaves open: its session, its
agent, tags the key does not set, and — for a key without a user, or the client's own provider key
— its user (``X-Spendgate-User``, OpenAI ``user``, Anthropic ``metadata.user_id``). Because clients
choose sessions, the defaults also count every key (``key-day``), which no client can rotate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendgate import keys
from spendgate.ledger import Ledger
from spendgate.request import Identity, hash_key, parse_tags

SESSION_HEADERS = ("x-spendgate-session", "x-claude-code-session-id", "session-id")
PROVIDER_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass(frozen=True, slots=True)
class Credentials:
    """The credential a client sent, and the header value to forward upstream (None: none)."""

    key_hash: str | None
    forward: str | None
    virtual: keys.VirtualKey | None = None


CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


def credentials(provider: str, headers: Mapping[str, str], store: Ledger) -> Credentials:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        for name in CREDENTIAL_HEADERS:
            if len(getall(name, ())) > 1:
                # one copy would be counted and another forwarded: the budget must follow the key billed
                raise PermissionError(f"the request carries more than one {name} header; send one credential")
    raw = headers.get("x-api-key") if provider == "anthropic" else None
    auth = headers.get("authorization", "")
    if not raw and auth.lower().startswith("bearer "):
        raw = auth[7:].strip()
    if not raw:
        return Credentials(None, None)
    if raw.startswith("sg-"):
        vkey = keys.lookup(store, raw, now=time.time())
        if vkey is None:
            raise PermissionError("unknown or revoked spendgate key")
        real = os.environ.get(PROVIDER_KEY_ENV.get(provider, ""), "")
        if not real:
            raise LookupError(f"virtual key accepted, but no {PROVIDER_KEY_ENV.get(provider)} is configured "
                              "for spendgate to forward")
        return Credentials(hash_key(raw), real, vkey)
    return Credentials(hash_key(raw), raw)


def _client_user(provider: str, headers: Mapping[str, str], body: Mapping[str, Any],
                 tags: Mapping[str, str]) -> str | None:
    user = headers.get("x-spendgate-user") or tags.get("user")
    if user:
        return user
    if provider == "openai" and isinstance(body.get("user"), str):
        return str(body["user"]) or None
    meta = body.get("metadata")
    if provider == "anthropic" and isinstance(meta, Mapping) and isinstance(meta.get("user_id"), str):
        return str(meta["user_id"])[:200] or None
    return None


def identity(provider: str, headers: Mapping[str, str], body: Mapping[str, Any], creds: Credentials) -> Identity:
    try:
        tags = parse_tags(headers.get("x-spendgate-tags", ""))
    except ValueError as exc:
        raise ValueError(f"X-Spendgate-Tags: {exc}") from None
    vkey = creds.virtual
    bound: dict[str, str] = {}  # what the key says: it wins over every header, tag and body field
    if vkey is not None:
        bound.update(vkey.tags)
        bound.update({k: v for k, v in (("user", vkey.user), ("team", vkey.team)) if v})
    tags.update(bound)  # so a rule matching a tag sees the key's value whether or not the client sent it
    user = bound.get("user") or _client_user(provider, headers, body, tags)
    session = next((headers[h] for h in SESSION_HEADERS if headers.get(h)), None)
    agent = bound.get("agent") or headers.get("x-spendgate-agent") or tags.get("agent")
    return Identity(key=creds.key_hash, user=user or None, team=tags.get("team") or None, session=session,
                    agent=agent, feature=tags.get("feature"), tags=tags)
