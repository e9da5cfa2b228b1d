"""Estimating a call before making it, and asserting what calls cost (in tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from spendgate.estimate import Estimate
from spendgate.money import nanos_to_usd
from spendgate.report import Row
from spendgate.report import report as _report
from spendgate.sdk import _runtime


def estimate(model: str, messages: Sequence[Any], **request: Any) -> Estimate:
    """The worst case of a chat / messages call, priced as the guard would; no call is made.

    Priced as a chat turn of the provider serving ``model`` (Claude models as Messages requests,
    an unknown model as OpenAI-compatible chat).
    ``request`` takes the call's other arguments (``max_tokens``, ``tools``, ``system``, …).
    """
    from spendgate import providers

    est = _runtime.engine().estimator
    spec = providers.for_model(model, est.prices)
    body = {"model": model, "messages": list(messages), **request}
    return est.estimate(spec.name, spec.chat_route, body)


@dataclass(frozen=True)
class Report:
    """Spend grouped by ``by`` over a period, dearest group first."""

    by: tuple[str, ...]
    rows: tuple[Row, ...]

    @property
    def total_usd(self) -> Decimal:
        return nanos_to_usd(sum(r.cost for r in self.rows))

    def usd(self, **filters: str) -> Decimal:
        """Spend of the rows matching every ``field=value`` filter (fields must be grouped by)."""
        unknown = sorted(set(filters) - set(self.by))
        if unknown:
            raise ValueError(f"cannot filter on {unknown[0]!r}: it is not in group_by {list(self.by)}")
        idx = {f: self.by.index(f) for f in filters}
        return nanos_to_usd(sum(r.cost for r in self.rows if all(r.group[idx[f]] == v for f, v in filters.items())))

    def assert_under(self, usd: float | str | Decimal, **filters: str) -> Report:
        """Fail (AssertionError) when the matching spend is above ``usd``; returns self to chain."""
        limit = Decimal(str(usd))
        spent = self.usd(**filters)
        if spent > limit:
            where = ", ".join(f"{k}={v}" for k, v in filters.items()) or "all calls"
            raise AssertionError(f"spend for {where} is ${spent}, above ${limit} "
                                 f"({sum(1 for _ in self.rows)} groups by {', '.join(self.by)})")
        return self

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict(self.by) for r in self.rows]


def report(group_by: Sequence[str] = ("model",), since: str | float = "24h") -> Report:
    """Spend recorded in the configured store since ``since`` (a duration such as ``"24h"``, or
    epoch seconds), grouped by ``group_by`` (``model``, ``provider``, ``user``, ``feature``, any tag)."""
    by = tuple(group_by)
    return Report(by, tuple(_report(_runtime.engine().ledger, by, since)))
