"""Input tokens of OpenAI requests, counted with tiktoken.

Chat messages follow the counting OpenAI documents in its cookbook ("How to count tokens with
tiktoken"): 3 tokens per message, the role and content encoded, 1 more for a ``name``, and 3 to
prime the reply; function tools by the cookbook's formula, or — for schemas with ``$ref``,
``$defs`` or combinators, which that flat formula cannot see into — by their JSON with references
inlined (:mod:`spendgate.estimate.schemas`), whichever is larger. Images whose size is unknown are
counted at the most an image can cost. Unknown item and tool types are counted as the tokens of
their JSON, an upper bound on their rendering.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from spendgate.errors import BadRequest
from spendgate.estimate import images, schemas
from spendgate.estimate.shape import TokenShape, dumps, is_map, optional_int, require_list, require_model
from spendgate.estimate.tokens import TokenCounter, counter, encoding_for_model

PER_MESSAGE = 3
PER_NAME = 1
REPLY_PRIMING = 3
# Cookbook function-tool formula constants (gpt-4o family; gpt-4/3.5 use 10 for FUNC_INIT).
FUNC_INIT_O200K, FUNC_INIT_CL100K = 7, 10
PROP_INIT, PROP_KEY, ENUM_INIT, ENUM_ITEM, FUNC_END = 3, 3, -3, 3, 12
# An image of unknown size at "high"/"auto" detail: the largest tiling (768x2048 -> 8 tiles).
IMAGE_LOW = 85
IMAGE_WORST = 85 + 170 * 8
IMAGE_WORST_4O_MINI = 2833 + 5667 * 8  # gpt-4o-mini bills images at ~33x the tokens
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _image_tokens(model: str, part: Mapping[str, Any]) -> int:
    """OpenAI's documented tiling for an inline image whose size can be read; the largest tiling
    otherwise (a URL is not fetched)."""
    spec = part.get("image_url")
    detail = spec.get("detail") if is_map(spec) else part.get("detail")
    url = spec.get("url") if is_map(spec) else spec
    size = images.size_of_data_url(url) if isinstance(url, str) else None
    base, per_tile, worst = (2833, 5667, IMAGE_WORST_4O_MINI) if "gpt-4o-mini" in model else (85, 170, IMAGE_WORST)
    if detail == "low":
        return base
    if size is None:
        return worst
    return base + per_tile * images.openai_tiles(*size)


def _content_tokens(tc: TokenCounter, model: str, content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return tc.count(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += tc.count(part)
            elif type(part) is not dict and not is_map(part):
                raise BadRequest(f"a content part must be an object, got {type(part).__name__}")
            elif isinstance(part.get("text"), str):
                total += tc.count(part["text"])
            elif part.get("type") in ("image_url", "input_image"):
                total += _image_tokens(model, part)
            else:
                total += tc.count(dumps(part))
        return total
    return tc.count(dumps(content))


def _schema_tokens(tc: TokenCounter, params: Any, text: str | None = None) -> int:
    """Tokens of a parameters schema as JSON, ``$ref``s inlined when that is longer (schemas.bound)."""
    return math.ceil(schemas.bound(params, tc.count, text))


def _function_tools(tc: TokenCounter, tools: list[Any], func_init: int) -> int:
    total = 0
    for tool in tools:
        fn = tool.get("function") if is_map(tool) else None
        if not is_map(fn) or tool.get("type", "function") != "function":
            total += tc.count(dumps(tool))
            continue
        desc = str(fn.get("description") or "").removesuffix(".")
        head = func_init + tc.count(f"{fn.get('name', '')}:{desc}")
        params = fn.get("parameters")
        props = params.get("properties") if is_map(params) else None
        if not is_map(props):
            props = {}
        body = 0
        if props:
            body += PROP_INIT
            for key, prop in props.items():
                prop = prop if is_map(prop) else {}
                body += PROP_KEY
                if isinstance(prop.get("enum"), list):
                    body += ENUM_INIT
                    for item in prop["enum"]:
                        body += ENUM_ITEM + tc.count(str(item))
                pdesc = str(prop.get("description") or "").removesuffix(".")
                body += tc.count(f"{key}:{prop.get('type', '')}:{pdesc}")
                nested = {k: v for k, v in prop.items() if k in ("properties", "items", "anyOf", "oneOf")}
                if nested:  # beyond the cookbook's flat formula: count nested schemas as JSON
                    body += tc.count(dumps(nested))
        text = dumps(params) if is_map(params) else ""
        if schemas.is_composite(text):
            # $ref / $defs / allOf / anyOf / oneOf: the cookbook's flat formula sees only the top
            # level; the provider renders what the references point to
            body = max(body, _schema_tokens(tc, params, text))
        total += head + body
    return total + FUNC_END if tools else 0


def _responses_tools(tc: TokenCounter, tools: Any) -> int:
    total = 0
    for tool in tools or ():
        if is_map(tool) and tool.get("type") == "function":
            desc = str(tool.get("description") or "")
            total += FUNC_INIT_O200K + tc.count(f"{tool.get('name', '')}:{desc}")
            total += _schema_tokens(tc, tool.get("parameters") or {})
        else:
            total += tc.count(dumps(tool))
    return total


def _messages_tokens(tc: TokenCounter, model: str, messages: list[Any]) -> int:
    total = REPLY_PRIMING
    for msg in messages:
        if type(msg) is not dict and not is_map(msg):
            raise BadRequest(f"each message must be an object, got {type(msg).__name__}")
        total += PER_MESSAGE + tc.count(str(msg.get("role", "")))
        total += _content_tokens(tc, model, msg.get("content"))
        if isinstance(msg.get("name"), str):
            total += tc.count(msg["name"]) + PER_NAME
        for key in ("tool_calls", "function_call", "audio"):
            if msg.get(key):
                total += tc.count(dumps(msg[key]))
        if isinstance(msg.get("tool_call_id"), str):
            total += tc.count(msg["tool_call_id"])
    return total


def _audio_tokens(tc: TokenCounter, messages: list[Any]) -> int:
    """The part of the count that is input audio (``input_audio`` content parts), held at the
    model's audio input rate. Counted as the tokens of the part's JSON (its base64 data): audio bills
    about 10 tokens a second, and a second of any format OpenAI accepts is more than 1,000 base64
    characters, so this bounds the audio tokens many times over."""
    total = 0
    for msg in messages:
        content = msg.get("content") if type(msg) is dict or is_map(msg) else None
        if isinstance(content, list):
            total += sum(tc.count(dumps(part)) for part in content
                         if (type(part) is dict or is_map(part)) and part.get("type") == "input_audio")
    return total


def chat(body: Mapping[str, Any]) -> TokenShape:
    model = require_model(body)
    enc = encoding_for_model(model)
    tc = counter(enc)
    messages = require_list(body, "messages")
    n_in = _messages_tokens(tc, model, messages)
    if body.get("tools") is not None:
        func_init = FUNC_INIT_O200K if enc == "o200k_base" else FUNC_INIT_CL100K
        n_in += _function_tools(tc, require_list(body, "tools"), func_init)
    if body.get("functions") is not None:
        legacy = [{"type": "function", "function": f} for f in require_list(body, "functions")]
        n_in += _function_tools(tc, legacy, FUNC_INIT_CL100K)
    if is_map(body.get("response_format")):
        n_in += _format_tokens(tc, body["response_format"])
    return TokenShape(
        model=model,
        input_tokens=n_in,
        requested_output=optional_int(body, "max_completion_tokens", "max_tokens"),
        choices=optional_int(body, "n") or 1,
        stream=bool(body.get("stream")),
        input_audio=_audio_tokens(tc, messages),
    )


def _format_tokens(tc: TokenCounter, fmt: Mapping[str, Any]) -> int:
    """A structured output format (chat ``response_format``, Responses ``text.format``): its JSON, or
    — for a schema with ``$ref``, ``$defs`` or combinators — the larger of that and the schema with
    its references written out where they are used (the schema is their root), as tool schemas are
    counted, plus the format's other fields (name, strict) as JSON."""
    text = dumps(fmt)
    if not schemas.is_composite(text):
        return tc.count(text)
    # chat nests the schema under ``json_schema``; Responses' ``text.format`` holds it directly
    nested = fmt.get("json_schema")
    inner: Mapping[str, Any] = nested if is_map(nested) else fmt
    schema = inner.get("schema")
    if not is_map(schema):
        return tc.count(text)
    rest = tc.count(dumps({k: v for k, v in fmt.items() if k != "json_schema"}))
    if inner is not fmt:
        rest += tc.count(dumps({k: v for k, v in inner.items() if k != "schema"}))
    else:
        rest = tc.count(dumps({k: v for k, v in fmt.items() if k != "schema"}))
    return max(tc.count(text), rest + _schema_tokens(tc, schema))


