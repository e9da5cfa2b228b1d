"""Reading what a provider billed from its own ``usage`` shape.

OpenAI chat/completions/embeddings report ``prompt_tokens`` (cached reads *included*) and
``completion_tokens`` (reasoning included); the Responses API ``input_tokens`` / ``output_tokens``
with the same inclusions; Anthropic ``input_tokens`` *excluding* cache reads and writes, which
come separately (split into 5-minute and 1-hour writes when ``cache_creation`` is present);
Gemini ``usageMetadata`` counts thoughts apart from candidates (its grounding searches are read
from ``candidates[].groundingMetadata`` beside it); Bedrock's Converse ``inputTokens``
excludes ``cacheReadInputTokens`` and ``cacheWriteInputTokens``. All become one :class:`Usage`.

Usage is read strictly. Every count the reader uses must be a non-negative integer, the input and
output counts must both be there (an embedding's ``{prompt_tokens, total_tokens}`` has no output,
and its total says so), and a part may not exceed its whole (cached ≤ input, reasoning ≤ output).
Anything else — ``"50"``, ``-5``, ``50.5``, ``null``, ``true``, an object, a missing count — raises
:class:`UnreadableUsage` naming the field, and the caller charges the worst case. Reading such a
count as 0 would charge nothing for a response the provider bills.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from spendgate.pricing.cost import Usage

log = logging.getLogger("spendgate.usage")


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

    Raises :class:`UnreadableUsage` when there is none or it is not a set of non-negative integers.

    The usual shapes (OpenAI chat and Responses, Anthropic), parsed JSON with every count in
    order, are read by :func:`_read_plain` without building a field name per count; anything it
    does not accept as it stands — a bad count, another shape, a mapping that is not a dict — is
    read by :func:`_read_strict`, the definition, which names what is wrong. Both give the same
    :class:`Usage` wherever the first gives one (``tests/test_usage_fast.py``)."""
    if type(payload) is dict and "usageMetadata" not in payload:
        if "usage" in payload:
            u, outer = payload["usage"], payload
        else:
            u, outer = payload, None
        if type(u) is dict:
            plain = _read_plain(u, outer)
            if plain is not None:
                return plain
    return _read_strict(payload)


def _nonneg(*counts: Any) -> bool:
    """Every one of ``counts`` is a non-negative int (not a bool)."""
    for v in counts:
        if type(v) is not int or v < 0:
            break
    else:
        return True
    return False


def _read_plain(u: dict[str, Any], outer: dict[str, Any] | None) -> Usage | None:
    """:func:`_read_strict` for a ``usage`` dict of a usual shape whose counts are all in order;
    None for anything else (the strict reader then reads it or says what is wrong)."""
    if "inputTokens" in u or "outputTokens" in u:
        return None
    if "prompt_tokens" in u or "completion_tokens" in u:
        inp, out, total = u.get("prompt_tokens", MISSING), u.get("completion_tokens", MISSING), u.get("total_tokens", 0)
        if not _nonneg(inp, out, total):
            return None  # an embedding's usage has no output count: the strict reader checks its total
        usage = _plain_openai(u, outer, inp, out, u.get("prompt_tokens_details"), u.get("completion_tokens_details"))
    elif "input_tokens" in u or "output_tokens" in u:
        if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u or "cache_creation" in u \
                or "server_tool_use" in u or not any(k in u for k in _DETAILS):
            usage = _plain_anthropic(u, outer)
        else:
            inp, out, total = u.get("input_tokens", MISSING), u.get("output_tokens", MISSING), u.get("total_tokens", 0)
            d = u.get("input_tokens_details")
            if not _nonneg(inp, out, total) or (d is not None and (type(d) is not dict or "text_tokens" in d)):
                return None  # the Images API's usage reads its output as image tokens: the strict reader
            ind = u.get("input_token_details", d)
            outd = u.get("output_token_details") if "output_token_details" in u else u.get("output_tokens_details")
            usage = _plain_openai(u, outer, inp, out, ind, outd)
    else:
        return None
    if usage is None:
        return None
    return _with_unknown(usage, u, "usage")


