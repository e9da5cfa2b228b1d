"""Errors in each provider's own envelope, so official SDKs raise their usual exceptions.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Anthropic:
``{"type": "error", "error": {"type", "message"}}``. A refusal adds a ``spendgate`` object with the
decision's numbers. ``x-should-retry`` is never sent: Claude Code would retry a refusal forever.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    502: "api_error", 503: "overloaded_error", 504: "api_error"}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded",
                 403: "permission_error", 404: "not_found", 413: "invalid_request_error",
                 502: "upstream_error", 503: "service_unavailable", 504: "upstream_timeout"}


def error_body(provider: str, status: int, message: str, *, code: str | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if provider == "anthropic":
        body: dict[str, Any] = {"type": "error",
                                "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    else:
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"), "param": None,
                          "code": code}}
    if extra:
        body["spendgate"] = dict(extra)
        if provider != "anthropic":
            # the OpenAI SDK exposes only the "error" object as APIStatusError.body: carry it there too
            body["error"]["spendgate"] = body["spendgate"]
    return body


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
    body = error_body(provider, status, message, code=code)
    if provider == "anthropic":
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    # OpenAI chat streams carry unnamed events; Responses streams name theirs ("error")
    body.update(type="error", message=message, code=code)
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
