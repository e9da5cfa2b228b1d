"""A wrapped client outlives the client it was made from. The SDKs close their HTTP client when it
is collected (the async ones by a task on the running loop), and the guard forwards to that HTTP
client's own transport: collecting the original mid-stream would close the connection under the
wrapped client's stream. The wrapped client keeps the original alive."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from aiohttp import web

import spendgate
from spendgate.demo.background import BackgroundLoop
from spendgate.policy import default_policy

MSG = [{"role": "user", "content": "hi"}]
USAGE = {"input_tokens": 10, "output_tokens": 2}


class PausedStream:
    """An Anthropic event stream that stops after ``message_start`` until the test lets it go on."""

    def __init__(self) -> None:
        self.go_on = threading.Event()

    async def messages(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(kind: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())

        await send("message_start", {"message": {
            "id": "m1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**USAGE, "output_tokens": 1}}})
        await asyncio.get_running_loop().run_in_executor(None, self.go_on.wait, 30)
        await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "hello"}})
        await send("content_block_stop", {"index": 0})
        await send("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": 2}})
        await send("message_stop", {})
        await resp.write_eof()
        return resp


@pytest.fixture
def upstream() -> Iterator[tuple[PausedStream, str]]:
    spendgate.configure(store="memory://", policy=default_policy())
    bg = BackgroundLoop()
    fake = PausedStream()
    app = web.Application()
    app.router.add_post("/v1/messages", fake.messages)
    yield fake, f"http://127.0.0.1:{bg.serve(app)}"
    fake.go_on.set()
    bg.close()
    spendgate.configure(store="memory://", policy=default_policy())


def test_an_async_stream_survives_the_original_client_being_collected_mid_stream(
        upstream: tuple[PausedStream, str]) -> None:
    fake, url = upstream

    async def go() -> list[str]:
        original: Any = anthropic.AsyncAnthropic(base_url=url, api_key="sk-a", max_retries=0)
        c = spendgate.wrap(original)
        stream = await c.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MSG,  # type: ignore[arg-type]
                                         stream=True)
        kinds = []
        async for event in stream:
            kinds.append(event.type)
            if len(kinds) == 1:  # mid-stream, the caller drops the client it wrapped and it is collected
                del original
                gc.collect()
                for _ in range(3):  # the close the SDK scheduled on collection runs now, if it was scheduled
                    await asyncio.sleep(0)
                fake.go_on.set()
        return kinds

    assert asyncio.run(go()) == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                                 "message_delta", "message_stop"]
    [capture] = [e for e in spendgate.report(("model",)).rows]
    assert capture.cost == 10 * 3_000 + 2 * 15_000  # claude-sonnet-4-5: $3 / $15 per Mtok, from the stream's usage