def _plain_openai(u: dict[str, Any], outer: dict[str, Any] | None, inp: int, out: int, d: Any, o: Any) -> Usage | None:
    """:func:`_openai` over details that are dicts (or absent) of counts in order, else None."""
    if d is None:
        cached = write = audio = image = c_audio = c_image = 0
    elif type(d) is dict:
        cached, write = d.get("cached_tokens", 0), d.get("cache_write_tokens", 0)
        audio, image = d.get("audio_tokens", 0), d.get("image_tokens", 0)
        cd = d.get("cached_tokens_details")
        if cd is None:
            c_audio = c_image = 0
        elif type(cd) is dict:
            c_audio, c_image = cd.get("audio_tokens", 0), cd.get("image_tokens", 0)
        else:
            return None
        if not _nonneg(cached, write, audio, image, c_audio, c_image) or c_audio > audio or c_image > image \
                or c_audio + c_image > cached or cached > inp:
            return None
    else:
        return None
    text = inp - cached - write - (audio - c_audio) - (image - c_image)
    if text < 0:
        return None
    if o is None:
        reasoning = o_audio = o_image = 0
    elif type(o) is dict:
        reasoning, o_audio, o_image = o.get("reasoning_tokens", 0), o.get("audio_tokens", 0), o.get("image_tokens", 0)
        if not _nonneg(reasoning, o_audio, o_image) or reasoning > out or reasoning + o_audio + o_image > out:
            return None
    else:
        return None
    return Usage(input=text, cache_read=cached - c_audio - c_image, cache_write_5m=write, output=out,
                 reasoning=reasoning, input_audio=audio - c_audio, cache_audio_read=c_audio,
                 input_image=image - c_image, cache_image_read=c_image, output_audio=o_audio,
                 output_image=o_image, web_searches=_calls(u, outer), tier=_tier(u, outer))


def _plain_anthropic(u: dict[str, Any], outer: dict[str, Any] | None) -> Usage | None:
    """:func:`_anthropic` over counts in order and dict (or absent) breakdowns, else None."""
    inp, out = u.get("input_tokens", MISSING), u.get("output_tokens", MISSING)
    read, written = u.get("cache_read_input_tokens", 0), u.get("cache_creation_input_tokens", 0)
    split = u.get("cache_creation")
    if split is None:
        w5 = w1 = 0
    elif type(split) is dict:
        w5, w1 = split.get("ephemeral_5m_input_tokens", 0), split.get("ephemeral_1h_input_tokens", 0)
    else:
        return None
    tools = u.get("server_tool_use")
    if tools is None:
        searches = 0
    elif type(tools) is dict:
        searches = tools.get("web_search_requests", 0)
    else:
        return None
    if not _nonneg(inp, out, read, written, w5, w1, searches):
        return None
    w5 += max(written - w5 - w1, 0)  # writes the split leaves out are charged at the 5-minute rate
    tier = _tier(u, outer)
    processing = "batch" if tier == "batch" else None
    return Usage(input=inp, cache_read=read, cache_write_5m=w5, cache_write_1h=w1, output=out,
                 web_searches=searches, tier=None if processing else tier,
                 speed=_tier(u, outer, "speed"), processing=processing)


def _read_strict(payload: Mapping[str, Any] | None) -> Usage:
    """:func:`read_usage` by definition: every count checked and named as it is read."""
    if not isinstance(payload, Mapping):
        raise UnreadableUsage("usage", MISSING)
    if "usageMetadata" in payload:
        meta = payload["usageMetadata"]
        if not isinstance(meta, Mapping):
            raise UnreadableUsage("usageMetadata", meta, "not an object")
        usage = _with_unknown(_gemini(meta, "usageMetadata"), meta, "usageMetadata")
        usage.web_searches, usage.grounded = grounding(payload)
        return usage
    if "usage" in payload:
        u = payload["usage"]
        if not isinstance(u, Mapping):
            raise UnreadableUsage("usage", u, "not an object")
    elif any(k in payload for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                                    "inputTokens", "outputTokens")):
        u = payload  # a bare usage object
    else:
        raise UnreadableUsage("usage", MISSING)
    outer = payload if u is not payload else None
    if "inputTokens" in u or "outputTokens" in u:
        return _with_unknown(_converse(u, "usage"), u, "usage")
    if "prompt_tokens" in u or "completion_tokens" in u:
        return _with_unknown(_chat(u, "usage", outer), u, "usage")
    if "input_tokens" in u or "output_tokens" in u:
        if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u or "cache_creation" in u \
                or "server_tool_use" in u:
            return _with_unknown(_anthropic(u, "usage", outer), u, "usage")
        if any(k in u for k in _IN) or any(k in u for k in _OUT):
            return _with_unknown(_responses(u, "usage", outer), u, "usage")
        return _with_unknown(_anthropic(u, "usage", outer), u, "usage")
    raise UnreadableUsage("usage", u, "not a usage shape spendgate knows (no input or output token count)")


