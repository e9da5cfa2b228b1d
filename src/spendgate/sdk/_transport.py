"""The guard as an httpx transport under the official clients.

The client builds its request as usual; the transport prices it, holds its worst case under the
active budgets and the policy, raises :class:`spendgate.BudgetExceeded` instead of sending when it
does not fit, forwards it to the client's own transport when it does, and settles from the
response's ``usage`` — for streams, as the caller reads the last event.

The transports are built per HTTP library (:func:`transports`): the ``openai`` SDK runs on
``httpx2`` but still takes a legacy ``httpx`` client, and a response's stream must be that library's
own ``SyncByteStream`` / ``AsyncByteStream``. Nothing here imports either library: the module is
loaded by :func:`spendgate.wrap` only, so ``import spendgate`` works without the clients extra.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from spendgate import providers
from spendgate.engine import Decision, Engine
from spendgate.errors import BadRequest, BudgetExceeded, StoreError, UnpricedModel
from spendgate.request import Identity, Request, hash_key
from spendgate.sdk import _runtime
from spendgate.sdk._context import active_capability, active_scopes, active_tags, answer_refusal
from spendgate.usage import usage_from_body
from spendgate.wire.edits import outgoing
from spendgate.wire.stream import StreamMeter

if TYPE_CHECKING:  # the annotations name httpx2's types; legacy httpx has the same interface
    import httpx2


@dataclass(frozen=True, slots=True)
class Errors:
    """spendgate's errors as subclasses of one SDK's base error, so that SDK passes them through
    untouched (the Anthropic client would otherwise wrap them as retryable connection errors)."""

    exceeded: type[BudgetExceeded]
    bad_request: type[BadRequest]
    store: type[StoreError]


@dataclass(frozen=True, slots=True)
class Priced:
    """A priced request, whichever library carries it: its hold (None: a free route), the path and
    bytes to send (``body is raw``: unchanged), whether to withhold the usage event, and the
    provider it was priced as (its stream meter reads the answer)."""

    decision: Decision | None
    path: str
    raw: bytes
    body: bytes
    withhold: bool = False
    spec: providers.Provider | None = None


@dataclass(frozen=True, slots=True)
class Prepared:
    request: httpx2.Request
    decision: Decision | None
    withhold: bool = False
    spec: providers.Provider | None = None


def _base(url: str) -> str:
    """A base URL as configured upstreams are compared: no trailing ``/`` nor ``/v1``."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


#: the most request URLs a guard remembers the configured upstream of (per policy)
_URLS_KEPT = 1024


