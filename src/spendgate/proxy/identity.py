"""Who sent a request: credentials, session, user and tags from headers and body.

The client's own provider key is forwarded and counted under ``key`` = a hash of it, never stored
raw. A spendgate virtual key (``sg-…``, :mod:`spendgate.keys`) is swapped for the provider key
configured in the environment (the provider's ``key_env``: ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``,
``GEMINI_API_KEY`` …).

**Who controls what.** What a virtual key binds (user, team, tags) is the operator's word and no
header or body field overrides it. A client fills only what the key leaves open: its session, its
agent, tags the key does not set, and — for a key without a user, or the client's own provider key
— its user (``X-Spendgate-User``, OpenAI ``user``, Anthropic ``metadata.user_id``). Because clients
choose sessions, the defaults also count every key (``key-day``), which no client can rotate.

A virtual key also brings its own budget (a rule in :attr:`Identity.rules`), the models it may call
and its capability. A request made with it counts under ``key`` = the hash of the key's first
secret (:attr:`spendgate.keys.VirtualKey.counted_as`), so rotating the secret moves no spend to a
new bucket. ``X-Spendgate-Capability`` counts only where the policy trusts clients with it
(``trust_client_capability = true``) and the key binds no capability: a header never widens what
a key allows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendgate import keys, providers
from spendgate.ledger import Ledger
from spendgate.policy.model import CAPABILITIES
from spendgate.request import Identity, hash_key, parse_tags

SESSION_HEADERS = ("x-spendgate-session", "x-claude-code-session-id", "session-id")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The credential a client sent, and the header value to forward upstream (None: none).
    ``key_hash`` is what its requests count under as ``key``: a provider key's hash, or a virtual
    key's :attr:`~spendgate.keys.VirtualKey.counted_as` (stable across rotation)."""

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
    spec = providers.get(provider)
    raw = spec.api_key(headers)
    if not raw:
        return Credentials(None, None)
    if raw.startswith("sg-"):
        vkey = keys.lookup(store, raw, now=time.time())  # an expired key: PermissionError naming it
        if vkey is None:
            raise PermissionError("unknown or revoked spendgate key")
        real = os.environ.get(spec.key_env, "") if spec.key_env else ""
        if not real:
            raise LookupError(f"virtual key accepted, but no {spec.key_env or 'provider key'} is configured "
                              "for spendgate to forward")
        return virtual_credentials(vkey, raw, real)
    return Credentials(hash_key(raw), raw)


def is_virtual(spec: providers.Provider, headers: Mapping[str, str]) -> bool:
    """Whether the request's credential is a spendgate key (looked up in the store) rather than a
    provider's (hashed, no store call)."""
    raw = spec.api_key(headers)
    return raw is not None and raw.startswith("sg-")


def virtual_credentials(vkey: keys.VirtualKey, secret: str, forward: str | None) -> Credentials:
    """A looked-up virtual key's credentials: counted as the key, not as this secret's hash."""
    return Credentials(vkey.counted_as or hash_key(secret), forward, vkey)


def _client_user(provider: str, headers: Mapping[str, str], body: Mapping[str, Any],
                 tags: Mapping[str, str]) -> str | None:
    user = headers.get("x-spendgate-user") or tags.get("user")
    if user:
        return user
    spec = providers.find(provider)
    return spec.body_user(body) if spec is not None else None


def _capability(headers: Mapping[str, str], vkey: keys.VirtualKey | None, trust_client: bool) -> str | None:
    """The key's capability; the client's header only where trusted and the key binds none."""
    if vkey is not None and vkey.capability is not None:
        return vkey.capability
    sent = headers.get("x-spendgate-capability")
    if not trust_client or sent is None:
        return None
    sent = sent.strip()
    if sent not in CAPABILITIES:
        raise ValueError(f"X-Spendgate-Capability: expected one of {', '.join(CAPABILITIES)}; got {sent!r}")
    return sent


def identity(provider: str, headers: Mapping[str, str], body: Mapping[str, Any], creds: Credentials, *,
             trust_client_capability: bool = False) -> Identity:
    """Who sent the request. ``trust_client_capability`` is the policy's: without it the
    ``X-Spendgate-Capability`` header is ignored."""
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
    own = vkey.rule() if vkey is not None else None
    return Identity(key=creds.key_hash, user=user or None, team=tags.get("team") or None, session=session,
                    agent=agent, feature=tags.get("feature"), tags=tags,
                    capability=_capability(headers, vkey, trust_client_capability),
                    models=vkey.models if vkey is not None else (), rules=(own,) if own is not None else ())
