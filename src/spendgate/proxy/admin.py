"""``/spendgate/…``: status, spend, decisions and approvals, behind the admin token; and non-LLM
spend (``/spendgate/charge``, ``/spendgate/reserve``) for tools in other processes, with the
caller's own key."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from spendgate import approvals, keys, providers
from spendgate.engine import Approval, Decision, fixed_estimate
from spendgate.errors import SpendgateError, StoreError
from spendgate.money import nanos_to_usd
from spendgate.proxy.budgets import add_budget_routes
from spendgate.proxy.envelope import error_response
from spendgate.proxy.identity import CREDENTIAL_HEADERS, Credentials, identity, virtual_credentials
from spendgate.report import approvals as approvals_since
from spendgate.report import event_dict, report, status
from spendgate.request import TOOL, Identity, tool_request, usd_arg

if TYPE_CHECKING:
    from spendgate.proxy.app import Proxy


def add_routes(app: web.Application, proxy: Proxy) -> None:
    def guard(handler: Any) -> Any:
        async def checked(request: web.Request) -> web.StreamResponse:
            token = proxy.config.admin_token
            if not token:
                return _err(403, "the admin API is off: start spendgate serve with --admin-token or "
                                 "SPENDGATE_ADMIN_TOKEN")
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(sent.encode(), token.encode()):
                return _err(401, "admin token missing or wrong (Authorization: Bearer <token>)")
            try:
                result: web.StreamResponse = await handler(request, proxy)
            except SpendgateError as exc:
                return _err(400, str(exc))
            return result
        return checked

    async def health(request: web.Request) -> web.Response:
        """For load balancers: no token, no numbers; 503 while the store cannot take what a request
        needs — a write (a read-only file, a full disk, a file deleted under the server all fail)."""
        try:
            await asyncio.to_thread(proxy.store.check, time.time())
        except SpendgateError as exc:
            return web.json_response({"ok": False, "store": str(exc)}, status=503)
        return web.json_response({"ok": True})

    app.router.add_get("/spendgate/health", health)
    app.router.add_get("/spendgate/status", guard(_status))
    app.router.add_get("/spendgate/spend", guard(_spend))
    app.router.add_get("/spendgate/decisions", guard(_decisions))
    app.router.add_get("/spendgate/approvals", guard(_approvals))
    app.router.add_post("/spendgate/approvals/{id}", guard(_answer))
    add_budget_routes(app, proxy, guard)
    spend_routes(app, proxy)


def _err(status_code: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status_code)


async def _status(request: web.Request, proxy: Proxy) -> web.Response:
    rows = status(proxy.store, on_expired=proxy.engine.emit)
    return web.json_response({"buckets": [
        {"bucket": b.key, "unit": b.unit, "spent": _amt(st.spent, b.unit), "held": _amt(st.held, b.unit),
         "limit": _amt(st.limit + st.granted, b.unit) if st.limit is not None else None,
         "granted": _amt(st.granted, b.unit)} for b, st in rows]})


async def _spend(request: web.Request, proxy: Proxy) -> web.Response:
    by = [f for f in request.query.get("by", "model").split(",") if f]
    since = request.query.get("since", "24h")
    rows = report(proxy.store, by, since, on_expired=proxy.engine.emit)
    return web.json_response({"by": by, "rows": [r.as_dict(by) for r in rows],
                              "approvals": approvals_since(proxy.store, since)})


async def _decisions(request: web.Request, proxy: Proxy) -> web.Response:
    raw = request.query.get("seconds", "3600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        return _err(400, f"seconds: expected a non-negative number of seconds, got {raw!r}")
    since = time.time() - seconds
    events = proxy.store.events(since)
    return web.json_response({"events": [event_dict(e) for e in events[-500:]]})


async def _approvals(request: web.Request, proxy: Proxy) -> web.Response:
    return web.json_response({"pending": [_pending(p) for p in approvals.pending(proxy.store)]})


async def _answer(request: web.Request, proxy: Proxy) -> web.Response:
    hold_id = request.match_info["id"]
    shape = "{\"approve\": true, \"max_usd\": 5} or {\"deny\": true}"
    try:
        doc = await request.json() if request.can_read_body else {}
    except (ValueError, RecursionError):
        return _err(400, f"body must be JSON: {shape}")
    if not isinstance(doc, dict):
        return _err(400, f"body must be a JSON object such as {shape}, got {type(doc).__name__}")
    try:
        if doc.get("deny"):
            p = await asyncio.to_thread(approvals.deny, proxy.store, hold_id, None, "admin API",
                                        proxy.engine.emit)
        else:
            raw = doc.get("max_usd")
            try:
                max_usd = approvals.parse_max(raw) if raw is not None else None
            except ValueError as exc:
                return _err(400, f"max_usd: {exc}")
            p = await asyncio.to_thread(approvals.approve, proxy.store, hold_id, max_usd, None, "admin API",
                                        proxy.engine.emit)
    except KeyError as exc:
        return _err(404, str(exc.args[0]))
    except ValueError as exc:
        return _err(409, str(exc))
    return web.json_response(_pending(p))


def _pending(p: approvals.Pending) -> dict[str, Any]:
    return {"id": p.id, "session": p.session, "rule": p.rule, "estimate_usd": p.estimate_usd,
            "status": p.status, "created": p.created, "expires_at": p.expires_at, "route": p.route,
            "message": p.message}


def _amt(n: int, unit: str) -> str | int:
    return str(nanos_to_usd(n)) if unit == "usd" else n


# -- non-LLM spend, with the caller's own key ---------------------------------------------------

#: the store records of open HTTP reservations, by reservation id (the decision id)
RESERVATION = "tool-reservation"
_SPEND_SHAPE = '{"usd": "0.25", "name": "serpapi", "tags": {"feature": "search"}}'


def spend_routes(app: web.Application, proxy: Proxy) -> None:
    """``POST /spendgate/charge``, ``/spendgate/reserve``, ``/spendgate/reserve/{id}/capture`` and
    ``/release``: the SDK's ``charge`` / ``reserve`` for a tool in another process or language.

    Authenticated with the caller's own key (``Authorization: Bearer`` or ``x-api-key``): a
    spendgate virtual key, whose bindings (user, team, tags) no body field overrides. Not a
    provider key — nothing here calls the provider, so nothing could check one — and not the admin
    token: the spend counts under the caller's budgets. A reservation is kept in the store, so any
    instance sharing it can capture or release it, and only with the key that made it."""

    async def charge(request: web.Request) -> web.StreamResponse:
        return await _tool_spend(request, proxy, reserve=False)

    async def reserve(request: web.Request) -> web.StreamResponse:
        return await _tool_spend(request, proxy, reserve=True)

    async def capture(request: web.Request) -> web.StreamResponse:
        return await _settle_reservation(request, proxy, capture=True)

    async def release(request: web.Request) -> web.StreamResponse:
        return await _settle_reservation(request, proxy, capture=False)

    app.router.add_post("/spendgate/charge", charge)
    app.router.add_post("/spendgate/reserve", reserve)
    app.router.add_post("/spendgate/reserve/{id}/capture", capture)
    app.router.add_post("/spendgate/reserve/{id}/release", release)


#: the spend routes are spendgate's own, answered in the default provider's envelope (OpenAI's)
SPEND_ENVELOPE = providers.default().name


def _spend_err(status_code: int, message: str, code: str | None = None) -> web.Response:
    return error_response(SPEND_ENVELOPE, status_code, f"spendgate: {message}", code=code)


def _caller_credentials(headers: Mapping[str, str], proxy: Proxy) -> Credentials:
    """The caller's key as a proxied request's: a virtual key looked up (nothing is forwarded, so
    no provider key need be configured), a provider key hashed. PermissionError: none, several or
    an unknown virtual key."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        for name in CREDENTIAL_HEADERS:
            if len(getall(name, ())) > 1:
                raise PermissionError(f"the request carries more than one {name} header; send one credential")
    auth = headers.get("authorization", "")
    raw = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "").strip()
    if not raw:
        raise PermissionError("send your own spendgate virtual key (Authorization: Bearer sg-…): the spend "
                              "counts under its budgets")
    if not raw.startswith("sg-"):
        # a provider key is checked by the provider when a request is forwarded; here nothing is,
        # so any string would do, and anyone reaching the port could fill a shared budget with it
        raise PermissionError("the spend routes take a spendgate virtual key (sg-…, from spendgate keys create): "
                              "a provider key cannot be checked without a call to the provider")
    vkey = keys.lookup(proxy.store, raw, now=time.time())
    if vkey is None:
        raise PermissionError("unknown or revoked spendgate key")
    return virtual_credentials(vkey, raw, None)  # counted as the key, whichever secret it sent


