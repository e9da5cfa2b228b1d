"""Google Cloud Vertex AI: Gemini and Claude on Google's publisher paths, with Google's prices.

Vertex serves two wire formats spendgate already reads, each on its own paths, so each is a
provider here over the adapter it shares with the first-party API:

- :class:`VertexGemini` (``vertex``): Gemini's ``generateContent`` / ``streamGenerateContent``
  (``alt=sse``) and ``countTokens`` (free) on
  ``/{v1,v1beta1}/projects/{project}/locations/{location}/publishers/google/models/{model}:…`` (and
  on ``/{v1,v1beta1}/publishers/google/models/{model}:…``, express mode's); the body,
  ``usageMetadata``, streams and error envelope are the Google AI API's (:mod:`.gemini`).
- :class:`VertexAnthropic` (``vertex-anthropic``): Claude's Messages body (with
  ``anthropic_version``, the model in the path, not the body) on
  ``…/publishers/anthropic/models/{model}:rawPredict`` and ``:streamRawPredict``, and the free
  ``…/models/count-tokens:rawPredict``; usage, streams and errors are Anthropic's (:mod:`.anthropic`).

**Prices.** A Vertex model id (``claude-sonnet-4-5@20250929``, ``gemini-2.5-flash``) is priced
from the price table's ``google`` rows — Vertex's own, Claude's included — never from another
provider's row while a Vertex row exists. A Claude model Vertex has no row for yet is priced as
Anthropic's first-party row (Vertex's list prices for Claude are Anthropic's, or above them on a
regional endpoint); a model neither knows is priced as the table's unknown models are.

**Credentials.** Clients send an OAuth access token (``Authorization: Bearer``), or an API key
(``x-goog-api-key``, Vertex's express mode): passed through as sent, counted under its hash. A
spendgate virtual key (``sg-…``) is swapped for the access token in ``VERTEX_ACCESS_TOKEN``, sent
as a bearer token (such tokens last an hour: whoever sets it renews it).

**Upstream.** ``https://aiplatform.googleapis.com`` (the global endpoint) unless the policy's
``[upstream] vertex`` or ``SPENDGATE_VERTEX_BASE_URL`` names another, such as a regional one
(``https://us-east5-aiplatform.googleapis.com``: one host serves the locations it serves); Claude's
calls go to ``vertex-anthropic``'s (``[upstream] vertex-anthropic``,
``SPENDGATE_VERTEX_ANTHROPIC_BASE_URL``), which declares ``vertex``'s as the one it follows
(:attr:`~spendgate.providers.base.Provider.base_url_from`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from spendgate.estimate import anthropic as counting
from spendgate.providers.anthropic import Anthropic
from spendgate.providers.base import Parser, Provider, model_into_path
from spendgate.providers.gemini import CLAMP_FIELD, Gemini, generate

#: the API versions Vertex serves (google-genai calls ``v1beta1`` by default, anthropic's ``v1``)
VERSIONS = ("v1", "v1beta1")
_PREFIX = "/{v}/projects/{{project}}/locations/{{location}}/publishers"
#: Gemini's paths: under a project and location, or with neither (express mode, an API key's calls)
_GOOGLE_PREFIXES = tuple(p for v in VERSIONS for p in (_PREFIX.format(v=v), f"/{v}/publishers"))
#: the environment variable holding the access token a virtual key is swapped for
TOKEN_ENV = "VERTEX_ACCESS_TOKEN"
DEFAULT_BASE_URL = "https://aiplatform.googleapis.com"


def _bearer_or_key(headers: dict[str, str], key: str) -> dict[str, str]:
    """``headers`` with the client's credential replaced by the access token ``key``, as a bearer
    token (what Vertex takes for every publisher)."""
    out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-api-key", "x-goog-api-key")}
    out["Authorization"] = f"Bearer {key}"
    return out


class VertexGemini(Gemini):
    """Gemini on Vertex AI: the Google AI API's adapter on Vertex's publisher paths."""

    name = "vertex"
    default_base_url = DEFAULT_BASE_URL
    key_env = TOKEN_ENV
    routes: Mapping[str, Parser] = {
        **{f"{p}/google/models/{{model}}:generateContent": generate for p in _GOOGLE_PREFIXES},
        **{f"{p}/google/models/{{model}}:streamGenerateContent": partial(generate, stream=True)
           for p in _GOOGLE_PREFIXES},
    }
    free_routes = frozenset(f"{p}/google/models/{{model}}:countTokens" for p in _GOOGLE_PREFIXES)
    output_fields: Mapping[str, tuple[str, ...]] = {r: (CLAMP_FIELD,) for r in routes}
    conversation_fields: Mapping[str, str] = {r: "contents" for r in routes}
    chat_route = f"{_PREFIX.format(v='v1')}/google/models/{{model}}:generateContent"
    price_providers = ("google",)
    strict_prices = True
    #: google-genai's errors are raised by the client's own SDK binding (``sdk_of``), not found by module
    sdk_error = ""
    sdk_of = "gemini"
    marker_headers: tuple[str, ...] = ()

    def apply_key(self, headers: dict[str, str], key: str) -> dict[str, str]:
        return _bearer_or_key(headers, key)


def messages(body: Mapping[str, Any], factor: float | None = None) -> Any:
    """Anthropic's Messages count for a Vertex body (its path's model in ``model``)."""
    return counting.messages(body) if factor is None else counting.messages(body, factor=factor)


class VertexAnthropic(Anthropic):
    """Claude on Vertex AI: Anthropic's Messages adapter, the model in the path."""

    name = "vertex-anthropic"
    default_base_url = DEFAULT_BASE_URL
    key_env = TOKEN_ENV
    #: its calls go to the base URL configured for ``vertex``
    base_url_from = "vertex"
    routes: Mapping[str, Parser] = {
        f"{_PREFIX.format(v=v)}/anthropic/models/{{model}}:{verb}": messages
        for v in VERSIONS for verb in ("rawPredict", "streamRawPredict")}
    free_routes = frozenset(f"{_PREFIX.format(v=v)}/anthropic/models/count-tokens:rawPredict" for v in VERSIONS)
    output_fields: Mapping[str, tuple[str, ...]] = {r: ("max_tokens",) for r in routes}
    conversation_fields: Mapping[str, str] = {r: "messages" for r in routes}
    chat_route = f"{_PREFIX.format(v='v1')}/anthropic/models/{{model}}:rawPredict"
    #: Vertex's own rows first (the table's ``google`` rows hold Claude on Vertex), then Anthropic's
    price_providers: tuple[str, ...] = ("google", "anthropic")
    strict_prices = True
    sdk_error = ""
    sdk_of = "anthropic"
    marker_headers: tuple[str, ...] = ()

    def paths(self) -> Iterable[tuple[str, str]]:
        """The token count first: its path also fills the ``{model}:rawPredict`` template."""
        return ((r, r) for r in (*self.free_routes, *self.routes))

    def match(self, path: str) -> tuple[str, dict[str, str]] | None:
        """``…/models/count-tokens:rawPredict`` is the free token count, not a model's call."""
        found = super().match(path)
        if found is not None and found[1].get("model") == "count-tokens":
            version = found[0].split("/")[1]
            free = f"{_PREFIX.format(v=version)}/anthropic/models/count-tokens:rawPredict"
            return free, {k: v for k, v in found[1].items() if k != "model"}
        return found

    def parsers(self, factor: float | None) -> dict[str, Parser]:
        return {r: partial(messages, factor=factor) for r in self.routes}

    def body_with(self, route: str, params: Mapping[str, str], body: dict[str, Any]) -> dict[str, Any]:
        """The path's model in ``model``, which the engine prices and a downgrade edits."""
        model = params.get("model")
        return {**body, "model": model} if model else body

    def upstream(self, path: str, params: Mapping[str, str], body: bytes, edited: bool) -> tuple[str, bytes]:
        """An edited body without ``model`` (Vertex takes it only in the path), a downgrade's model
        put in the path instead."""
        if not edited:
            return path, body
        obj = json.loads(body)
        path = model_into_path(path, params, obj)
        return path, json.dumps(obj).encode()

    def apply_key(self, headers: dict[str, str], key: str) -> dict[str, str]:
        return _bearer_or_key(headers, key)


PROVIDERS: tuple[Provider, ...] = (VertexGemini(), VertexAnthropic())
