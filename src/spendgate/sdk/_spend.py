"""Spend that is not an LLM call — a paid search API, a tool — under the same budgets.

An amount goes through the engine like an LLM call, priced at exactly what the caller names (a
request of provider ``"tool"``, counted under its name as the model): the active
:func:`spendgate.budget` scopes, the policy's rules and the tags of :func:`spendgate.tags` all
apply, in the same buckets, with the same events and audit entries.

- :func:`charge` records money already spent. It is never refused: a ledger that left out spend
  because it came past a limit would under-count, and every later call would be judged on a
  number lower than the truth. A charge past a limit is recorded, logged, and reported
  (:attr:`Spent.over`); the budget then refuses what comes next.
- :func:`reserve` holds first (refused with :class:`spendgate.BudgetExceeded` when it does not
  fit), captures after: for a call whose price is known only once it returns.
- :func:`tool` is :func:`reserve` around a function, charged its stated price when it returns.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from spendgate.engine import Decision, Engine
from spendgate.errors import BudgetExceeded, ConfigError
from spendgate.money import fmt_usd, nanos_to_usd
from spendgate.request import Identity, Request, tool_request, usd_arg
from spendgate.sdk import _runtime
from spendgate.sdk._context import active_capability, active_scopes, active_tags, answer_refusal

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger("spendgate.sdk")
Amount = Decimal | int | float | str


def _identity(extra: Mapping[str, str], where: str) -> Identity:
    """The active tags with ``extra`` on top, as the identity the budgets count ``per``."""
    bad = [k for k, v in extra.items() if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"{where}: tag values must be strings; {bad[0]}={extra[bad[0]]!r}")
    tags = {**active_tags(), **extra}
    return Identity(tags=tags, user=tags.get("user"), team=tags.get("team"), session=tags.get("session"),
                    agent=tags.get("agent"), feature=tags.get("feature"), capability=active_capability())


def _rules() -> list[Any]:
    return [s.rule for s in active_scopes()]


@dataclass(frozen=True, slots=True)
class Spent:
    """What :func:`charge` recorded."""

    decision_id: str
    usd: Decimal
    #: the rules this charge went past (recorded all the same); empty when it fit
    over: tuple[str, ...] = ()

    @property
    def over_budget(self) -> bool:
        return bool(self.over)


def charge(usd: Amount, *, name: str | None = None, **tags: str) -> Spent:
    """Record ``usd`` already spent outside an LLM call, under the active budgets, the policy's
    rules and ``tags`` (on top of :func:`spendgate.tags`); ``name`` names it in reports and rules
    (``match.model``; default ``"tool"``).

    Never refused and never raises for a budget: money spent cannot be un-spent. When it takes a
    budget past its limit it is recorded anyway, a warning is logged and :attr:`Spent.over` names
    the rules; the next call under them is refused. Raises ``ValueError`` for an amount that is
    negative, not finite or not a number, and :class:`spendgate.StoreError` when the store fails.
    """
    nanos = usd_arg(usd)
    req = tool_request(nanos, _identity(tags, "spendgate.charge"), name, force=True)
    d, c = _runtime.engine().record_spend(req, extra_rules=_rules())
    if d.over:
        log.warning("spendgate.charge: %s recorded past the limit of %s (decision %s)", fmt_usd(nanos),
                    ", ".join(d.over), d.id)
    return Spent(d.id, nanos_to_usd(c.cost_nanos), d.over)


def _hold(engine: Engine, req: Request) -> Decision:
    """Hold a reservation like an LLM call: a refusal raises :class:`BudgetExceeded`, unless the
    tripped budget's ``on_exceed`` callable lets it through once."""
    rules = _rules()
    d = engine.decide(req, extra_rules=rules)
    return d if d.allowed else answer_refusal(engine, req, d, rules, BudgetExceeded)


