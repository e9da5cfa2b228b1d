"""Serving aiohttp apps on free loopback ports from a background event loop.

The demo and the tests drive servers with synchronous clients from the main thread; the servers
live on their own loop in a daemon thread and are cleaned up explicitly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="spendgate-servers", daemon=True)
        self.thread.start()
        self._runners: list[web.AppRunner] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def serve(self, app: web.Application, host: str = "127.0.0.1") -> int:
        """Serve ``app`` on a free port of ``host``; returns the port."""
        return self.run(self._serve(app, host))

    async def _serve(self, app: web.Application, host: str) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        self._runners.append(runner)
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    def close(self) -> None:
        async def stop() -> None:
            for r in reversed(self._runners):
                await r.cleanup()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
