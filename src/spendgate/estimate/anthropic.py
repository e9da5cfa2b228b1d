"""Input tokens of Anthropic Messages requests, by a calibrated factor over o200k.

No offline tokenizer exists for current Claude models. The text of the request (system, every
message block, tool definitions) is counted with o200k and multiplied by ``factor`` (default
:data:`DEFAULT_FACTOR`); each run of a script that o200k compresses far better than Claude does
(Cyrillic, Arabic, Devanagari, Thai, …) counts at least its per-script floor
(:mod:`spendgate.estimate.scripts`), and tool schemas count their ``$ref``-inlined size when that
is larger (:mod:`spendgate.estimate.schemas`). A deliberate upward bias: the hold is settled from the response's
``usage`` anyway, so over-estimating only holds a little more for the duration of one call,
while under-estimating could let a budget be overrun. See the README for the factor's source
and error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from spendgate.errors import BadRequest
from spendgate.estimate import images
from spendgate.estimate.shape import TokenShape, dumps, is_map, optional_int, require_list, require_model
from spendgate.estimate.tally import Tally, tally

#: Claude tokens per o200k token, biased upward (README: "Anthropic input estimates").
DEFAULT_FACTOR = 1.7
PER_MESSAGE = 4
#: The system prompt Anthropic adds when tools are present (its documented maximum for Claude 4).
TOOL_SYSTEM_PROMPT = 346
#: An image of unknown size: the largest a resized image can bill (1568 px long edge, ~1.15 MP).
IMAGE_WORST = 1600
#: A base64 PDF of unknown page count: one token per 12 decoded bytes, an upward heuristic.
PDF_BYTES_PER_TOKEN = 12


def _block_tokens(t: Tally, block: Any) -> None:
    """Adds one content block to ``t``."""
    if isinstance(block, str):
        t.text(block)
        return
    if type(block) is not dict and not is_map(block):
        raise BadRequest(f"a content block must be an object, got {type(block).__name__}")
    kind = block.get("type")
    if kind == "text":
        t.text(str(block.get("text", "")))
    elif kind == "image":
        src = block.get("source")
        size = None
        if is_map(src) and src.get("type") == "base64" and isinstance(src.get("data"), str):
            size = images.size_of_data_url(f"data:{src.get('media_type', 'image')};base64,{src['data'][:65536]}")
        t.fixed += images.anthropic_tokens(*size) if size else IMAGE_WORST
    elif kind == "document":
        src = block.get("source")
        if not is_map(src):
            t.text(dumps(block))
        elif src.get("type") == "base64" and isinstance(src.get("data"), str):
            t.fixed += math.ceil(len(src["data"]) * 3 / 4 / PDF_BYTES_PER_TOKEN)
        else:
            t.text(dumps(src))
    elif kind == "thinking":
        t.text(str(block.get("thinking", "")))
    elif kind == "redacted_thinking":
        t.text(str(block.get("data", "")))
    elif kind == "tool_use":
        t.text(f"{block.get('name', '')}{dumps(block.get('input', {}))}")
    elif kind == "tool_result":
        content = block.get("content")
        if isinstance(content, str | list) or content is None:
            _content_tokens(t, content)
        else:
            t.text(dumps(content))
    else:
        t.text(dumps(block))


def _content_tokens(t: Tally, content: Any) -> None:
    if isinstance(content, str):
        t.text(content)
    elif isinstance(content, list):
        for block in content:
            _block_tokens(t, block)
    elif content is not None:
        raise BadRequest(f"message `content` must be a string or a list of blocks, got {type(content).__name__}")


def _cache_ttl(node: Any) -> str | None:
    """The longest prompt-cache TTL any ``cache_control`` mark in the request asks for.

    Every object and list of the body is visited (dicts and lists by type first: see
    :func:`~spendgate.estimate.shape.is_map`); strings and numbers, most of a body, are passed over."""
    found: str | None = None
    stack = [node]
    while stack:
        cur = stack.pop()
        if type(cur) is list:
            items: Iterable[Any] = cur
        elif type(cur) is dict or is_map(cur):
            cc = cur.get("cache_control")
            if is_map(cc):
                if cc.get("ttl") == "1h":
                    return "1h"
                found = "5m"
            items = cur.values()
        elif isinstance(cur, list):
            items = cur
        else:
            continue
        for v in items:
            kind = type(v)
            if kind is dict or kind is list or (kind is not str and isinstance(v, list | Mapping)):
                stack.append(v)
    return found


def messages(body: Mapping[str, Any], factor: float = DEFAULT_FACTOR) -> TokenShape:
    model = require_model(body)
    t = tally(factor)
    msgs = require_list(body, "messages")
    _content_tokens(t, body.get("system"))
    for msg in msgs:
        if type(msg) is not dict and not is_map(msg):
            raise BadRequest(f"each message must be an object, got {type(msg).__name__}")
        _content_tokens(t, msg.get("content"))
        t.fixed += PER_MESSAGE
    tools = body.get("tools")
    if tools:
        t.tools(tools)
        t.fixed += TOOL_SYSTEM_PROMPT
    return TokenShape(
        model=model,
        input_tokens=t.total(),
        requested_output=optional_int(body, "max_tokens"),
        cache_write=_cache_ttl(body),
        stream=bool(body.get("stream")),
        exact=False,
    )
