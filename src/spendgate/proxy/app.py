"""The proxy: decide, forward, meter, settle — one request path, top to bottom.

aiohttp serves and a pooled aiohttp client forwards (README: "Why aiohttp"). The engine's async
methods run a local store's calls inline (a decision costs less than a thread hop would) and a
networked store's through its asyncio client, so a round trip never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from spendgate import ledger as ledger_mod
from spendgate.engine import Approval, Decision, Engine
from spendgate.errors import BadRequest, StoreError, UnpricedModel
from spendgate.estimate.tokens import preload
from spendgate.money import nanos_to_usd
from spendgate.policy import Policy
from spendgate.proxy import admin, approvals
from spendgate.proxy.envelope import error_response
from spendgate.proxy.identity import Credentials, credentials, identity
from spendgate.request import Request
from spendgate.usage import usage_from_body
from spendgate.wire.edits import outgoing
from spendgate.wire.stream import StreamMeter

log = logging.getLogger("spendgate.proxy")
T = TypeVar("T")

#: Priced routes: path -> provider.
ROUTES = {
    "/v1/chat/completions": "openai",
    "/v1/responses": "openai",
    "/v1/completions": "openai",
    "/v1/embeddings": "openai",
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic",
}
DEFAULT_UPSTREAMS = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
                        "content-encoding"})
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "cookie"})


@dataclass
class ProxyConfig:
    upstreams: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_UPSTREAMS))
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_timeout_s: float = 600.0
    admin_token: str | None = None

    @classmethod
    def from_policy(cls, policy: Policy, admin_token: str | None = None) -> ProxyConfig:
        ups = dict(DEFAULT_UPSTREAMS)
        ups.update(policy.upstream)
        for provider in ("openai", "anthropic"):
            env = os.environ.get(f"SPENDGATE_{provider.upper()}_BASE_URL")
            if env:
                ups[provider] = env
        return cls(upstreams={k: _base(v) for k, v in ups.items()}, admin_token=admin_token)


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class Proxy:
    """Everything a request needs, built once per server."""

    def __init__(self, engine: Engine, config: ProxyConfig) -> None:
        self.engine = engine
        self.store = engine.ledger
        self.config = config
        self.recent = approvals.RecentRefusals()
        #: bodies this instance held, so only their retries look for an approval given by id
        self.held_bodies: dict[str, float] = {}
        self.client: aiohttp.ClientSession | None = None
        self._settling: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        for path in ROUTES:
            app.router.add_post(path, self.guarded)
        app.router.add_get("/v1/models", self.passthrough)
        admin.add_routes(app, self)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        preload()  # the vocabularies load before the first request, not during it
        if self.store.networked and self.engine.aledger is None:
            from spendgate.ledger.redis import AsyncRedisLedger

            # the request path talks to a networked store through its asyncio client, on this loop
            self.engine.aledger = AsyncRedisLedger(self.store.url)
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.config.upstream_timeout_s),
            auto_decompress=False,
        )

    async def _stop(self, _: web.Application) -> None:
        await self.settled()
        if self.client is not None:
            await self.client.close()
        close = getattr(self.engine.aledger, "close", None)
        if close is not None:
            await close()

    # -- routes -------------------------------------------------------------------------------

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        provider = "anthropic" if ("x-api-key" in request.headers or "anthropic-version" in request.headers) \
            else "openai"
        if request.method == "POST":
            return error_response(provider, 404, f"spendgate: {request.path} is not a route spendgate can price, "
                                                 "so it is refused; priced routes are " + ", ".join(ROUTES),
                                  code="spendgate_unknown_route")
        return error_response(provider, 404, f"spendgate: no such route {request.method} {request.path}")

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Free routes with no body to price (``GET /v1/models``)."""
        return await self._forward_plain(request, "openai", None, b"", None)

    async def guarded(self, request: web.Request) -> web.StreamResponse:
        provider = ROUTES[request.path]
        route = request.path
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(provider, 413, f"spendgate: request body over the "
                                                 f"{self.config.max_body_bytes:,}-byte limit")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error_response(provider, 400, f"spendgate: the request body is not valid JSON ({exc})")
        if not isinstance(body, dict):
            return error_response(provider, 400, "spendgate: the request body must be a JSON object")
        try:
            creds = await self._store_io(credentials, provider, request.headers, self.store)
            ident = identity(provider, request.headers, body, creds)
        except PermissionError as exc:
            return error_response(provider, 401, f"spendgate: {exc}")
        except (LookupError, ValueError) as exc:
            return error_response(provider, 400, f"spendgate: {exc}")
        if route == "/v1/messages/count_tokens":
            return await self._forward_plain(request, provider, creds, raw, None)
        return await self._decide_and_forward(request, provider, route, raw, body, creds, ident)

    async def _decide_and_forward(self, request: web.Request, provider: str, route: str, raw: bytes,
                                  body: dict[str, Any], creds: Credentials, ident: Any) -> web.StreamResponse:
        now = time.time()
        session = ident.value("session")
        dry = request.headers.get("x-spendgate-estimate") == "1"
        try:
            approval, send, body, early = await self._store_io(self._answers, provider, route, raw, body, session,
                                                               request.headers, now)
        except ValueError as exc:
            return error_response(provider, 400, f"spendgate: {exc}")
        if early is not None:
            return early
        if approval is None and not dry:
            repeat = self.recent.get(session, raw, now)
            if repeat is not None:
                status, payload, headers = repeat
                return web.Response(status=status, body=payload, content_type="application/json", headers=headers)
        req = Request(provider, route, body, ident)
        try:
            d = await self.engine.adecide(req, now=now, approval=approval)
        except BadRequest as exc:
            return error_response(provider, 400, f"spendgate: {exc}", code="spendgate_unpriceable")
        except UnpricedModel as exc:
            return error_response(provider, 402, f"spendgate: {exc}", code="spendgate_unpriced")
        except StoreError as exc:
            return error_response(provider, 503, f"spendgate: the spend store failed, so the request was not "
                                                 f"sent: {exc}", code="spendgate_store_error")
        if dry:
            await self.engine.arelease(d, now=now)
            return web.json_response({"spendgate": d.to_dict(), "allowed": d.allowed,
                                      "message": d.message or (d.estimate.describe() if d.estimate else ""),
                                      "edits": dict(d.edits)}, headers={"X-Spendgate-Decision": d.id})
        if not d.allowed:
            return await self._store_io(self._refuse, request, provider, route, send, d, session, now, raw)
        out, withhold = outgoing(route, send, d)
        return await self._forward_plain(request, provider, creds, out, d, withhold)

    def _answers(self, provider: str, route: str, raw: bytes, body: dict[str, Any], session: str,
                 headers: Mapping[str, str], now: float
                 ) -> tuple[Approval | None, bytes, dict[str, Any], web.StreamResponse | None]:
        """A person's answer to a hold, if this request carries one: the latest user turn, the
        X-Spendgate-Allow header, or an approval given by id."""
        text, handle = approvals.latest_user_text(provider, route, body)
        ans = approvals.read_answer(text)
        if ans is not None and ans.directive:
            stripped = approvals.strip_directive(route, body, handle)
            return (Approval(ans.max_usd, by="in-band directive"), json.dumps(stripped).encode(), stripped, None)
        if ans is not None:
            held = approvals.latest_for_session(self.store, session, now)
            if held is not None and not ans.yes:
                approvals.deny(self.store, held.id, now)
                return None, raw, body, error_response(
                    provider, 402, f"spendgate: you declined held request {held.id}; it was not sent. The "
                                   f"session's budget \"{held.rule}\" stays in force.",
                    code="spendgate_denied", extra={"decision_id": held.id, "action": "denied", "rule": held.rule})
            if held is not None:
                held.status = "approved"
                self.store.put_record(approvals.KIND, held.id, held.to_json(), expires_at=held.expires_at)
                replay = held.body  # the held request itself, byte for byte, answers the "yes"
                return Approval(ans.max_usd, by="in-band yes"), replay, json.loads(replay), None
        allow = headers.get("x-spendgate-allow")
        if allow is not None:
            return Approval(approvals.parse_allow_header(allow), by="X-Spendgate-Allow"), raw, body, None
        key = approvals.once_key(session, raw)
        if self.held_bodies.get(key, 0) > now and \
                self.store.take_record(approvals.ONCE, key, now=now) is not None:
            return Approval(by="spendgate approve"), raw, body, None  # approved by id, retried as held
        return None, raw, body, None

    def _refuse(self, request: web.Request, provider: str, route: str, body: bytes, d: Decision, session: str,
                now: float, raw: bytes) -> web.Response:
        extra = d.to_dict()
        if d.action == "hold":
            safe = {k: v for k, v in request.headers.items()
                    if k.lower() not in CREDENTIAL_HEADERS and k.lower() not in HOP_BY_HOP}
            held = approvals.keep(self.store, d, session, provider, route, request.query_string, body, safe, now)
            if len(self.held_bodies) > 10_000:
                self.held_bodies = {k: t for k, t in self.held_bodies.items() if t > now}
            self.held_bodies[approvals.once_key(session, body)] = held.expires_at
            extra["approval"] = {"id": held.id, "expires_at": held.expires_at,
                                 "how": f"spendgate approve {held.id} [--max USD]; POST /spendgate/approvals/"
                                        f"{held.id}; or reply 'yes' (optionally 'yes max=$5')"}
        headers = {"X-Spendgate-Decision": d.id}
        if d.trip is not None and d.trip.resets_at is not None:
            headers["Retry-After"] = str(max(1, math.ceil(d.trip.resets_at - now)))
        resp = error_response(provider, 402, d.message, code="spendgate_blocked", extra=extra, headers=headers)
        assert isinstance(resp.body, bytes)
        self.recent.put(session, raw, (402, resp.body, headers), now)
        return resp

    # -- forwarding ---------------------------------------------------------------------------

    def _upstream_headers(self, request: web.Request, creds: Credentials | None) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-spendgate-")}
        headers["Accept-Encoding"] = "identity"  # usage must be readable; a compressed body is not
        if creds is not None and creds.virtual is not None and creds.forward:
            headers.pop("Authorization", None)
            headers.pop("authorization", None)
            if "x-api-key" in {k.lower() for k in headers}:
                headers = {k: v for k, v in headers.items() if k.lower() != "x-api-key"}
                headers["x-api-key"] = creds.forward
            else:
                headers["Authorization"] = f"Bearer {creds.forward}"
        return headers

    async def _forward_plain(self, request: web.Request, provider: str, creds: Credentials | None, body: bytes,
                             d: Decision | None, withhold: bool = False) -> web.StreamResponse:
        assert self.client is not None
        url = self.config.upstreams[provider] + request.path
        if request.query_string:
            url += "?" + request.query_string
        headers = self._upstream_headers(request, creds)
        try:
            up_cm = self.client.request(request.method, url, data=body if request.method == "POST" else None,
                                        headers=headers)
            async with up_cm as up:
                if up.content_type == "text/event-stream" and up.status < 400:
                    return await self._relay_stream(request, provider, up, d, withhold)
                data = await up.read()
                if d is not None:
                    await self._settle(self._settle_plain(up.status, data, d))
                return web.Response(status=up.status, body=data, headers=self._reply_headers(up.headers, d))
        except aiohttp.ClientConnectorError as exc:
            await self._release(d)
            return error_response(provider, 502, f"spendgate: cannot reach the {provider} upstream at "
                                                 f"{self.config.upstreams[provider]} ({exc.os_error or exc}); "
                                                 "nothing was sent, nothing charged", code="spendgate_upstream")
        except TimeoutError:
            await self._unknown(d, None)
            return error_response(provider, 504, f"spendgate: the {provider} upstream did not answer in time; "
                                                 "the request's worst case was charged", code="spendgate_timeout")
        except aiohttp.ClientError as exc:
            await self._unknown(d, None)
            return error_response(provider, 502, f"spendgate: the {provider} upstream failed ({exc}); the "
                                                 "request's worst case was charged", code="spendgate_upstream")

    async def _settle(self, work: Coroutine[Any, Any, None]) -> None:
        """Charge a finished call. With a local store this runs just after the reply leaves, so the
        client is not kept waiting for it; until then the hold (the worst case) still counts, so the
        ledger can only over-count in the meantime, never under-count. A networked store's round
        trip is awaited before the reply."""
        if self.store.networked:
            await work
        else:
            self._settle_later(work)

    async def _finish_stream(self, d: Decision, meter: StreamMeter) -> None:
        if meter.complete:
            await self.engine.acapture(d, meter.usage)
        else:
            await self._unknown(d, meter)

    async def _store_io(self, fn: Callable[..., T], *args: Any) -> T:
        """The rarer store calls (virtual keys, held requests, approvals) use the store's sync client:
        inline for a local store, on a worker thread for a networked one, never blocking the loop."""
        if self.store.networked:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _settle_later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("settling a request failed; its hold will expire and be charged at its worst case",
                      exc_info=task.exception())

    async def settled(self) -> None:
        """Wait until every response already sent has been charged (tests; graceful shutdown)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def _settle_plain(self, status: int, data: bytes, d: Decision | None) -> None:
        if d is None or d.hold_id is None:
            return
        if status >= 400:
            await self._release(d)  # the provider refused it: nothing was generated, nothing billed
            return
        await self.engine.acapture(d, usage_from_body(data))

    async def _relay_stream(self, request: web.Request, provider: str, up: aiohttp.ClientResponse,
                            d: Decision | None, withhold: bool) -> web.StreamResponse:
        resp = web.StreamResponse(status=up.status, headers=self._reply_headers(up.headers, d))
        meter = StreamMeter(provider, withhold)
        settled = False
        try:
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                out = meter.feed(chunk)
                if out:
                    await resp.write(out)
            tail = meter.flush()
            if tail:
                await resp.write(tail)
            settled = True
            if d is not None:
                await self._settle(self._finish_stream(d, meter))
            await resp.write_eof()
        except (ConnectionResetError, aiohttp.ClientError, asyncio.CancelledError):
            if not settled:
                await self._unknown(d, meter)
            raise
        return resp

    def _reply_headers(self, upstream: Mapping[str, str], d: Decision | None) -> dict[str, str]:
        out = {k: v for k, v in upstream.items() if k.lower() not in HOP_BY_HOP}
        if d is not None and d.estimate is not None:
            out["X-Spendgate-Decision"] = d.id
            out["X-Spendgate-Estimate-Usd"] = str(nanos_to_usd(d.estimate.cost_nanos))
            remaining = d.remaining_nanos
            if remaining is not None:
                out["X-Spendgate-Remaining-Usd"] = str(nanos_to_usd(remaining))
        return out

    async def _release(self, d: Decision | None) -> None:
        if d is not None:
            await self.engine.arelease(d)

    async def _unknown(self, d: Decision | None, meter: StreamMeter | None) -> None:
        """Charge a call whose outcome is unknown: input + output seen, or the worst case."""
        if d is None or d.hold_id is None:
            return
        seen = meter.output_tokens(self.engine.estimator.anthropic_factor) if meter is not None else None
        await self.engine.acharge_unknown(d, seen)


def build(policy: Policy, store_url: str, admin_token: str | None = None) -> Proxy:
    store = ledger_mod.open(store_url)
    return Proxy(Engine(policy, store), ProxyConfig.from_policy(policy, admin_token))
