"""Reading what a provider billed from its own ``usage`` shape.

OpenAI chat/completions/embeddings report ``prompt_tokens`` (cached reads *included*) and
``completion_tokens`` (reasoning included); the Responses API ``input_tokens`` / ``output_tokens``
with the same inclusions; Anthropic ``input_tokens`` *excluding* cache reads and writes, which
come separately (split into 5-minute and 1-hour writes when ``cache_creation`` is present);
Gemini ``usageMetadata`` counts thoughts apart from candidates. All become one :class:`Usage`.

Usage is read strictly. Every count the reader uses must be a non-negative integer, the input and
output counts must both be there (an embedding's ``{prompt_tokens, total_tokens}`` has no output,
and its total says so), and a part may not exceed its whole (cached ≤ input, reasoning ≤ output).
Anything else — ``"50"``, ``-5``, ``50.5``, ``null``, ``true``, an object, a missing count — raises
:class:`UnreadableUsage` naming the field, and the caller charges the worst case. Reading such a
count as 0 would charge nothing for a response the provider bills.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from spendgate.pricing.cost import Usage


class _Missing:
    def __repr__(self) -> str:
        return "missing"


#: Stands for a field that is absent (``None`` is a JSON null the provider sent).
MISSING: Any = _Missing()


class UnreadableUsage(ValueError):
    """A usage block that is not a set of non-negative integer counts; ``field`` names the culprit
    (``usage.prompt_tokens``), ``value`` is what was there (:data:`MISSING` when absent)."""

    def __init__(self, field: str, value: Any, why: str = "not a non-negative integer") -> None:
        self.field, self.value, self.why = field, value, why
        if value is MISSING:
            super().__init__(f"{field} is missing")
        else:
            super().__init__(f"{field} is {_show(value)}, {why}")


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(m: Mapping[str, Any], key: str, where: str, required: bool = True) -> int:
    """The count ``m[key]``: a non-negative int (not a bool), or 0 when optional and absent."""
    if key not in m:
        if required:
            raise UnreadableUsage(f"{where}.{key}", MISSING)
        return 0
    v = m[key]
    if type(v) is not int or v < 0:
        raise UnreadableUsage(f"{where}.{key}", v)
    return v


def _part(m: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    """A nested ``*_details`` object; absent or null means no breakdown was given."""
    v = m.get(key)
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise UnreadableUsage(f"{where}.{key}", v, "not an object")
    return v


def _at_most(part: int, whole: int, field: str, whole_field: str) -> int:
    if part > whole:
        raise UnreadableUsage(field, part, f"more than {whole_field} ({whole})")
    return part


def read_usage(payload: Mapping[str, Any] | None) -> Usage:
    """The :class:`Usage` of a response body or of its bare ``usage`` object.

    Raises :class:`UnreadableUsage` when there is none or it is not a set of non-negative integers."""
    if not isinstance(payload, Mapping):
        raise UnreadableUsage("usage", MISSING)
    if "usageMetadata" in payload:
        meta = payload["usageMetadata"]
        if not isinstance(meta, Mapping):
            raise UnreadableUsage("usageMetadata", meta, "not an object")
        return _gemini(meta, "usageMetadata")
    if "usage" in payload:
        u = payload["usage"]
        if not isinstance(u, Mapping):
            raise UnreadableUsage("usage", u, "not an object")
    elif any(k in payload for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")):
        u = payload  # a bare usage object
    else:
        raise UnreadableUsage("usage", MISSING)
    if "prompt_tokens" in u or "completion_tokens" in u:
        return _chat(u, "usage")
    if "input_tokens" in u or "output_tokens" in u:
        if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u or "cache_creation" in u:
            return _anthropic(u, "usage")
        if "input_tokens_details" in u or "output_tokens_details" in u:
            return _responses(u, "usage")
        return _anthropic(u, "usage")
    raise UnreadableUsage("usage", u, "not a usage shape spendgate knows (no input or output token count)")


def parse_usage(payload: Mapping[str, Any] | None) -> Usage | None:
    """:func:`read_usage`, with None for unreadable usage (callers that need no reason)."""
    try:
        return read_usage(payload)
    except UnreadableUsage:
        return None


def _chat(u: Mapping[str, Any], w: str) -> Usage:
    prompt = _count(u, "prompt_tokens", w)
    if "completion_tokens" in u:
        output = _count(u, "completion_tokens", w)
        _count(u, "total_tokens", w, required=False)
    else:
        # embeddings report no output at all; their total proves it. Without one, the output is unknown.
        if "total_tokens" not in u or _count(u, "total_tokens", w) != prompt:
            raise UnreadableUsage(f"{w}.completion_tokens", MISSING)
        output = 0
    cached = _at_most(_count(_part(u, "prompt_tokens_details", w), "cached_tokens",
                             f"{w}.prompt_tokens_details", required=False),
                      prompt, f"{w}.prompt_tokens_details.cached_tokens", f"{w}.prompt_tokens")
    reasoning = _at_most(_count(_part(u, "completion_tokens_details", w), "reasoning_tokens",
                                f"{w}.completion_tokens_details", required=False),
                         output, f"{w}.completion_tokens_details.reasoning_tokens", f"{w}.completion_tokens")
    return Usage(input=prompt - cached, cache_read=cached, output=output, reasoning=reasoning)


def _responses(u: Mapping[str, Any], w: str) -> Usage:
    inp, out = _count(u, "input_tokens", w), _count(u, "output_tokens", w)
    _count(u, "total_tokens", w, required=False)
    cached = _at_most(_count(_part(u, "input_tokens_details", w), "cached_tokens",
                             f"{w}.input_tokens_details", required=False),
                      inp, f"{w}.input_tokens_details.cached_tokens", f"{w}.input_tokens")
    reasoning = _at_most(_count(_part(u, "output_tokens_details", w), "reasoning_tokens",
                                f"{w}.output_tokens_details", required=False),
                         out, f"{w}.output_tokens_details.reasoning_tokens", f"{w}.output_tokens")
    return Usage(input=inp - cached, cache_read=cached, output=out, reasoning=reasoning)


def _anthropic(u: Mapping[str, Any], w: str) -> Usage:
    inp, out = _count(u, "input_tokens", w), _count(u, "output_tokens", w)
    read = _count(u, "cache_read_input_tokens", w, required=False)
    written = _count(u, "cache_creation_input_tokens", w, required=False)
    split = _part(u, "cache_creation", w)
    w5 = _count(split, "ephemeral_5m_input_tokens", f"{w}.cache_creation", required=False)
    w1 = _count(split, "ephemeral_1h_input_tokens", f"{w}.cache_creation", required=False)
    w5 += max(written - w5 - w1, 0)  # writes the split leaves out are charged at the 5-minute rate
    return Usage(input=inp, cache_read=read, cache_write_5m=w5, cache_write_1h=w1, output=out)


def _gemini(m: Mapping[str, Any], w: str) -> Usage:
    prompt = _count(m, "promptTokenCount", w)
    candidates = _count(m, "candidatesTokenCount", w)
    _count(m, "totalTokenCount", w, required=False)
    cached = _at_most(_count(m, "cachedContentTokenCount", w, required=False), prompt,
                      f"{w}.cachedContentTokenCount", f"{w}.promptTokenCount")
    thoughts = _count(m, "thoughtsTokenCount", w, required=False)
    return Usage(input=prompt - cached, cache_read=cached, output=candidates + thoughts, reasoning=thoughts)


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
