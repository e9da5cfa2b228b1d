"""spendgate: a pre-send spend guard for LLM API calls.

In-process use wraps the official clients::

    client = spendgate.wrap(OpenAI())
    with spendgate.budget(usd=0.50), spendgate.tags(feature="support"):
        client.chat.completions.create(...)

Spend that is not an LLM call counts under the same budgets: ``spendgate.charge(usd=…)`` for
money already spent, ``with spendgate.reserve(usd=…) as r: … r.capture(actual)`` and
``@spendgate.tool(usd=…)`` for a paid call.

``import spendgate`` loads nothing of the provider SDKs (``openai``, ``anthropic``, ``httpx2``): the
proxy and the CLI run on a plain install. ``wrap`` is loaded on first use and imports them when
called; without them it says which extra to install (``pip install 'spendgate[clients]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spendgate.errors import BudgetExceeded, ConfigError, SpendgateError, StoreError
from spendgate.sdk._api import Report, estimate, report
from spendgate.sdk._context import bind, budget, capability, tags
from spendgate.sdk._runtime import configure
from spendgate.sdk._spend import Reservation, Spent, charge, reserve, tool

if TYPE_CHECKING:
    from spendgate.sdk._wrap import wrap

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "Report",
    "Reservation",
    "SpendgateError",
    "Spent",
    "StoreError",
    "bind",
    "budget",
    "capability",
    "charge",
    "configure",
    "estimate",
    "report",
    "reserve",
    "tags",
    "tool",
    "wrap",
]


def __getattr__(name: str) -> Any:
    """``spendgate.wrap``, loaded when first asked for (PEP 562), so ``import spendgate`` stays free
    of the SDK binding's modules."""
    if name == "wrap":
        from spendgate.sdk._wrap import wrap

        globals()["wrap"] = wrap
        return wrap
    raise AttributeError(f"module 'spendgate' has no attribute {name!r}")
