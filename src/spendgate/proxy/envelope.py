"""Errors in each provider's own envelope, so official SDKs raise their usual exceptions.

The envelope itself is the provider's (:meth:`spendgate.providers.base.Provider.error_body`); a
refusal adds a ``spendgate`` object with the decision's numbers. ``x-should-retry`` is never sent:
Claude Code would retry a refusal forever.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from spendgate import providers


def error_body(provider: str, status: int, message: str, *, code: str | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return providers.get(provider).error_body(status, message, code=code, extra=extra)


def error_response(provider: str, status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    body = error_body(provider, status, message, code=code, extra=extra)
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=dict(headers or {}))


def sse_error(provider: str, status: int, message: str, *, code: str | None = None) -> bytes:
    """The last event of a stream that cannot be finished (the upstream cut it mid-way): an error
    in the provider's own stream shape, which the official SDKs raise as their usual error. It is
    sent inside the stream that already started — never a second status line."""
    return providers.get(provider).sse_error(status, message, code=code)
