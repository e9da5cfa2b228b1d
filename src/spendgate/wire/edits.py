"""The bytes sent upstream after a decision.

Unchanged unless the decision edited the body (a downgraded model, a clamped output bound), or an
OpenAI stream must carry ``stream_options.include_usage`` to be metered — in which case the usage
chunk the client did not ask for is withheld from it (the returned flag).
"""

from __future__ import annotations

import json
from typing import Any

from spendgate.engine import Decision

#: Chat and legacy completions only meter a stream when asked to include usage.
INCLUDE_USAGE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


def outgoing(route: str, send: bytes, d: Decision) -> tuple[bytes, bool]:
    """(bytes to send, whether to withhold the usage chunk from the caller)."""
    body = d.body
    withhold = False
    patch: dict[str, Any] = dict(d.edits)
    if route in INCLUDE_USAGE_ROUTES and body.get("stream") is True:
        opts = body.get("stream_options")
        if not (isinstance(opts, dict) and opts.get("include_usage") is True):
            patch["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
            withhold = True
    if not patch:
        return send, False
    return json.dumps({**body, **patch}).encode(), withhold