class Guard:
    """Everything the sync and async transports share: decide before, settle after.

    ``http`` is the HTTP library of the client being guarded (``httpx2`` or legacy ``httpx``): the
    requests and responses the guard builds must be that library's, or the client rejects them.

    ``provider`` is the wire format of the client's SDK. A request whose URL is under the
    ``base_url`` of an upstream the policy configures over that wire format (``[upstreams.NAME]``:
    an OpenAI-compatible server, Azure OpenAI) is priced as that upstream — its price table, its
    ``free`` globs, its Azure ``deployments`` — exactly as the proxy prices its ``/NAME`` routes."""

    def __init__(self, provider: str, errors: Errors, http: ModuleType,
                 engine: Callable[[], Engine] = _runtime.engine, capability: str | None = None) -> None:
        self.provider = provider
        #: the client's own capability (``wrap(client, capability=…)``); a ``spendgate.capability``
        #: block around a call takes its place
        self.capability = capability
        self.errors = errors
        self.http = http
        self._engine = engine
        self._spec = providers.get(provider)
        #: the providers whose routes this SDK's clients also call (Vertex AI's), tried after its own
        self._served = providers.served_for(provider)
        self._routes: dict[providers.Provider, list[str]] = {}
        self._last_auth: str | None = None
        self._last_hash: str | None = None
        self._policy_seen: object = None
        self._by_url: dict[str, providers.Provider] = {}

    def provider_for(self, url: str | None, engine: Engine) -> providers.Provider:
        """The provider a request to ``url`` is priced as: the configured upstream whose base URL it
        is under (the longest such), else the SDK's own. Remembered per URL until the policy changes."""
        upstreams = engine.policy.upstreams
        if url is None or not upstreams:
            return self._spec
        if engine.policy is not self._policy_seen:
            self._policy_seen, self._by_url = engine.policy, {}
        at = url.split("?", 1)[0]
        found = self._by_url.get(at)
        if found is None:
            found = self._spec
            best = -1
            for name, up in upstreams.items():
                base = _base(up.base_url)
                if len(base) > best and (at == base or at.startswith(base + "/")):
                    spec = providers.find(name)
                    if spec is None:  # an engine built over the policy without registering its upstreams
                        providers.configure(upstreams)
                        spec = providers.get(name)
                    if getattr(spec, "wire", None) is self._spec:
                        found, best = spec, len(base)
            if len(self._by_url) < _URLS_KEPT:
                self._by_url[at] = found
        return found

    def route_of(self, path: str, spec: providers.Provider | None = None) -> tuple[str, dict[str, str]] | None:
        """The route ``path`` ends with (a base URL may add a prefix) and the path's parameters."""
        spec = spec or self._spec
        routes = self._routes.get(spec)
        if routes is None:
            routes = self._routes[spec] = sorted((*spec.routes, *spec.free_routes), key=len, reverse=True)
        exact = next((r for r in routes if path.endswith(r)), None)
        if exact is not None:
            return exact, {}
        at = 0
        while (at := path.find("/", at)) >= 0:  # a route template, matched from each segment on
            found = spec.match_direct(path[at:])
            if found is not None:
                return found
            at += 1
        return None

    def before(self, request: httpx2.Request) -> Prepared:
        url = request.url
        priced = self.price(request.method, url.path, request.headers, request.read,
                            url=f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}")
        if priced.decision is None:
            return Prepared(request, None)
        if priced.body is not priced.raw:
            headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
            url = request.url if priced.path == request.url.path else request.url.copy_with(path=priced.path)
            request = self.http.Request(request.method, url, headers=headers, content=priced.body,
                                        extensions=request.extensions)
        return Prepared(request, priced.decision, priced.withhold, priced.spec)

    def price(self, method: str, path: str, headers: Mapping[str, str], read: Callable[[], bytes],
              url: str | None = None) -> Priced:
        """Price and hold the request ``method path`` (its body read by ``read`` only when the route
        is priced), independent of the HTTP library that carries it: the decision (None: a free
        route), and the path and bytes to send. ``url``: the request's URL without its query, which
        names a configured upstream. Raises the SDK-typed refusal when it does not fit."""
        engine = self._engine()
        spec = self.provider_for(url, engine)
        found = self.route_of(path, spec)
        if found is None and spec is self._spec:  # a route of another provider its clients call (Vertex AI's)
            for other in self._served:
                found = self.route_of(path, other)
                if found is not None:
                    spec = other
                    break
        elif found is None:  # a configured upstream whose API has no /v1 in its paths (DeepSeek's base URL)
            found = self.route_of("/v1" + path, spec)
        route, params = found if found is not None else (None, {})
        if route in spec.free_routes or (route is None and method in ("GET", "HEAD", "DELETE")):
            return Priced(None, path, b"", b"")
        if route is None:
            hint = (" (an Azure OpenAI deployment or an OpenAI-compatible server is priced when its URL is under "
                    "the base_url of an [upstreams.NAME] table of the policy)" if spec is providers.default() else "")
            raise self.errors.bad_request(f"spendgate: {method} {path} cannot be priced, so it was not sent{hint}")
        raw = read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise self.errors.bad_request(f"spendgate: the request body is not JSON ({exc})") from None
        if isinstance(body, dict):
            try:
                body = spec.body_with(route, params, body)
            except LookupError as exc:  # the path names what cannot be priced (an unconfigured deployment)
                raise self.errors.bad_request(f"spendgate: {exc.args[0] if exc.args else exc}") from None
        scopes = active_scopes()
        rules = [s.rule for s in scopes]
        req = Request(spec.name, route, body, self.identity_of(headers, spec), raw=raw)
        try:
            d = engine.decide(req, extra_rules=rules)
            if not d.allowed:
                d = self._ask(engine, req, d, rules)
        except BadRequest as exc:
            raise self.errors.bad_request(f"spendgate: {exc}") from None
        except UnpricedModel as exc:
            raise self.errors.exceeded(f"spendgate: {exc}", {"action": "block", "rule": "unpriced"}) from None
        except StoreError as exc:
            raise self.errors.store(f"spendgate: the spend store failed, so the call was not sent: {exc}") from None
        out, withhold = outgoing(route, raw, d, spec.name)
        try:
            new_path, out = spec.upstream_direct(path, params, out, out is not raw)
        except ValueError as exc:  # a downgrade no configured deployment serves: the call cannot be made
            engine.release(d)
            raise self.errors.bad_request(f"spendgate: {exc}") from None
        return Priced(d, new_path, raw, out, withhold, spec)

    def _ask(self, engine: Engine, req: Request, d: Decision, rules: list[Any]) -> Decision:
        """A refusal, unless the tripped budget's ``on_exceed`` callable lets the call through once."""
        return answer_refusal(engine, req, d, rules, self.errors.exceeded)

    def _identity(self, request: httpx2.Request) -> Identity:
        return self.identity_of(request.headers)

    def identity_of(self, headers: Mapping[str, str], spec: providers.Provider | None = None) -> Identity:
        """Who the call is for: the active tags and capability, and the hash of the key it carries."""
        tags = active_tags()
        auth = (spec or self._spec).api_key(headers) or ""
        if auth != self._last_auth:  # a client sends one key: hash it once, not per call
            self._last_auth, self._last_hash = auth, hash_key(auth) if auth else None
        return Identity(key=self._last_hash, tags=tags, user=tags.get("user"), team=tags.get("team"),
                        session=tags.get("session"), agent=tags.get("agent"), feature=tags.get("feature"),
                        capability=active_capability() or self.capability)

    # -- after --------------------------------------------------------------------------------

    def settle_body(self, d: Decision, status: int, content: bytes) -> None:
        engine = self._engine()
        if status >= 400:
            engine.release(d)  # the provider refused it: nothing was generated, nothing billed
            return
        engine.capture(d, usage_from_body(content))

    def settle_stream(self, d: Decision, meter: StreamMeter) -> None:
        engine = self._engine()
        if meter.complete:
            usage, seen = meter.capture_args(engine.estimator.anthropic_factor)
            engine.capture(d, usage, output_seen=seen)
        else:
            engine.charge_unknown(d, meter.output_tokens(engine.estimator.anthropic_factor))

    def failed(self, d: Decision | None, exc: BaseException) -> None:
        """The transport raised: nothing sent (release) or an unknown outcome (worst case)."""
        if d is None:
            return
        if isinstance(exc, self.http.ConnectError):
            self._engine().release(d)
        else:
            self._engine().charge_unknown(d)

    @staticmethod
    def is_stream(response: httpx2.Response) -> bool:
        return response.headers.get("content-type", "").startswith("text/event-stream")

    def metered(self, response: httpx2.Response, p: Prepared, stream_cls: Any) -> httpx2.Response:
        """``response`` with its event stream relayed through a meter that settles at its end."""
        d = p.decision
        assert d is not None
        meter = (p.spec or self._spec).meter(p.withhold)
        stream = stream_cls(response.stream, meter, lambda: self.settle_stream(d, meter))
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() != "content-length"]
        new: httpx2.Response = self.http.Response(response.status_code, headers=headers, stream=stream,
                                                  extensions=response.extensions)
        return new


