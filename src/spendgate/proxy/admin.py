"""``/spendgate/…``: status, spend, decisions and approvals, behind the admin token."""

from __future__ import annotations

import hmac
import json
import time
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from aiohttp import web

from spendgate.errors import SpendgateError
from spendgate.money import nanos_to_usd
from spendgate.proxy import approvals
from spendgate.report import report, status

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
        """For load balancers: no token, no numbers; 503 while the store cannot be reached."""
        try:
            proxy.store.get_record("health", "probe", now=time.time())
        except SpendgateError as exc:
            return web.json_response({"ok": False, "store": str(exc)}, status=503)
        return web.json_response({"ok": True})

    app.router.add_get("/spendgate/health", health)
    app.router.add_get("/spendgate/status", guard(_status))
    app.router.add_get("/spendgate/spend", guard(_spend))
    app.router.add_get("/spendgate/decisions", guard(_decisions))
    app.router.add_get("/spendgate/approvals", guard(_approvals))
    app.router.add_post("/spendgate/approvals/{id}", guard(_answer))


def _err(status_code: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status_code)


async def _status(request: web.Request, proxy: Proxy) -> web.Response:
    rows = status(proxy.store)
    return web.json_response({"buckets": [
        {"bucket": b.key, "unit": b.unit, "spent": _amt(st.spent, b.unit), "held": _amt(st.held, b.unit),
         "limit": _amt(st.limit + st.granted, b.unit) if st.limit is not None else None,
         "granted": _amt(st.granted, b.unit)} for b, st in rows]})


async def _spend(request: web.Request, proxy: Proxy) -> web.Response:
    by = [f for f in request.query.get("by", "model").split(",") if f]
    rows = report(proxy.store, by, request.query.get("since", "24h"))
    return web.json_response({"by": by, "rows": [r.as_dict(by) for r in rows]})


async def _decisions(request: web.Request, proxy: Proxy) -> web.Response:
    since = time.time() - float(request.query.get("seconds", "3600"))
    events = proxy.store.events(since)
    return web.json_response({"events": [json.loads(e.to_json()) for e in events[-500:]]})


async def _approvals(request: web.Request, proxy: Proxy) -> web.Response:
    return web.json_response({"pending": [_pending(p) for p in approvals.pending(proxy.store)]})


async def _answer(request: web.Request, proxy: Proxy) -> web.Response:
    hold_id = request.match_info["id"]
    try:
        doc = await request.json() if request.can_read_body else {}
    except ValueError:
        return _err(400, "body must be JSON: {\"approve\": true, \"max_usd\": 5} or {\"deny\": true}")
    try:
        if doc.get("deny"):
            p = approvals.deny(proxy.store, hold_id)
        else:
            raw = doc.get("max_usd")
            try:
                max_usd = Decimal(str(raw)) if raw is not None else None
            except InvalidOperation:
                return _err(400, f"max_usd: expected a number of dollars, got {raw!r}")
            p = approvals.approve(proxy.store, hold_id, max_usd)
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
