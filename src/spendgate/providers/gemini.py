"""Gemini's wire format (the Google AI API): ``generateContent`` and ``streamGenerateContent``.

The model is in the path, not the body: ``POST /v1beta/models/{model}:generateContent`` (and the
same under ``/v1/``, which the ``google-genai`` SDK calls by default), ``:streamGenerateContent``
(``?alt=sse``) and ``:countTokens`` (free, passed through). The proxy hands the engine the body with
the path's model in ``model`` (:meth:`Gemini.body_with`); a downgrade that changes it changes the
path, and a clamp's ``maxOutputTokens`` goes back under ``generationConfig`` (:meth:`Gemini.upstream`).

Field names are read in either spelling the API takes (proto JSON accepts ``generationConfig`` and
``generation_config`` alike, and google-genai sends ``thinkingConfig.thinking_budget``), so a
request cannot leave a part of itself uncounted by its spelling.

Credentials travel in ``x-goog-api-key`` or in ``?key=``; the proxy moves a ``key`` parameter into
the header before anything reads, keeps or forwards the request, so a held request never keeps it.

**Input estimate, biased upward.** Gemini's tokenizer is not published for offline use. The text a
request bills (every part's text, the system instruction, the tool declarations, the tool config
and the response schema, as compact JSON where they are structures) is counted with o200k and
multiplied by :data:`FACTOR` (1.3, a margin chosen rather than measured: Gemini's own counts for
English prose and code are near o200k's, and the 30 % covers the gap where they are not; the free
``:countTokens`` route is the way to calibrate it), each non-ASCII script counting at least its
per-script floor (:mod:`spendgate.estimate.scripts`, set for Claude's tokenizer, which splits
those scripts finer than Gemini's larger vocabulary), plus :data:`PER_CONTENT` tokens a turn. An
inline image counts the larger of Gemini 2.5's 258 tokens per 768-px tile (one tile at most below
384 px) and :data:`IMAGE_MIN`, the most a Gemini 3 ``media_resolution`` bills an image (ultra
high); any other inline data (audio, video, a PDF, an image of unreadable size) one token per
:data:`INLINE_BYTES_PER_TOKEN` decoded bytes, above what each medium bills (audio 32 tokens a
second, video 263, a PDF page 258 to 560). Not bounded before send: a ``fileData`` part (an uploaded file,
counted as its reference) and a ``cachedContent`` (read at the cache rate, unknown size); the call
is settled from ``usageMetadata`` all the same.

**Output bound.** ``generationConfig.maxOutputTokens`` plus ``thinkingConfig.thinkingBudget`` when
it is positive (Gemini 2.5 and 3 models are seen to count thoughts inside ``maxOutputTokens``;
adding the budget is the upward side of the two readings of the docs), times ``candidateCount``;
without ``maxOutputTokens``, the model's maximum output from the price table.

**Grounding with Google Search** (a ``googleSearch`` / ``googleSearchRetrieval`` tool, either
spelling) is billed apart from tokens: once per grounded prompt on Gemini 1.x/2.x ($35 per 1,000),
per search query the model runs on Gemini 3 ($14 per 1,000), which no request field caps. The
price row says which (``web_search_per``); :meth:`Gemini.searches` returns an unbounded count and
the estimator holds one fee for a per-prompt model, else one query per
:data:`~spendgate.estimate.TOKENS_PER_SEARCH` tokens of the output bound. Capture reads
``candidates[].groundingMetadata`` (:func:`spendgate.usage.grounding`), in a stream from whichever
events carry it (:class:`Grounding`).

Usage is ``usageMetadata`` (:func:`spendgate.usage.read_usage`); a stream's events each carry the
cumulative counts so far, and the one with a ``finishReason`` is final. Errors are
``{"error": {"code", "message", "status"}}``, which ``google-genai`` raises as ``errors.ClientError``
(4xx) or ``errors.ServerError`` (5xx), ``message`` being spendgate's text; a stream that cannot be
finished ends with such an object as its last ``data:`` event, which the SDK raises too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from functools import cache, partial
from typing import TYPE_CHECKING, Any

from spendgate.errors import BadRequest
from spendgate.estimate import images
from spendgate.estimate.shape import TokenShape, dumps, optional_int
from spendgate.estimate.tally import Tally, tally
from spendgate.providers.base import Parser, Provider, model_into_path

if TYPE_CHECKING:
    from spendgate.wire.stream import StreamMeter

#: Gemini tokens per o200k token, biased upward (module docstring).
FACTOR = 1.3
#: tokens a turn adds beyond its parts (role and separators)
PER_CONTENT = 4
#: an image's tokens per 768 x 768 tile (Gemini 2.5), and the tile's edge in pixels
IMAGE_TILE_TOKENS, IMAGE_TILE = 258, 768
#: the most tokens one image bills on Gemini 3 (``MEDIA_RESOLUTION_ULTRA_HIGH``)
IMAGE_MIN = 2240
#: decoded bytes per token of inline data whose token count is not read from its header
INLINE_BYTES_PER_TOKEN = 12

_GENERATE = "/{v}/models/{{model}}:generateContent"
_STREAM = "/{v}/models/{{model}}:streamGenerateContent"
_COUNT = "/{v}/models/{{model}}:countTokens"
VERSIONS = ("v1beta", "v1")
#: A tool's keys that ground an answer with Google Search, billed per grounded prompt (Gemini 2.x)
#: or per search query (Gemini 3), in both spellings proto JSON takes (google-genai sends
#: ``googleSearch`` and ``googleSearchRetrieval``; Vertex's ``enterpriseWebSearch`` searches the web too)
SEARCH_TOOLS = ("googleSearch", "google_search", "googleSearchRetrieval", "google_search_retrieval",
                "enterpriseWebSearch", "enterprise_web_search")
#: Tools whose answers carry ``groundingMetadata`` without web searches (Google Maps, Vertex AI Search
#: / RAG retrieval): a grounded prompt, charged one fee at a model billed per grounded prompt
OTHER_GROUNDING = ("googleMaps", "google_maps", "retrieval")
#: the bytes an event with grounding contains
GROUNDING_MARKERS = (b'"groundingMetadata"', b'"grounding_metadata"')
#: the body field a clamp writes; :meth:`Gemini.upstream` moves it under ``generationConfig``
CLAMP_FIELD = "maxOutputTokens"


def _snake(camel: str) -> str:
    return re.sub(r"([A-Z])", r"_\1", camel).lower()


def key_of(obj: Mapping[str, Any], camel: str) -> str:
    """The spelling of field ``camel`` that ``obj`` uses (lowerCamel or snake_case), lowerCamel when
    it has neither."""
    if camel in obj:
        return camel
    snake = _snake(camel)
    return snake if snake in obj else camel


def field(obj: Mapping[str, Any], camel: str) -> Any:
    """Field ``camel`` of ``obj`` in either spelling (None: absent)."""
    return obj.get(key_of(obj, camel))


def _inline(t: Tally, blob: Mapping[str, Any]) -> None:
    data, mime = blob.get("data"), str(field(blob, "mimeType") or "")
    if not isinstance(data, str):
        raise BadRequest(f"`inlineData.data` must be a base64 string, got {type(data).__name__}")
    by_bytes = math.ceil(len(data) * 3 / 4 / INLINE_BYTES_PER_TOKEN)
    if mime.startswith("image/"):
        size = images.size_of_data_url(f"data:{mime};base64,{data[:65536]}")
        if size is not None:
            w, h = size
            tiles = 1 if max(w, h) <= 384 else math.ceil(w / IMAGE_TILE) * math.ceil(h / IMAGE_TILE)
            t.fixed += max(tiles * IMAGE_TILE_TOKENS, IMAGE_MIN)
            return
        by_bytes = max(by_bytes, IMAGE_MIN)
    t.fixed += by_bytes


def _part(t: Tally, part: Any) -> None:
    if isinstance(part, str):
        t.text(part)
        return
    if not isinstance(part, Mapping):
        raise BadRequest(f"each part must be an object, got {type(part).__name__}")
    if isinstance(part.get("text"), str):
        t.text(part["text"])
    blob = field(part, "inlineData")
    if isinstance(blob, Mapping):
        _inline(t, blob)
    rest = {k: v for k, v in part.items()
            if k not in ("text", "inlineData", "inline_data", "thought", "thoughtSignature", "thought_signature")}
    if rest:  # a function call or response, code and its result, a file reference: as JSON
        t.text(dumps(rest))


def _content(t: Tally, content: Any, where: str) -> None:
    if isinstance(content, str):
        t.text(content)
    elif isinstance(content, Mapping):
        parts = content.get("parts", [])
        if not isinstance(parts, list):
            raise BadRequest(f"`{where}.parts` must be a list, got {type(parts).__name__}")
        for part in parts:
            _part(t, part)
    elif content is not None:
        raise BadRequest(f"`{where}` must be an object with `parts`, got {type(content).__name__}")
    t.fixed += PER_CONTENT


def _output(body: Mapping[str, Any], config: Mapping[str, Any]) -> int | None:
    clamped = optional_int(body, CLAMP_FIELD)  # a clamp's edit: the whole bound, thoughts included
    if clamped is not None:
        return clamped
    bound = optional_int(config, key_of(config, "maxOutputTokens"))
    if bound is None:
        return None
    thinking = field(config, "thinkingConfig")
    budget = field(thinking, "thinkingBudget") if isinstance(thinking, Mapping) else None
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        bound += budget
    return bound


def model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("the model is missing: a Gemini request names it in its path "
                         "(/v1beta/models/{model}:generateContent)")
    return model.removeprefix("models/")


def generate(body: Mapping[str, Any], stream: bool = False) -> TokenShape:
    """The token shape of a ``generateContent`` / ``streamGenerateContent`` body (its path's model in
    ``model``)."""
    model = model_of(body)
    contents = body.get("contents")
    if not isinstance(contents, list):
        raise BadRequest(f"`contents` must be a list, got {type(contents).__name__}")
    config = field(body, "generationConfig") or {}
    if not isinstance(config, Mapping):
        raise BadRequest(f"`generationConfig` must be an object, got {type(config).__name__}")
    t = tally(FACTOR)
    system = field(body, "systemInstruction")
    if system is not None:
        _content(t, system, "systemInstruction")
    for i, content in enumerate(contents):
        _content(t, content, f"contents[{i}]")
    for name in ("tools", "toolConfig"):
        if field(body, name):
            t.text(dumps(field(body, name)))
    for name in ("responseSchema", "responseJsonSchema"):
        if field(config, name):
            t.text(dumps(field(config, name)))
    n = optional_int(config, key_of(config, "candidateCount"))
    return TokenShape(model=model, input_tokens=t.total(), requested_output=_output(body, config),
                      choices=max(1, n or 1), stream=stream, exact=False)


class Grounding:
    """The grounding a Gemini stream reported so far, kept beside its usage for capture."""

    def __init__(self) -> None:
        #: candidate index -> the distinct non-empty queries seen, and the most any one event listed
        self.queries: dict[int, set[str]] = {}
        self.listed: dict[int, int] = {}
        self.grounded = 0
        #: the last ``usageMetadata`` put beside it (None: none yet)
        self.meta: Any = None

    def note(self, obj: Mapping[str, Any]) -> None:
        """Keep one event's grounding. Whether a stream repeats the queries so far in each event
        or sends each once, a candidate's count is the larger of its distinct non-empty queries
        over the whole stream and the most one event listed: never fewer than it ran."""
        for i, cand in enumerate(obj.get("candidates") or ()):
            gm = field(cand, "groundingMetadata") if isinstance(cand, Mapping) else None
            if not isinstance(gm, Mapping):
                continue
            self.grounded = 1
            index = cand.get("index", i)
            index = index if isinstance(index, int) else i
            queries = field(gm, "webSearchQueries")
            if isinstance(queries, list):
                kept = {q for q in queries if isinstance(q, str) and q.strip()}
                self.queries.setdefault(index, set()).update(kept)
                self.listed[index] = max(self.listed.get(index, 0), len(kept))

    def beside(self, meta: Any) -> dict[str, Any]:
        """The usage to capture: ``meta`` with the grounding seen so far beside it
        (:func:`spendgate.usage.grounding` reads both)."""
        self.meta = meta
        out: dict[str, Any] = {"usageMetadata": meta}
        if self.grounded:
            out["grounded"] = 1
            out["web_search_queries"] = sum(max(len(q), self.listed.get(i, 0)) for i, q in self.queries.items())
        return out


@cache
def meter_class() -> type[StreamMeter]:
    """The meter of a Gemini event stream (built on first use: the stream module imports the
    registry, so it cannot be imported while the registry loads)."""
    from spendgate.wire.stream import StreamMeter

    class GeminiMeter(StreamMeter):
        """A Gemini event stream: every event carries ``usageMetadata`` (no ``"usage"`` key), and the
        output text sits in ``candidates[].content.parts[].text``. A grounded answer's
        ``groundingMetadata`` is kept too, from whichever events carry it (:class:`Grounding`)."""

        usage_marker = b'"usageMetadata"'

        def __init__(self, provider: str, withhold_usage_chunk: bool = False) -> None:
            super().__init__(provider, withhold_usage_chunk)
            self.grounding = Grounding()

        def _observe(self, event: bytes) -> bool:
            if self.usage_marker not in event and any(m in event for m in GROUNDING_MARKERS):
                # grounding in an event without usage (the others are read by stream_usage)
                data = b"".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
                try:
                    obj = json.loads(data)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    self.grounding.note(obj)
                    if self.grounding.meta is not None:  # the usage came first: carry the grounding to it
                        self.usage = self.grounding.beside(self.grounding.meta)
            return super()._observe(event)

        def _texts_of(self, obj: dict[str, Any]) -> None:
            for cand in obj.get("candidates") or ():
                content = cand.get("content") if isinstance(cand, dict) else None
                for part in (content.get("parts") or ()) if isinstance(content, dict) else ():
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        self.text.append(part["text"])
                    elif isinstance(part, dict) and isinstance(part.get("functionCall"), dict):
                        self.text.append(dumps(part["functionCall"]))

    return GeminiMeter


class Gemini(Provider):
    name = "gemini"
    default_base_url = "https://generativelanguage.googleapis.com"
    key_env = "GEMINI_API_KEY"
    routes: Mapping[str, Parser] = {
        **{_GENERATE.format(v=v): generate for v in VERSIONS},
        **{_STREAM.format(v=v): partial(generate, stream=True) for v in VERSIONS},
    }
    free_routes = frozenset(_COUNT.format(v=v) for v in VERSIONS)
    output_fields: Mapping[str, tuple[str, ...]] = {r: (CLAMP_FIELD,) for r in routes}
    conversation_fields: Mapping[str, str] = {r: "contents" for r in routes}
    chat_route = _GENERATE.format(v="v1beta")
    price_providers: tuple[str, ...] = ("google",)
    sdk_package = "google.genai"
    sdk_error = "errors.APIError"
    credential_headers = ("x-goog-api-key",)
    credential_params = ("key",)
    marker_headers: tuple[str, ...] = ("x-goog-api-key", "x-goog-api-client")
    error_types: Mapping[int, str] = {
        400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED",
        # a budget refusal: a 4xx google-genai raises as ClientError and no client retries
        402: "FAILED_PRECONDITION",
        403: "PERMISSION_DENIED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

    def body_with(self, route: str, params: Mapping[str, str], body: dict[str, Any]) -> dict[str, Any]:
        """The path's model in ``model``, which the engine prices and a downgrade edits."""
        model = params.get("model")
        return {**body, "model": model} if model else body

    def upstream(self, path: str, params: Mapping[str, str], body: bytes, edited: bool) -> tuple[str, bytes]:
        """An edited body back in Gemini's shape: ``model`` out of it (into the path when a downgrade
        changed it), a clamp's ``maxOutputTokens`` under ``generationConfig``, with a thinking
        budget cut so thoughts and answer together stay within the clamp."""
        if not edited:
            return path, body
        obj = json.loads(body)
        path = model_into_path(path, params, obj)
        bound = obj.pop(CLAMP_FIELD, None)
        if isinstance(bound, int):
            config_key = key_of(obj, "generationConfig")
            config = dict(obj.get(config_key) or {})
            thinking_key = key_of(config, "thinkingConfig")
            thinking = config.get(thinking_key)
            if isinstance(thinking, Mapping):
                budget_key = key_of(thinking, "thinkingBudget")
                budget = thinking.get(budget_key)
                if isinstance(budget, int) and budget > 0:
                    budget = min(budget, bound // 2)
                    config[thinking_key] = {**thinking, budget_key: budget}
                    bound -= budget
            config[key_of(config, "maxOutputTokens")] = max(1, bound)
            obj[config_key] = config
        return path, json.dumps(obj).encode()

    def searches(self, body: Mapping[str, Any]) -> int:
        """Grounding with Google Search, billed per request or per search (:data:`SEARCH_TOOLS`): -1,
        an unbounded count — Gemini 3 bills each search query the model runs and no field caps
        them, so the estimator bounds them by the output bound; a model the price table bills per
        grounded prompt (Gemini 2.x) is held one fee instead. A tool that grounds an answer without
        web searches (:data:`OTHER_GROUNDING`) is held one fee, what a grounded prompt is charged."""
        tools = field(body, "tools")
        if not isinstance(tools, list):
            return 0
        found = 0
        for tool in tools:
            if not isinstance(tool, Mapping):
                continue
            if any(tool.get(k) is not None for k in SEARCH_TOOLS):
                return -1
            if any(tool.get(k) is not None for k in OTHER_GROUNDING):
                found = 1
        return found

    def meter(self, withhold: bool = False) -> StreamMeter:
        return meter_class()(self.name, withhold)

    def sdk_error_class(self, status: int) -> str:
        """As google-genai raises an answer of that status: ``ClientError`` (4xx), ``ServerError``."""
        return "errors.ClientError" if status < 500 else "errors.ServerError"

    def sdk_error_fields(self, status: int) -> dict[str, Any]:
        """``code`` and ``status`` as on google-genai's own errors (its retry options read ``code``)."""
        return {"code": status, "status": self.error_types.get(status, "UNKNOWN")}

    def sdk_guard(self, client: Any, guard: Callable[[Any], Any]) -> Any | None:
        """A ``google.genai.Client`` rebuilt with the same options over guard transports: its sync
        and async HTTP clients' own transports (so its pool, TLS settings or a test's transport
        stay underneath), given as ``client_args`` / ``async_client_args`` — google-genai's own way
        to take a transport, which also routes ``.aio`` through httpx rather than aiohttp. The
        original client is kept alive by the new one: collecting it would close its transports.
        A Vertex AI client (``vertexai=True``) is rebuilt the same way, with its project, location and
        credentials."""
        api = getattr(client, "_api_client", None)
        if api is None or not hasattr(client, "aio"):
            raise TypeError(f"spendgate.wrap: expected a google.genai Client, got {type(client).__name__}")
        from spendgate.sdk._transport import Guarded

        sync_http, async_http = api._httpx_client, api._async_httpx_client
        if isinstance(getattr(sync_http, "_transport", None), Guarded):
            return client  # already guarded
        opts = api._http_options
        guarded_opts = opts.model_copy(update={
            "httpx_client": None, "httpx_async_client": None,
            "client_args": {**(opts.client_args or {}), "transport": guard(sync_http)},
            "async_client_args": {**(opts.async_client_args or {}), "transport": guard(async_http)},
        })
        # a Vertex AI client keeps its project, location and credentials (the token it already
        # holds: nothing is fetched again); its calls are priced as the ``vertex`` provider's
        vertex = {"vertexai": True, "project": api.project, "location": api.location,
                  "credentials": api._credentials} if api.vertexai else {}
        wrapped = type(client)(api_key=api.api_key, http_options=guarded_opts, **vertex)
        wrapped._spendgate_original = client
        return wrapped

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("x-goog-api-key") or super().api_key(headers)

    def apply_key(self, headers: dict[str, str], key: str) -> dict[str, str]:
        out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-goog-api-key")}
        out["x-goog-api-key"] = key
        return out

    def error_body(self, status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"error": {"code": status, "message": message,
                                          "status": self.error_types.get(status, "UNKNOWN")}}
        if code is not None:
            body["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": code,
                                         "domain": "spendgate"}]
        if extra:
            body["spendgate"] = dict(extra)
        return body

    def sse_error(self, status: int, message: str, *, code: str | None = None) -> bytes:
        """An error object as the stream's last ``data:`` event: google-genai raises a chunk that
        starts with ``{"error":``."""
        return b"data: " + json.dumps(self.error_body(status, message, code=code)).encode() + b"\r\n\r\n"

    def stream_usage(self, meter: StreamMeter, obj: dict[str, Any]) -> bool:
        """Each event's ``usageMetadata`` is cumulative: keep the last; the one whose candidate has
        a ``finishReason`` is final (a stream cut before it is charged input + output seen)."""
        meta = obj.get("usageMetadata")
        grounding = getattr(meter, "grounding", None)
        if isinstance(grounding, Grounding):
            grounding.note(obj)
        if isinstance(meta, dict):
            meter.usage = grounding.beside(meta) if isinstance(grounding, Grounding) else {"usageMetadata": meta}
            cands = obj.get("candidates")
            if isinstance(cands, list) and any(isinstance(c, dict) and c.get("finishReason") for c in cands):
                meter.complete = True
        return True

    def is_tool_result(self, item: Mapping[str, Any]) -> bool:
        """A function's response travels in a ``user`` turn: part of the model's tool round."""
        parts = item.get("parts")
        return isinstance(parts, list) and any(isinstance(p, Mapping) and field(p, "functionResponse") is not None
                                               for p in parts)
