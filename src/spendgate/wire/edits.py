"""The bytes sent upstream after a decision.

Unchanged unless the decision edited the body (a downgraded model, a clamped output bound), or a
stream must be asked to report its usage to be metered (its provider's ``stream_edits``) — in which
case the usage event the client did not ask for is withheld from it (the returned flag).
"""

from __future__ import annotations

import json
from typing import Any

from spendgate import providers
from spendgate.engine import Decision


def outgoing(route: str, send: bytes, d: Decision, provider: str | None = None) -> tuple[bytes, bool]:
    """(bytes to send, whether to withhold the usage event from the caller). ``provider`` None:
    the one whose route ``route`` is."""
    body = d.body
    spec = providers.find(provider) if provider is not None else providers.owner(route)
    patch: dict[str, Any] = dict(d.edits)
    metered = spec.stream_edits(route, body) if spec is not None else {}
    withhold = bool(metered)
    patch.update(metered)
    if not patch:
        return send, False
    return json.dumps({**body, **patch}).encode(), withhold
