"""Budgets and tags that follow the code that sets them: contextvars, so asyncio tasks inherit them
and a thread the caller starts carries them when started through :func:`bind`.

Budgets nest: every active budget's rule applies to a call at once, so an inner budget (even one
that downgrades) never lets an outer one be exceeded.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any, ParamSpec, TypeVar, cast

from spendgate.engine import Approval, Decision, Engine, global_keys
from spendgate.errors import ConfigError
from spendgate.policy.model import CAPABILITIES, Rule
from spendgate.policy.parse import parse as parse_policy
from spendgate.request import Request
from spendgate.sdk import _runtime

P = ParamSpec("P")
R = TypeVar("R")
OnExceed = str | Callable[[Exception], bool]
_ACTIONS = ("block", "downgrade", "clamp", "truncate", "alert")


@dataclass(frozen=True, slots=True)
class Scope:
    """One entered budget: its rule (with a bucket of its own) and what to do when it trips."""

    rule: Rule
    callback: Callable[[Exception], bool] | None = None


_scopes: contextvars.ContextVar[tuple[Scope, ...]] = contextvars.ContextVar("spendgate_budgets", default=())
_tags: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "spendgate_tags", default=MappingProxyType({}))


def active_scopes() -> tuple[Scope, ...]:
    return _scopes.get()


def active_tags() -> Mapping[str, str]:
    return _tags.get()


_capability: contextvars.ContextVar[str | None] = contextvars.ContextVar("spendgate_capability", default=None)


def active_capability() -> str | None:
    return _capability.get()


def check_capability(value: str | None, where: str) -> str | None:
    """``value`` if it names a capability (or is None), else a ConfigError naming ``where`` and the choices."""
    if value is not None and value not in CAPABILITIES:
        raise ConfigError(f"{where}: expected one of {', '.join(CAPABILITIES)}, got {value!r}")
    return value


@contextmanager
def capability(name: str) -> Iterator[None]:
    """Calls inside carry capability ``name`` (``read_only`` < ``data_write`` < ``payment_initiate`` <
    ``payment_execute``): a rule with ``requires_capability`` refuses, before pricing, a call whose
    capability ranks lower. In-process code is the operator, so what it says here is trusted; an
    inner block may lower or raise it, and leaving the block restores the outer one."""
    token = _capability.set(check_capability(name, "spendgate.capability"))
    try:
        yield
    finally:
        _capability.reset(token)


class budget:
    """A budget for the calls made inside it, as a context manager or a decorator (sync or async).

    ``window=None`` (default): each entry — each ``with`` block, each call of a decorated function —
    gets a fresh budget. With a window (``"1h"``, ``"day"``, ``"total"``), the budget is one
    bucket shared by every entry, named by ``name`` (default: the decorated function).
    ``on_exceed``: ``"block"`` (raise :class:`spendgate.BudgetExceeded`), ``"downgrade"`` (along
    ``downgrade``), ``"clamp"`` (shrink the output bound, if ``min_output`` fits), ``"alert"`` (allow
    and record), or a callable given the refusal that returns True to let the call through once.
    """

    def __init__(self, usd: float | str | Decimal | None = None, *, tokens: int | None = None,
                 window: str | None = None, on_exceed: OnExceed = "block",
                 downgrade: Mapping[str, str] | list[str] | None = None, min_output: int | None = None,
                 name: str | None = None, timezone: str | None = None) -> None:
        callback = on_exceed if callable(on_exceed) else None
        action = "hold" if callback is not None else on_exceed
        if callback is None and on_exceed not in _ACTIONS:
            raise ConfigError(f"on_exceed: expected one of {', '.join(_ACTIONS)} or a callable, got {on_exceed!r}")
        raw: dict[str, Any] = {"name": "sdk", "window": window or "total", "action": action}
        if usd is not None:
            raw["usd"] = str(usd) if isinstance(usd, Decimal) else usd
        if tokens is not None:
            raw["tokens"] = tokens
        if downgrade is not None:
            raw["downgrade"] = downgrade
        if min_output is not None:
            raw["min_output"] = min_output
        if timezone is not None:
            raw["timezone"] = timezone
        try:
            [self._rule] = parse_policy({"budget": [raw]}).rules
        except ConfigError as exc:  # name the argument, not a policy-file path
            raise ConfigError(str(exc).replace('budget[0] "sdk".', "spendgate.budget ")) from None
        self._callback = callback
        self._shared = window is not None
        self._name = name
        self._tokens: list[tuple[contextvars.Token[tuple[Scope, ...]], Scope]] = []

    def _scope(self, label: str) -> Scope:
        key = f"sdk:{self._name or label}" if self._shared else f"sdk:{self._name or label}:{uuid.uuid4().hex[:12]}"
        return Scope(replace(self._rule, name=key), self._callback)

    @contextmanager
    def _entered(self, label: str) -> Iterator[None]:
        scope = self._scope(label)
        token = _scopes.set((*_scopes.get(), scope))
        try:
            yield
        finally:
            _scopes.reset(token)
            self._done(scope)

    def __enter__(self) -> budget:
        scope = self._scope("budget")
        self._tokens.append((_scopes.set((*_scopes.get(), scope)), scope))
        return self

    def __exit__(self, *exc: object) -> None:
        token, scope = self._tokens.pop()
        _scopes.reset(token)
        self._done(scope)

    def _done(self, scope: Scope) -> None:
        """A per-entry budget's bucket ends with its block: the store keeps nothing of it (its
        spend stays in the event log). Shared, windowed budgets keep counting."""
        if not self._shared:
            _runtime.engine().ledger.forget(global_keys(scope.rule))

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        label = f"{fn.__module__}.{fn.__qualname__}"
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self._entered(label):
                    return await fn(*args, **kwargs)
            return cast(Callable[P, R], run_async)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._entered(label):
                return fn(*args, **kwargs)
        return run


@contextmanager
def tags(**values: str) -> Iterator[None]:
    """Attribute the calls inside to these tags (``user``, ``team``, ``session``, ``agent`` and
    ``feature`` also fill the identity fields budgets are counted ``per``)."""
    bad = [k for k, v in values.items() if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"spendgate.tags: values must be strings; {bad[0]}={values[bad[0]]!r}")
    token = _tags.set({**_tags.get(), **values})
    try:
        yield
    finally:
        _tags.reset(token)


def bind(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` bound to the current budgets and tags, for a thread or an executor.

    A new thread starts with empty contextvars; ``threading.Thread(target=spendgate.bind(work))``
    or ``executor.submit(spendgate.bind(work), …)`` runs ``work`` under the budgets active where
    ``bind`` was called, sharing their buckets (spend in the thread counts against them).
    """
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return ctx.copy().run(fn, *args, **kwargs)
    return run


def answer_refusal(engine: Engine, req: Request, d: Decision, rules: list[Rule],
                   exceeded: Callable[[str, dict[str, Any]], Exception]) -> Decision:
    """A refusal (raised as ``exceeded(message, details)``), unless the tripped budget's
    ``on_exceed`` callable lets the request through once — an LLM call and a reservation alike."""
    err = exceeded(d.message, d.to_dict())
    tripped = d.trip.rule.name if d.trip is not None else None
    callback = next((s.callback for s in active_scopes() if s.rule.name == tripped and s.callback), None)
    if callback is not None and callback(err):
        again = engine.decide(req, extra_rules=rules, approval=Approval(by="on_exceed callback"))
        if again.allowed:
            return again
        err = exceeded(again.message, again.to_dict())
    raise err