class _Metering:
    """Relays a stream event by event through a :class:`StreamMeter` and settles once at the end,
    or when the caller closes the stream early (then for what it produced)."""

    def __init__(self, meter: StreamMeter, settle: Callable[[], None]) -> None:
        self._meter, self._settle, self._done = meter, settle, False

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._settle()


class Guarded:
    """What every guard transport is, whichever library it was built for: ``wrap`` of a wrapped
    client finds one and returns the client as it is."""


@dataclass(frozen=True, slots=True)
class Transports:
    """One HTTP library's guard transports: ``sync(inner, guard)`` and ``async_(inner, guard)``."""

    sync: type[Any]
    async_: type[Any]


@cache
def transports(http: ModuleType) -> Transports:
    """The guard transports for the HTTP library ``http`` (the ``httpx2`` or ``httpx`` module), built
    once per library: their streams subclass that library's byte streams, which its responses check."""

    class MeteredStream(_Metering, http.SyncByteStream):  # type: ignore[misc, name-defined]
        def __init__(self, inner: httpx2.SyncByteStream, meter: StreamMeter, settle: Callable[[], None]) -> None:
            super().__init__(meter, settle)
            self._inner = inner

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self._inner:
                if out := self._meter.feed(chunk):
                    yield out
            if tail := self._meter.flush():
                yield tail
            self._finish()

        def close(self) -> None:
            self._finish()
            self._inner.close()

    class AsyncMeteredStream(_Metering, http.AsyncByteStream):  # type: ignore[misc, name-defined]
        def __init__(self, inner: httpx2.AsyncByteStream, meter: StreamMeter, settle: Callable[[], None]) -> None:
            super().__init__(meter, settle)
            self._inner = inner

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self._inner:
                if out := self._meter.feed(chunk):
                    yield out
            if tail := self._meter.flush():
                yield tail
            self._finish()

        async def aclose(self) -> None:
            self._finish()
            await self._inner.aclose()

    class GuardTransport(Guarded, http.BaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self, inner: httpx2.BaseTransport, guard: Guard) -> None:
            self.inner, self.guard = inner, guard

        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            p = self.guard.before(request)
            try:
                response = self.inner.handle_request(p.request)
            except BaseException as exc:
                self.guard.failed(p.decision, exc)
                raise
            if p.decision is None:
                return response
            if self.guard.is_stream(response) and response.status_code < 400:
                return self.guard.metered(response, p, MeteredStream)
            self.guard.settle_body(p.decision, response.status_code, response.read())
            return response

        def close(self) -> None:
            self.inner.close()

    class AsyncGuardTransport(Guarded, http.AsyncBaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self, inner: httpx2.AsyncBaseTransport, guard: Guard) -> None:
            self.inner, self.guard = inner, guard

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            p = self.guard.before(request)
            try:
                response = await self.inner.handle_async_request(p.request)
            except BaseException as exc:
                self.guard.failed(p.decision, exc)
                raise
            if p.decision is None:
                return response
            if self.guard.is_stream(response) and response.status_code < 400:
                return self.guard.metered(response, p, AsyncMeteredStream)
            self.guard.settle_body(p.decision, response.status_code, await response.aread())
            return response

        async def aclose(self) -> None:
            await self.inner.aclose()

    return Transports(GuardTransport, AsyncGuardTransport)
