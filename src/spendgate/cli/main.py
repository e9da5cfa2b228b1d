"""``spendgate`` — subcommands over the engine. Every command that prints data takes ``--json``.

This module only wires the parser and runs a command: each command group lives in its own module
(``cli/<group>.py``, found by its name), and what they share — the resolved settings, the store, the
common flags — in :mod:`spendgate.cli.context`. ``Context`` stays importable from here for callers
that always found it here.

Settings come from flags first, then the environment (``SPENDGATE_STORE``, ``SPENDGATE_CONFIG``,
``SPENDGATE_HOME``), then the policy file, then the embedded defaults.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from spendgate.cli import (
    alerts,
    approvals,
    audit,
    budgets,
    config,
    demo,
    estimate,
    init,
    keys,
    pause,
    prices,
    reconcile,
    replay,
    report,
    serve,
    tail,
)
from spendgate.cli.context import Context, add_common, os_reason
from spendgate.cli.output import REFUSED, say
from spendgate.errors import ConfigError, SpendgateError

__all__ = ["Context", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_common(common, lambda _: argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="spendgate", description="A pre-send spend guard for LLM API calls.")
    p.add_argument("--version", action="version", version=f"spendgate {_version()}")
    add_common(p, lambda value: value)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # the order of `spendgate --help`
    for group in (init, prices, estimate, config, replay, report, serve, demo, approvals, keys, budgets, pause,
                  reconcile, audit, alerts, tail):
        group.add_parser(sub, common)
    return p


def _version() -> str:
    """The installed distribution's version, so ``--version`` names what pip installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spendgate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        # `spendgate report | head` ends quietly, like any Unix tool — only as the command itself:
        # a program calling main([...]) keeps its own handling of writes to closed sockets
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (SpendgateError, OSError) as exc:
        # an expected failure (a bad file, flag or store, a busy port, a disk) is one line that
        # names what and where; --debug shows the traceback instead, for a bug report
        if args.debug:
            raise
        say(f"spendgate: error: {_one_line(exc, args)}", REFUSED, out=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return code


def _one_line(exc: BaseException, args: argparse.Namespace) -> str:
    if not isinstance(exc, OSError) or isinstance(exc, SpendgateError):
        return str(exc)
    command = " ".join(str(c) for c in (args.command, *(getattr(args, a, None) for a in _ACTIONS)) if c)
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return f"{command}: {where}{os_reason(exc)}"


#: the attributes holding a command group's action (``prices update``, ``keys create``, …)
_ACTIONS = ("prices_command", "config_command", "keys_command", "audit_command", "budgets_command")


if __name__ == "__main__":
    sys.exit(main())