def _response_items_tokens(tc: TokenCounter, model: str, items: Any) -> int:
    if isinstance(items, str):
        return tc.count(items) + PER_MESSAGE + REPLY_PRIMING
    if not isinstance(items, list):
        raise BadRequest(f"`input` must be a string or a list, got {type(items).__name__}")
    total = REPLY_PRIMING
    for item in items:
        if not is_map(item):
            raise BadRequest(f"each `input` item must be an object, got {type(item).__name__}")
        kind = item.get("type", "message")
        if kind == "message" or "role" in item:
            total += PER_MESSAGE + tc.count(str(item.get("role", "")))
            total += _content_tokens(tc, model, item.get("content"))
        elif kind == "function_call":
            total += PER_MESSAGE + tc.count(f"{item.get('name', '')}{item.get('arguments', '')}")
        elif kind == "function_call_output":
            out = item.get("output")
            total += PER_MESSAGE + (tc.count(out) if isinstance(out, str) else tc.count(dumps(out)))
        elif kind == "reasoning":
            total += sum(tc.count(str(s.get("text", ""))) for s in item.get("summary") or ()
                         if is_map(s))
        else:
            total += tc.count(dumps(item))
    return total


def responses(body: Mapping[str, Any]) -> TokenShape:
    model = require_model(body)
    tc = counter(encoding_for_model(model))
    n_in = _response_items_tokens(tc, model, body.get("input", ""))
    if isinstance(body.get("instructions"), str):
        n_in += PER_MESSAGE + tc.count(body["instructions"])
    n_in += _responses_tools(tc, body.get("tools"))
    if is_map(body.get("text")) and is_map(body["text"].get("format")):
        n_in += _format_tokens(tc, body["text"]["format"])
    elif is_map(body.get("text")) and body["text"].get("format"):
        n_in += tc.count(dumps(body["text"]["format"]))
    return TokenShape(
        model=model,
        input_tokens=n_in,
        requested_output=optional_int(body, "max_output_tokens"),
        stream=bool(body.get("stream")),
    )


