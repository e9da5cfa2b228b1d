"""What pricing needs from a request body, whatever the provider: the token shape."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from spendgate.errors import BadRequest


@dataclass(slots=True)
class TokenShape:
    """A request reduced to what its worst case depends on."""

    model: str
    input_tokens: int
    #: ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` as sent, if any
    requested_output: int | None
    #: the API's own default when the request sets none (legacy completions: 16); else None
    api_default_output: int | None = None
    #: completions billed per request (``n``, ``best_of``)
    choices: int = 1
    #: "5m" or "1h" when the request asks for prompt caching, else None
    cache_write: str | None = None
    stream: bool = False
    #: True when the input count is exact (tiktoken for OpenAI), False when calibrated
    exact: bool = True
    #: why the output bound is what it is, when the body sets it by other means than a token count
    #: (an image's size and quality)
    output_why: str | None = None
    #: what the request costs where its model is priced per unit, not per token: the unit
    #: (``"image"``, ``"character"``), the option each unit is priced at (``"hd/1024x1792"``, or ``""``)
    #: and how many (the images are ``choices``; None for token-only requests). A model the table
    #: prices per token is priced from the token counts instead.
    per_unit: tuple[str, str, int] | None = None
    #: input tokens (part of ``input_tokens``) that are audio, held at the audio input rate
    input_audio: int = 0
    #: the output bound is set by what the request asks for (an image's size and quality), not by a
    #: token count the body carries: no clamp can lower it
    fixed_output: bool = False


def is_map(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """``value`` is an object: a request body is parsed JSON, whose objects are dicts — checked
    first, by type, since the ``Mapping`` ABC's instance check costs several times as much and a
    body is walked object by object (its loops test ``type(x) is dict`` inline before calling this).
    Any other mapping (the SDK's callers may pass their own) still is one."""
    return type(value) is dict or isinstance(value, Mapping)


def require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("`model` is missing or not a string; a request must name its model to be priced")
    return model


def optional_int(body: Mapping[str, Any], *keys: str) -> int | None:
    """The first of ``keys`` present, as a positive int; a wrong type is refused by name."""
    for key in keys:
        if key in body and body[key] is not None:
            v = body[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadRequest(f"`{key}` must be a non-negative integer, got {v!r}")
            return v
    return None


def require_list(body: Mapping[str, Any], key: str) -> list[Any]:
    v = body.get(key)
    if not isinstance(v, list):
        raise BadRequest(f"`{key}` must be a list, got {type(v).__name__}")
    return v


def dumps(value: Any) -> str:
    """Compact JSON of a structure whose text is billed but whose exact rendering is unknown."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
