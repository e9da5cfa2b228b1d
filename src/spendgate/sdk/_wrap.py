"""``spendgate.wrap(client)``: the same client, with the guard under its HTTP layer.

No global is patched: the client is copied with ``with_options(http_client=…)`` — the SDKs' own
way to swap the HTTP client — around a guard transport that forwards to the client's original
transport (so a custom transport, a proxy or a test's ``MockTransport`` keeps working). The
result is the original client's type.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any, TypeVar, cast

import httpx2

from spendgate.errors import BadRequest, BudgetExceeded, StoreError
from spendgate.sdk._transport import AsyncGuardTransport, Errors, Guard, GuardTransport

C = TypeVar("C")
_SDKS = {"openai": "OpenAIError", "anthropic": "AnthropicError"}


@cache
def errors_for(sdk: str) -> Errors:
    base = getattr(importlib.import_module(sdk), _SDKS[sdk])

    def sub(cls: type[Exception]) -> Any:
        return type(cls.__name__, (cls, base), {"__module__": "spendgate", "__doc__": cls.__doc__})

    return Errors(sub(BudgetExceeded), sub(BadRequest), sub(StoreError))


def wrap(client: C) -> C:
    """Guard an ``OpenAI``, ``AsyncOpenAI``, ``Anthropic`` or ``AsyncAnthropic`` client."""
    sdk = type(client).__module__.split(".", 1)[0]
    http = getattr(client, "_client", None)
    if sdk not in _SDKS or not isinstance(http, httpx2.Client | httpx2.AsyncClient):
        raise TypeError(f"spendgate.wrap: expected an OpenAI, AsyncOpenAI, Anthropic or AsyncAnthropic client, "
                        f"got {type(client).__name__}")
    inner = http._transport  # the client's own transport: kept underneath the guard
    if isinstance(inner, GuardTransport | AsyncGuardTransport):
        return client  # already guarded
    module = importlib.import_module(sdk)
    guard = Guard(sdk, errors_for(sdk))
    if isinstance(http, httpx2.AsyncClient):
        new_http: Any = module.DefaultAsyncHttpxClient(
            transport=AsyncGuardTransport(cast(httpx2.AsyncBaseTransport, inner), guard))
    else:
        new_http = module.DefaultHttpxClient(transport=GuardTransport(cast(httpx2.BaseTransport, inner), guard))
    wrapped: C = client.with_options(http_client=new_http)  # type: ignore[attr-defined]
    return wrapped
