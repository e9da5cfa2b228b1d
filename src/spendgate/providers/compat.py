"""Upstreams added by configuration, not code: an OpenAI-compatible server and Azure OpenAI.

A ``[upstreams.NAME]`` table (:class:`~spendgate.policy.model.UpstreamSpec`) becomes a provider
that speaks a registered wire format (its parsers, usage readers, stream meter and error envelope)
under a name, a route prefix, a base URL, a key and a price table of its own:

- :class:`Compat`: the wire format's routes under ``/NAME`` (``/mistral/v1/chat/completions``),
  sent upstream without the prefix;
- :class:`Azure`: Azure OpenAI's deployment routes (``/openai/deployments/{deployment}/…``) and its
  ``/openai/v1/…`` API, a deployment priced as the model the config maps it to.

Both price a model only from their ``prices`` table provider's rows (:attr:`Provider.strict_prices`):
a model that table does not know is priced as its dearest model (or refused under
``unpriced = "block"``), never by another provider's row that happens to share the name. A model
costs nothing only when a ``free`` glob of the config names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from spendgate.providers.base import Parser, Provider, template_regex

if TYPE_CHECKING:
    from spendgate.policy.model import UpstreamSpec
    from spendgate.wire.stream import StreamMeter

#: what a configured provider takes over from the wire format it speaks, unchanged
_DECLARED = ("routes", "free_routes", "output_fields", "conversation_fields", "sdk_error", "scaled_counts",
             "error_types", "chat_route", "credential_headers", "credential_params", "writes_cache_itself")


class Configured(Provider):
    """A provider built from a ``[upstreams.NAME]`` table over the wire format ``wire``: every
    reading and writing of bodies, usage, streams and errors is the wire format's."""

    strict_prices = True

    def __init__(self, spec: UpstreamSpec, wire: Provider) -> None:
        for attr in _DECLARED:
            setattr(self, attr, getattr(wire, attr))
        self.wire = wire
        self.spec = spec
        self.name = spec.name
        self.default_base_url = spec.base_url
        self.key_env = spec.key_env
        self.price_providers = (spec.prices,)
        self.sdk_package = wire.sdk_module
        self.marker_headers = ()  # never the provider a request on an unknown path is answered as

    def is_free_model(self, model: str) -> bool:
        return self.spec.is_free(model)

    # -- everything else is the wire format's -------------------------------------------------

    def body_with(self, route: str, params: Mapping[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return self.wire.body_with(route, params, body)

    def upstream(self, path: str, params: Mapping[str, str], body: bytes, edited: bool) -> tuple[str, bytes]:
        return self.wire.upstream(path, params, body, edited)

    def sdk_error_class(self, status: int) -> str:
        return self.wire.sdk_error_class(status)

    def sdk_error_fields(self, status: int) -> dict[str, Any]:
        return self.wire.sdk_error_fields(status)

    def sdk_guard(self, client: Any, guard: Callable[[Any], Any]) -> Any | None:
        return self.wire.sdk_guard(client, guard)

    def meter(self, withhold: bool = False) -> StreamMeter:
        return self.wire.meter(withhold)

    def route_for(self, body: Mapping[str, Any]) -> str:
        return self.wire.route_for(body)

    def parsers(self, factor: float | None) -> dict[str, Parser]:
        return self.wire.parsers(factor)

    def variant(self, body: Mapping[str, Any], auto_tier: str) -> dict[str, str]:
        return self.wire.variant(body, auto_tier)

    def searches(self, body: Mapping[str, Any]) -> int:
        return self.wire.searches(body)

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        return self.wire.api_key(headers)

    def apply_key(self, headers: dict[str, str], key: str) -> dict[str, str]:
        return self.wire.apply_key(headers, key)

    def stream_edits(self, route: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.wire.stream_edits(route, body)

    def body_user(self, body: Mapping[str, Any]) -> str | None:
        return self.wire.body_user(body)

    def error_body(self, status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.wire.error_body(status, message, code=code, extra=extra)

    def sse_error(self, status: int, message: str, *, code: str | None = None) -> bytes:
        return self.wire.sse_error(status, message, code=code)

    def stream_usage(self, meter: StreamMeter, obj: dict[str, Any]) -> bool:
        return self.wire.stream_usage(meter, obj)

    def is_tool_result(self, item: Mapping[str, Any]) -> bool:
        return self.wire.is_tool_result(item)


class Compat(Configured):
    """An OpenAI-compatible server (or any registered wire format) under the ``/NAME`` prefix:
    clients use ``http://spendgate/NAME/v1``; the prefix is dropped on the way upstream."""

    def __init__(self, spec: UpstreamSpec, wire: Provider) -> None:
        super().__init__(spec, wire)
        self.prefix = f"/{spec.name}"

    def paths(self) -> Iterable[tuple[str, str]]:
        return ((self.prefix + r, r) for r in (*self.routes, *self.free_routes))

    def match(self, path: str) -> tuple[str, dict[str, str]] | None:
        if not path.startswith(self.prefix + "/"):
            return None
        return self.wire.match(path[len(self.prefix):])

    def upstream(self, path: str, params: Mapping[str, str], body: bytes, edited: bool) -> tuple[str, bytes]:
        return self.wire.upstream(path.removeprefix(self.prefix), params, body, edited)

    def match_direct(self, path: str) -> tuple[str, dict[str, str]] | None:
        """A client of the upstream itself sends the wire format's paths, without ``/NAME``."""
        return self.wire.match(path)

    def upstream_direct(self, path: str, params: Mapping[str, str], body: bytes, edited: bool
                        ) -> tuple[str, bytes]:
        """Nothing to drop: a base URL whose own path starts with ``/NAME`` keeps it."""
        return self.wire.upstream(path, params, body, edited)


#: Azure OpenAI's paths -> the OpenAI route each is read as
AZURE_PATHS: Mapping[str, str] = {
    "/openai/deployments/{deployment}/chat/completions": "/v1/chat/completions",
    "/openai/deployments/{deployment}/completions": "/v1/completions",
    "/openai/deployments/{deployment}/embeddings": "/v1/embeddings",
    "/openai/v1/chat/completions": "/v1/chat/completions",
    "/openai/v1/responses": "/v1/responses",
    "/openai/v1/completions": "/v1/completions",
    "/openai/v1/embeddings": "/v1/embeddings",
    "/openai/v1/models": "/v1/models",
}
_DEPLOYMENTS = "/openai/deployments/"


class Azure(Configured):
    """Azure OpenAI: OpenAI's wire format on Azure's paths, ``api-key`` auth and the ``api-version``
    query (forwarded as sent). The model a request is priced as is the one ``deployments`` maps its
    deployment to — the path's ``{deployment}``, or the body's ``model`` on the ``/openai/v1/`` API;
    a deployment the config does not name is refused, never forwarded."""

    def __init__(self, spec: UpstreamSpec, wire: Provider) -> None:
        super().__init__(spec, wire)
        self.credential_headers = ("api-key",)
        self._paths = tuple((p, r, template_regex(p)) for p, r in AZURE_PATHS.items()
                            if r in wire.routes or r in wire.free_routes)

    def paths(self) -> Iterable[tuple[str, str]]:
        return ((p, r) for p, r, _ in self._paths)

    def match(self, path: str) -> tuple[str, dict[str, str]] | None:
        for _, route, rx in self._paths:
            m = rx.match(path)
            if m is not None:
                return route, m.groupdict()
        return None

    def _unknown(self, deployment: object) -> LookupError:
        known = ", ".join(sorted(self.spec.deployments))
        return LookupError(f"Azure deployment {deployment!r} is not in [upstreams.{self.name}] deployments "
                           f"(configured: {known}), so it cannot be priced; the request was not sent")

    def body_with(self, route: str, params: Mapping[str, str], body: dict[str, Any]) -> dict[str, Any]:
        """The deployment's model in ``model``: what the engine prices and a downgrade edits."""
        deployment = params.get("deployment") or body.get("model")
        if not isinstance(deployment, str) or deployment not in self.spec.deployments:
            raise self._unknown(deployment)
        return {**body, "model": self.spec.deployments[deployment]}

    def deployment_for(self, model: str) -> str | None:
        """The configured deployment serving ``model`` (a downgrade's target), None if none does."""
        return next((d for d, m in self.spec.deployments.items() if m == model), None)

    def upstream(self, path: str, params: Mapping[str, str], body: bytes, edited: bool) -> tuple[str, bytes]:
        """An edited body names its deployment again; a downgrade goes to the deployment serving the
        cheaper model (ValueError when none does: the cheaper call cannot be made on Azure)."""
        if not edited:
            return path, body
        obj = json.loads(body)
        model = obj.get("model")
        sent = params.get("deployment") or ""
        if sent and self.spec.deployments.get(sent) == model:
            deployment: str | None = sent
        else:
            deployment = self.deployment_for(str(model))
        if deployment is None:
            raise ValueError(f"no deployment in [upstreams.{self.name}] deployments serves {model!r}, the model "
                             "a rule downgraded this request to")
        obj["model"] = deployment
        if sent and deployment != sent:
            path = path.replace(f"{_DEPLOYMENTS}{sent}/", f"{_DEPLOYMENTS}{deployment}/", 1)
        return path, json.dumps(obj).encode()

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        """``api-key`` (how Azure's SDKs send a key), else a bearer token (an Entra ID token)."""
        key = headers.get("api-key")
        return key.strip() or None if key is not None else self.wire.api_key(headers)

    def apply_key(self, headers: dict[str, str], key: str) -> dict[str, str]:
        """The virtual key swapped for the Azure key, in ``api-key`` (Azure's key header)."""
        out = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-api-key", "api-key")}
        out["api-key"] = key
        return out


def build(spec: UpstreamSpec, wire: Provider) -> Configured:
    """The provider a ``[upstreams.NAME]`` table describes, over the wire format it names."""
    return Azure(spec, wire) if spec.api == "azure" else Compat(spec, wire)

