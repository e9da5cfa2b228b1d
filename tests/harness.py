"""A real spendgate proxy over the fake upstream, both on loopback, on one background loop."""

from __future__ import annotations

from spendgate import ledger
from spendgate.demo.background import BackgroundLoop
from spendgate.demo.upstream import COMPLETION_TOKENS, PROMPT_TOKENS, FakeUpstream
from spendgate.engine import Engine
from spendgate.policy import Policy
from spendgate.proxy.app import Proxy, ProxyConfig

__all__ = ["COMPLETION_TOKENS", "PROMPT_TOKENS", "Servers"]


class Servers:
    """The fake upstream and a proxy over ``policy`` and ``store_url``."""

    def __init__(self, policy: Policy, store_url: str, admin_token: str | None = "admin-secret",
                 max_body_bytes: int = 32 * 1024 * 1024, upstream_timeout_s: float = 600.0) -> None:
        self.bg = BackgroundLoop()
        self.mock = FakeUpstream()
        self.store = ledger.open(store_url)
        self.engine = Engine(policy, self.store)
        self.upstream_port = self.bg.serve(self.mock.app())
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        config = ProxyConfig(upstreams={"openai": upstream, "anthropic": upstream}, admin_token=admin_token,
                             max_body_bytes=max_body_bytes, upstream_timeout_s=upstream_timeout_s)
        self.proxy = Proxy(self.engine, config)
        self.port = self.bg.serve(self.proxy.app())
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.bg.close()
        self.store.close()
