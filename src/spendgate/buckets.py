"""Which ledger buckets a rule keeps for one scope: their keys, units, limits and periods.

One place for the naming the engine writes and every reader (``status``, ``/spendgate/me``, a
top-up, a per-scope limit) must find again: ``rule|per=value`` (``|period`` for a calendar window),
``#tokens`` and ``#requests`` for the other units. A reader that rebuilt a key by hand would read a
bucket nobody charges.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import lru_cache

from spendgate.ledger import Bucket
from spendgate.money import usd_to_nanos
from spendgate.policy.model import Rule

#: the units a rule may count, in the order its buckets are listed
UNITS = ("usd", "tokens", "requests")


def bucket_key(rule_name: str, scope: str, period: str | None = None) -> str:
    """The ledger key of one rule's bucket: ``name|per=value`` (``|period`` for calendar windows)."""
    key = f"{rule_name}|{scope}"
    return f"{key}|{period}" if period else key


def tokens_key(usd_key: str) -> str:
    return f"{usd_key}#tokens"


def requests_key(usd_key: str) -> str:
    return f"{usd_key}#requests"


def unit_key(usd_key: str, unit: str) -> str:
    return usd_key if unit == "usd" else f"{usd_key}#{unit}"


@dataclass(frozen=True, slots=True)
class Limit:
    """One scope's own limits for a ``per`` rule (``spendgate budgets limit``); None keeps the rule's.
    Dollars in nano-dollars."""

    usd: int | None = None
    tokens: int | None = None
    requests: int | None = None

    def of(self, unit: str) -> int | None:
        return {"usd": self.usd, "tokens": self.tokens, "requests": self.requests}.get(unit)


def rule_limit(rule: Rule, unit: str, override: Limit | None = None) -> int | None:
    """``rule``'s limit in ``unit`` for a scope with ``override`` (None: the rule does not count it)."""
    own = override.of(unit) if override is not None else None
    if own is not None:
        return own
    if unit == "usd":
        return _nanos(rule.usd) if rule.usd is not None else None
    return rule.tokens if unit == "tokens" else rule.requests


@lru_cache(maxsize=4096)
def _nanos(usd: Decimal) -> int:
    """A rule's dollar limit in nano-dollars: asked for every bucket of every request, and a policy
    has few distinct limits."""
    return usd_to_nanos(usd)


@dataclass(frozen=True, slots=True)
class RuleBucket:
    """One bucket of a windowed rule for one scope at one instant."""

    unit: str
    limit: int
    key: str
    #: a calendar period's label ("2026-12"), a rolling window's slot number, "" for total
    period: str
    #: when a calendar period ends (epoch seconds), else None
    resets_at: float | None
    window_s: int | None
    #: the ledger's bucket, enforced and counted only (built once with this, asked for per request)
    enforced: Bucket = field(init=False, compare=False, repr=False)
    counted: Bucket = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        enforced = Bucket(self.key, self.limit, self.window_s, self.unit, self.resets_at)  # type: ignore[arg-type]
        object.__setattr__(self, "enforced", enforced)
        object.__setattr__(self, "counted", replace(enforced, limit=None))

    def bucket(self, enforce: bool = True) -> Bucket:
        """The ledger's bucket; ``enforce`` False counts without refusing (alert and shadow rules)."""
        return self.enforced if enforce else self.counted


#: rule_buckets' answers: (id of the rule, scope, override, period) -> (the rule, its buckets); the
#: engine asks for every windowed rule of every request, and the answer changes once a period
_MEMO: dict[tuple[int, str, Limit | None, object], tuple[Rule, tuple[RuleBucket, ...]]] = {}
#: entries kept before the memo starts over (one per rule, scope and period: sessions come and go)
MEMO_MAX = 8192


def rule_buckets(rule: Rule, scope: str, now: float, override: Limit | None = None) -> tuple[RuleBucket, ...]:
    """The buckets ``rule`` counts for ``scope`` (``per=value``) at ``now``, one per unit it limits.
    A ``window = "request"`` rule keeps none: it weighs one call."""
    w = rule.window
    if w.kind == "request":
        return ()
    if w.kind == "calendar":
        token: object = w.period_of(now, rule.tz)
    elif w.kind == "rolling":
        token = int(now // w.seconds)
    else:
        token = None
    memo_key = (id(rule), scope, override, token)
    hit = _MEMO.get(memo_key)
    if hit is not None and hit[0] is rule:
        return hit[1]
    key, window_s, period = bucket_key(rule.name, scope), None, ""
    resets: float | None = None
    if w.kind == "calendar":
        period, resets = w.period_of(now, rule.tz)
        key = bucket_key(rule.name, scope, period)
    elif w.kind == "rolling":
        window_s = w.seconds
        period = str(token)
    out = []
    for unit in UNITS:
        limit = rule_limit(rule, unit, override)
        if limit is not None:
            out.append(RuleBucket(unit, int(limit), unit_key(key, unit), period, resets, window_s))
    if len(_MEMO) >= MEMO_MAX:
        _MEMO.clear()
    _MEMO[memo_key] = (rule, tuple(out))
    return tuple(out)