def _caller_identity(headers: Mapping[str, str], tags: Mapping[str, str], creds: Credentials,
                     trust_client_capability: bool = False) -> Identity:
    """Who the spend counts under: the proxy's identity from headers, with the body's ``tags`` on
    top — except where the virtual key binds a value, which nothing the caller sends overrides."""
    base = identity(TOOL, headers, {}, creds, trust_client_capability=trust_client_capability)
    vkey = creds.virtual
    bound: dict[str, str] = {}
    if vkey is not None:
        bound.update(vkey.tags)
        bound.update({k: v for k, v in (("user", vkey.user), ("team", vkey.team)) if v})
    merged = {**base.tags, **{k: v for k, v in tags.items() if k not in bound}}

    def pick(name: str) -> str | None:
        return bound.get(name) or tags.get(name) or getattr(base, name)

    # the key's own budget and capability count here as on a proxied call; its model list does
    # not: a tool's name is no model, and a key limited to gpt-4o* may still pay for a search
    return Identity(key=creds.key_hash, user=pick("user"), team=pick("team"),
                    session=tags.get("session") or base.session, agent=pick("agent"), feature=pick("feature"),
                    tags=merged, capability=base.capability, rules=base.rules)


async def _read_spend(request: web.Request, proxy: Proxy, *, amount: bool = True
                      ) -> tuple[Credentials, dict[str, Any], int | None] | web.Response:
    """The caller's credentials, the JSON body and its ``usd`` in nanos — or the error reply."""
    try:
        creds = await proxy._store_io(_caller_credentials, request.headers, proxy)
    except PermissionError as exc:
        return _spend_err(401, str(exc))
    except StoreError as exc:
        return _spend_err(503, f"the spend store failed: {exc}", "spendgate_store_error")
    try:
        doc = await request.json() if request.can_read_body else {}
    except (ValueError, RecursionError):
        return _spend_err(400, f"the body must be JSON such as {_SPEND_SHAPE}")
    if not isinstance(doc, dict):
        return _spend_err(400, f"the body must be a JSON object such as {_SPEND_SHAPE}")
    nanos = None
    if amount:
        if "usd" not in doc:
            return _spend_err(400, f"usd: missing; send the amount in dollars, e.g. {_SPEND_SHAPE}")
        try:
            nanos = usd_arg(doc["usd"])
        except ValueError as exc:
            return _spend_err(400, str(exc))
    return creds, doc, nanos


