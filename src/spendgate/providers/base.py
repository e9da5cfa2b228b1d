"""What spendgate must know about one wire format, declared in one place.

A provider module subclasses :class:`Provider` and is listed in :mod:`spendgate.providers`' registry.
The engine, the doors (proxy, SDK), replay and the CLI ask the registry; none of them names a
provider. What a provider declares:

- its routes: the priced ones with the body parser that counts a request's input and reads its
  output bound, and the free ones passed through unpriced. A route is an exact path or a path
  template with ``{name}`` placeholders (``/v1beta/models/{model}:generateContent``): the template
  is the route the engine, the estimator and the rules see, and :meth:`Provider.body_with` puts
  what the path says (the model) into the body they read;
- the body fields a decision may edit: the output bound (a ``clamp``) and the conversation (a
  ``truncate``);
- the price variant a body asks for (a service tier, a speed) and per-request fees it allows;
- its stream's usage events, its error envelope (so its official SDK raises its usual errors) and
  the headers that carry its credentials and its caller's user;
- its official SDK's error base class, for ``spendgate.wrap``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from spendgate.estimate.shape import TokenShape

if TYPE_CHECKING:
    from yarl import URL

    from spendgate.keys import VirtualKey
    from spendgate.ledger import Ledger
    from spendgate.wire.stream import StreamMeter

#: A priced route's body parser: the request body -> what it may cost in tokens.
Parser = Callable[[Mapping[str, Any]], TokenShape]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_template(route: str) -> bool:
    """A route with ``{name}`` placeholders rather than one exact path."""
    return "{" in route


def template_regex(route: str) -> re.Pattern[str]:
    """The path regex of a route template: each ``{name}`` is one path segment's worth of
    characters (no ``/``), the rest is literal (``:`` included)."""
    out, at = [], 0
    for m in _PLACEHOLDER.finditer(route):
        out.append(re.escape(route[at:m.start()]))
        out.append(f"(?P<{m.group(1)}>[^/{{}}]+)")
        at = m.end()
    out.append(re.escape(route[at:]))
    return re.compile("".join(out) + r"\Z")


class Provider:
    """One wire format. Subclasses set the class attributes and override what differs."""

    name: str = ""
    #: where its API lives unless the policy or the environment says otherwise
    default_base_url: str = ""
    #: the environment variable holding the key spendgate forwards for a virtual key
    key_env: str = ""
    #: priced path -> body parser
    routes: Mapping[str, Parser] = {}
    #: paths that cost nothing, passed through unpriced
    free_routes: frozenset[str] = frozenset()
    #: path -> the body fields bounding the output, the first present one is edited by a clamp
    output_fields: Mapping[str, tuple[str, ...]] = {}
    #: path -> the body field holding the conversation a truncate may shorten
    conversation_fields: Mapping[str, str] = {}
    #: the error base class of its official Python SDK, a dotted name within :attr:`sdk_package`
    #: (``OpenAIError``, ``errors.APIError``), or "" for none
    sdk_error: str = ""
    #: the import name of its official SDK (empty: its own name, ``openai``)
    sdk_package: str = ""
    #: its input counts are offline counts scaled by the policy's factor (``anthropic_token_factor``):
    #: the stream meter scales the output it counts of a cut-short stream the same way
    scaled_counts: bool = False
    #: a header only this provider's clients send, so a request on a path two providers share is
    #: told apart (None: the provider a shared path defaults to)
    marker_headers: tuple[str, ...] = ()
    #: the statuses of its error envelope: HTTP status -> its error type
    error_types: Mapping[int, str] = {}
    #: the route a chat turn takes (a replayed trace, ``spendgate.estimate``)
    chat_route: str = ""
    #: the price table's providers whose models it serves first-hand
    price_providers: tuple[str, ...] = ()
    #: headers that carry its credentials beyond the common ones (``authorization``, ``x-api-key``):
    #: never kept with a held request
    credential_headers: tuple[str, ...] = ()
    #: query parameters that may carry its credential (``?key=``): the proxy moves one into
    #: ``credential_headers[0]`` before anything reads, keeps or forwards the request
    credential_params: tuple[str, ...] = ()
    #: its models are priced only from its :attr:`price_providers`' rows, never from another
    #: provider's row sharing a model's name (a configured upstream: ``prices = "mistral"``)
    strict_prices: bool = False
    #: its clients sign each request (AWS SigV4) rather than send a key: :meth:`authenticate` checks
    #: the signature and :meth:`sign_upstream` signs the forwarded request anew
    signed_requests: bool = False
    #: the status of a request whose credentials are refused (AWS answers a bad signature with 403)
    auth_failure_status: int = 401
    #: the provider whose official SDK's clients call this one's routes too (Vertex AI's paths are
    #: called by google-genai and anthropic clients): ``spendgate.wrap`` of such a client prices a
    #: request on these routes as this provider, raising that SDK's errors ("": none)
    sdk_of: str = ""
    #: the provider whose configured upstream base URL this one's calls go to when none is
    #: configured for it by name (two wire formats on one host: Vertex AI's); "" for its own
    base_url_from: str = ""
    #: the content types of its streamed responses, relayed through its :meth:`meter`
    stream_content_types: tuple[str, ...] = ("text/event-stream",)

    # -- routes -------------------------------------------------------------------------------

    @cached_property
    def _templates(self) -> tuple[tuple[str, re.Pattern[str]], ...]:
        return tuple((r, template_regex(r)) for r in (*self.routes, *self.free_routes) if is_template(r))

    def match(self, path: str) -> tuple[str, dict[str, str]] | None:
        """The route ``path`` is (an exact path, or the template it fills) and the path's
        parameters; None when it is none of this provider's routes."""
        if path in self.routes or path in self.free_routes:
            return path, {}
        for route, rx in self._templates:
            m = rx.match(path)
            if m is not None:
                return route, m.groupdict()
        return None

    def match_direct(self, path: str) -> tuple[str, dict[str, str]] | None:
        """:meth:`match` for a request a client sends to the upstream itself (``spendgate.wrap``),
        not through the proxy's own paths (a configured upstream's ``/NAME`` prefix)."""
        return self.match(path)

    def paths(self) -> Iterable[tuple[str, str]]:
        """The HTTP paths (or path templates) it is served on, each with the route it is read as:
        its routes themselves, unless it lives under a prefix or on paths of its own (a configured
        upstream's ``/mistral/v1/…``, Azure's ``/openai/deployments/{deployment}/…``)."""
        return ((r, r) for r in (*self.routes, *self.free_routes))

    def is_free_model(self, model: str) -> bool:
        """``model`` costs nothing here: only where the configuration says so (``free = [globs]``)."""
        return False

    def body_with(self, route: str, params: Mapping[str, str], body: dict[str, Any]) -> dict[str, Any]:
        """The body the engine reads for a request on ``route`` whose path said ``params``: the body
        itself unless the path carries what a body elsewhere would (a model). LookupError: the path
        names something this provider cannot price (an unconfigured Azure deployment), so the
        request is refused and never forwarded."""
        return body

    def upstream(self, path: str, params: Mapping[str, str], body: bytes, edited: bool) -> tuple[str, bytes]:
        """The path and bytes to send upstream once a decision is made. ``edited``: ``body`` was
        re-serialized from the body the engine read (a downgrade, a clamp), so what
        :meth:`body_with` added, or an edit the wire format keeps elsewhere, is put back in place."""
        return path, body

    def upstream_direct(self, path: str, params: Mapping[str, str], body: bytes, edited: bool
                        ) -> tuple[str, bytes]:
        """:meth:`upstream` for a request a client sends to the upstream itself (``spendgate.wrap``):
        its path is the upstream's already, with no proxy prefix to drop."""
        return self.upstream(path, params, body, edited)

    # -- its SDK --------------------------------------------------------------------------------

    @property
    def sdk_module(self) -> str:
        return self.sdk_package or self.name

    def sdk_error_class(self, status: int) -> str:
        """The SDK's error class spendgate's error of this HTTP status subclasses (its base class
        unless the SDK has one per kind)."""
        return self.sdk_error

    def sdk_error_fields(self, status: int) -> dict[str, Any]:
        """Attributes spendgate's errors carry as its SDK's errors (``code``): the HTTP status the
        proxy would answer with (402 a refusal, 400 a bad request, 503 a failing store)."""
        return {}

    def sdk_guard(self, client: Any, guard: Callable[[Any], Any]) -> Any | None:
        """``client`` guarded, for an SDK that is not rebuilt with ``with_options(http_client=…)``;
        ``guard(http_client)`` is the guard transport over that HTTP client's own transport. None:
        the common way applies."""
        return None

    def meter(self, withhold: bool = False) -> StreamMeter:
        """The meter of its event streams (the common one unless its events differ in shape)."""
        from spendgate.wire.stream import StreamMeter

        return StreamMeter(self.name, withhold)

    def route_for(self, body: Mapping[str, Any]) -> str:
        """The priced route a request body of this shape goes to (``spendgate estimate FILE``)."""
        return self.chat_route

    def parsers(self, factor: float | None) -> dict[str, Parser]:
        """Its priced routes' parsers, with the policy's count factor bound where it applies."""
        return dict(self.routes)

    def variant(self, body: Mapping[str, Any], auto_tier: str) -> dict[str, str]:
        """The price variant the body asks for (``{"service_tier": "priority"}``); none by default."""
        return {}

    def searches(self, body: Mapping[str, Any]) -> int:
        """The most per-request-priced searches the body allows before send (0: none; negative:
        allowed without a bound, which the estimator bounds by the output bound, one search per
        ``estimate.TOKENS_PER_SEARCH`` output tokens)."""
        return 0

    #: it writes the prompt cache by itself and bills the write: any input may be a cache write
    writes_cache_itself: bool = False

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        """The credential the client sent (a bearer token unless the provider says otherwise)."""
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return auth[7:].strip() or None

    def apply_key(self, headers: dict[str, str], key: str) -> dict[str, str]:
        """``headers`` with the client's credential replaced by ``key`` (a virtual key swapped for
        the provider key spendgate holds), in the header the client used: ``x-api-key`` if it
        sent one, else a bearer token."""
        sent_api_key = any(k.lower() == "x-api-key" for k in headers)
        out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-api-key")}
        if sent_api_key:
            out["x-api-key"] = key
        else:
            out["Authorization"] = f"Bearer {key}"
        return out

    def stream_edits(self, route: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Body fields to add so a stream on ``route`` reports its usage (empty: it always does);
        the usage event they bring is withheld from a client that did not ask for it."""
        return {}

    def body_user(self, body: Mapping[str, Any]) -> str | None:
        """The end user a request body names, in this provider's own field (None: none)."""
        return None

    def error_body(self, status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """An error in its own envelope, with spendgate's numbers under ``spendgate``."""
        raise NotImplementedError

    def error_headers(self, status: int) -> dict[str, str]:
        """Headers its SDK reads an error's type from (AWS: ``x-amzn-ErrorType``); none by default."""
        return {}

    def authenticate(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes, store: Ledger,
                     now: float) -> tuple[VirtualKey, str]:
        """For :attr:`signed_requests`: the virtual key that signed the request and the credential id
        it is known by. PermissionError: refused (no, unknown or bad credentials); LookupError:
        spendgate cannot sign the upstream call."""
        raise NotImplementedError

    def sign_upstream(self, method: str, url: str, headers: dict[str, str], body: bytes
                      ) -> tuple[str | URL, dict[str, str]]:
        """The URL and headers of the request sent upstream, for a provider whose requests are
        signed (:attr:`signed_requests`); unchanged otherwise."""
        return url, headers

    def sse_error(self, status: int, message: str, *, code: str | None = None) -> bytes:
        """The last event of a stream that cannot be finished, in its own stream shape."""
        body = self.error_body(status, message, code=code)
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"

    def stream_usage(self, meter: StreamMeter, obj: dict[str, Any]) -> bool:
        """Read one stream event that mentions usage into ``meter``; False when it must not reach
        the client (a usage chunk the client did not ask for)."""
        raise NotImplementedError

    def is_tool_result(self, item: Mapping[str, Any]) -> bool:
        """A ``user`` message that carries tool results rather than a person's turn."""
        return False


def model_into_path(path: str, params: Mapping[str, str], obj: dict[str, Any]) -> str:
    """Take ``model`` out of an edited body whose API carries it only in the path (``{model}`` in
    the route), and put a downgrade's model into the path instead: ``path`` as it is to be sent."""
    model = obj.pop("model", None)
    sent = params.get("model")
    if isinstance(model, str) and sent and model != sent:
        return path.replace(f"/models/{sent}:", f"/models/{model.removeprefix('models/')}:", 1)
    return path
