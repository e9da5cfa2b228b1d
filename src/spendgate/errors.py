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
