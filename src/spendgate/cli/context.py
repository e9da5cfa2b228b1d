"""What every command shares: the resolved settings (:class:`Context`), the store, the common flags,
and the audit chain an operator's command writes to.

Settings come from flags first, then the environment (``SPENDGATE_STORE``, ``SPENDGATE_CONFIG``,
``SPENDGATE_HOME``), then the policy file, then the embedded defaults. Resolving them lives here, once,
so that every command group reads them the same way.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from spendgate import ledger
from spendgate.errors import ConfigError
from spendgate.policy import Policy, default_policy, load, policy_hash
from spendgate.pricing.table import PriceTable

if TYPE_CHECKING:
    from spendgate.events.chain import AuditLog


@dataclass
class Context:
    """What a command runs against, resolved once from flags, environment and policy."""

    policy: Policy
    store_url: str
    prices: PriceTable

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        path = getattr(args, "config", None) or os.environ.get("SPENDGATE_CONFIG")
        policy = load(path) if path else default_policy()
        store = getattr(args, "store", None) or os.environ.get("SPENDGATE_STORE") or policy.store \
            or ledger.default_url()
        prices = PriceTable.bundled().with_overrides(ledger.home() / "prices.json")
        return cls(policy, store, prices)


def open_store(args: argparse.Namespace, create: bool = True) -> ledger.Ledger:
    """The store the flags name; ``create=False`` for commands that only read, so a mistyped path
    is an error rather than a new, empty store."""
    return ledger.open(Context.from_args(args).store_url, create=create)


def add_common(parser: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
    """The flags people put either side of the command: ``spendgate --store URL status`` and
    ``spendgate status --store URL`` mean the same.

    The top-level parser holds the defaults; each command's copy defaults to ``SUPPRESS`` so that
    argparse, which copies a subcommand's namespace over the top-level one, only overwrites a
    value given after the command (the later flag wins) and never resets one given before it."""
    parser.add_argument("--store", default=default(None),
                        help="store URL (memory://, sqlite:///path, redis://host/db); env SPENDGATE_STORE")
    parser.add_argument("--config", default=default(None), help="policy file (spendgate.toml); env SPENDGATE_CONFIG")
    parser.add_argument("--json", action="store_true", default=default(False), help="print one JSON document")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="on an error, show the traceback instead of one line")


def os_reason(exc: OSError) -> str:
    """The reason alone, without the errno number or a repeat of the address."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    return exc.strerror or str(exc)


def audit_log(policy: Policy, store: ledger.Ledger) -> AuditLog | None:
    """A chain of the signed log for this one command (an operator's approval is a decision too)."""
    from spendgate.events.chain import AuditLog
    from spendgate.events.signing import load_key

    if not policy.audit.enabled:
        return None
    return AuditLog(store, load_key(policy.audit.key), checkpoint_entries=policy.audit.checkpoint_entries,
                    checkpoint_seconds=policy.audit.checkpoint_seconds)


class ExpiryLog:
    """``status`` and ``report`` charge stale holds before reading; each such charge is a decision
    the audit log must hold, so a chain is written for it — only when a hold did expire."""

    def __init__(self, policy: Policy, store: ledger.Ledger) -> None:
        self.policy, self.store = policy, store
        self.log: AuditLog | None = None

    def __call__(self, event: ledger.Event) -> None:
        if self.log is None:
            try:
                self.log = audit_log(self.policy, self.store)
            except ConfigError as exc:  # the read goes on; the charge is in the ledger all the same
                print(f"spendgate: warning: an expired hold is not in the audit log: {exc}", file=sys.stderr)
                self.policy = replace(self.policy, audit=replace(self.policy.audit, enabled=False))
                return
        if self.log is not None:
            self.log.add(event, policy_hash(self.policy))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
