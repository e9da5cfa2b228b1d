"""The provider registry: every wire format spendgate guards, one module each.

Adding a provider is one module here (a :class:`~spendgate.providers.base.Provider` subclass), its
prices and its tests; everything else asks this registry (:func:`get`, :func:`all_providers`,
:func:`priced_routes`, :func:`free_routes`).

Upstreams added by configuration (``[upstreams.NAME]``: OpenAI-compatible servers, Azure OpenAI)
are registered by :func:`configure` when a server or an engine starts over a policy that names
them; from then on :func:`get` and :func:`find` know them by name, like the built-in ones.
:func:`all_providers` stays the built-in wire formats; :func:`active` adds the configured ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from spendgate.providers.anthropic import Anthropic
from spendgate.providers.base import Parser, Provider
from spendgate.providers.bedrock import Bedrock
from spendgate.providers.gemini import Gemini
from spendgate.providers.openai import OpenAI
from spendgate.providers.vertex import PROVIDERS as VERTEX

if TYPE_CHECKING:
    from spendgate.policy.model import UpstreamSpec
    from spendgate.pricing.table import PriceTable

__all__ = ["Parser", "Provider", "active", "all_providers", "configure", "default", "find", "for_model",
           "free_routes", "get", "match", "priced_routes", "served_for"]

#: the first is the default: the wire format of a request that names none (OpenAI-compatible)
_REGISTRY: dict[str, Provider] = {p.name: p for p in (OpenAI(), Anthropic(), Gemini(), Bedrock(), *VERTEX)}
#: providers built from ``[upstreams.NAME]`` tables, by name (:func:`configure`)
_CONFIGURED: dict[str, Provider] = {}


def configure(upstreams: Mapping[str, UpstreamSpec]) -> tuple[Provider, ...]:
    """The providers ``[upstreams.NAME]`` tables describe, registered (or replaced, by name) so that
    every lookup by name — the engine's, the proxy's, the stream meter's — finds them. The policy
    parser has checked each names a registered wire format and no built-in provider's name."""
    from spendgate.providers import compat

    built = tuple(compat.build(spec, get(spec.api if spec.api != "azure" else "openai"))
                  for spec in upstreams.values())
    for p in built:
        if p.name in _REGISTRY:
            raise ValueError(f"upstreams.{p.name}: {p.name!r} is a built-in provider")
        _CONFIGURED[p.name] = p
    return built


def active() -> tuple[Provider, ...]:
    """The built-in providers and the configured ones."""
    return (*_REGISTRY.values(), *_CONFIGURED.values())


def get(name: str) -> Provider:
    """The provider called ``name``; KeyError naming the known ones otherwise."""
    found = _REGISTRY.get(name) or _CONFIGURED.get(name)
    if found is None:
        raise KeyError(f"no provider {name!r}; spendgate knows {', '.join((*_REGISTRY, *_CONFIGURED))}")
    return found


def find(name: str) -> Provider | None:
    return _REGISTRY.get(name) or _CONFIGURED.get(name)


def default() -> Provider:
    """The wire format of a request or trace row that names none: OpenAI's, which most clients and
    OpenAI-compatible servers speak."""
    return next(iter(_REGISTRY.values()))


def for_model(model: str, prices: PriceTable) -> Provider:
    """The provider serving ``model`` first-hand, by the price table's row for it; the default when
    the table has none (an unknown model is still priced, as the dearest)."""
    found = prices.resolve(model)
    if found is not None:
        for p in _REGISTRY.values():
            if found.price.provider in p.price_providers:
                return p
    return default()


def by_headers(headers: Mapping[str, str]) -> Provider:
    """The provider whose clients send one of these headers (``anthropic-version``), else the
    default: how a request on a path no provider owns is answered in its client's own envelope."""
    for p in _REGISTRY.values():
        if any(h in headers for h in p.marker_headers):
            return p
    return default()


def owner(path: str) -> Provider | None:
    """The provider whose priced or free route ``path`` is (None: no provider's)."""
    for p in _REGISTRY.values():
        if path in p.routes or path in p.free_routes:
            return p
    return None


def match(path: str) -> tuple[Provider, str, dict[str, str]] | None:
    """The provider whose route a request ``path`` is, the route (the exact path, or the template
    it fills) and the path's parameters (``{"model": …}``); None: no provider's route."""
    for p in active():
        found = p.match(path)
        if found is not None:
            return p, found[0], found[1]
    return None


def all_providers() -> tuple[Provider, ...]:
    return tuple(_REGISTRY.values())


def served_for(sdk: str) -> tuple[Provider, ...]:
    """The providers whose routes the clients of ``sdk``'s official SDK also call (:attr:`Provider.sdk_of`):
    Vertex AI's, for the google-genai and anthropic clients."""
    return tuple(p for p in _REGISTRY.values() if p.sdk_of == sdk)


def priced_routes() -> frozenset[tuple[str, str]]:
    """Every (provider, path) spendgate prices."""
    return frozenset((p.name, r) for p in _REGISTRY.values() for r in p.routes)


def free_routes() -> frozenset[tuple[str, str]]:
    """Every (provider, path) that costs nothing and is passed through unpriced."""
    return frozenset((p.name, r) for p in _REGISTRY.values() for r in p.free_routes)
