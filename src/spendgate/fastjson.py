"""JSON on the request path, through orjson (a C parser and writer, several times the standard
library's speed), accepting exactly what :mod:`json` accepts.

Every request parses its body and a response, and writes two events (stored, and piped to the audit
writer); with the standard library that was a tenth of spendgate's own CPU per request. orjson is
stricter than :mod:`json` in two ways that matter at a boundary — it refuses integers beyond 64 bits
and the ``NaN``/``Infinity`` literals — so a document it refuses is parsed again by :mod:`json`:
a body the upstream would take is never refused for the library's sake, and one :mod:`json`
refuses is refused as before.

Writing: compact, UTF-8 (non-ASCII characters as themselves, not ``\\uXXXX`` escapes: the same
values when read back, a few bytes shorter). Keys must be strings, as in every document spendgate writes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(raw: str | bytes | bytearray) -> Any:
    """Parse ``raw``; raises :class:`json.JSONDecodeError` (a :class:`ValueError`) as :func:`json.loads` does."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def dumps(obj: Any) -> str:
    """``obj`` as compact JSON text; what orjson cannot write (integers beyond 64 bits, strings with a
    lone surrogate, non-string keys) as :mod:`json` writes it."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # ASCII-escaped: a lone surrogate in a string is written as \udXXX, never lost
        return json.dumps(obj, separators=(",", ":"))


def dumpb(obj: Any) -> bytes:
    """:func:`dumps` as UTF-8 bytes (what goes on a wire or a pipe)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()
