"""spendgate: a pre-send spend guard for LLM API calls.

In-process use wraps the official clients::

    client = spendgate.wrap(OpenAI())
    with spendgate.budget(usd=0.50), spendgate.tags(feature="support"):
        client.chat.completions.create(...)
"""

from spendgate.errors import BudgetExceeded, ConfigError, SpendgateError, StoreError
from spendgate.sdk._api import Report, estimate, report
from spendgate.sdk._context import bind, budget, tags
from spendgate.sdk._runtime import configure
from spendgate.sdk._wrap import wrap

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "Report",
    "SpendgateError",
    "StoreError",
    "bind",
    "budget",
    "configure",
    "estimate",
    "report",
    "tags",
    "wrap",
]
