"""The proxy: decide, forward, meter, settle — one request path, top to bottom.

aiohttp serves and a pooled aiohttp client forwards (README: "Why aiohttp"). The engine's async
methods run a local store's calls inline (a decision costs less than a thread hop would) and a
networked store's through its asyncio client, so a round trip never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import MultiDict

from spendgate import approvals, providers
from spendgate import ledger as ledger_mod
from spendgate.engine import Approval, Decision, Engine, approve_command
from spendgate.errors import BadRequest, ConfigError, StoreError, UnpricedModel
from spendgate.estimate.tokens import preload
from spendgate.events.chain import AuditLog
from spendgate.events.process import AuditChild
from spendgate.events.sender import AlertSender
from spendgate.events.signing import load_key
from spendgate.ledger.group import GroupCommit
from spendgate.money import NANOS_PER_USD, nanos_to_usd, usd_to_nanos
from spendgate.observe.metrics import metrics_routes
from spendgate.policy import Policy
from spendgate.pricing.table import PriceTable
from spendgate.proxy import admin, me, ui
from spendgate.proxy.envelope import error_response, sse_error
from spendgate.proxy.identity import Credentials, credentials, identity, is_virtual, virtual_credentials
from spendgate.request import Identity, Request
from spendgate.usage import usage_from_body
from spendgate.wire.edits import outgoing
from spendgate.wire.stream import StreamMeter

if TYPE_CHECKING:
    from spendgate.policy.live import LivePolicy

log = logging.getLogger("spendgate.proxy")
T = TypeVar("T")

DEFAULT_UPSTREAMS = {p.name: p.default_base_url for p in providers.all_providers()}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
                        "content-encoding"})
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "cookie",
                                *(h for p in providers.all_providers() for h in p.credential_headers)})


#: how often the store's upkeep runs (stale holds, ended buckets, old events) and spooled charges are applied
UPKEEP_EVERY_S = 60.0
SPOOL_DRAIN_EVERY_S = 5.0
#: how often the alert outbox is looked at (a due alert waits at most this long)
ALERT_POLL_S = 1.0
#: how long a stopping server waits for the alert sender's pass in flight (a webhook's timeout)
SENDER_STOP_S = 15.0


@dataclass
class ProxyConfig:
    upstreams: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_UPSTREAMS))
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_timeout_s: float = 600.0
    admin_token: str | None = None
    retention_days: int | None = 90
    #: where the admin API is reached, for the approve link in a hold's notification
    admin_base: str | None = None
    #: this server runs the store's upkeep (stale holds, ended buckets, old events) and drains the spool;
    #: of several servers on one store started together (``serve --workers``), one does
    upkeep: bool = True
    #: this server sends the alert outbox (when webhooks are configured); one of several workers does
    send_alerts: bool = True
    #: once started, the heap built so far (price tables, vocabularies, policy, the store's client)
    #: is kept out of the cyclic garbage collector's passes (``serve`` sets it): each full pass
    #: walked it all, ~20 ms every ~3,000 requests — ~8 µs a request, and a pause on some replies
    freeze_heap: bool = False

    @classmethod
    def from_policy(cls, policy: Policy, admin_token: str | None = None,
                    upstream_timeout_s: float | None = None) -> ProxyConfig:
        ups = dict(DEFAULT_UPSTREAMS)
        ups.update(policy.upstream)
        ups.update({name: spec.base_url for name, spec in policy.upstreams.items()})
        named = set(policy.upstream)  # base URLs set for the provider itself
        for name in (*(p.name for p in providers.all_providers()), *policy.upstreams):
            env = os.environ.get(f"SPENDGATE_{name.upper().replace('-', '_')}_BASE_URL")
            if env:
                ups[name] = env
                named.add(name)
        for p in providers.all_providers():  # a second wire format on another's host follows that host
            if p.base_url_from and p.name not in named and p.base_url_from in ups:
                ups[p.name] = ups[p.base_url_from]
        return cls(upstreams={k: _base(v) for k, v in ups.items()}, admin_token=admin_token,
                   upstream_timeout_s=upstream_timeout_s or policy.upstream_timeout_s,
                   retention_days=policy.retention_days, admin_base=policy.alerts.admin_url)


def _store_failed(provider: str, exc: StoreError) -> web.Response:
    return error_response(provider, 503, f"spendgate: the spend store failed, so the request was not sent: {exc}",
                          code="spendgate_store_error")


def _capped(asked: Decimal | None, ceiling: Decimal) -> Decimal | None:
    return min(asked, ceiling) if asked is not None else None


def _route(request: web.Request) -> str:
    """The route a request matched: its path, or the path template it fills."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _one_credential(request: web.Request, spec: providers.Provider) -> web.Request:
    """``request`` with a credential sent as a query parameter (``?key=``) moved into the provider's
    credential header, so it is read, forwarded and stripped like one and no query kept with a
    held request or sent upstream carries it. Two credentials are refused: one would be counted
    and another billed."""
    for name in spec.credential_headers:
        if len(request.headers.getall(name, ())) > 1:
            raise PermissionError(f"the request carries more than one {name} header; send one credential")
    names = {n.lower() for n in spec.credential_params}
    found = [v for k, v in request.query.items() if k.lower() in names] if names and request.query_string else []
    if not found:
        return request
    header = spec.credential_headers[0]
    sent = request.headers.get(header)
    if len(set(found)) > 1 or (sent is not None and sent != found[0]):
        raise PermissionError(f"the request carries more than one credential (?{'/'.join(sorted(names))}= and "
                              f"{header}); send one")
    headers = request.headers.copy()
    headers[header] = found[0]
    query = MultiDict((k, v) for k, v in request.query.items() if k.lower() not in names)
    return request.clone(headers=headers, rel_url=request.rel_url.with_query(query))


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class Proxy:
    """Everything a request needs, built once per server."""

    def __init__(self, engine: Engine, config: ProxyConfig, audit: AuditLog | AuditChild | None = None) -> None:
        self.engine = engine
        self.store = engine.ledger
        self.config = config
        #: this server's chain of the signed decision log (None: ``[audit] enabled = false``)
        self.audit = audit
        if audit is not None:
            engine.observers.append(audit.add)
        #: the audit writer process, whose backlog a request waits out (see ``AuditChild.caught_up``)
        self._writer = audit if isinstance(audit, AuditChild) else None
        self.recent = approvals.RecentRefusals()
        self.client: aiohttp.ClientSession | None = None
        self._settling: set[asyncio.Task[None]] = set()
        #: captures run after the reply has left (a local store, leases) rather than before it
        self._settle_after = not self.store.networked
        self._background: list[asyncio.Task[None]] = []
        self._sender: AlertSender | None = None
        self._sending: asyncio.Task[None] | None = None
        #: keeps the engine's policy current (run-time budgets, file reloads); ``serve`` sets it, and
        #: the admin API asks it to re-read the store after a change so the change applies at once
        self.live: LivePolicy | None = None
        #: the upstreams the policy configures (``[upstreams.NAME]``), registered by name
        self.configured = providers.configure(engine.policy.upstreams)
        #: HTTP path or path template -> (provider, the route it is read as)
        known = engine.estimator.prices.entries
        for p in self.configured:
            if p.price_providers[0] not in known:
                raise ConfigError(f"upstreams.{p.name}.prices: the price table has no provider "
                                  f"{p.price_providers[0]!r}; it has {', '.join(sorted(known))}")
        self.routes = {path: (p.name, route) for p in (*providers.all_providers(), *self.configured)
                       for path, route in p.paths()}
        #: ``flat_holds``' paths, served from start; each one's amount is read from the policy in
        #: force per request (a reload changes an amount at once; a new path needs a restart)
        self.flat = tuple(engine.policy.flat_holds)
        for path in self.flat:
            if path in self.routes:
                raise ConfigError(f'flat_holds."{path}": this route is already priced by its tokens; '
                                  "remove it from flat_holds")

    # -- lifecycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        for path, (name, route) in self.routes.items():
            typed = type(providers.get(name)).error_headers is not providers.Provider.error_headers
            app.router.add_post(path, self.guarded_typed if typed else self.guarded)
            if route in providers.get(name).free_routes:  # a token count is a POST, a model list a GET
                app.router.add_get(path, self.passthrough)
        for path in self.flat:
            app.router.add_post(path, self.flat_hold)
        admin.add_routes(app, self)
        ui.add_routes(app, self)
        me.add_routes(app, self)
        metrics_routes(app, self)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        preload()  # the vocabularies load before the first request, not during it
        if self.store.networked and self.engine.aledger is None:
            from spendgate.ledger.lease import LeasedLedger, lease_settings
            from spendgate.ledger.redis import AsyncRedisLedger

            # the request path talks to a networked store through its asyncio client, on this loop;
            # with ?leases=on, through slices of each bucket held in it (ledger/lease.py)
            exact = AsyncRedisLedger(self.store.url)
            leases = lease_settings(self.store.url)
            self.engine.aledger = exact if leases is None else LeasedLedger(self.store.url, exact=exact,
                                                                             settings=leases)
            # a leased bucket's capture settles into its slice in memory: no round trip to wait for
            self._settle_after = leases is not None
        elif self.engine.aledger is None:  # a local store: captures committed in groups
            from spendgate.ledger.lease import LeasedLedger, lease_settings

            group = GroupCommit(self.store)
            leases = lease_settings(self.store.url)  # sqlite:///…?leases=on: the commit off the request path
            self.engine.aledger = group if leases is None else LeasedLedger(self.store.url, exact=group,
                                                                             settings=leases)
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.config.upstream_timeout_s),
            auto_decompress=False,
            # one pool serves every caller: an upstream's Set-Cookie to one must never ride along on
            # another's request (and a jar costs every request a cookie filter)
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        if self.live is not None:  # the store's run-time budgets apply before the first request
            self.live.on_change.append(self._forget_refusals)
            await self.live.start()
        loop = asyncio.get_running_loop()
        if isinstance(self.audit, AuditChild):
            await self.audit.start()
        self._background = [loop.create_task(self._every(UPKEEP_EVERY_S, self.upkeep)),
                            loop.create_task(self._every(SPOOL_DRAIN_EVERY_S, self.drain_spool))
                            ] if self.config.upkeep else []
        webhooks = self.engine.policy.alerts.webhooks
        # an instance with nowhere to send leaves the outbox to those that have somewhere
        if webhooks and self.config.send_alerts:
            self._sender = AlertSender(self.store, webhooks, store_url=self.store.url,
                                       admin_base=self.config.admin_base)
            self._sending = loop.create_task(self._sender.run(ALERT_POLL_S))
        if isinstance(self.audit, AuditChild):
            self._background.append(loop.create_task(self.audit.run()))
        if self.config.freeze_heap:  # what is alive now lives as long as the server does
            gc.collect()
            gc.freeze()

    async def _stop(self, _: web.Application) -> None:
        if self.live is not None:  # first: no reload swaps the policy while the rest winds down
            await self.live.stop()
        if self._sender is not None and self._sending is not None:
            # let the pass in flight finish, so an alert a receiver took is recorded as sent
            self._sender.stop()
            try:
                await asyncio.wait_for(self._sending, SENDER_STOP_S)
            except TimeoutError:
                log.warning("the alert sender did not finish within %s s; what it was sending is sent again later",
                            SENDER_STOP_S)
            except Exception:
                log.exception("the alert sender had failed")
        for task in self._background:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # a background job that died must not keep the rest from closing
                log.exception("a background job had failed")
        await self.settled()
        # after the last capture, so the final checkpoint names it
        if isinstance(self.audit, AuditChild):
            await self.audit.close()
        elif self.audit is not None:
            with contextlib.suppress(StoreError):  # the writer logs what it could not store
                await asyncio.to_thread(self.audit.close)
        if self.client is not None:
            await self.client.close()
        close = getattr(self.engine.aledger, "close", None)
        if close is not None:
            await close()

    def _forget_refusals(self) -> None:
        """A refusal is repeated to a client retrying the same body for a while; once the policy,
        a limit or a pause changes, the next retry is decided afresh (a raised limit applies now)."""
        self.recent = approvals.RecentRefusals(self.recent.window_s)

    # -- routes -------------------------------------------------------------------------------

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        spec = providers.by_headers(request.headers)
        provider, typed = spec.name, spec.error_headers(404)
        if request.method == "POST":
            priced = sorted({path for _, path in providers.priced_routes()})
            return error_response(provider, 404, f"spendgate: {request.path} is not a route spendgate can price, "
                                                 "so it is refused (an operator may pass it through at a fixed "
                                                 "hold with flat_holds in the policy); priced routes are "
                                                 + ", ".join(priced),
                                  code="spendgate_unknown_route", headers=typed)
        return error_response(provider, 404, f"spendgate: no such route {request.method} {request.path}",
                              headers=typed)

    def _flat_provider(self, request: web.Request) -> providers.Provider:
        """Whose URL space a flat-hold path is in: a configured upstream whose ``/NAME`` prefix
        starts it, else the provider the client's headers name (``anthropic-version``), else the
        default one — the same choice an unknown route's refusal makes."""
        for p in self.configured:
            prefix = getattr(p, "prefix", None)
            if isinstance(prefix, str) and request.path.startswith(prefix + "/"):
                return p
        return providers.by_headers(request.headers)

    async def flat_hold(self, request: web.Request) -> web.StreamResponse:
        """A route the config passes through under a flat hold (``flat_holds``): its body is never
        read as a model call (it may be multipart audio), the request is decided as a fixed amount
        named by its path under every budget and rule, forwarded byte for byte, and charged exactly
        that amount on a 2xx answer — flagged estimated, as the real cost is unknown — or released
        on an error status."""
        if self._writer is not None and self._writer.behind:
            await self._writer.caught_up()
        usd = self.engine.policy.flat_holds.get(request.path)
        if usd is None:  # a reloaded policy dropped it: refused like any route spendgate cannot price
            return await self.unknown(request)
        nanos = usd_to_nanos(usd)
        spec = self._flat_provider(request)
        provider, route = spec.name, request.path
        got = await self._read(request, provider, spec)
        if isinstance(got, web.StreamResponse):
            return got
        request, raw = got
        body = {"model": route}
        who_is = await self._caller(request, provider, spec, raw, body)
        if isinstance(who_is, web.StreamResponse):
            return who_is
        creds, ident = who_is
        now = time.time()
        dry = request.headers.get("x-spendgate-estimate") == "1"
        req = Request(provider, route, body, ident, raw=raw, dry=dry, fixed_nanos=nanos)
        who = ident.fingerprint()
        try:
            d = await self.engine.adecide(req, now=now)
            if d.action == "hold" and not dry:  # approved by id: the held request's retry passes
                by_id = await self._store_io(self._approved_by_id, who, raw, now)
                if by_id is not None:
                    d = await self.engine.adecide(req, now=now, approval=by_id)
        except StoreError as exc:
            return _store_failed(provider, exc)
        if dry:
            return await self._dry_answer(d, now)
        if not d.allowed:
            try:
                return await self._store_io(self._refuse, request, provider, route, raw, d, ident, who, now, raw,
                                            ())
            except StoreError as exc:
                return _store_failed(provider, exc)
        path, _ = spec.upstream(request.path, {}, raw, False)
        return await self._forward_plain(request, provider, creds, raw, d, path=path, flat=nanos)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Free routes with no body to price (``GET /v1/models``)."""
        provider = self.routes[_route(request)][0]
        path, _ = providers.get(provider).upstream(request.path, request.match_info, b"", False)
        return await self._forward_plain(request, provider, None, b"", None, path=path)

    async def guarded_typed(self, request: web.Request) -> web.StreamResponse:
        """:meth:`guarded` for a provider whose SDK reads an error's type from a header
        (``x-amzn-ErrorType``): spendgate's own errors carry it; an upstream's keep their own."""
        resp = await self.guarded(request)
        if resp.status >= 400 and not resp.prepared:
            spec = providers.get(self.routes[_route(request)][0])
            for k, v in spec.error_headers(resp.status).items():
                if k not in resp.headers:
                    resp.headers[k] = v
        return resp

    async def guarded(self, request: web.Request) -> web.StreamResponse:
        if self._writer is not None and self._writer.behind:
            await self._writer.caught_up()
        provider, route = self.routes[_route(request)]
        spec = providers.get(provider)
        got = await self._read(request, provider, spec)
        if isinstance(got, web.StreamResponse):
            return got
        request, raw = got
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error_response(provider, 400, f"spendgate: the request body is not valid JSON ({exc})")
        except RecursionError:
            return error_response(provider, 400, "spendgate: the request body nests JSON too deeply to read")
        if not isinstance(body, dict):
            return error_response(provider, 400, "spendgate: the request body must be a JSON object")
        try:
            body = spec.body_with(route, request.match_info, body)
        except LookupError as exc:  # the path names what cannot be priced: refused, never forwarded
            return error_response(provider, 404, f"spendgate: {exc.args[0] if exc.args else exc}",
                                  code="spendgate_unknown_target")
        who_is = await self._caller(request, provider, spec, raw, body)
        if isinstance(who_is, web.StreamResponse):
            return who_is
        creds, ident = who_is
        if route in spec.free_routes:
            path, _ = spec.upstream(request.path, request.match_info, raw, False)
            return await self._forward_plain(request, provider, creds, raw, None, path=path)
        return await self._decide_and_forward(request, provider, route, raw, body, creds, ident)

    async def _dry_answer(self, d: Decision, now: float) -> web.Response:
        """A dry run's answer (``X-Spendgate-Estimate: 1``): the decision as things stand, its hold
        released, nothing sent upstream."""
        await self.engine.arelease(d, now=now)
        return web.json_response({"spendgate": d.to_dict(), "allowed": d.allowed,
                                  "message": d.message or (d.estimate.describe() if d.estimate else ""),
                                  "edits": dict(d.edits)}, headers={"X-Spendgate-Decision": d.id})

    async def _read(self, request: web.Request, provider: str, spec: providers.Provider
                    ) -> tuple[web.Request, bytes] | web.StreamResponse:
        """The request (its credential moved into its header) and its body — or the error to answer:
        two copies of a credential, a body over the limit."""
        if spec.credential_headers:
            try:
                request = _one_credential(request, spec)
            except PermissionError as exc:
                return error_response(provider, 401, f"spendgate: {exc}")
        content = request.content
        if content.is_eof():  # the whole body arrived with the headers (the usual case): taken as it lies
            raw = content.read_nowait()
            if len(raw) <= self.config.max_body_bytes:
                return request, raw
        else:
            try:
                return request, await request.read()
            except web.HTTPRequestEntityTooLarge:
                pass
        return error_response(provider, 413, f"spendgate: request body over the "
                                             f"{self.config.max_body_bytes:,}-byte limit")

    async def _caller(self, request: web.Request, provider: str, spec: providers.Provider, raw: bytes,
                      body: dict[str, Any]) -> tuple[Credentials, Identity] | web.StreamResponse:
        """Who sent ``request``: its credentials (a signature checked with the virtual credentials
        that made it, for a provider whose requests are signed) and the identity they count under —
        or the error to answer with."""
        try:
            if spec.signed_requests:
                vkey, cred_id = await self._store_io(spec.authenticate, request.method, request.raw_path,
                                                     request.headers, raw, self.store, time.time())
                creds = virtual_credentials(vkey, cred_id, None)
            elif self.store.networked and is_virtual(spec, request.headers):
                # a virtual key is looked up in the store: on a thread, off this loop
                creds = await self._store_io(credentials, provider, request.headers, self.store)
            else:  # a provider key (or none) needs no store call: no thread hop for it
                creds = credentials(provider, request.headers, self.store)
            ident = identity(provider, request.headers, body, creds,
                             trust_client_capability=self.engine.policy.trust_client_capability)
        except PermissionError as exc:
            return error_response(provider, spec.auth_failure_status, f"spendgate: {exc}")
        except (LookupError, ValueError) as exc:
            return error_response(provider, 400, f"spendgate: {exc}")
        except StoreError as exc:
            return _store_failed(provider, exc)
        return creds, ident

    async def _decide_and_forward(self, request: web.Request, provider: str, route: str, raw: bytes,
                                  body: dict[str, Any], creds: Credentials, ident: Identity) -> web.StreamResponse:
        now = time.time()
        who = ident.fingerprint()
        try:
            who.encode()
        except UnicodeEncodeError:
            return error_response(provider, 400, "spendgate: a session, user, agent or tag value is not valid "
                                                 "UTF-8 text")
        dry = request.headers.get("x-spendgate-estimate") == "1"
        try:
            answer = self._answer_in_request(provider, route, raw, body, creds, request.headers)
        except ValueError as exc:
            return error_response(provider, 400, f"spendgate: {exc}")
        except RecursionError:
            return error_response(provider, 400, "spendgate: the request body nests too deeply to edit")
        approval, send, body, notes, reply = answer
        if dry:  # a dry run decides as things stand: it answers no hold and spends no approval
            approval, reply = None, None
        if reply is not None:
            try:
                approval, send, body, early = await self._store_io(self._inband_reply, provider, reply, raw, body,
                                                                   who, now)
            except StoreError as exc:
                return _store_failed(provider, exc)
            if early is not None:
                return early
        req = Request(provider, route, body, ident, raw=send, dry=dry)
        try:
            by_id: Approval | None = None
            if approval is None and not dry:
                repeat = self.recent.get(who, raw, now)
                if repeat is not None:
                    status, payload, headers, held = repeat
                    by_id = await self._store_io(self._approved_by_id, who, send, now) if held else None
                    if by_id is None:
                        return web.Response(status=status, body=payload, content_type="application/json",
                                            headers=headers)
            d = await self.engine.adecide(req, now=now, approval=by_id or approval)
            if d.action == "hold" and by_id is None and not dry:
                # approved by id (on any instance, before or after a restart): the held request's retry passes
                by_id = await self._store_io(self._approved_by_id, who, send, now)
                if by_id is not None:
                    d = await self.engine.adecide(req, now=now, approval=by_id)
            if by_id is not None and not d.allowed:
                # another rule refused it: the operator's approval stays for the retry after that is settled
                await self._store_io(self._keep_approval, who, send, by_id, now)
        except BadRequest as exc:
            return error_response(provider, 400, f"spendgate: {exc}", code="spendgate_unpriceable")
        except UnpricedModel as exc:
            return error_response(provider, 402, f"spendgate: {exc}", code="spendgate_unpriced")
        except RecursionError:
            return error_response(provider, 400, "spendgate: the request body nests too deeply to price",
                                  code="spendgate_unpriceable")
        except StoreError as exc:
            return _store_failed(provider, exc)
        if dry:
            return await self._dry_answer(d, now)
        if not d.allowed:
            try:
                return await self._store_io(self._refuse, request, provider, route, send, d, ident, who, now, raw,
                                            notes)
            except StoreError as exc:
                return _store_failed(provider, exc)
        try:
            out, withhold = outgoing(route, send, d, provider)
            path, out = providers.get(provider).upstream(request.path, request.match_info, out, out is not send)
        except RecursionError:
            await self._release(d)
            return error_response(provider, 400, "spendgate: the request body nests too deeply to edit",
                                  code="spendgate_unpriceable")
        except ValueError as exc:  # the edited call cannot be made there (no Azure deployment serves it)
            await self._release(d)
            return error_response(provider, 400, f"spendgate: {exc}; nothing was sent, nothing charged",
                                  code="spendgate_unsendable")
        return await self._forward_plain(request, provider, creds, out, d, withhold, path)

    def _answer_in_request(self, provider: str, route: str, raw: bytes, body: dict[str, Any], creds: Credentials,
                           headers: Mapping[str, str]
                           ) -> tuple[Approval | None, bytes, dict[str, Any], tuple[str, ...], approvals.Answer | None]:
        """An approval the request carries by itself — a directive typed in the latest user turn, or
        the X-Spendgate-Allow header — capped by what the policy or the virtual key allows that
        channel. Returns (approval, bytes to send, body, notes for a refusal, the bare yes/no of the
        latest turn that answers a held request). No store call."""
        limits = self.engine.policy.approvals
        text, handle = approvals.latest_user_text(provider, route, body)
        ans = approvals.read_answer(text)
        if ans is not None and ans.directive:
            stripped = approvals.strip_directive(route, body, handle)
            send = json.dumps(stripped).encode()
            if limits.inband_max_usd <= 0:
                return None, send, stripped, ("the [spendgate: allow=…] directive was ignored: in-band approvals "
                                              "are off ([approvals] inband_max_usd = 0)",), None
            return (Approval(_capped(ans.max_usd, limits.inband_max_usd), by="in-band directive", channel="inband",
                             ceiling_usd=limits.inband_max_usd), send, stripped, (), None)
        if ans is not None:
            return None, raw, body, (), ans
        allow = headers.get("x-spendgate-allow")
        if allow is None:
            return None, raw, body, (), None
        asked = approvals.parse_allow_header(allow)
        vkey = creds.virtual
        ceiling = vkey.preapprove_max_usd if vkey is not None and vkey.preapprove_max_usd is not None \
            else limits.header_max_usd
        if ceiling <= 0:
            return None, raw, body, ("X-Spendgate-Allow was ignored: a client's header may pre-approve only up "
                                     "to [approvals] header_max_usd (0 here) or its virtual key's --preapprove-max",
                                     ), None
        note = (f"X-Spendgate-Allow: max=${asked} was cut to this key's ceiling of ${ceiling} per budget and "
                "window",) if asked > ceiling else ()
        return (Approval(min(asked, ceiling), by="X-Spendgate-Allow", channel="header", ceiling_usd=ceiling),
                raw, body, note, None)

    def _inband_reply(self, provider: str, ans: approvals.Answer, raw: bytes, body: dict[str, Any], who: str,
                      now: float) -> tuple[Approval | None, bytes, dict[str, Any], web.StreamResponse | None]:
        """A yes or no typed in the latest user turn, answering this identity's latest held request."""
        held = approvals.latest_for(self.store, who, now)
        if held is None:
            return None, raw, body, None
        if not ans.yes:
            approvals.deny(self.store, held.id, now, by="in-band no", on_event=self.engine.emit)
            return None, raw, body, error_response(
                provider, 402, f"spendgate: you declined held request {held.id}; it was not sent. The "
                               f"session's budget \"{held.rule}\" stays in force.",
                code="spendgate_denied", extra={"decision_id": held.id, "action": "denied", "rule": held.rule})
        limits = self.engine.policy.approvals
        if limits.inband_max_usd <= 0:
            return None, raw, body, None
        held.status = "approved"
        self.store.put_record(approvals.KIND, held.id, held.to_json(), expires_at=held.expires_at)
        replay = held.body  # the held request itself, byte for byte, answers the "yes"
        return (Approval(_capped(ans.max_usd, limits.inband_max_usd), by="in-band yes", channel="inband",
                         ceiling_usd=limits.inband_max_usd), replay, json.loads(replay), None)

    def _approved_by_id(self, who: str, body: bytes, now: float) -> Approval | None:
        """An operator's approval of this very request (same identity, same bytes) by its id, for
        the rule it was held by; consumed once. Asked only of held requests, so an allowed one costs
        no store call."""
        rules = approvals.approved_rules(self.store.take_record(approvals.ONCE, approvals.once_key(who, body),
                                                                now=now))
        return Approval(by="spendgate approve", recorded=True, rules=rules) if rules else None

    def _keep_approval(self, who: str, body: bytes, by_id: Approval, now: float) -> None:
        key = approvals.once_key(who, body)
        rules = approvals.approved_rules(self.store.get_record(approvals.ONCE, key, now=now)) | (by_id.rules or set())
        self.store.put_record(approvals.ONCE, key, json.dumps(sorted(rules)), expires_at=now + approvals.HOLD_TTL_S)

    def _refuse(self, request: web.Request, provider: str, route: str, body: bytes, d: Decision, ident: Identity,
                who: str, now: float, raw: bytes, notes: tuple[str, ...]) -> web.Response:
        extra = d.to_dict()
        message = " ".join((d.message, *notes))
        extra["notes"] = [*extra["notes"], *notes]
        if d.action == "hold":
            safe = {k: v for k, v in request.headers.items()
                    if k.lower() not in CREDENTIAL_HEADERS and k.lower() not in HOP_BY_HOP}
            held = approvals.keep(self.store, d, ident.value("session"), who, provider, route, request.query_string,
                                  body, safe, now)
            command = approve_command(held.id, self.store.url)  # None: an in-memory store no CLI reaches
            extra["approval"] = {"id": held.id, "expires_at": held.expires_at, "command": command,
                                 "how": (f"{command} [--max USD]; " if command else "")
                                 + f"POST /spendgate/approvals/{held.id}; or reply 'yes' (optionally 'yes max=$5')"}
        headers = {"X-Spendgate-Decision": d.id}
        if d.trip is not None and d.trip.resets_at is not None:
            headers["Retry-After"] = str(max(1, math.ceil(d.trip.resets_at - now)))
        resp = error_response(provider, 402, message, code="spendgate_blocked", extra=extra, headers=headers)
        assert isinstance(resp.body, bytes)
        self.recent.put(who, raw, (402, resp.body, headers, d.action == "hold"), now)
        return resp

    # -- forwarding ---------------------------------------------------------------------------

    def _upstream_headers(self, request: web.Request, provider: str, creds: Credentials | None) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if _to_upstream(k)}
        headers["Accept-Encoding"] = "identity"  # usage must be readable; a compressed body is not
        if creds is not None and creds.virtual is not None and creds.forward:
            headers = providers.get(provider).apply_key(headers, creds.forward)
        return headers

    async def _forward_plain(self, request: web.Request, provider: str, creds: Credentials | None, body: bytes,
                             d: Decision | None, withhold: bool = False, path: str | None = None,
                             flat: int | None = None) -> web.StreamResponse:
        """Send the request upstream and relay the answer. ``flat``: a flat-hold route's amount, the
        charge for any 2xx answer whatever its body says (no usage is read from it)."""
        assert self.client is not None
        base = self._upstream(provider)
        url = base + (path or request.path)
        if request.query_string:
            url += "?" + request.query_string
        headers = self._upstream_headers(request, provider, creds)
        spec = providers.get(provider)
        wire: Any = url
        if spec.signed_requests:
            try:
                wire, headers = spec.sign_upstream(request.method, url, headers, body)
            except LookupError as exc:
                await self._release(d)
                return error_response(provider, 502, f"spendgate: {exc}; nothing was sent, nothing charged",
                                      code="spendgate_upstream")
        try:
            up_cm = self.client.request(request.method, wire, data=body if request.method == "POST" else None,
                                        headers=headers)
            async with up_cm as up:
                if flat is not None:
                    return await self._relay_flat(request, up, d, flat)
                if up.content_type in spec.stream_content_types and up.status < 400:
                    return await self._relay_stream(request, provider, up, d, withhold)
                data = await up.read()
                if d is not None:
                    await self._settle(self._settle_plain(up.status, data, d))
                return web.Response(status=up.status, body=data, headers=self._reply_headers(up.headers, d))
        except aiohttp.ClientConnectorError as exc:
            await self._release(d)
            return error_response(provider, 502, f"spendgate: cannot reach the {provider} upstream at "
                                                 f"{base} ({exc.os_error or exc}); "
                                                 "nothing was sent, nothing charged", code="spendgate_upstream")
        except TimeoutError:
            await self._unknown(d, None)
            return error_response(provider, 504, f"spendgate: the {provider} upstream did not answer in time; "
                                                 "the request's worst case was charged", code="spendgate_timeout")
        except aiohttp.ClientError as exc:
            await self._unknown(d, None)
            return error_response(provider, 502, f"spendgate: the {provider} upstream failed ({exc}); the "
                                                 "request's worst case was charged", code="spendgate_upstream")

    def _upstream(self, provider: str) -> str:
        """The base URL ``provider``'s calls go to: the config's, else a configured upstream's own."""
        found = self.config.upstreams.get(provider)
        return found if found is not None else _base(providers.get(provider).default_base_url)

    async def _settle(self, work: Coroutine[Any, Any, None]) -> None:
        """Charge a finished call. With a local store, or budget leases, this runs just after the
        reply leaves, so the client is not kept waiting for it; until then the hold (the worst case)
        still counts, so the ledger can only over-count in the meantime, never under-count. A
        networked store's round trip is awaited before the reply (so captures waiting on a slow
        store never pile up behind replies already sent)."""
        if self._settle_after:
            self._settle_later(work)
        else:
            await work

    async def _finish_stream(self, d: Decision, meter: StreamMeter) -> None:
        if meter.complete:
            usage, seen = meter.capture_args(self.engine.estimator.anthropic_factor)
            await self.engine.acapture(d, usage, output_seen=seen)
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

    # -- upkeep, off the request path -----------------------------------------------------------

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Coroutine[Any, Any, object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except StoreError as exc:  # the store is down: requests say so; try again next time
                log.warning("%s skipped: %s", getattr(job, "__name__", "upkeep"), exc)
            except Exception:
                log.exception("%s failed; it runs again later", getattr(job, "__name__", "upkeep"))

    async def upkeep(self) -> None:
        """Charge stale holds their worst case, prune buckets whose window is over and drop events
        past the retention — on a worker thread, in small batches, so requests go between them."""
        retention = self.config.retention_days * 86400.0 if self.config.retention_days else None
        swept = await asyncio.to_thread(self.store.sweep, time.time(), retention_s=retention)
        for gone in swept.gone:  # each expired hold's charge reaches the audit log
            if gone.event is not None:
                self.engine.emit(gone.event)
        if swept.expired or swept.pruned or swept.events_deleted:
            log.info("store upkeep: %d stale holds charged, %d ended buckets pruned, %d old events deleted",
                     swept.expired, swept.pruned, swept.events_deleted)

    async def drain_spool(self) -> None:
        """Apply the charges kept while the store was failing, once it answers again."""
        n = await asyncio.to_thread(self.engine.drain_spool)
        if n:
            log.info("applied %d charge(s) kept while the store was failing", n)

    async def _relay_flat(self, request: web.Request, up: aiohttp.ClientResponse, d: Decision | None,
                          nanos: int) -> web.StreamResponse:
        """A flat-hold route's answer, relayed as it arrives (a transcription may stream): an error
        status releases the hold; any other is charged exactly ``nanos``, flagged estimated — also
        when the client leaves early, since the provider bills the call anyway."""
        if up.status >= 400:
            data = await up.read()
            await self._release(d)
            return web.Response(status=up.status, body=data, headers=self._reply_headers(up.headers, d))
        resp = web.StreamResponse(status=up.status, headers=self._reply_headers(up.headers, d))
        try:
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            except (aiohttp.ClientError, TimeoutError, ConnectionResetError):
                resp.force_close()  # either side broke off after the status line: the charge stands
            else:
                await resp.write_eof()
        finally:
            await self._settle(self._charge_flat(d, nanos))
        return resp

    async def _charge_flat(self, d: Decision | None, nanos: int) -> None:
        if d is not None and d.hold_id is not None:
            await self.engine.acapture_amount(d, nanos, estimated=True)

    async def _settle_plain(self, status: int, data: bytes, d: Decision | None) -> None:
        if d is None or d.hold_id is None:
            return
        if status >= 400:
            await self._release(d)  # the provider refused it: nothing was generated, nothing billed
            return
        await self.engine.acapture(d, usage_from_body(data))

    async def _relay_stream(self, request: web.Request, provider: str, up: aiohttp.ClientResponse,
                            d: Decision | None, withhold: bool) -> web.StreamResponse:
        """Relay an event stream as it arrives, metering it. An upstream that fails mid-way gets the
        client an error event in the provider's own stream shape and a clean end — the status line
        was sent long ago — and the call is charged its input plus the output relayed.

        Bytes that arrived together leave together: the status line goes out with the first events
        when they are already here, and the last events with the end of the body, so a stream that
        arrived in one piece is relayed in one write rather than three (each ~10 µs of syscall).
        Nothing waits for more to arrive: before the relay awaits the upstream, what it holds is sent."""
        resp = _HeldHeaders(status=up.status, headers=self._reply_headers(up.headers, d))
        meter = providers.get(provider).meter(withhold)
        settled = False
        try:
            await resp.prepare(request)
            cut, held = await self._pump(up, resp, meter)
            if cut is not None:
                settled = True
                if d is not None:  # usage that already arrived is the charge; else input + output seen
                    await self._finish_stream(d, meter)
                resp.force_close()
                await resp.write_eof(held + sse_error(provider, 502, f"spendgate: the {provider} upstream broke "
                                                                     f"off the stream ({cut}); the output so far "
                                                                     "was charged", code="spendgate_upstream"))
                return resp
            held += meter.flush()
            settled = True
            if d is not None:
                await self._settle(self._finish_stream(d, meter))
            await resp.write_eof(held)
        except (ConnectionResetError, aiohttp.ClientError):
            if not settled:  # the client went away: the provider bills what it generated anyway
                await self._unknown(d, meter)
        except asyncio.CancelledError:
            if not settled:
                await self._unknown(d, meter)
            raise
        return resp

    @staticmethod
    async def _pump(up: aiohttp.ClientResponse, resp: web.StreamResponse, meter: StreamMeter
                    ) -> tuple[str | None, bytes]:
        """Copy the upstream's events to the client: (the upstream's failure as text, None when it
        ended well; the events relayed but not yet written). What has arrived is taken without
        waiting; only before waiting for more is what is held written — with the status line if it
        has not left yet — so the client never waits on bytes the proxy has. Only reading the
        upstream is caught here: a client that went away raises."""
        content = up.content
        held = b""
        sent = False  # the status line and headers have left
        while True:
            try:
                chunk = content.read_nowait()  # what has arrived, without waiting
                if not chunk:
                    if content.at_eof():
                        return None, held
                    if held or not sent:
                        await resp.write(held)  # an empty write sends the status line alone
                        held, sent = b"", True
                    chunk = await content.readany()
                    if not chunk:
                        return None, held
            except (aiohttp.ClientError, TimeoutError) as exc:
                return str(exc) or type(exc).__name__, held
            out = meter.feed(chunk)
            if out:
                held = held + out if held else out
                if len(held) >= _HOLD_MAX:
                    await resp.write(held)
                    held, sent = b"", True

    def _reply_headers(self, upstream: Mapping[str, str], d: Decision | None) -> dict[str, str]:
        out = {k: v for k, v in upstream.items() if _to_client(k)}
        if d is not None and d.estimate is not None:
            out["X-Spendgate-Decision"] = d.id
            out["X-Spendgate-Estimate-Usd"] = usd_text(d.estimate.cost_nanos)
            remaining = d.remaining_nanos
            if remaining is not None:
                out["X-Spendgate-Remaining-Usd"] = usd_text(remaining)
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


def usd_text(nanos: int) -> str:
    """``str(nanos_to_usd(nanos))`` — the reply headers' dollar figures — in integer arithmetic
    (two a reply; the Decimal division and normalization cost ~2 µs each). Figures whose Decimal
    text is in exponent form (under $0.000001), negative or beyond its 28 digits take the Decimal way."""
    if 1000 <= nanos < 10 ** 18:
        whole, frac = divmod(nanos, NANOS_PER_USD)
        return f"{whole}.{frac:09d}".rstrip("0") if frac else str(whole)
    return str(nanos_to_usd(nanos))


#: the most relayed bytes kept back to leave in one write with bytes already arriving behind them
_HOLD_MAX = 64 * 1024


class _HeldHeaders(web.StreamResponse):
    """A streamed reply whose status line and headers leave with its first bytes (the first write,
    which may be empty), as a ``web.Response``'s do, rather than in a write of their own."""

    _send_headers_immediately = False


# a header name's fate, worked out once per spelling (a few dozen names recur on every request)
@lru_cache(maxsize=1024)
def _to_upstream(name: str) -> bool:
    """Whether a client's header goes on to the upstream: not hop-by-hop, not spendgate's own."""
    low = name.lower()
    return low not in HOP_BY_HOP and not low.startswith("x-spendgate-")


@lru_cache(maxsize=1024)
def _to_client(name: str) -> bool:
    """Whether an upstream's header goes back to the client: not hop-by-hop."""
    return name.lower() not in HOP_BY_HOP

def build(policy: Policy, store_url: str, admin_token: str | None = None,
          upstream_timeout_s: float | None = None, prices: PriceTable | None = None,
          admin_base: str | None = None) -> Proxy:
    """The proxy over ``store_url``, pricing with ``prices`` (the bundled table and the prices
    imported with ``spendgate prices update``, as the CLI resolves them). The audit log's signing key
    is read (or created) here, so a missing or unreadable key stops the server before it serves —
    never an unsigned log."""
    key = load_key(policy.audit.key) if policy.audit.enabled else None
    store = ledger_mod.open(store_url)
    config = ProxyConfig.from_policy(policy, admin_token, upstream_timeout_s)
    config.freeze_heap = True
    if config.admin_base is None:
        config.admin_base = admin_base
    audit: AuditLog | AuditChild | None = None
    if key is not None and store.url.startswith("memory:"):  # no other process can reach this store
        audit = AuditLog(store, key, checkpoint_entries=policy.audit.checkpoint_entries,
                         checkpoint_seconds=policy.audit.checkpoint_seconds)
    elif key is not None:  # signed in a child process, off this event loop's interpreter
        audit = AuditChild(store.url, policy.audit.key, checkpoint_entries=policy.audit.checkpoint_entries,
                           checkpoint_seconds=policy.audit.checkpoint_seconds)
    return Proxy(Engine(policy, store, prices), config, audit)