def _with_unknown(usage: Usage, raw: Mapping[str, Any], where: str) -> Usage:
    found = _unknown(raw)
    if found:
        usage.unknown = tuple(f"{where}.{path}" for path in found)
    return usage


_WARNED: set[tuple[str, str]] = set()


def warn_unknown(usage: Usage, model: str, provider: str = "") -> None:
    """Log, once per model and field, a count the reader does not know but that looks billable."""
    for name in usage.unknown:
        if (model, name) not in _WARNED:
            _WARNED.add((model, name))
            log.warning("%s%s: usage field %s is not one spendgate prices; the provider may bill it",
                        f"{provider}/" if provider else "", model, name)


def parse_usage(payload: Mapping[str, Any] | None) -> Usage | None:
    """:func:`read_usage`, with None for unreadable usage (callers that need no reason)."""
    try:
        return read_usage(payload)
    except UnreadableUsage:
        return None


def _detail(u: Mapping[str, Any], part: str, key: str, w: str) -> int:
    return _count(_part(u, part, w), key, f"{w}.{part}", required=False)


def _tier(u: Mapping[str, Any], payload: Mapping[str, Any] | None, key: str = "service_tier") -> str | None:
    """The tier the provider says it served: in the usage (Anthropic) or beside it (OpenAI)."""
    v = u.get(key)
    if isinstance(v, str) and v:
        return v
    if payload:
        v = payload.get(key)
        if isinstance(v, str) and v:
            return v
    return None


def _openai(u: Mapping[str, Any], w: str, inp: int, out: int, in_details: str, out_details: str,
            payload: Mapping[str, Any] | None) -> Usage:
    """Chat, Responses and Realtime shapes alike: ``inp`` includes cached reads, cache writes and
    audio/image tokens (cached ones inside ``cached_tokens``, broken down by
    ``cached_tokens_details``); ``out`` includes reasoning and audio/image output."""
    d = _part(u, in_details, w)
    dw = f"{w}.{in_details}"
    cached = _count(d, "cached_tokens", dw, required=False)
    write = _count(d, "cache_write_tokens", dw, required=False)
    audio = _count(d, "audio_tokens", dw, required=False)
    image = _count(d, "image_tokens", dw, required=False)
    cd = _part(d, "cached_tokens_details", dw)
    c_audio = _at_most(_count(cd, "audio_tokens", f"{dw}.cached_tokens_details", required=False), audio,
                       f"{dw}.cached_tokens_details.audio_tokens", f"{dw}.audio_tokens")
    c_image = _at_most(_count(cd, "image_tokens", f"{dw}.cached_tokens_details", required=False), image,
                       f"{dw}.cached_tokens_details.image_tokens", f"{dw}.image_tokens")
    _at_most(c_audio + c_image, cached, f"{dw}.cached_tokens_details", f"{dw}.cached_tokens")
    _at_most(cached, inp, f"{dw}.cached_tokens", f"{w}.{_IN[in_details]}")
    text = inp - cached - write - (audio - c_audio) - (image - c_image)
    if text < 0:
        raise UnreadableUsage(f"{dw}", inp - text, f"its parts add up to more than {w}.{_IN[in_details]} ({inp})")
    o = _part(u, out_details, w)
    ow = f"{w}.{out_details}"
    reasoning = _at_most(_count(o, "reasoning_tokens", ow, required=False), out,
                         f"{ow}.reasoning_tokens", f"{w}.{_OUT[out_details]}")
    o_audio = _count(o, "audio_tokens", ow, required=False)
    o_image = _count(o, "image_tokens", ow, required=False)
    _at_most(reasoning + o_audio + o_image, out, ow, f"{w}.{_OUT[out_details]}")
    return Usage(input=text, cache_read=cached - c_audio - c_image, cache_write_5m=write, output=out,
                 reasoning=reasoning, input_audio=audio - c_audio, cache_audio_read=c_audio,
                 input_image=image - c_image, cache_image_read=c_image, output_audio=o_audio,
                 output_image=o_image, web_searches=_calls(u, payload), tier=_tier(u, payload))