def _prompt_tokens(tc: TokenCounter, prompt: Any, field: str) -> int:
    if isinstance(prompt, str):
        return tc.count(prompt)
    if isinstance(prompt, list):
        if all(isinstance(x, int) for x in prompt):
            return len(prompt)
        total = 0
        for x in prompt:
            if isinstance(x, str):
                total += tc.count(x)
            elif isinstance(x, list) and all(isinstance(t, int) for t in x):
                total += len(x)
            else:
                raise BadRequest(f"`{field}` items must be strings or token arrays")
        return total
    raise BadRequest(f"`{field}` must be a string, a list of strings or token arrays")


def completions(body: Mapping[str, Any]) -> TokenShape:
    model = require_model(body)
    tc = counter(encoding_for_model(model))
    n_in = _prompt_tokens(tc, body.get("prompt", ""), "prompt")
    if isinstance(body.get("suffix"), str):
        n_in += tc.count(body["suffix"])
    choices = max(optional_int(body, "n") or 1, optional_int(body, "best_of") or 1)
    return TokenShape(
        model=model,
        input_tokens=n_in,
        requested_output=optional_int(body, "max_tokens"),
        api_default_output=COMPLETIONS_DEFAULT_MAX_TOKENS,
        choices=choices,
        stream=bool(body.get("stream")),
    )


def embeddings(body: Mapping[str, Any]) -> TokenShape:
    model = require_model(body)
    tc = counter(encoding_for_model(model))
    if "input" not in body:
        raise BadRequest("`input` is missing; an embeddings request must carry its input")
    return TokenShape(model=model, input_tokens=_prompt_tokens(tc, body["input"], "input"),
                      requested_output=0)