class Reservation:
    """A hold of ``usd`` under the active budgets, settled once: :meth:`capture` (what it cost),
    :meth:`release` (nothing was spent), or when its block ends — released when the block raises,
    charged in full when it returns without saying (the reservation is the most it may cost, so
    silence is charged as the most, flagged estimated). A cancellation or interrupt (not an
    ``Exception``) leaves the outcome unknown: charged in full too, never dropped.

    A hold lives ``hold_ttl_s`` of the policy (10 min by default); one left longer is charged in
    full by the store and a later :meth:`capture` only reports that."""

    def __init__(self, usd: Amount, name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        self.nanos = usd_arg(usd)
        self._name = name
        self._tags = dict(tags or {})
        self._identity = _identity(self._tags, "spendgate.reserve")
        self._decision: Decision | None = None
        self._engine: Engine | None = None
        self._charged: int | None = None
        self._lock = threading.Lock()

    @property
    def usd(self) -> Decimal:
        """The amount reserved."""
        return nanos_to_usd(self.nanos)

    @property
    def decision_id(self) -> str | None:
        return self._decision.id if self._decision is not None else None

    @property
    def charged_usd(self) -> Decimal | None:
        """What was charged once settled (0 when released), None while the hold stands."""
        return nanos_to_usd(self._charged) if self._charged is not None else None

    def open(self) -> Reservation:
        """Hold the amount now (what entering the ``with`` block does)."""
        if self._decision is not None:
            raise RuntimeError("spendgate.reserve: this reservation is already held; make a new one")
        self._engine = _runtime.engine()
        self._decision = _hold(self._engine, tool_request(self.nanos, self._identity, self._name))
        return self

    def capture(self, usd: Amount) -> Decimal:
        """Charge what the call cost (at most the reservation) and release the rest; returns the
        amount charged. Above the reservation it is a ``ValueError`` naming both amounts, and the
        whole reservation is charged: the hold is the upper bound the budgets were checked at, so
        reserve enough."""
        nanos = usd_arg(usd)
        if nanos > self.nanos:
            self._settle(self.nanos, estimated=True)
            raise ValueError(f"spendgate.reserve: capture of ${nanos_to_usd(nanos)} is above the reservation of "
                             f"${self.usd}; the reservation (${self.usd}) was charged. Reserve the most a call "
                             "can cost.")
        return self._settle(nanos)

    def release(self) -> None:
        """Nothing was spent: drop the hold without charge."""
        with self._lock:
            d, engine = self._take()
            self._charged = 0
        engine.release(d)

    def _take(self) -> tuple[Decision, Engine]:
        if self._decision is None or self._engine is None:
            raise RuntimeError("spendgate.reserve: the reservation is not held (use it in a with block)")
        if self._charged is not None:
            raise RuntimeError(f"spendgate.reserve: reservation {self._decision.id} is already settled "
                               f"(charged ${nanos_to_usd(self._charged)})")
        return self._decision, self._engine

    def _settle(self, nanos: int, estimated: bool = False) -> Decimal:
        with self._lock:
            d, engine = self._take()
            self._charged = nanos
        engine.capture_amount(d, nanos, estimated=estimated)
        return nanos_to_usd(nanos)

    def _exit(self, exc: BaseException | None) -> None:
        if self._charged is not None or self._decision is None:
            return
        if isinstance(exc, Exception):
            self.release()  # the paid call failed: it is not billed
        else:  # returned without saying, or an unknown outcome: the most it may have cost
            self._settle(self.nanos, estimated=True)

    def __enter__(self) -> Reservation:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._exit(exc)

    async def __aenter__(self) -> Reservation:
        return self.open()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._exit(exc)


def reserve(usd: Amount, *, name: str | None = None, **tags: str) -> Reservation:
    """``with spendgate.reserve(usd=0.05) as r: … r.capture(actual)`` (or ``async with``): hold
    ``usd`` under the active budgets, rules and ``tags`` before a paid call, raising
    :class:`spendgate.BudgetExceeded` when it does not fit; see :class:`Reservation` for how it
    settles. ``name`` names it in reports and rules (default ``"tool"``)."""
    return Reservation(usd, name, tags)


def tool(usd: Amount, *, name: str | None = None, **tags: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator for a function that makes a paid call costing ``usd`` (sync or async): each
    call reserves ``usd`` first (refused with :class:`spendgate.BudgetExceeded` when it does not
    fit, the function then not run), is charged ``usd`` when it returns and nothing when it raises.
    ``name`` defaults to the function's name."""
    usd_arg(usd)  # a wrong amount fails where it is written, not at the first call

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        label = name or fn.__name__
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                async with Reservation(usd, label, tags) as r:
                    result = await fn(*args, **kwargs)
                    r.capture(usd)
                    return result
            return cast(Callable[P, R], run_async)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with Reservation(usd, label, tags) as r:
                result = fn(*args, **kwargs)
                r.capture(usd)
                return result
        return run
    return decorate
