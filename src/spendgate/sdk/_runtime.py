"""The SDK's engine: one per process, configured once, shared by every wrapped client.

Given the same store URL and policy, it counts in the same buckets as ``spendgate serve``.
Defaults: the store and policy of ``SPENDGATE_STORE`` / ``SPENDGATE_CONFIG``, else the embedded
defaults (the SQLite file and the built-in policy), opened on first use.

Run-time budgets, per-scope limits and pauses kept in the store (``spendgate budgets``, ``pause``)
apply here as in ``serve``: :func:`engine` re-reads them inline at most once per
:data:`~spendgate.policy.runtime.REFRESH_S` — between refreshes that costs a clock read, and no
thread runs in a process that is not calling. A store that fails to answer then leaves the last
budgets read in force; it never fails a call.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from spendgate import ledger
from spendgate.engine import Engine
from spendgate.errors import ConfigError, StoreError
from spendgate.policy import Policy, default_policy, load
from spendgate.policy.live import LivePolicy
from spendgate.pricing.table import PriceTable

if TYPE_CHECKING:
    from spendgate.events.chain import AuditLog

_lock = threading.Lock()
_first_use = threading.Lock()
_engine: Engine | None = None
_live: LivePolicy | None = None  # keeps _engine's policy current with the store's run-time budgets
_audits: list[AuditLog] = []  # this process's chain (one, or none with [audit] enabled = false)


def configure(store: str | None = None, policy: str | Path | Policy | None = None) -> Engine:
    """Set the store URL and the policy (a file path or a :class:`~spendgate.policy.Policy`) for
    every wrapped client of this process; returns the engine."""
    global _engine, _live
    from spendgate.events.chain import AuditLog
    from spendgate.events.signing import load_key

    pol = policy if isinstance(policy, Policy) else load(policy) if policy is not None else (
        load(os.environ["SPENDGATE_CONFIG"]) if os.environ.get("SPENDGATE_CONFIG") else default_policy())
    url = store or os.environ.get("SPENDGATE_STORE") or pol.store or ledger.default_url()
    # a missing or unreadable signing key fails here, before any request is decided unlogged
    key = load_key(pol.audit.key) if pol.audit.enabled else None
    # the prices in force are the bundled table and those imported with `spendgate prices update`
    prices = PriceTable.bundled().with_overrides(ledger.home() / "prices.json")
    _register_upstreams(pol, prices)
    store_ = ledger.open(url)
    new = Engine(pol, store_, prices)
    # this process's own chain of the signed decision log
    audit = None if key is None else AuditLog(store_, key, checkpoint_entries=pol.audit.checkpoint_entries,
                                              checkpoint_seconds=pol.audit.checkpoint_seconds)
    if audit is not None:
        new.observers.append(audit.add)
    # the file is read once here (a process reads it again by calling configure); the store's part
    # is re-read as calls are made
    live = LivePolicy(new, store_, None, pol)
    live.maybe_refresh()
    with _lock:
        old, _engine, _live = _engine, new, live
        old_audit, _audits[:] = list(_audits), [audit] if audit is not None else []
    for log in old_audit:
        with contextlib.suppress(StoreError):  # logged by the writer itself
            log.close()
    if old is not None:
        old.ledger.close()
    return new


def _register_upstreams(pol: Policy, prices: PriceTable) -> None:
    """The policy's ``[upstreams.NAME]`` tables registered as providers, so a wrapped client whose
    URL is under one's ``base_url`` is priced as it (its price table, ``free`` globs, Azure
    deployments); a table naming a price provider the table lacks is refused here, as ``serve``
    refuses it, before any call is priced."""
    from spendgate import providers

    for name, spec in pol.upstreams.items():
        if spec.prices not in prices.entries:
            raise ConfigError(f"upstreams.{name}.prices: the price table has no provider {spec.prices!r}; "
                              f"it has {', '.join(sorted(prices.entries))}")
    providers.configure(pol.upstreams)


@atexit.register
def _close_audit() -> None:
    """The last entries and a checkpoint naming them are written as the process exits."""
    for log in list(_audits):
        with contextlib.suppress(StoreError):  # logged by the writer, naming what was lost
            log.close()


def engine() -> Engine:
    """The configured engine, configured from the environment on first use, with the store's
    run-time budgets as of at most :data:`~spendgate.policy.runtime.REFRESH_S` ago."""
    current = _engine
    if current is None:
        with _first_use:
            if _engine is None:
                configure()
        current = _engine
    assert current is not None
    live = _live
    if live is not None and live.engine is current:
        live.maybe_refresh()
    return current
