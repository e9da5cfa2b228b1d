"""``/spendgate/…``: status, spend, decisions and approvals, behind the admin token."""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from spendgate import approvals
from spendgate.errors import SpendgateError
from spendgate.money import nanos_to_usd
from spendgate.report import approvals as approvals_since
from spendgate.report import event_dict, report, status

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
