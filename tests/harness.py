"""A real spendgate proxy over the fake upstream, both on loopback, on one background loop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from spendgate import ledger, providers
from spendgate.demo.background import BackgroundLoop
from spendgate.demo.upstream import COMPLETION_TOKENS, PROMPT_TOKENS, FakeUpstream
from spendgate.engine import Engine
from spendgate.policy import Policy
from spendgate.proxy.app import Proxy, ProxyConfig

__all__ = ["COMPLETION_TOKENS", "PROMPT_TOKENS", "Servers", "free_port", "start_serve"]


class Servers:
    """The fake upstream and a proxy over ``policy`` and ``store_url``."""

    def __init__(self, policy: Policy, store_url: str, admin_token: str | None = "admin-secret",
                 max_body_bytes: int = 32 * 1024 * 1024, upstream_timeout_s: float = 600.0) -> None:
        self.closed = False
        self.bg = BackgroundLoop()
        self.mock = FakeUpstream()
        self.store = ledger.open(store_url)
        self.engine = Engine(policy, self.store)
        self.upstream_port = self.bg.serve(self.mock.app())
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        config = ProxyConfig(upstreams={p.name: upstream for p in providers.all_providers()}, admin_token=admin_token,
                             max_body_bytes=max_body_bytes, upstream_timeout_s=upstream_timeout_s)
        self.proxy = Proxy(self.engine, config)
        self.port = self.bg.serve(self.proxy.app())
        self.url = f"http://127.0.0.1:{self.port}"

    def settled(self) -> None:
        """Wait until the proxy has charged every response it sent."""
        self.bg.run(self.proxy.settled())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bg.close()
        self.store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(home: Path, upstream_port: int, *args: str, port: int | None = None
                ) -> tuple[subprocess.Popen[str], int]:
    """``spendgate serve`` as its own process, returned once it accepts connections."""
    port = port or free_port()
    env = {**os.environ, "HOME": str(home), "SPENDGATE_HOME": str(home / ".spendgate"),
           **{f"SPENDGATE_{p.name.upper().replace('-', '_')}_BASE_URL": f"http://127.0.0.1:{upstream_port}"
              for p in providers.all_providers()}}
    proc = subprocess.Popen([sys.executable, "-m", "spendgate.cli.main", "serve", "--port", str(port), *args],
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    banner = proc.stderr.readline()  # printed just before the server binds
    if "guarding" not in banner:
        proc.kill()
        raise RuntimeError(f"spendgate serve did not start: {banner}{proc.stderr.read()}")
    deadline = time.monotonic() + 30
    while True:  # the bind itself cannot be awaited from this process: poll the port briefly
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"spendgate serve exited or never listened: {proc.stderr.read()}")
        time.sleep(0.02)
