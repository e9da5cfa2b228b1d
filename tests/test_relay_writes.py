"""How a reply leaves the proxy: bytes that arrived together leave in one write, and nothing the
client is waiting for is held back. Driven with the official OpenAI client through the real proxy
app over an upstream on loopback; the proxy's writes to its client's socket are counted where
aiohttp hands them to the transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from hypothesis import given
from hypothesis import strategies as st

from spendgate.money import nanos_to_usd
from spendgate.policy import default_policy
from spendgate.proxy.app import usd_text
from spendgate.wire.stream import data_of
from tests.harness import Servers

CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
#: gpt-4o-mini: $0.15 / $0.60 per Mtok
COST = 12 * 150 + 7 * 600


def event(delta: dict[str, Any] | None = None, usage: dict[str, Any] | None = None) -> bytes:
    doc = {**CHUNK, "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": None}]}
    if usage is not None:
        doc["usage"] = usage
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


FIRST = event({"role": "assistant", "content": "Hel"})
REST = [event({"content": "lo"}), event(usage=USAGE), b"data: [DONE]\n\n"]


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers(default_policy(), "memory://")
    yield s
    s.close()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch, servers: Servers) -> list[bytes]:
    """Every write the proxy's HTTP server hands its clients' transports, in order."""
    seen: list[bytes] = []
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def ours(w: StreamWriter) -> bool:
        transport = w.transport
        return transport is not None and transport.get_extra_info("sockname")[1] == servers.port

    def counted_write(self: StreamWriter, chunk: Any) -> None:
        if ours(self):
            seen.append(bytes(chunk))
        write(self, chunk)

    def counted_writelines(self: StreamWriter, chunks: Iterable[Any]) -> None:
        chunks = list(chunks)
        if ours(self):
            seen.append(b"".join(bytes(c) for c in chunks))
        writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", counted_write)
    monkeypatch.setattr(StreamWriter, "_writelines", counted_writelines)
    return seen


def upstream(servers: Servers, handler: Any) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    servers.proxy.config.upstreams["openai"] = f"http://127.0.0.1:{servers.bg.serve(app)}"


def client(servers: Servers) -> openai.OpenAI:
    return openai.OpenAI(base_url=servers.url + "/v1", api_key="sk-test-key", max_retries=0, timeout=30)


def ask(c: openai.OpenAI) -> Any:
    return c.chat.completions.create(model="gpt-4o-mini", max_tokens=50, stream=True,
                                     stream_options={"include_usage": True},
                                     messages=[{"role": "user", "content": "hi"}])


def test_a_stream_that_arrived_whole_is_relayed_in_one_write(servers: Servers, writes: list[bytes]) -> None:
    async def whole(request: web.Request) -> web.Response:
        await request.read()  # the whole event stream in one body, one write
        return web.Response(body=FIRST + b"".join(REST), content_type="text/event-stream")

    upstream(servers, whole)
    chunks = list(ask(client(servers)))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    [reply] = writes  # status line, headers, every event and the chunked body's end: one write
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"\r\n0\r\n\r\n")
    for e in (FIRST, *REST):
        assert e in body
    servers.settled()
    [ev] = servers.store.events(0)
    assert ev.cost == COST


def test_nothing_the_client_waits_for_is_held_back(servers: Servers, writes: list[bytes]) -> None:
    """The status line leaves before the upstream's first event exists, and each event before the
    next: an upstream that sends nothing more until the client has seen what came before would
    otherwise never be answered (the client's 30 s timeout fails the test)."""
    gates = [asyncio.Event(), asyncio.Event()]

    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await gates[0].wait()  # until the client has the status line
        await resp.write(FIRST)
        await gates[1].wait()  # until the client has read the first event
        for e in REST:
            await resp.write(e)
        await resp.write_eof()
        return resp

    def open_gate(i: int) -> None:
        servers.bg.loop.call_soon_threadsafe(gates[i].set)

    upstream(servers, slow)
    stream = ask(client(servers))  # returns once the status line and headers arrived
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n")
    open_gate(0)
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.content == "Hel"
    assert len(writes) == 2 and FIRST in writes[1]
    open_gate(1)
    rest = list(chunks)
    assert rest[-1].usage is not None and rest[-1].usage.prompt_tokens == 12
    assert b"".join(writes[2:]).endswith(b"\r\n0\r\n\r\n")
    servers.settled()
    [ev] = servers.store.events(0)
    assert ev.cost == COST


def test_a_plain_reply_is_one_write(servers: Servers, writes: list[bytes]) -> None:
    r = client(servers).chat.completions.with_raw_response.create(model="gpt-4o-mini", max_tokens=5,
                                                                   messages=[{"role": "user", "content": "hi"}])
    assert r.http_response.status_code == 200
    assert Decimal(r.headers["x-spendgate-estimate-usd"]) > 0
    [reply] = writes
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(r.http_response.content)


@given(st.one_of(st.integers(min_value=-10**20, max_value=10**20), st.integers(min_value=0, max_value=10**6),
                 st.sampled_from([10**k + d for k in range(22) for d in (-1, 0, 1)])))
def test_the_dollar_headers_read_as_the_decimal_figures_they_always_were(nanos: int) -> None:
    assert usd_text(nanos) == str(nanos_to_usd(nanos))


_LINE_PARTS = st.sampled_from([b"data:", b"data: ", b"event: message_delta", b'{"usage": {}}', b"[DONE]", b"\n", b"\r",
                               b"\r\n", b" ", b"\t", b"\x0b", b"\x85", b"id: 7", b":", b"da", b"ta:"])


@given(st.lists(_LINE_PARTS, max_size=10).map(b"".join))
def test_an_events_data_is_read_as_a_client_reads_it(event: bytes) -> None:
    """The meter's quick read of one- and two-line events gives what splitting every line did."""
    assert data_of(event) == b"".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
