"""A fake provider upstream on loopback, for ``spendgate demo`` and the test suite.

It speaks the providers' real shapes (JSON and SSE, with ``usage`` where each provider puts it),
bills whatever ``prompt_tokens`` / ``completion_tokens`` it is set to, and records every request it
receives, so a demo can show what reached the "provider" and a test can count it and compare bytes.
An ``x-mock`` request header makes it misbehave on purpose: ``500``, ``nousage``, ``cut`` (drop the
connection mid-stream), ``hang`` (never answer). ``x-mock-usage: <json>`` makes it report that value
as the usage of this one response, JSON or SSE (a test of garbage usage needs no shared state), and
``on_request`` runs while a request is being handled: after the proxy sent it, before it is answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

PROMPT_TOKENS, COMPLETION_TOKENS = 50, 10


@dataclass
class Seen:
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeUpstream:
    seen: list[Seen] = field(default_factory=list)
    prompt_tokens: int = PROMPT_TOKENS
    completion_tokens: int = COMPLETION_TOKENS
    #: when set, the input billed is computed from each request body (the demo bills real counts)
    bill_input: Callable[[dict[str, Any]], int] | None = None
    #: awaited with each request before it is answered (a test breaks the store here)
    on_request: Callable[[Seen], Awaitable[None]] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        for version in ("v1", "v1beta"):  # Gemini puts the model in the path
            app.router.add_post(f"/{version}/models/{{model}}:generateContent", self.gemini)
            app.router.add_post(f"/{version}/models/{{model}}:streamGenerateContent", self.gemini)
            app.router.add_post(f"/{version}/models/{{model}}:countTokens", self.gemini_count)
        return app

    async def _record(self, request: web.Request) -> tuple[dict[str, Any], str]:
        body = await request.read()
        seen = Seen(request.path, request.query_string, CIMultiDict(request.headers), body)
        self.seen.append(seen)
        parsed = json.loads(body) if body else {}
        if self.bill_input is not None:
            self.prompt_tokens = self.bill_input(parsed)
        if self.on_request is not None:
            await self.on_request(seen)
        return parsed, request.headers.get("x-mock", "")

    @staticmethod
    def _usage(request: web.Request, usage: Any) -> Any:
        """The usage to report: the request's ``x-mock-usage`` JSON when it has one."""
        override = request.headers.get("x-mock-usage")
        return usage if override is None else json.loads(override)

    @staticmethod
    def _tier(request: web.Request, body: dict[str, Any]) -> str:
        """The ``service_tier`` OpenAI echoes: the one asked for (``auto``: ``default``), or the
        request's ``x-mock-service-tier`` (a tier the provider served instead)."""
        asked = body.get("service_tier")
        return request.headers.get("x-mock-service-tier") or (
            asked if isinstance(asked, str) and asked != "auto" else "default")

    async def _sse(self, request: web.Request, events: list[tuple[str | None, Any]], cut: bool = False
                   ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, (name, data) in enumerate(events):
            if cut and i == len(events) // 2:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            line = (f"event: {name}\n" if name else "") + "data: " + (
                data if isinstance(data, str) else json.dumps(data)) + "\n\n"
            await resp.write(line.encode())
        await resp.write_eof()
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, mock = await self._record(request)
        if mock == "500":
            return web.json_response({"error": {"message": "upstream exploded", "type": "server_error"}}, status=500)
        if mock == "hang":
            await asyncio.Event().wait()  # never answers: the caller's timeout decides
        usage = self._usage(request, {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                                      "total_tokens": self.prompt_tokens + self.completion_tokens})
        model = body.get("model", "gpt-4o-mini")
        tier = self._tier(request, body)
        if not body.get("stream"):
            out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                                   "service_tier": tier,
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                                "logprobs": None, "finish_reason": "stop"}]}
            if mock != "nousage":
                out["usage"] = usage
            return web.json_response(out)
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                 "service_tier": tier}
        events: list[tuple[str | None, Any]] = [
            (None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": w},
                                          "finish_reason": None}]}) for w in ("hel", "lo", " there")]
        events.append((None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**chunk, "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        return await self._sse(request, events, cut=mock == "cut")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, mock = await self._record(request)
        usage = self._usage(request, {
            "input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + self.completion_tokens})
        resp = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
                "model": body.get("model"), "service_tier": self._tier(request, body),
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "hello", "annotations": []}]}],
                "usage": usage}
        if not body.get("stream"):
            return web.json_response(resp)
        events: list[tuple[str | None, Any]] = [
            ("response.created", {"type": "response.created", "sequence_number": 0,
                                  "response": {**resp, "status": "in_progress", "output": [], "usage": None}}),
            ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1,
                                            "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                            "delta": "hello", "logprobs": []}),
            ("response.completed", {"type": "response.completed", "sequence_number": 2, "response": resp}),
        ]
        return await self._sse(request, events, cut=mock == "cut")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        usage = self._usage(request, {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens})
        return web.json_response({"object": "list", "model": "text-embedding-3-small",
                                  "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                                  "usage": usage})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, mock = await self._record(request)
        if mock == "500":
            return web.json_response({"type": "error", "error": {"type": "api_error", "message": "boom"}},
                                     status=500)
        model = body.get("model", "claude-sonnet-4-5")
        usage = {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        override = self._usage(request, None)
        # an override is the whole usage of message_start and of message_delta alike, so the
        # stream's merged final usage is exactly the override
        start_usage, delta_usage = ({**usage, "output_tokens": 1}, {"output_tokens": self.completion_tokens}) \
            if override is None else (override, override)
        usage = usage if override is None else override
        msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return web.json_response(msg)
        events: list[tuple[str | None, Any]] = [
            ("message_start", {"type": "message_start",
                               "message": {**msg, "content": [], "stop_reason": None,
                                           "usage": start_usage}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "hel"}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "lo"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": delta_usage}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return await self._sse(request, events, cut=mock == "cut")

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.json_response({"input_tokens": 42})

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        """``generateContent`` and, on ``:streamGenerateContent``, its SSE stream: each event carries
        the cumulative ``usageMetadata`` so far, the last one (with ``finishReason``) the final."""
        _, mock = await self._record(request)
        if mock == "500":
            return web.json_response({"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}, status=500)
        usage = self._usage(request, {"promptTokenCount": self.prompt_tokens,
                                      "candidatesTokenCount": self.completion_tokens,
                                      "totalTokenCount": self.prompt_tokens + self.completion_tokens})
        model = request.match_info["model"]

        def chunk(text: str, meta: Any, finish: str | None = None) -> dict[str, Any]:
            cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
            if finish:
                cand["finishReason"] = finish
            return {"candidates": [cand], "usageMetadata": meta, "modelVersion": model, "responseId": "r1"}

        if not request.path.endswith(":streamGenerateContent"):
            return web.json_response(chunk("hello", usage, "STOP"))
        partial = {"promptTokenCount": self.prompt_tokens, "totalTokenCount": self.prompt_tokens}
        events: list[tuple[str | None, Any]] = [(None, chunk("hel", partial)), (None, chunk("lo", partial)),
                                                (None, chunk(" there", usage, "STOP"))]
        return await self._sse(request, events, cut=mock == "cut")

    async def gemini_count(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.json_response({"totalTokens": 42})

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        """A route spendgate cannot price (multipart audio in, text out, no usage): what a
        ``flat_holds`` entry passes through. ``x-mock: fail`` answers 400."""
        self.seen.append(Seen(request.path, request.query_string, CIMultiDict(request.headers),
                              await request.read()))
        if request.headers.get("x-mock") == "fail":
            return web.json_response({"error": {"message": "bad audio", "type": "invalid_request_error"}},
                                     status=400)
        return web.json_response({"text": "hello"})

    async def models(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model",
                                                              "created": 1, "owned_by": "openai"}]})

    def reached(self, path: str | None = None) -> int:
        return sum(1 for s in self.seen if path is None or s.path == path)