async def _tool_spend(request: web.Request, proxy: Proxy, *, reserve: bool) -> web.StreamResponse:
    got = await _read_spend(request, proxy)
    if isinstance(got, web.Response):
        return got
    creds, doc, nanos = got
    assert nanos is not None
    tags, name = doc.get("tags", {}), doc.get("name")
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        return _spend_err(400, "tags: expected an object of string values, such as {\"feature\": \"search\"}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        return _spend_err(400, f"name: expected a non-empty string naming the tool, got {name!r}")
    ident = _caller_identity(request.headers, tags, creds, proxy.engine.policy.trust_client_capability)
    req = tool_request(nanos, ident, name, force=not reserve)
    engine = proxy.engine
    now = time.time()
    try:
        if not reserve:
            d, c = await engine.arecord_spend(req, now=now)
            return web.json_response({"decision_id": d.id, "charged_usd": str(nanos_to_usd(c.cost_nanos)),
                                      "model": req.body["model"], "over": list(d.over), "alerts": list(d.alerts),
                                      "notes": list(d.notes)}, headers={"X-Spendgate-Decision": d.id})
        return await _reserve(request, proxy, req, creds, now)
    except StoreError as exc:
        return _spend_err(503, f"the spend store failed, so nothing was {'held' if reserve else 'recorded'}: "
                               f"{exc}", "spendgate_store_error")


async def _reserve(request: web.Request, proxy: Proxy, req: Any, creds: Credentials, now: float
                   ) -> web.StreamResponse:
    """Hold like a proxied request: a refusal is its 402 (a held one approvable by id, and its
    retry with the same body then passes); a hold is kept in the store for capture or release."""
    engine = proxy.engine
    who = req.identity.fingerprint()
    raw = await request.read()
    d = await engine.adecide(req, now=now)
    if d.action == "hold":
        by_id: Approval | None = await proxy._store_io(proxy._approved_by_id, who, raw, now)
        if by_id is not None:
            d = await engine.adecide(req, now=now, approval=by_id)
    if not d.allowed:
        refused: web.Response = await proxy._store_io(proxy._refuse, request, SPEND_ENVELOPE, request.path, raw, d,
                                                       req.identity, who, now, raw, ())
        return refused
    if d.hold_id is None:  # the store failed and the policy says to allow unmetered: nothing to settle
        return web.json_response({"reservation_id": None, "decision_id": d.id, "reserved_usd": "0",
                                  "notes": list(d.notes)})
    expires = now + engine.policy.hold_ttl_s
    record = {"hold_id": d.hold_id, "owner": creds.key_hash, "model": req.body["model"], "nanos": req.fixed_nanos,
              "dims": dict(d.dims)}
    try:
        await proxy._store_io(functools.partial(proxy.store.put_record, RESERVATION, d.id, json.dumps(record),
                                                 expires_at=expires))
    except StoreError:
        await engine.arelease(d)  # a hold nobody could settle would only expire, charged in full
        raise
    remaining = d.remaining_nanos
    return web.json_response({"reservation_id": d.id, "decision_id": d.id,
                              "reserved_usd": str(nanos_to_usd(req.fixed_nanos)), "expires_at": expires,
                              "remaining_usd": str(nanos_to_usd(remaining)) if remaining is not None else None,
                              "capture": f"/spendgate/reserve/{d.id}/capture",
                              "release": f"/spendgate/reserve/{d.id}/release"},
                             headers={"X-Spendgate-Decision": d.id})


async def _settle_reservation(request: web.Request, proxy: Proxy, *, capture: bool) -> web.StreamResponse:
    """Capture (``{"usd": …}``, at most the reservation) or release a reservation, once, with the
    key that made it. Above the reservation: 400 naming both amounts, and the reservation charged."""
    got = await _read_spend(request, proxy, amount=capture)
    if isinstance(got, web.Response):
        return got
    creds, _, nanos = got
    rid = request.match_info["id"]
    now = time.time()
    gone = _spend_err(404, f"no open reservation {rid!r} for this key (unknown, already captured or released, or "
                           f"past its {proxy.engine.policy.hold_ttl_s} s and charged in full)",
                      "spendgate_no_reservation")
    try:
        raw = await proxy._store_io(functools.partial(proxy.store.get_record, RESERVATION, rid, now=now))
        if raw is None or json.loads(raw).get("owner") != creds.key_hash:
            return gone
        raw = await proxy._store_io(functools.partial(proxy.store.take_record, RESERVATION, rid, now=now))
        if raw is None:  # settled by a racing call
            return gone
        rec = json.loads(raw)
        reserved = int(rec["nanos"])
        est = fixed_estimate(TOOL, TOOL, rec["model"], reserved)
        d = Decision(rid, "allow", True, est, {}, hold_id=rec["hold_id"], dims=rec["dims"], at=now)
        if not capture:
            await proxy.engine.arelease(d, now=now)
            return web.json_response({"reservation_id": rid, "released": True, "charged_usd": "0"})
        assert nanos is not None
        if nanos > reserved:
            await proxy.engine.acapture_amount(d, reserved, estimated=True, now=now)
            return _spend_err(400, f"capture of ${nanos_to_usd(nanos)} is above the reservation of "
                                   f"${nanos_to_usd(reserved)}; the reservation (${nanos_to_usd(reserved)}) was "
                                   "charged. Reserve the most a call can cost.", "spendgate_capture_over_reservation")
        charged = await proxy.engine.acapture_amount(d, nanos, now=now)
    except StoreError as exc:
        return _spend_err(503, f"the spend store failed: {exc}", "spendgate_store_error")
    return web.json_response({"reservation_id": rid, "charged_usd": str(nanos_to_usd(nanos)),
                              "captured": charged.captured or charged.spooled})
