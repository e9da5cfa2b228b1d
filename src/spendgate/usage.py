"""Reading what a provider billed from its own ``usage`` shape.

OpenAI chat/completions/embeddings report ``prompt_tokens`` (cached reads *included*) and
``completion_tokens`` (reasoning included); the Responses API ``input_tokens`` / ``output_tokens``
with the same inclusions; Anthropic ``input_tokens`` *excluding* cache reads and writes, which
come separately (split into 5-minute and 1-hour writes when ``cache_creation`` is present);
Gemini ``usageMetadata`` counts thoughts apart from candidates. All become one :class:`Usage`.
A shape we cannot read returns None, and the caller charges the worst case — never zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from spendgate.pricing.cost import Usage


def _int(m: Mapping[str, Any] | None, key: str) -> int:
    v = m.get(key) if isinstance(m, Mapping) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def parse_usage(payload: Mapping[str, Any] | None) -> Usage | None:
    """A :class:`Usage` from a response body or its ``usage`` object; None if none is readable."""
    if not isinstance(payload, Mapping):
        return None
    if isinstance(payload.get("usageMetadata"), Mapping):
        return _gemini(payload["usageMetadata"])
    u = payload.get("usage") if isinstance(payload.get("usage"), Mapping) else payload
    if isinstance(u, Mapping) and "prompt_tokens" in u:
        details = u.get("prompt_tokens_details")
        cached = _int(details, "cached_tokens")
        reasoning = _int(u.get("completion_tokens_details"), "reasoning_tokens")
        return Usage(input=max(_int(u, "prompt_tokens") - cached, 0), cache_read=cached,
                     output=_int(u, "completion_tokens"), reasoning=reasoning)
    if isinstance(u, Mapping) and ("input_tokens" in u or "output_tokens" in u):
        if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u or "cache_creation" in u:
            return _anthropic(u)
        if "input_tokens_details" in u or "output_tokens_details" in u:
            cached = _int(u.get("input_tokens_details"), "cached_tokens")
            return Usage(input=max(_int(u, "input_tokens") - cached, 0), cache_read=cached,
                         output=_int(u, "output_tokens"),
                         reasoning=_int(u.get("output_tokens_details"), "reasoning_tokens"))
        return _anthropic(u)
    return None


def _anthropic(u: Mapping[str, Any]) -> Usage:
    split = u.get("cache_creation")
    if isinstance(split, Mapping):
        w5, w1 = _int(split, "ephemeral_5m_input_tokens"), _int(split, "ephemeral_1h_input_tokens")
        rest = _int(u, "cache_creation_input_tokens") - w5 - w1
        w5 += max(rest, 0)
    else:
        w5, w1 = _int(u, "cache_creation_input_tokens"), 0
    return Usage(input=_int(u, "input_tokens"), cache_read=_int(u, "cache_read_input_tokens"),
                 cache_write_5m=w5, cache_write_1h=w1, output=_int(u, "output_tokens"))


def _gemini(m: Mapping[str, Any]) -> Usage:
    cached = _int(m, "cachedContentTokenCount")
    thoughts = _int(m, "thoughtsTokenCount")
    return Usage(input=max(_int(m, "promptTokenCount") - cached, 0), cache_read=cached,
                 output=_int(m, "candidatesTokenCount") + thoughts, reasoning=thoughts)


_DECODER = json.JSONDecoder()


def usage_from_body(data: bytes) -> Mapping[str, Any] | None:
    """The usage of a non-streamed response body, without parsing the whole body.

    A long completion is mostly text; its ``usage`` object is small and near the end. The key is
    found as raw bytes (``"usage":`` cannot occur unescaped inside a JSON string) and only its value
    is decoded; anything unexpected falls back to parsing the whole body.
    """
    for key, wrap in ((b'"usage":', "usage"), (b'"usageMetadata":', "usageMetadata")):
        at = data.rfind(key)
        if at < 0:
            continue
        try:
            text = data[at + len(key):].decode()
            value, _ = _DECODER.raw_decode(text.lstrip())
        except (UnicodeDecodeError, ValueError):
            break
        if isinstance(value, dict):
            return {wrap: value}
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None
