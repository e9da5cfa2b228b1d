"""The SDK's engine: one per process, configured once, shared by every wrapped client.

Given the same store URL and policy, it counts in the same buckets as ``spendgate serve``.
Defaults: the store and policy of ``SPENDGATE_STORE`` / ``SPENDGATE_CONFIG``, else the embedded
defaults (the SQLite file and the built-in policy), opened on first use.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from spendgate import ledger
from spendgate.engine import Engine
from spendgate.policy import Policy, default_policy, load
from spendgate.pricing.table import PriceTable

_lock = threading.Lock()
_first_use = threading.Lock()
_engine: Engine | None = None


def configure(store: str | None = None, policy: str | Path | Policy | None = None) -> Engine:
    """Set the store URL and the policy (a file path or a :class:`~spendgate.policy.Policy`) for
    every wrapped client of this process; returns the engine."""
    global _engine
    pol = policy if isinstance(policy, Policy) else load(policy) if policy is not None else (
        load(os.environ["SPENDGATE_CONFIG"]) if os.environ.get("SPENDGATE_CONFIG") else default_policy())
    url = store or os.environ.get("SPENDGATE_STORE") or pol.store or ledger.default_url()
    # the prices in force are the bundled table and those imported with `spendgate prices update`
    new = Engine(pol, ledger.open(url), PriceTable.bundled().with_overrides(ledger.home() / "prices.json"))
    with _lock:
        old, _engine = _engine, new
    if old is not None:
        old.ledger.close()
    return new


def engine() -> Engine:
    """The configured engine, configured from the environment on first use."""
    current = _engine
    if current is None:
        with _first_use:
            if _engine is None:
                configure()
        current = _engine
    assert current is not None
    return current
