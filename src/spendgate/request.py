"""What the engine is asked about: a provider request and who sent it. No HTTP here."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spendgate.estimate.shape import TokenShape

NONE = "(none)"


@dataclass(slots=True)
class Identity:
    """Who a request is counted under. ``key`` is a hash of the credential, never the credential."""

    key: str | None = None
    user: str | None = None
    team: str | None = None
    session: str | None = None
    agent: str | None = None
    feature: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def value(self, per: str) -> str:
        """The scope value a ``per`` rule counts this identity under.

        A request without a session is counted under a session derived from its credentials: a
        missing header must never let an agent skip its session budget.
        """
        if per == "session":
            if self.session:
                return self.session
            return f"key:{self.key}" if self.key else NONE
        if per.startswith("tag:"):
            return self.tags.get(per[4:]) or NONE
        direct = getattr(self, per, None) if per in ("key", "user", "team", "agent", "feature") else None
        return direct or self.tags.get(per) or NONE

    def dims(self) -> dict[str, str]:
        """Reporting dimensions: every identity field that is set, tags included."""
        out = {k: v for k, v in (("key", self.key), ("user", self.user), ("team", self.team),
                                 ("session", self.value("session")), ("agent", self.agent),
                                 ("feature", self.feature)) if v}
        for k, v in self.tags.items():
            out.setdefault(k, v)
        return out


    def fingerprint(self) -> str:
        """Every field a decision may count this identity under, as one string: two requests share a
        remembered answer (a refusal's repeat, an approval by id) only if they share all of it."""
        tags = ",".join(f"{k}={v}" for k, v in sorted(self.tags.items()))
        return "\0".join((self.key or "", self.user or "", self.team or "", self.value("session"), self.agent or "",
                          self.feature or "", tags))


def hash_key(secret: str) -> str:
    """A stable, non-reversible id for a provider key (the first 16 hex of its SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


@dataclass(slots=True)
class Request:
    provider: str  # openai | anthropic
    route: str  # e.g. /v1/chat/completions
    body: Mapping[str, Any]
    identity: Identity = field(default_factory=Identity)
    #: token counts already known (a replayed trace, an SDK estimate): skips parsing ``body``
    shape: TokenShape | None = None
    #: the body as sent, when the door has it: the audit log keeps its hash, never the bytes
    raw: bytes | None = None
    #: a dry run (``X-Spendgate-Estimate: 1``): decided as things stand, never sent — so it fires
    #: no alert and leaves no event: nothing happened
    dry: bool = False
