"""Shorter versions of a conversation, for a budget rule with ``action = "truncate"``.

A rule that truncates lets a request through with its oldest turns dropped, rather than refuse it.
What may be dropped is decided here, as pure functions over the request body; which of the shorter
bodies fits a budget is the engine's business (it prices each one).

A body is only ever cut *before a user turn*: everything ahead of that turn goes, except the
system prompt and system/developer messages, which are kept in their order. So the kept
conversation still starts with a user turn (Anthropic requires one first; no provider accepts a
conversation opening on a tool result), and a tool call and its results — which always sit between
two user turns — are dropped together. A cut is also refused when a kept tool result names a call
that would be dropped (a malformed conversation that interleaves them), so no provider ever sees an
orphaned result. The latest user turn, and everything after it, is never dropped.

Shapes: OpenAI chat (``messages``), Anthropic messages (``messages``; the top-level ``system`` is
never touched), OpenAI Responses (``input`` when it is a list; a string input has nothing to drop).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from spendgate import providers

#: Roles that carry instructions rather than conversation: never dropped.
SYSTEM_ROLES = frozenset({"system", "developer"})


def conversation_field(provider: str, route: str, body: Mapping[str, Any]) -> str | None:
    """The field of ``body`` a truncation may shorten, or None when the route has none or the
    field is not a list (a Responses ``input`` string, a malformed body)."""
    spec = providers.find(provider)
    name = spec.conversation_fields.get(route) if spec is not None else None
    if name is None or not isinstance(body.get(name), list):
        return None
    return name


def is_system(item: Any) -> bool:
    """A system or developer message: kept whatever else is dropped."""
    return isinstance(item, Mapping) and item.get("role") in SYSTEM_ROLES


def is_user_turn(provider: str, item: Any) -> bool:
    """A turn the person wrote: a ``user`` message that is not a tool result.

    An Anthropic tool result travels inside a ``user`` message, so such a message is part of the
    assistant's tool round, not a turn a cut may start at. A Responses item of another ``type``
    (a function call output) is never a user turn."""
    if not isinstance(item, Mapping) or item.get("role") != "user":
        return False
    if item.get("type", "message") != "message":
        return False
    spec = providers.find(provider)
    return not (spec is not None and spec.is_tool_result(item))


def _result_id(block: Any) -> str | None:
    """The call id an Anthropic content block answers (``tool_result``, a server tool's result)."""
    if isinstance(block, Mapping):
        ref = block.get("tool_use_id")
        if isinstance(ref, str):
            return ref
    return None


def calls(item: Any) -> set[str]:
    """The ids of the tool calls ``item`` makes (OpenAI ``tool_calls``, Anthropic ``tool_use``
    blocks, Responses call items)."""
    if not isinstance(item, Mapping):
        return set()
    out: set[str] = set()
    for tc in item.get("tool_calls") or ():
        if isinstance(tc, Mapping) and isinstance(tc.get("id"), str):
            out.add(tc["id"])
    content = item.get("content")
    if isinstance(content, list):
        for block in content:
            if isinstance(block, Mapping) and str(block.get("type", "")).endswith("tool_use") \
                    and isinstance(block.get("id"), str):
                out.add(block["id"])
    kind = str(item.get("type", ""))
    if isinstance(item.get("call_id"), str) and not kind.endswith("_output"):
        out.add(item["call_id"])
    if kind == "mcp_approval_request" and isinstance(item.get("id"), str):
        out.add(item["id"])
    return out


def results(item: Any) -> set[str]:
    """The ids of the tool calls ``item`` answers (OpenAI ``tool`` messages, Anthropic
    ``tool_result`` blocks, Responses ``…_output`` items and MCP approval responses)."""
    if not isinstance(item, Mapping):
        return set()
    out: set[str] = set()
    if item.get("role") == "tool" and isinstance(item.get("tool_call_id"), str):
        out.add(item["tool_call_id"])
    content = item.get("content")
    if isinstance(content, list):
        out.update(ref for ref in map(_result_id, content) if ref is not None)
    kind = str(item.get("type", ""))
    if kind.endswith("_output") and isinstance(item.get("call_id"), str):
        out.add(item["call_id"])
    if kind == "mcp_approval_response" and isinstance(item.get("approval_request_id"), str):
        out.add(item["approval_request_id"])
    return out


def cut(items: Sequence[Any], at: int) -> list[Any]:
    """``items`` without what precedes index ``at``, system messages excepted (kept in order)."""
    return [m for m in items[:at] if is_system(m)] + list(items[at:])


def cut_points(provider: str, items: Sequence[Any]) -> list[int]:
    """Where a cut may start, fewest dropped first: each user turn with something droppable
    before it, whose cut leaves no kept tool result without its call. The last user turn is the
    furthest a cut may go, so it is always kept."""
    answered: dict[str, int] = {}  # call id -> the last index answering it
    for i, item in enumerate(items):
        for ref in results(item):
            answered[ref] = i
    points = []
    reach = -1  # the last index answering a call made before the cut
    droppable = False
    for i, item in enumerate(items):
        if is_user_turn(provider, item) and droppable and reach < i:
            points.append(i)
        if not is_system(item):
            droppable = True
            reach = max([reach, *(answered.get(ref, -1) for ref in calls(item))])
    return points


def shorter(provider: str, route: str, body: Mapping[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every body a truncation may send instead of ``body``, fewest items dropped first, each as
    (items dropped, the new body). Nothing when the route has no conversation to shorten."""
    name = conversation_field(provider, route, body)
    if name is None:
        return
    items: list[Any] = body[name]
    for at in cut_points(provider, items):
        kept = cut(items, at)
        yield len(items) - len(kept), {**body, name: kept}
