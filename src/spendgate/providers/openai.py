"""OpenAI's wire format: chat completions, Responses, legacy completions, embeddings, image generation.
Speech, transcriptions, translations and image edits are refused unless the policy passes them
through under a flat hold (``flat_holds``); their models' per-character and per-minute prices are in
the table for ``spendgate prices show``.

Errors are ``{"error": {"message", "type", "param", "code"}}``; a chat stream reports usage in a last
chunk with ``choices: []`` (only when ``stream_options.include_usage`` is set — the proxy sets it
and withholds that chunk from a client that did not ask), a Responses stream in
``response.completed``. The tier a response was served at is reported beside its usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spendgate.estimate import image_gen
from spendgate.estimate import openai as counting
from spendgate.providers.base import Parser, Provider

if TYPE_CHECKING:
    from spendgate.wire.stream import StreamMeter


def with_tier(usage: dict[str, Any], outer: dict[str, Any]) -> dict[str, Any]:
    """OpenAI reports the tier it served beside the usage, not in it, and bills each web search
    call of a Responses output apart from it: carry both along for capture."""
    extra: dict[str, Any] = {}
    tier = outer.get("service_tier")
    if isinstance(tier, str) and "service_tier" not in usage:
        extra["service_tier"] = tier
    output = outer.get("output")
    if isinstance(output, list):
        calls = sum(1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call")
        if calls:
            extra["web_search_calls"] = calls
    return {**usage, **extra} if extra else usage


class OpenAI(Provider):
    name = "openai"
    default_base_url = "https://api.openai.com"
    key_env = "OPENAI_API_KEY"
    routes: Mapping[str, Parser] = {
        "/v1/chat/completions": counting.chat,
        "/v1/responses": counting.responses,
        "/v1/completions": counting.completions,
        "/v1/embeddings": counting.embeddings,
        # JSON bodies only: /v1/images/edits is multipart (images in), which the proxy does not read
        "/v1/images/generations": image_gen.generations,
    }
    free_routes = frozenset({"/v1/models"})
    output_fields: Mapping[str, tuple[str, ...]] = {
        "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
        "/v1/responses": ("max_output_tokens",),
        "/v1/completions": ("max_tokens",),
    }
    conversation_fields: Mapping[str, str] = {"/v1/chat/completions": "messages", "/v1/responses": "input"}
    sdk_error = "OpenAIError"
    chat_route = "/v1/chat/completions"
    price_providers = ("openai",)
    writes_cache_itself = True
    error_types: Mapping[int, str] = {400: "invalid_request_error", 401: "authentication_error", 402: "budget_exceeded",
                   403: "permission_error", 404: "not_found", 413: "invalid_request_error",
                   502: "upstream_error", 503: "service_unavailable", 504: "upstream_timeout"}

    def variant(self, body: Mapping[str, Any], auto_tier: str) -> dict[str, str]:
        """``service_tier``; absent or ``"auto"`` is the project's default tier (``auto_tier``)."""
        tier = body.get("service_tier")
        if not isinstance(tier, str) or tier == "auto":
            tier = auto_tier
        return {"service_tier": tier}

    def searches(self, body: Mapping[str, Any]) -> int:
        """The web searches a Responses request may run, each billed per call: its
        ``max_tool_calls`` (a cap on all built-in tool calls) when it allows a ``web_search*`` tool;
        -1 when it names no cap, so the estimator bounds them by the output bound
        (:data:`spendgate.estimate.TOKENS_PER_SEARCH`); 0 without a web search tool."""
        tools = body.get("tools")
        if not isinstance(tools, list) or not any(
                isinstance(t, Mapping) and str(t.get("type", "")).startswith("web_search") for t in tools):
            return 0
        cap = body.get("max_tool_calls")
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
            return cap
        return -1

    def route_for(self, body: Mapping[str, Any]) -> str:
        if "messages" in body:
            return "/v1/chat/completions"
        if "prompt" in body and (image_gen.is_image_model(str(body.get("model", "")))
                                 or any(k in body for k in ("size", "quality", "response_format"))):
            return "/v1/images/generations"
        if "prompt" in body:
            return "/v1/completions"
        if "input" in body and "embedding" in str(body.get("model", "")):
            return "/v1/embeddings"
        return "/v1/responses"

    def stream_edits(self, route: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Chat and legacy completions meter a stream only when asked to include usage."""
        if route not in ("/v1/chat/completions", "/v1/completions") or body.get("stream") is not True:
            return {}
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            return {}
        return {"stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}

    def body_user(self, body: Mapping[str, Any]) -> str | None:
        user = body.get("user")
        return str(user) or None if isinstance(user, str) else None

    def error_body(self, status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"error": {"message": message, "type": self.error_types.get(status, "api_error"),
                                          "param": None, "code": code}}
        if extra:
            body["spendgate"] = dict(extra)
            # the OpenAI SDK exposes only the "error" object as APIStatusError.body: carry it there too
            body["error"]["spendgate"] = body["spendgate"]
        return body

    def sse_error(self, status: int, message: str, *, code: str | None = None) -> bytes:
        import json

        # chat streams carry unnamed events; Responses streams name theirs ("error")
        body = self.error_body(status, message, code=code)
        body.update(type="error", message=message, code=code)
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"

    def stream_usage(self, meter: StreamMeter, obj: dict[str, Any]) -> bool:
        kind = obj.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                resp = obj.get("response")
                if isinstance(resp, dict) and isinstance(resp.get("usage"), dict):
                    meter.usage = with_tier(resp["usage"], resp)
                    meter.complete = True
            return True
        if isinstance(obj.get("usage"), dict):
            meter.usage = with_tier(obj["usage"], obj)
            meter.complete = True
            if meter.withhold and obj.get("choices") == []:
                return False
        return True