def _calls(u: Mapping[str, Any], payload: Mapping[str, Any] | None) -> int:
    """OpenAI web search calls, counted from the response's output beside the usage."""
    v = u.get("web_search_calls")
    if type(v) is int and v > 0:
        return v
    if payload:
        v = payload.get("web_search_calls")
        if type(v) is int and v > 0:
            return v
    return 0


_IN = {"prompt_tokens_details": "prompt_tokens", "input_tokens_details": "input_tokens",
       "input_token_details": "input_tokens"}
_OUT = {"completion_tokens_details": "completion_tokens", "output_tokens_details": "output_tokens",
        "output_token_details": "output_tokens"}
_DETAILS = (*_IN, *_OUT)


def _chat(u: Mapping[str, Any], w: str, payload: Mapping[str, Any] | None = None) -> Usage:
    prompt = _count(u, "prompt_tokens", w)
    if "completion_tokens" in u:
        output = _count(u, "completion_tokens", w)
        _count(u, "total_tokens", w, required=False)
    else:
        # embeddings report no output at all; their total proves it. Without one, the output is unknown.
        if "total_tokens" not in u or _count(u, "total_tokens", w) != prompt:
            raise UnreadableUsage(f"{w}.completion_tokens", MISSING)
        output = 0
    return _openai(u, w, prompt, output, "prompt_tokens_details", "completion_tokens_details", payload)


def _is_images(u: Mapping[str, Any]) -> bool:
    """The Images API's usage (``/v1/images/generations``, ``/edits``): its ``input_tokens_details``
    always splits ``text_tokens`` from ``image_tokens``, which no Responses usage does (the Realtime
    and transcription shapes that also say ``text_tokens`` name it ``input_token_details``)."""
    d = u.get("input_tokens_details")
    return isinstance(d, Mapping) and "text_tokens" in d


def _responses(u: Mapping[str, Any], w: str, payload: Mapping[str, Any] | None = None) -> Usage:
    inp, out = _count(u, "input_tokens", w), _count(u, "output_tokens", w)
    _count(u, "total_tokens", w, required=False)
    # the Realtime API says ``input_token_details``; Responses ``input_tokens_details``
    ind = "input_token_details" if "input_token_details" in u else "input_tokens_details"
    outd = "output_token_details" if "output_token_details" in u else "output_tokens_details"
    usage = _openai(u, w, inp, out, ind, outd, payload)
    if _is_images(u):
        o = _part(u, "output_tokens_details", w)
        if "image_tokens" not in o and "text_tokens" not in o:
            # the Images API's output_tokens are "the number of image tokens in the output image":
            # billed at the image output rate, never the (lower) text one
            usage.output_image = usage.output - usage.reasoning - usage.output_audio
        elif "image_tokens" not in o:
            # only text is broken out: the rest of the output is the image
            text = _at_most(_count(o, "text_tokens", f"{w}.output_tokens_details"), out,
                            f"{w}.output_tokens_details.text_tokens", f"{w}.output_tokens")
            usage.output_image = out - text
    return usage


def _anthropic(u: Mapping[str, Any], w: str, payload: Mapping[str, Any] | None = None) -> Usage:
    inp, out = _count(u, "input_tokens", w), _count(u, "output_tokens", w)
    read = _count(u, "cache_read_input_tokens", w, required=False)
    written = _count(u, "cache_creation_input_tokens", w, required=False)
    split = _part(u, "cache_creation", w)
    w5 = _count(split, "ephemeral_5m_input_tokens", f"{w}.cache_creation", required=False)
    w1 = _count(split, "ephemeral_1h_input_tokens", f"{w}.cache_creation", required=False)
    w5 += max(written - w5 - w1, 0)  # writes the split leaves out are charged at the 5-minute rate
    searches = _detail(u, "server_tool_use", "web_search_requests", w)
    tier = _tier(u, payload)
    processing = "batch" if tier == "batch" else None
    return Usage(input=inp, cache_read=read, cache_write_5m=w5, cache_write_1h=w1, output=out,
                 web_searches=searches, tier=None if processing else tier,
                 speed=_tier(u, payload, "speed"), processing=processing)


def _converse(u: Mapping[str, Any], w: str) -> Usage:
    """Bedrock Converse: ``inputTokens`` are the uncached input; cache reads and writes apart."""
    inp, out = _count(u, "inputTokens", w), _count(u, "outputTokens", w)
    read = _count(u, "cacheReadInputTokens", w, required=False)
    written = _count(u, "cacheWriteInputTokens", w, required=False)
    _count(u, "totalTokens", w, required=False)
    return Usage(input=inp, cache_read=read, cache_write_5m=written, output=out)


