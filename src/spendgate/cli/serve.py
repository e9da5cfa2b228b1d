"""``spendgate serve``: the guarding proxy."""

from __future__ import annotations

import argparse
import logging
import math
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spendgate.cli.context import Context, os_reason
from spendgate.errors import ConfigError

if TYPE_CHECKING:
    from spendgate.proxy.workers import Role


def cmd_serve(args: argparse.Namespace) -> int:
    """One server in this process, or ``--workers N`` processes on one port (:mod:`spendgate.proxy.workers`)."""
    from spendgate.proxy.app import ProxyConfig
    from spendgate.proxy.workers import Listener, Supervisor

    ctx = Context.from_args(args)
    tls = _tls(args)  # read before any worker starts: a bad file is one line, here
    shared = not ctx.store_url.startswith("memory:")
    workers = args.workers if args.workers is not None else _env_workers()
    if workers is None or workers == AUTO:  # a memory:// store lives in one process: one there
        workers = _auto() if shared else 1
    if workers > 1 and not shared:
        raise ConfigError(f"--workers {workers}: the store {ctx.store_url} lives in one process's memory, so "
                          "worker processes could not share its budgets; use a sqlite:// or redis:// store "
                          "(--store), or --workers 1")
    if workers == 1:
        return _serve(args, ctx, tls)
    try:
        listener = Listener(args.host, args.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {os_reason(exc)} "
                          "(is another server on that port? choose one with --port)") from exc
    token = args.admin_token or os.environ.get("SPENDGATE_ADMIN_TOKEN")
    ups = ", ".join(f"{k} -> {v}" for k, v in ProxyConfig.from_policy(ctx.policy).upstreams.items())

    def announce() -> None:
        _banner(f"{_scheme(tls)}://{args.host}:{listener.port}", ctx, ups, token, f"; {workers} workers")

    flags = {k: v for k, v in vars(args).items() if k != "func" and _plain(v)}
    flags["port"] = listener.port
    return Supervisor(workers, listener, flags, announce).run()


def _banner(address: str, ctx: Context, ups: str, token: str | None, workers: str = "") -> None:
    """"guarding …" (what tests and people wait for), then a stale price table's warning."""
    print(f"spendgate: guarding {address} (store {ctx.store_url}; policy {ctx.policy.source}; upstreams {ups}; "
          f"admin API {'on' if token else 'off'}{workers})", file=sys.stderr, flush=True)
    stale = ctx.prices.stale_warning()
    if stale:
        print(f"spendgate: warning: {stale}", file=sys.stderr, flush=True)


#: ``--workers auto``, the default: one per core available (a memory:// store: one)
AUTO = 0


def _auto() -> int:
    from spendgate.proxy.workers import default_workers

    return default_workers()


def run_worker(args: argparse.Namespace, role: Role, ready: Callable[[], None]) -> None:
    """One of ``serve --workers N``'s processes: serve on the sockets the parent bound, count into the
    shared metrics directory, and say ``ready`` once listening (the parent prints the banner)."""
    import socket

    from spendgate.observe import metrics

    ctx = Context.from_args(args)
    metrics.share_counters(Path(role.metrics_dir), f"w{role.index}-{os.getpid()}")
    socks = [socket.socket(fileno=fd) for fd in role.fds]
    for sock in socks:  # a child of this worker (its audit writer) must not keep the port open after it
        sock.set_inheritable(False)
    _serve(args, ctx, _tls(args), socks=socks, role=role, ready=ready)


