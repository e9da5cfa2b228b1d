"""Anthropic's wire format: the Messages API.

Errors are ``{"type": "error", "error": {"type", "message"}}``; a stream reports input usage in
``message_start`` and the final, cumulative counts in ``message_delta``. Input is counted offline
(o200k) scaled by an upward factor (``anthropic_token_factor``), since Claude's tokenizer is not
published.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from spendgate.estimate import anthropic as counting
from spendgate.providers.base import Parser, Provider

if TYPE_CHECKING:
    from spendgate.wire.stream import StreamMeter


def merge_usage(start: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The final usage of a stream: ``message_delta``'s cumulative counts over ``message_start``'s.

    As in Anthropic's own SDK, a null optional count in the delta means "not applicable" and the
    start's value stands. ``output_tokens`` is different: the delta must carry the final count
    (the start's is a placeholder, often 1), so a null or missing one stays null or missing and
    the usage is unreadable — charged conservatively, never as the placeholder. A null the start
    sent and no delta replaced stays null, unreadable too.
    """
    merged = dict(start)
    merged.update({k: v for k, v in delta.items() if v is not None or k == "output_tokens"})
    if "output_tokens" not in delta:
        merged.pop("output_tokens", None)
    return merged


class Anthropic(Provider):
    name = "anthropic"
    default_base_url = "https://api.anthropic.com"
    key_env = "ANTHROPIC_API_KEY"
    routes: Mapping[str, Parser] = {"/v1/messages": counting.messages}
    free_routes = frozenset({"/v1/messages/count_tokens"})
    output_fields: Mapping[str, tuple[str, ...]] = {"/v1/messages": ("max_tokens",)}
    conversation_fields: Mapping[str, str] = {"/v1/messages": "messages"}
    sdk_error = "AnthropicError"
    chat_route = "/v1/messages"
    price_providers: tuple[str, ...] = ("anthropic",)
    scaled_counts = True
    marker_headers: tuple[str, ...] = ("x-api-key", "anthropic-version")
    error_types: Mapping[int, str] = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   502: "api_error", 503: "overloaded_error", 504: "api_error"}

    def parsers(self, factor: float | None) -> dict[str, Parser]:
        if factor is None:
            return dict(self.routes)
        return {"/v1/messages": partial(counting.messages, factor=factor)}

    def variant(self, body: Mapping[str, Any], auto_tier: str) -> dict[str, str]:
        speed = body.get("speed")
        return {"speed": speed} if isinstance(speed, str) else {}

    def searches(self, body: Mapping[str, Any]) -> int:
        """The sum of its web-search tools' ``max_uses``; -1 when a web-search tool has none (the
        estimator then bounds its searches by the output bound), so an unbounded tool is held too."""
        tools = body.get("tools")
        if not isinstance(tools, list):
            return 0
        n = 0
        for tool in tools:
            if isinstance(tool, Mapping) and str(tool.get("type", "")).startswith("web_search"):
                uses = tool.get("max_uses")
                if not isinstance(uses, int) or isinstance(uses, bool) or uses <= 0:
                    return -1
                n += uses
        return n

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("x-api-key") or super().api_key(headers)

    def body_user(self, body: Mapping[str, Any]) -> str | None:
        meta = body.get("metadata")
        if isinstance(meta, Mapping) and isinstance(meta.get("user_id"), str):
            return str(meta["user_id"])[:200] or None
        return None

    def error_body(self, status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "error",
                                "error": {"type": self.error_types.get(status, "api_error"), "message": message}}
        if extra:
            body["spendgate"] = dict(extra)
        return body

    def stream_usage(self, meter: StreamMeter, obj: dict[str, Any]) -> bool:
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
                meter.usage = dict(msg["usage"])
        elif kind == "message_delta" and isinstance(obj.get("usage"), dict):
            meter.usage = merge_usage(meter.usage or {}, obj["usage"])
            meter.complete = True
        return True

    def is_tool_result(self, item: Mapping[str, Any]) -> bool:
        """A tool result travels inside a ``user`` message: such a message is part of the
        assistant's tool round, not a turn a cut may start at."""
        content = item.get("content")
        return isinstance(content, list) and any(isinstance(b, Mapping) and isinstance(b.get("tool_use_id"), str)
                                                 for b in content)
