"""A bound on the tokens a tool's JSON Schema costs once the provider renders it.

What pydantic emits for a model with nested models is mostly indirection: ``properties`` point
with ``$ref`` into ``$defs``, optional fields are ``anyOf [X, null]``, and enums sit behind
``allOf``. A provider renders what the references point to — a nested object is written out where
it is used — so a count of the top-level ``properties`` alone (the cookbook formula) sees a few
names and misses the rest. The bound is the larger of two compact-JSON sizes: the schema as sent
(``$defs`` and all: a provider that writes each definition once) and the schema with every local
``$ref`` (``#/$defs/…``, ``#/definitions/…``, ``#``) replaced by its target and the ``$defs``
dropped (one that writes each out where it is used). JSON is longer than the provider's own
rendering of the same structure (OpenAI's TypeScript-like form drops the quotes, braces and
keywords), so its tokens bound it from above.

Inlining is bounded: a reference back into its own chain (a recursive model) is left as the
``$ref`` it was, and an expansion past :data:`MAX_EXPANSION` times the schema's own JSON
(references nested in references can grow exponentially) stops; the schema then counts one token
per UTF-8 byte of its own JSON — a byte-level BPE never spends more than that on the text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from spendgate.estimate.shape import dumps

#: keywords whose presence makes a schema more than flat ``properties``
COMPOSITE = ('"$ref"', '"$defs"', '"definitions"', '"allOf"', '"anyOf"', '"oneOf"')
#: an inlined schema may grow to this many times its own JSON before the byte ceiling takes over
MAX_EXPANSION = 32
#: …and never past this many characters
MAX_CHARS = 4_000_000


class _TooBig(Exception):
    pass


def is_composite(text: str) -> bool:
    """True when a schema's JSON uses references or combinators (cheap substring test)."""
    return any(k in text for k in COMPOSITE)


def _target(root: Any, ref: str) -> Any:
    """The node a local JSON pointer names, or None when it names nothing here."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def inline(schema: Any, budget: int) -> Any:
    """``schema`` with local ``$ref``s replaced by their targets and ``$defs``/``definitions``
    dropped. A cycle keeps its ``$ref``; raises :class:`_TooBig` once ``budget`` nodes are spent."""
    spent = 0

    def walk(node: Any, chain: tuple[str, ...]) -> Any:
        nonlocal spent
        spent += 1
        if spent > budget:
            raise _TooBig
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in chain:
                target = _target(schema, ref)
                if target is not None:
                    rest = {k: walk(v, chain) for k, v in node.items() if k not in ("$ref", "$defs", "definitions")}
                    expanded = walk(target, (*chain, ref))
                    if isinstance(expanded, Mapping):
                        return {**expanded, **rest}
                    return expanded if not rest else {**rest, "$ref": expanded}
            return {k: walk(v, chain) for k, v in node.items() if k not in ("$defs", "definitions")}
        if isinstance(node, list):
            return [walk(v, chain) for v in node]
        return node

    return walk(schema, ())


def _nodes(value: Any) -> int:
    n, stack = 0, [value]
    while stack:
        cur = stack.pop()
        n += 1
        if isinstance(cur, Mapping):
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return n


_cache: dict[str, str | None] = {}
_cache_chars = 0
_lock = threading.Lock()
_CACHE_MAX_CHARS = 8_000_000


def expanded(schema: Any, text: str) -> str | None:
    """The JSON of ``schema`` with its references inlined (``text`` when it has none), or None
    when the expansion passes its cap. Cached by ``text`` (the schema's own JSON), so an agent
    resending the same tools every turn inlines them once."""
    global _cache_chars
    if not is_composite(text):
        return text
    if text in _cache:
        return _cache[text]
    try:
        out: str | None = dumps(inline(schema, budget=MAX_EXPANSION * _nodes(schema)))
        if len(out or "") > min(MAX_CHARS, MAX_EXPANSION * len(text) + 4096):
            out = None
    except (_TooBig, RecursionError):
        out = None
    with _lock:
        _cache[text] = out
        _cache_chars += len(text) + len(out or "")
        while _cache_chars > _CACHE_MAX_CHARS and _cache:
            old = next(iter(_cache))
            _cache_chars -= len(old) + len(_cache.pop(old) or "")
    return out


def bound(schema: Any, count: Callable[[str], float], text: str | None = None) -> float:
    """Tokens ``schema`` can cost once rendered, by ``count`` (a text's tokens): the larger of its
    own JSON (a provider that renders each definition once) and its JSON with references inlined
    (one that writes each out where it is used); when inlining passes its cap, one token per
    UTF-8 byte of its own JSON. ``text`` is ``dumps(schema)`` when the caller has it."""
    text = dumps(schema) if text is None else text
    flat = count(text)
    if not is_composite(text):
        return flat
    out = expanded(schema, text)
    if out is None:
        return max(flat, float(len(text.encode("utf-8", "surrogatepass"))))
    return max(flat, count(out))
