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
    from spendgate.sdk._transport import Errors

C = TypeVar("C")
#: the official SDK package of each provider that has one -> its error base class
_SDKS = {p.name: p.sdk_error for p in providers.all_providers() if p.sdk_error}
EXTRA_HINT = "pip install 'spendgate[clients]'"


@cache
def errors_for(sdk: str) -> Errors:
    from spendgate.sdk._transport import Errors

    base = getattr(importlib.import_module(sdk), _SDKS[sdk])

    def sub(cls: type[Exception]) -> Any:
        return type(cls.__name__, (cls, base), {"__module__": "spendgate", "__doc__": cls.__doc__})

    return Errors(sub(BudgetExceeded), sub(BadRequest), sub(StoreError))


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


def wrap(client: C, *, capability: str | None = None) -> C:
    """Guard an ``OpenAI``, ``AsyncOpenAI``, ``Anthropic`` or ``AsyncAnthropic`` client, on whichever
    HTTP client it holds (an ``httpx2`` one, or a legacy ``httpx`` one given as ``http_client``).
    ``capability``: what the client's calls carry outside any ``spendgate.capability`` block.

    Raises :class:`ImportError` naming the ``clients`` extra when the provider SDKs are not installed."""
    sdk = type(client).__module__.split(".", 1)[0]
    http: Any = getattr(client, "_client", None)
    lib = _http_library(http)
    if sdk not in _SDKS or lib is None:
        raise TypeError(f"spendgate.wrap: expected an OpenAI, AsyncOpenAI, Anthropic or AsyncAnthropic client, "
                        f"got {type(client).__name__}")
    from spendgate.sdk._context import check_capability
    from spendgate.sdk._transport import Guard, Guarded, transports

    check_capability(capability, "spendgate.wrap capability")

    inner = http._transport  # the client's own transport, kept underneath the guard
    if isinstance(inner, Guarded):
        return client  # already guarded
    guard = Guard(sdk, errors_for(sdk), lib, capability=capability)
    kit = transports(lib)
    is_async = isinstance(http, lib.AsyncClient)
    transport = kit.async_(inner, guard) if is_async else kit.sync(inner, guard)
    cls: Any = lib.AsyncClient if is_async else lib.Client
    if lib.__name__ == "httpx2":  # the SDK's own defaults (connection limits) for its own library
        module = importlib.import_module(sdk)
        cls = getattr(module, "DefaultAsyncHttpxClient" if is_async else "DefaultHttpxClient", cls)
    # the caller's own client settings come along; its connection pool lives in ``inner``, kept
    new_http: Any = cls(transport=transport, timeout=http.timeout, headers=http.headers,
                        follow_redirects=http.follow_redirects, event_hooks=http.event_hooks)
    wrapped: C = client.with_options(http_client=new_http)  # type: ignore[attr-defined]
    return wrapped