_MODALITIES = {"AUDIO": "audio", "IMAGE": "image", "DOCUMENT": "image", "VIDEO": "video"}


def _modalities(m: Mapping[str, Any], key: str, w: str) -> dict[str, int]:
    """Gemini's ``[{"modality": "AUDIO", "tokenCount": 12}, …]`` as ``{"audio": 12}``."""
    v = m.get(key)
    if v is None:
        return {}
    if not isinstance(v, list):
        raise UnreadableUsage(f"{w}.{key}", v, "not a list")
    out: dict[str, int] = {}
    for i, item in enumerate(v):
        if not isinstance(item, Mapping):
            raise UnreadableUsage(f"{w}.{key}[{i}]", item, "not an object")
        n = _count(item, "tokenCount", f"{w}.{key}[{i}]", required=False)
        kind = _MODALITIES.get(str(item.get("modality")), "text")
        out[kind] = out.get(kind, 0) + n
    return out


def _gemini(m: Mapping[str, Any], w: str) -> Usage:
    prompt = _count(m, "promptTokenCount", w)
    candidates = _count(m, "candidatesTokenCount", w)
    _count(m, "totalTokenCount", w, required=False)
    cached = _at_most(_count(m, "cachedContentTokenCount", w, required=False), prompt,
                      f"{w}.cachedContentTokenCount", f"{w}.promptTokenCount")
    thoughts = _count(m, "thoughtsTokenCount", w, required=False)
    tool = _count(m, "toolUsePromptTokenCount", w, required=False)  # billed as input, outside promptTokenCount
    p, t = _modalities(m, "promptTokensDetails", w), _modalities(m, "toolUsePromptTokensDetails", w)
    c = _modalities(m, "cacheTokensDetails", w)
    o = _modalities(m, "candidatesTokensDetails", w)
    kinds = {k: p.get(k, 0) + t.get(k, 0) for k in ("audio", "image", "video")}
    c_audio = _at_most(c.get("audio", 0), kinds["audio"], f"{w}.cacheTokensDetails", f"{w}.promptTokensDetails")
    c_image = _at_most(c.get("image", 0), kinds["image"], f"{w}.cacheTokensDetails", f"{w}.promptTokensDetails")
    _at_most(c_audio + c_image, cached, f"{w}.cacheTokensDetails", f"{w}.cachedContentTokenCount")
    u_audio, u_image = kinds["audio"] - c_audio, kinds["image"] - c_image
    # cached video is read at the cache rate like text (Gemini prices them alike); uncached apart
    c_video = min(c.get("video", 0), kinds["video"])
    u_video = kinds["video"] - c_video
    text = prompt + tool - cached - u_audio - u_image - u_video
    if text < 0:
        raise UnreadableUsage(f"{w}.promptTokensDetails", prompt + tool - text,
                              f"more than {w}.promptTokenCount + toolUsePromptTokenCount ({prompt + tool})")
    o_audio, o_image = o.get("audio", 0), o.get("image", 0)
    _at_most(o_audio + o_image, candidates, f"{w}.candidatesTokensDetails", f"{w}.candidatesTokenCount")
    return Usage(input=text, cache_read=cached - c_audio - c_image, output=candidates + thoughts,
                 reasoning=thoughts, input_audio=u_audio, cache_audio_read=c_audio, input_image=u_image,
                 cache_image_read=c_image, input_video=u_video, output_audio=o_audio, output_image=o_image)


def _queries(gm: Mapping[str, Any], w: str) -> int:
    """The search queries one candidate's ``groundingMetadata`` says the model ran: its distinct
    non-empty ``webSearchQueries`` (Google bills Gemini 3 per query and, for billing, "ignores the
    empty web search queries when counting unique queries")."""
    key = "webSearchQueries" if "webSearchQueries" in gm else "web_search_queries"
    queries = gm.get(key)
    if queries is None:
        return 0
    if not isinstance(queries, list):
        raise UnreadableUsage(f"{w}.{key}", queries, "not a list")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise UnreadableUsage(f"{w}.{key}[{i}]", q, "not a string")
    return len({q for q in queries if q.strip()})


