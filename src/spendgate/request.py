"""What the engine is asked about: a provider request and who sent it. No HTTP here."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from spendgate.estimate.shape import TokenShape
from spendgate.money import usd_to_nanos

if TYPE_CHECKING:
    from spendgate.policy.model import Rule

NONE = "(none)"
#: The provider and route of spend that is not an LLM call (a paid search API, a tool): priced at
#: the fixed amount the caller names, counted under the same rules. A rule matches it with
#: ``match = { provider = "tool" }`` or by its name as ``match.model``.
TOOL = "tool"


@dataclass(slots=True)
class Identity:
    """Who a request is counted under. ``key`` is a hash of the credential, never the credential (for
    a virtual key, the hash of its first secret, so it stays the same across ``keys rotate``)."""

    key: str | None = None
    user: str | None = None
    team: str | None = None
    session: str | None = None
    agent: str | None = None
    feature: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    #: what the caller may be trusted with (:data:`spendgate.policy.model.CAPABILITIES`): from its
    #: virtual key, or from the client only where the policy trusts clients with it
    capability: str | None = None
    #: the model globs the caller's key allows (empty: any model)
    models: tuple[str, ...] = ()
    #: budgets bound to the caller's key, applied like any rule (a key's own ``--usd`` budget)
    rules: tuple[Rule, ...] = ()

    def value(self, per: str) -> str:
        """The scope value a ``per`` rule counts this identity under.

        A request without a session is counted under a session derived from its credentials: a
        missing header must never let an agent skip its session budget.
        """
        if per == "global":  # one bucket for every request: never a value a client's tag could pick
            return NONE
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


def parse_tags(value: str) -> dict[str, str]:
    """``feature=search, team=ml`` -> {"feature": "search", "team": "ml"}: the one text form of tags,
    in a header (``X-Spendgate-Tags``) or on the command line (``--tag``); a malformed part raises
    ValueError naming it (the caller says where it came from)."""
    tags: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ValueError(f"expected key=value pairs, got {part.strip()!r}")
        tags[k.strip()] = v.strip()
    return tags


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
    #: a fixed amount in nano-dollars (spend that is not an LLM call): the request is priced at
    #: exactly this, with no token estimate, and counted under its ``body["model"]`` as its name
    fixed_nanos: int | None = None
    #: spend that already happened (``spendgate.charge``): recorded even past a limit, never
    #: refused — money spent cannot be un-spent, and a ledger that left it out would under-count
    force: bool = False


def usd_arg(value: object, name: str = "usd") -> int:
    """A dollar amount given by a caller (a ``Decimal``, an int, a float or a string such as
    ``"0.25"``) in nano-dollars. Floats go through their shortest text (``0.1`` is ten cents, not
    ``0.1000000000000000055…``). A negative, non-finite or non-numeric value is a ``ValueError``
    naming the argument: an amount the ledger cannot count exactly is never guessed at."""
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, float, str)):
        raise ValueError(f"{name}: expected a dollar amount (a number or a string such as \"0.25\"), got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite dollar amount, got {value!r}")
    try:
        usd = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ValueError(f"{name}: expected a dollar amount such as \"0.25\", got {value!r}") from None
    if not usd.is_finite():
        raise ValueError(f"{name}: expected a finite dollar amount, got {value!r}")
    if usd < 0:
        raise ValueError(f"{name}: a dollar amount cannot be negative, got {value!r}")
    return usd_to_nanos(usd)


def tool_request(nanos: int, identity: Identity, name: str | None = None, *, force: bool = False) -> Request:
    """The engine's request for ``nanos`` of non-LLM spend named ``name`` (default ``"tool"``)."""
    return Request(TOOL, TOOL, {"model": name or TOOL}, identity, fixed_nanos=nanos, force=force)
