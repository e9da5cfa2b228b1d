"""``spendgate serve``: the guarding proxy."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any

from spendgate.cli.context import Context, os_reason
from spendgate.errors import ConfigError


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from spendgate.policy.live import LivePolicy
    from spendgate.proxy.app import build

    ctx = Context.from_args(args)
    token = args.admin_token or os.environ.get("SPENDGATE_ADMIN_TOKEN")
    proxy = build(ctx.policy, ctx.store_url, token, upstream_timeout_s=args.upstream_timeout, prices=ctx.prices,
                  admin_base=f"http://{args.host}:{args.port}")
    # the file (reloaded on SIGHUP or when it changes) plus the store's run-time budgets, kept current
    path = getattr(args, "config", None) or os.environ.get("SPENDGATE_CONFIG") or None
    live = LivePolicy(proxy.engine, proxy.store, path, ctx.policy)
    proxy.live = live
    _policy_log()
    ups = ", ".join(f"{k} -> {v}" for k, v in proxy.config.upstreams.items())
    listening = False

    def started(_aiohttp_banner: str) -> None:
        """aiohttp calls its ``print`` once every socket is bound: only then is "guarding" true."""
        nonlocal listening
        listening = True
        print(f"spendgate: guarding http://{args.host}:{args.port} (store {ctx.store_url}; policy "
              f"{ctx.policy.source}; upstreams {ups}; admin API {'on' if token else 'off'})",
              file=sys.stderr, flush=True)
        stale = ctx.prices.stale_warning()
        if stale:
            print(f"spendgate: warning: {stale}", file=sys.stderr, flush=True)
        live.announce()  # the policy in force (hash, version), said after the banner

    try:
        web.run_app(proxy.app(), host=args.host, port=args.port, print=started, access_log=None,
                    handle_signals=True, loop=_fast_loop())
    except OSError as exc:
        if listening:
            raise
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {os_reason(exc)} "
                          "(is another server on that port? choose one with --port)") from exc
    return 0


def _policy_log() -> None:
    """What the live policy says (each policy applied, with its hash and version; a reload that
    failed, naming the key) goes to stderr beside the banner: an operator watching a reload sees
    whether it took."""
    logger = logging.getLogger("spendgate.policy")
    if any(getattr(h, "spendgate_serve", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("spendgate: %(message)s"))
    handler.spendgate_serve = True  # type: ignore[attr-defined]
    handler.addFilter(_Repeats())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _Repeats(logging.Filter):
    """Say a warning once until its text changes: the store is re-read every half second, and a
    stored rule that no longer validates would otherwise be named twice a second."""

    def __init__(self) -> None:
        super().__init__()
        self.said: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:  # an error (a reload refused) is said each time
            return True
        text, now = record.getMessage(), time.monotonic()
        if now - self.said.get(text, -math.inf) < REPEAT_AFTER_S:
            return False
        self.said[text] = now
        return True


#: a warning said again after this long if it still holds (seconds)
REPEAT_AFTER_S = 600.0


def _fast_loop() -> Any:
    """uvloop where it is installed (Linux, macOS): it roughly halves the event loop's share of
    each proxied request; the standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on the platforms it supports
        import asyncio

        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {raw!r}")
    return value


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate serve``."""
    sv = sub.add_parser("serve", parents=[common], help="run the guarding proxy")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8787)
    sv.add_argument("--admin-token", help="token for /spendgate/… (env SPENDGATE_ADMIN_TOKEN); off when unset")
    sv.add_argument("--upstream-timeout", type=_seconds, metavar="S",
                    help="seconds to wait for an upstream's next bytes (default: the policy's upstream_timeout_s, 600)")
    sv.set_defaults(func=cmd_serve)