def grounding(payload: Mapping[str, Any]) -> tuple[int, int]:
    """``(queries, grounded)`` of a Gemini response: the search queries its candidates ran (each
    candidate's distinct non-empty ``groundingMetadata.webSearchQueries``, summed), and 1 when any
    candidate carries ``groundingMetadata`` (a grounded prompt, what Gemini 2.x bills). A stream's
    meter carries them beside the usage as ``web_search_queries`` and ``grounded``. A malformed
    grounding is unreadable, never read as no search."""
    queries = grounded = 0
    if "web_search_queries" in payload or "grounded" in payload:
        queries = _count(payload, "web_search_queries", "grounding", required=False)
        grounded = _count(payload, "grounded", "grounding", required=False)
    cands = payload.get("candidates")
    if cands is None:
        return queries, grounded
    if not isinstance(cands, list):
        raise UnreadableUsage("candidates", cands, "not a list")
    for i, cand in enumerate(cands):
        if not isinstance(cand, Mapping):
            continue
        key = "groundingMetadata" if "groundingMetadata" in cand else "grounding_metadata"
        gm = cand.get(key)
        if gm is None:
            continue
        if not isinstance(gm, Mapping):
            raise UnreadableUsage(f"candidates[{i}].{key}", gm, "not an object")
        grounded = 1
        queries += _queries(gm, f"candidates[{i}].{key}")
    return queries, grounded


#: Every count the readers know (billed or only checked); any other ``*_tokens`` / ``*TokenCount``
#: / ``*_requests`` count is reported in :attr:`Usage.unknown` and logged once by the engine.
KNOWN = frozenset({
    "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens", "cached_tokens",
    "cache_write_tokens", "audio_tokens", "image_tokens", "text_tokens", "reasoning_tokens",
    "accepted_prediction_tokens", "rejected_prediction_tokens", "cache_read_input_tokens",
    "cache_creation_input_tokens", "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens",
    "web_search_requests", "web_fetch_requests", "promptTokenCount", "candidatesTokenCount", "totalTokenCount",
    "cachedContentTokenCount", "thoughtsTokenCount", "toolUsePromptTokenCount",
    "inputTokens", "outputTokens", "totalTokens", "cacheReadInputTokens", "cacheWriteInputTokens",
})
_BILLABLE = re.compile(r"(?:_tokens|TokenCount|_requests)$")


def _unknown(u: Mapping[str, Any], depth: int = 0) -> list[str]:
    """The paths (``prompt_tokens_details.foo_tokens``) of unknown billable-looking counts in ``u``;
    a path is written only for what is found, which is almost never."""
    out: list[str] = []
    for k, v in u.items():
        if k in KNOWN:  # the common case, first: a set lookup, no pattern
            continue
        if isinstance(v, dict) and depth < 3:
            if KNOWN.issuperset(v):  # a breakdown of known counts only (the usual): nothing to report
                continue
            inner = _unknown(v, depth + 1)
            if inner:
                out.extend(f"{k}.{path}" for path in inner)
        elif type(v) is int and v > 0 and isinstance(k, str) and _BILLABLE.search(k):
            out.append(k)
    return out


_DECODER = json.JSONDecoder()


_TIER_KEY = b'"service_tier":'


def _value_at(data: bytes, at: int) -> Any:
    """The JSON value starting at ``data[at]`` (after any whitespace), if it ends within 200 bytes."""
    try:
        return _DECODER.raw_decode(data[at:at + 200].decode(errors="replace").lstrip())[0]
    except ValueError:
        return None


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
            if wrap == "usageMetadata" and (b'"groundingMetadata"' in data or b'"grounding_metadata"' in data):
                break  # Gemini grounding: its searches are in the candidates, read from the whole body
            found: dict[str, Any] = {wrap: value}
            t = data.find(_TIER_KEY)
            if t >= 0:
                if data.find(_TIER_KEY, t + len(_TIER_KEY)) >= 0:
                    break  # one is nested (a Responses output item can echo a client's JSON): parse it all
                tier = _value_at(data, t + len(_TIER_KEY))  # OpenAI: the tier served, beside the usage
                if isinstance(tier, str):
                    found["service_tier"] = tier
            # a Responses output item per web search, each billed per call ("web_search_call"
            # cannot occur unescaped inside a JSON string, so only a type value matches)
            calls = data.count(b'"web_search_call"')
            if calls:
                found["web_search_calls"] = calls
            return found
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None
