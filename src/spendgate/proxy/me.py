"""``GET /spendgate/me``: the budgets that apply to the caller, read with its own credentials.

An agent plans before it spends: with the provider key or virtual key it sends requests with (no
admin token), it asks what each budget it is counted under allows — limit, spent, held, remaining,
window, when it resets — and gets the same numbers ``spendgate status --json`` shows for those
buckets.

**Only the caller's own.** The scopes listed are those the credential itself fixes: the key (its
hash), what a virtual key binds (user, team, tags) and the key's own budget; ``global`` rules show
the shared total. What a client merely claims in a header (``X-Spendgate-User``, a session, an
agent, tags) is not read here, since any client may claim anyone's: a session budget is shown for
the session a request without a session header counts under (``key:<hash>``). Rules counted per
model, provider or tier depend on the request's model; they are listed with their match and scope
"per request's model" (provider, tier) and no numbers. ``window = "request"`` rules are per-call
limits: listed with their limit, nothing spent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from spendgate import keys, providers
from spendgate.errors import StoreError
from spendgate.money import nanos_to_usd, usd_to_nanos
from spendgate.proxy.envelope import error_response
from spendgate.proxy.identity import Credentials, credentials, identity
from spendgate.request import Identity, hash_key

if TYPE_CHECKING:
    from spendgate.ledger import Ledger
    from spendgate.policy.model import Match, Rule
    from spendgate.proxy.app import Proxy

#: ``per`` values whose scope depends on the request, not on who sends it
PER_REQUEST = ("model", "provider", "tier")


def add_routes(app: web.Application, proxy: Proxy) -> None:
    async def handler(request: web.Request) -> web.Response:
        return await me(request, proxy)

    app.router.add_get("/spendgate/me", handler)


async def me(request: web.Request, proxy: Proxy) -> web.Response:
    provider = providers.by_headers(request.headers).name
    try:
        creds = await _io(proxy.store, _credentials, provider, request.headers, proxy.store)
    except PermissionError as exc:
        return error_response(provider, 401, f"spendgate: {exc}")
    except StoreError as exc:
        return error_response(provider, 503, f"spendgate: the spend store failed: {exc}",
                              code="spendgate_store_error")
    if creds.key_hash is None:
        return error_response(provider, 401, "spendgate: send your own credentials (Authorization: Bearer <key>, "
                                             "or x-api-key) to read the budgets that apply to them")
    # read from the credential alone: what a header claims (a user, a session, tags) is not shown
    ident = identity(provider, {}, {}, creds)
    now = time.time()
    try:
        budgets = await _io(proxy.store, budgets_of, proxy, ident, now, creds.virtual is not None)
    except StoreError as exc:
        return error_response(provider, 503, f"spendgate: the spend store failed: {exc}",
                              code="spendgate_store_error")
    vkey = creds.virtual
    return web.json_response({
        "key": ident.key, "virtual_key": vkey.id if vkey is not None else None,
        "user": ident.user, "team": ident.team, "policy_hash": proxy.engine.policy_hash,
        "policy_version": proxy.engine.policy.version, "budgets": budgets})


def _credentials(provider: str, headers: Mapping[str, str], store: Ledger) -> Credentials:
    """As a proxied request reads them; a virtual key is read even where no provider key is
    configured to forward it to (nothing is forwarded here)."""
    try:
        return credentials(provider, headers, store)
    except LookupError:
        raw = providers.get(provider).api_key(headers) or ""
        vkey = keys.lookup(store, raw, now=time.time())
        if vkey is None:
            raise PermissionError("unknown or revoked spendgate key") from None
        return Credentials(getattr(vkey, "counted_as", None) or hash_key(raw), None, vkey)


async def _io(store: Ledger, fn: Any, *args: Any) -> Any:
    """A networked store's sync client runs on a worker thread, never on the event loop."""
    if store.networked:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def budgets_of(proxy: Proxy, ident: Identity, now: float, shared: bool = True) -> list[dict[str, Any]]:
    """Every budget that applies to ``ident``: one entry per bucket (rule, unit) of a windowed rule
    in the caller's own scope, per-call limits, and per-model rules without numbers. ``shared``
    False (a provider key, which spendgate cannot check: any string would do) leaves out the
    numbers of budgets every caller shares (``per = "global"``): what others spent is not shown to
    whoever reaches the port."""
    engine = proxy.engine
    rules: list[Rule] = [*engine.policy.rules, *ident.rules]
    out: list[dict[str, Any]] = []
    counted: list[tuple[dict[str, Any], Any]] = []
    for rule in rules:
        base: dict[str, Any] = {"rule": rule.name, "window": rule.window.text or rule.window.kind,
                                "match": _match(rule.match), "action": rule.action,
                                "mode": engine.policy.mode_of(rule)}
        if rule.window.kind == "request":
            for unit, limit in (("usd", rule.usd), ("tokens", rule.tokens)):
                if limit is not None:
                    lim = usd_to_nanos(limit) if unit == "usd" else int(limit)
                    out.append({**base, "scope": "each request", "unit": unit, "limit": _amount(lim, unit),
                                "spent": None, "held": None, "remaining": None, "resets_at": None,
                                "bucket": None})
            continue
        if rule.per in PER_REQUEST or (rule.per == "global" and not shared):
            scope_text = "all requests (numbers shown to spendgate keys)" if rule.per == "global" \
                else f"per request's {rule.per}"
            out.append({**base, "scope": scope_text, "unit": None, "limit": None, "spent": None,
                        "held": None, "remaining": None, "resets_at": None, "bucket": None})
            continue
        scope = f"{rule.per}={ident.value(rule.per)}"
        for rb in engine.buckets_for(rule, scope, now):
            entry: dict[str, Any] = {**base, "scope": scope, "unit": rb.unit, "bucket": rb.key}
            out.append(entry)
            counted.append((entry, rb))
    states = proxy.store.states([rb.bucket() for _, rb in counted], now=now) if counted else []
    for (entry, rb), st in zip(counted, states, strict=True):
        limit = rb.limit + st.granted
        entry.update({"limit": _amount(limit, rb.unit), "spent": _amount(st.spent, rb.unit),
                      "held": _amount(st.held, rb.unit),
                      "remaining": _amount(max(0, limit - st.spent - st.held), rb.unit),
                      "resets_at": rb.resets_at if rb.resets_at is not None else st.frees_at})
    return out


def _amount(n: int, unit: str) -> str | int:
    """Dollars as exact text ("0.012345"), tokens and requests as whole numbers."""
    return str(nanos_to_usd(n)) if unit == "usd" else int(n)


def _match(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.models:
        out["models"] = list(m.models)
    if m.providers:
        out["providers"] = list(m.providers)
    if m.tiers:
        out["tiers"] = list(m.tiers)
    if m.tags:
        out["tags"] = {k: list(v) for k, v in m.tags.items()}
    return out