def _serve(args: argparse.Namespace, ctx: Context, tls: ssl.SSLContext | None, *,
           socks: list[Any] | None = None, role: Role | None = None,
           ready: Callable[[], None] | None = None) -> int:
    from aiohttp import web

    from spendgate.policy.live import LivePolicy
    from spendgate.proxy.app import build

    token = args.admin_token or os.environ.get("SPENDGATE_ADMIN_TOKEN")
    proxy = build(ctx.policy, ctx.store_url, token, upstream_timeout_s=args.upstream_timeout, prices=ctx.prices,
                  admin_base=f"{_scheme(tls)}://{args.host}:{args.port}")
    if role is not None:  # one worker of several runs the sweeper, drains the spool and sends alerts
        proxy.config.upkeep = proxy.config.send_alerts = role.upkeep
    # the file (reloaded on SIGHUP or when it changes) plus the store's run-time budgets, kept current
    path = getattr(args, "config", None) or os.environ.get("SPENDGATE_CONFIG") or None
    live = LivePolicy(proxy.engine, proxy.store, path, ctx.policy)
    proxy.live = live
    _policy_log("spendgate: " if role is None else f"spendgate: worker {role.index}: ")
    ups = ", ".join(f"{k} -> {v}" for k, v in proxy.config.upstreams.items())
    listening = False
    app = proxy.app()
    loop = fast_loop()
    orphaned: list[bool] = []  # the parent was killed: nobody else will remove the counters' directory
    if role is not None:
        from spendgate.proxy.workers import watch_parent

        app.on_response_prepare.append(_worker_header(str(role.index)))
        watch_parent(loop, live.announce, lambda: orphaned.append(True))

    def started(_aiohttp_banner: str) -> None:
        """aiohttp calls its ``print`` once every socket is bound: only then is "guarding" true."""
        nonlocal listening
        listening = True
        if ready is not None:  # a worker: the parent prints the banner, then asks for the policy's lines
            ready()
            return
        _banner(f"{_scheme(tls)}://{args.host}:{args.port}", ctx, ups, token)
        live.announce()  # the policy in force (hash, version), said after the banner

    where: dict[str, Any] = {"sock": socks} if socks is not None else {"host": args.host, "port": args.port}
    try:
        web.run_app(app, **where, print=started, access_log=None, handle_signals=True, loop=loop,
                    ssl_context=tls)
    except OSError as exc:
        if listening:
            raise
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {os_reason(exc)} "
                          "(is another server on that port? choose one with --port)") from exc
    finally:
        if orphaned and role is not None:  # every orphaned worker tries; the last one out succeeds
            import shutil

            shutil.rmtree(role.metrics_dir, ignore_errors=True)
    return 0


def _worker_header(index: str) -> Callable[[Any, Any], Awaitable[None]]:
    """``X-Spendgate-Worker: N`` on every answer of worker N: which process served a request."""

    async def stamp(_request: Any, response: Any) -> None:
        response.headers["X-Spendgate-Worker"] = index

    return stamp


def _scheme(tls: ssl.SSLContext | None) -> str:
    return "https" if tls is not None else "http"


def _plain(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _env_workers() -> int | None:
    raw = os.environ.get("SPENDGATE_WORKERS")
    if not raw:
        return None
    try:
        return _count(raw)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"SPENDGATE_WORKERS: {exc}") from exc


def _count(raw: str) -> int:
    """A number of processes, 1 or more, or ``auto`` (:data:`AUTO`)."""
    if raw.strip().lower() == "auto":
        return AUTO
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, 1 or more, or auto, got {raw!r}")
    return value


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from ``--tls-cert`` and ``--tls-key`` (None: plain HTTP). Every
    way the pair can be wrong is one line naming the flag and the file."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if cert is not None else ("--tls-key", "--tls-cert")
        raise ConfigError(f"{given} needs {missing} too: HTTPS takes a certificate and its private key")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot read it: {os_reason(exc)}") from exc
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def no_password() -> bytes:
        raise ConfigError(f"--tls-key {key}: the key is encrypted; give it unencrypted (readable only by "
                          "the server's user)")

    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-cert {cert} with --tls-key {key}: not a PEM certificate and its matching "
                          f"private key ({exc.reason or exc})") from exc
    return ctx


def _policy_log(prefix: str = "spendgate: ") -> None:
    """What the live policy says (each policy applied, with its hash and version; a reload that
    failed, naming the key) goes to stderr beside the banner: an operator watching a reload sees
    whether it took."""
    logger = logging.getLogger("spendgate.policy")
    if any(getattr(h, "spendgate_serve", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
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


def fast_loop() -> Any:
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
    sv.add_argument("--workers", type=_count, metavar="N",
                    help="server processes on the one port, or auto: one per core available (default: env "
                         "SPENDGATE_WORKERS, else auto; a memory:// store has 1)")
    sv.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate (chain); needs --tls-key")
    sv.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key (unencrypted)")
    sv.set_defaults(func=cmd_serve)
