"""The errors spendgate raises, so callers handle a few types, not every backend's."""

from __future__ import annotations


class SpendgateError(Exception):
    """Base of every error spendgate raises on purpose."""


class ConfigError(SpendgateError):
    """A policy, price file or setting is invalid; the message names the key and the value."""


class BadRequest(SpendgateError):
    """A request body cannot be priced (malformed, or missing what pricing needs)."""


class UnpricedModel(SpendgateError):
    """No price is known for a model and the policy says ``unpriced = "block"``."""


class StoreError(SpendgateError):
    """The ledger's store failed (disk, lock, connection); wraps the backend's own error once."""


class BudgetExceeded(SpendgateError):
    """A call was refused before it was sent. Carries the same fields as the proxy's 402 body
    (``decision_id``, ``action``, ``rule``, ``scope``, ``window``, ``limit_usd``, ``spent_usd``,
    ``held_usd``, ``estimate_usd``, ``remaining_usd``, ``resets_at``, ``retryable``, ``recovery``);
    all of them are also in :attr:`details`."""

    def __init__(self, message: str, details: dict[str, object]) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __getattr__(self, name: str) -> object:
        details = self.__dict__.get("details", {})
        if name in details:
            return details[name]
        raise AttributeError(name)
