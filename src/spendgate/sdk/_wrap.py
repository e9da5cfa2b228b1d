"""``spendgate.wrap(client)``: the same client, with the guard under its HTTP layer.

No global is patched: the client is copied with ``with_options(http_client=…)`` — the SDKs' own
way to swap the HTTP client — around a guard transport that forwards to the client's original
transport (so a custom transport, a proxy or a test's ``MockTransport`` keeps working). The
result is the original client's type.

The guard sits on whichever HTTP library the client holds: ``httpx2`` (the SDKs' own) or a legacy
``httpx`` client, which the ``openai`` SDK still takes as ``http_client``. Nothing of the provider
SDKs or their HTTP libraries is imported until ``wrap`` is called, so the CLI and the proxy run on
an install without the ``clients`` extra.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from spendgate import providers
from spendgate.errors import BadRequest, BudgetExceeded, StoreError

if TYPE_CHECKING:
    from spendgate.sdk._transport import Errors, Guard

C = TypeVar("C")
EXTRA_HINT = "pip install 'spendgate[clients]'"
#: the HTTP status the proxy answers each of spendgate's errors with
_STATUS = {BudgetExceeded: 402, BadRequest: 400, StoreError: 503}


@cache
def errors_for(provider: str) -> Errors:
    """spendgate's errors as subclasses of ``provider``'s SDK error base class."""
    from spendgate.sdk._transport import Errors

    spec = providers.get(provider)
    sdk = importlib.import_module(spec.sdk_module)

    def sub(cls: type[Exception]) -> Any:
        base: Any = sdk
        for name in spec.sdk_error_class(_STATUS[cls]).split("."):
            base = getattr(base, name)
        if base.__init__ is not Exception.__init__:
            # an SDK error built from a response (google-genai's): spendgate's error is built from its
            # message, and the SDK's constructor is left out of the chain
            base = type(base.__name__, (base,), {"__init__": Exception.__init__, "__module__": base.__module__})
        return type(cls.__name__, (cls, base), {"__module__": "spendgate", "__doc__": cls.__doc__,
                                                **spec.sdk_error_fields(_STATUS[cls])})

    return Errors(sub(BudgetExceeded), sub(BadRequest), sub(StoreError))


def _provider_of(client: object) -> providers.Provider | None:
    """The provider whose official SDK ``client`` belongs to."""
    module = type(client).__module__
    for p in providers.all_providers():
        if p.sdk_error and (module == p.sdk_module or module.startswith(p.sdk_module + ".")):
            return p
    return None


def _http_library(http: object) -> ModuleType | None:
    """The module (``httpx2`` or legacy ``httpx``) whose ``Client`` / ``AsyncClient`` ``http`` is.

    Legacy ``httpx`` is looked up among the loaded modules only: a client of it exists only if it
    was imported, and a plain install need not have it."""
    try:
        import httpx2
    except ImportError:  # the SDKs depend on it: without it no client can be guarded
        raise ImportError(f"spendgate.wrap needs the provider SDKs (openai, anthropic): {EXTRA_HINT}") from None
    for lib in (httpx2, sys.modules.get("httpx")):
        if lib is not None and isinstance(http, lib.Client | lib.AsyncClient):
            return lib
    return None


class _Binder:
    """What a provider's ``sdk_guard`` hook is given. Called with an HTTP client: the guard transport
    over that client's own transport (itself if it is one already). ``guard(library)``: a fresh
    :class:`~spendgate.sdk._transport.Guard` for an SDK that is not on an httpx library (botocore,
    whose hooks the binding registers itself)."""

    def __init__(self, sdk: str, capability: str | None, expected: str) -> None:
        self.sdk, self.capability, self.expected = sdk, capability, expected

    def guard(self, library: ModuleType) -> Guard:
        from spendgate.sdk._transport import Guard

        return Guard(self.sdk, errors_for(self.sdk), library, capability=self.capability)

    def __call__(self, http: Any) -> Any:
        from spendgate.sdk._transport import Guarded, transports

        lib = _http_library(http)
        if lib is None:
            raise TypeError(self.expected)
        inner = http._transport
        if isinstance(inner, Guarded):
            return inner
        kit = transports(lib)
        g = self.guard(lib)
        return kit.async_(inner, g) if isinstance(http, lib.AsyncClient) else kit.sync(inner, g)


def wrap(client: C, *, capability: str | None = None) -> C:
    """Guard an ``OpenAI``, ``AsyncOpenAI``, ``Anthropic``, ``AsyncAnthropic`` or ``google.genai``
    ``Client`` (sync and ``.aio``), on whichever HTTP client it holds (an ``httpx2`` one, or a legacy
    ``httpx`` one given as ``http_client``), or a boto3 ``bedrock-runtime`` client (on its botocore
    event hooks: the same client is returned). ``capability``: what the client's calls carry outside
    any ``spendgate.capability`` block.

    A call whose URL is under the ``base_url`` of an ``[upstreams.NAME]`` table of the policy is
    priced as that upstream (an ``AzureOpenAI`` client's deployments through its ``deployments`` map,
    an OpenAI-compatible server from its ``prices`` table and ``free`` globs); a Vertex AI client
    (``genai.Client(vertexai=True)``, ``AnthropicVertex``) is priced as Vertex's providers.

    Raises :class:`ImportError` naming the ``clients`` extra when the provider SDKs are not installed."""
    _http_library(None)  # without the SDKs' HTTP library no client can be guarded: ImportError naming the extra
    spec = _provider_of(client)
    expected = ("spendgate.wrap: expected an OpenAI, AsyncOpenAI, Anthropic, AsyncAnthropic, google.genai or "
                f"boto3 bedrock-runtime client, got {type(client).__name__}")
    if spec is None:
        raise TypeError(expected)
    from spendgate.sdk._context import check_capability
    from spendgate.sdk._transport import Guard, Guarded, transports

    check_capability(capability, "spendgate.wrap capability")
    sdk = spec.name

    guard_for = _Binder(sdk, capability, expected)
    custom = spec.sdk_guard(client, guard_for)
    if custom is not None:
        return custom  # type: ignore[no-any-return]
    http: Any = getattr(client, "_client", None)
    lib = _http_library(http)
    if lib is None:
        raise TypeError(expected)

    inner = http._transport  # the client's own transport, kept underneath the guard
    if isinstance(inner, Guarded):
        return client  # already guarded
    guard = Guard(sdk, errors_for(sdk), lib, capability=capability)
    kit = transports(lib)
    is_async = isinstance(http, lib.AsyncClient)
    transport = kit.async_(inner, guard) if is_async else kit.sync(inner, guard)
    cls: Any = lib.AsyncClient if is_async else lib.Client
    if lib.__name__ == "httpx2":  # the SDK's own defaults (connection limits) for its own library
        module = importlib.import_module(spec.sdk_module)
        cls = getattr(module, "DefaultAsyncHttpxClient" if is_async else "DefaultHttpxClient", cls)
    # the caller's own client settings come along; its connection pool lives in ``inner``, kept
    new_http: Any = cls(transport=transport, timeout=http.timeout, headers=http.headers,
                        follow_redirects=http.follow_redirects, event_hooks=http.event_hooks)
    wrapped: C = client.with_options(http_client=new_http)  # type: ignore[attr-defined]
    # the SDKs close their HTTP client when it is collected, and with it ``inner``, which the new
    # one forwards to: the original is kept as long as the wrapped client lives
    wrapped._spendgate_original = client  # type: ignore[attr-defined]
    return wrapped
