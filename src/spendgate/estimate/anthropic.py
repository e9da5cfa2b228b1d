"""Input tokens of Anthropic Messages requests, by a calibrated factor over o200k.

No offline tokenizer exists for current Claude models. The text of the request (system, every
message block, tool definitions) is counted with o200k and multiplied by ``factor`` (default
:data:`DEFAULT_FACTOR`), a deliberate upward bias: the hold is settled from the response's
``usage`` anyway, so over-estimating only holds a little more for the duration of one call,
while under-estimating could let a budget be overrun. See the README for the factor's source
and error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from spendgate.errors import BadRequest
from spendgate.estimate import images
from spendgate.estimate.shape import TokenShape, dumps, optional_int, require_list, require_model
from spendgate.estimate.tokens import TokenCounter, counter

#: Claude tokens per o200k token, biased upward (README: "Anthropic input estimates").
DEFAULT_FACTOR = 1.7
PER_MESSAGE = 4
#: The system prompt Anthropic adds when tools are present (its documented maximum for Claude 4).
TOOL_SYSTEM_PROMPT = 346
#: An image of unknown size: the largest a resized image can bill (1568 px long edge, ~1.15 MP).
IMAGE_WORST = 1600
#: A base64 PDF of unknown page count: one token per 12 decoded bytes, an upward heuristic.
PDF_BYTES_PER_TOKEN = 12


def _block_tokens(tc: TokenCounter, block: Any) -> tuple[int, int]:
    """(text tokens to scale, fixed tokens) of one content block."""
    if isinstance(block, str):
        return tc.count(block), 0
    if not isinstance(block, Mapping):
        raise BadRequest(f"a content block must be an object, got {type(block).__name__}")
    kind = block.get("type")
    if kind == "text":
        return tc.count(str(block.get("text", ""))), 0
    if kind == "image":
        src = block.get("source")
        size = None
        if isinstance(src, Mapping) and src.get("type") == "base64" and isinstance(src.get("data"), str):
            size = images.size_of_data_url(f"data:{src.get('media_type', 'image')};base64,{src['data'][:65536]}")
        return 0, images.anthropic_tokens(*size) if size else IMAGE_WORST
    if kind == "document":
        src = block.get("source")
        if not isinstance(src, Mapping):
            return tc.count(dumps(block)), 0
        if src.get("type") == "base64" and isinstance(src.get("data"), str):
            return 0, math.ceil(len(src["data"]) * 3 / 4 / PDF_BYTES_PER_TOKEN)
        return tc.count(dumps(src)), 0
    if kind == "thinking":
        return tc.count(str(block.get("thinking", ""))), 0
    if kind == "redacted_thinking":
        return tc.count(str(block.get("data", ""))), 0
    if kind == "tool_use":
        return tc.count(f"{block.get('name', '')}{dumps(block.get('input', {}))}"), 0
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, str | list) or content is None:
            return _content_tokens(tc, content)
        return tc.count(dumps(content)), 0
    return tc.count(dumps(block)), 0


def _content_tokens(tc: TokenCounter, content: Any) -> tuple[int, int]:
    if isinstance(content, str):
        return tc.count(content), 0
    if isinstance(content, list):
        scaled = fixed = 0
        for block in content:
            s, f = _block_tokens(tc, block)
            scaled, fixed = scaled + s, fixed + f
        return scaled, fixed
    if content is None:
        return 0, 0
    raise BadRequest(f"message `content` must be a string or a list of blocks, got {type(content).__name__}")


def _cache_ttl(node: Any) -> str | None:
    """The longest prompt-cache TTL any ``cache_control`` mark in the request asks for."""
    found: str | None = None
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, Mapping):
            cc = cur.get("cache_control")
            if isinstance(cc, Mapping):
                if cc.get("ttl") == "1h":
                    return "1h"
                found = "5m"
            stack.extend(v for v in cur.values() if isinstance(v, list | Mapping))
        elif isinstance(cur, list):
            stack.extend(v for v in cur if isinstance(v, list | Mapping))
    return found


def messages(body: Mapping[str, Any], factor: float = DEFAULT_FACTOR) -> TokenShape:
    model = require_model(body)
    tc = counter("o200k_base")
    msgs = require_list(body, "messages")
    scaled, fixed = _content_tokens(tc, body.get("system"))
    for msg in msgs:
        if not isinstance(msg, Mapping):
            raise BadRequest(f"each message must be an object, got {type(msg).__name__}")
        s, f = _content_tokens(tc, msg.get("content"))
        scaled, fixed = scaled + s, fixed + f + PER_MESSAGE
    tools = body.get("tools")
    if tools:
        scaled += tc.count(dumps(tools))
        fixed += TOOL_SYSTEM_PROMPT
    return TokenShape(
        model=model,
        input_tokens=math.ceil(scaled * factor) + fixed,
        requested_output=optional_int(body, "max_tokens"),
        cache_write=_cache_ttl(body),
        stream=bool(body.get("stream")),
        exact=False,
    )
