"""AWS Bedrock's runtime API: ``Converse``, ``ConverseStream``, ``InvokeModel`` and
``InvokeModelWithResponseStream``, called by stock AWS SDKs.

The model (a model id or an inference profile: ``us.anthropic.claude-sonnet-4-5-20250929-v1:0``) is
in the path, ``POST /model/{modelId}/converse`` and ``/model/{modelId}/converse-stream``; the proxy
hands the engine the body with it in ``model`` (:meth:`Bedrock.body_with`), and it is priced from
the price table's ``bedrock`` rows only (strict prices: a Bedrock id never borrows the price of the
vendor's own API or of a reseller).

**Client credentials.** An AWS SDK signs every request with SigV4 and will not send a bearer token
to a plain-HTTP endpoint, so a client holds *virtual* AWS credentials (``spendgate keys create
--aws``): :meth:`Bedrock.authenticate` recomputes the client's signature with botocore over the same
method, path, query, signed headers, body and ``X-Amz-Date``, compares it in constant time, and
refuses a bad signature or a date more than :data:`MAX_SKEW_S` off with a 403 in AWS's error shape.
A request with no credentials, or with an access key id spendgate did not issue, is refused: it is
never forwarded with spendgate's own credentials.

**Upstream credentials.** The request is re-signed for the upstream (:meth:`Bedrock.sign_upstream`)
with a Bedrock API key from ``AWS_BEARER_TOKEN_BEDROCK`` when set, else the proxy's own AWS
credentials from botocore's standard chain (environment, shared files, SSO, instance role). The
region signed for is the base URL's (``bedrock-runtime.<region>.amazonaws.com``), else
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``.

**Input estimate, biased upward.** Text (messages, system prompts, tool specs and tool results as
compact JSON) is counted with o200k and multiplied by :data:`FACTOR` (Anthropic's default count
factor: Claude's tokenizer, the family most served here, splits finer than o200k), each non-ASCII
script at least its per-script floor, plus :data:`PER_MESSAGE` a message; an image counts
:data:`IMAGE_TOKENS` (Claude's most for one image), a document or video one token per
:data:`BYTES_PER_TOKEN` bytes. **Output bound**: ``inferenceConfig.maxTokens``, else the model's
maximum from the price table.

**InvokeModel** (``/model/{modelId}/invoke``, ``/invoke-with-response-stream``) is priced for
Anthropic-family bodies (``anthropic_version``, ``messages``, ``max_tokens``), counted as Anthropic's
Messages API counts them; its usage is the Anthropic ``usage`` of the response, or of the stream's
``message_start`` and ``message_delta`` events, which arrive base64-encoded inside ``chunk`` events.
Any other model family's invoke body is refused (400, never forwarded): call it through Converse.

**Usage** is the response's ``usage`` (``inputTokens`` excludes the cache reads and writes, which
come as ``cacheReadInputTokens`` / ``cacheWriteInputTokens``; :func:`spendgate.usage.read_usage`),
and in a stream the ``metadata`` event's. The stream is AWS event-stream binary framing, read with
botocore's parser (:class:`botocore.eventstream.EventStreamBuffer`); the bytes are relayed as they
came. A stream that cannot be finished ends with an ``exception`` message, which boto3 raises.

**Errors** are ``{"message": …}`` with the error type in ``x-amzn-ErrorType`` (how boto3 reads
it). A refusal is a 402 typed ``SpendgateRefused``: boto3 raises it as a ``botocore``
``ClientError`` with spendgate's message and, neither its status nor its type being one it retries,
does not send it again.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from functools import cache, partial
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from spendgate.errors import BadRequest
from spendgate.estimate.anthropic import DEFAULT_FACTOR
from spendgate.estimate.anthropic import messages as anthropic_messages
from spendgate.estimate.shape import TokenShape, dumps, optional_int
from spendgate.estimate.tally import Tally, tally
from spendgate.providers.anthropic import merge_usage
from spendgate.providers.base import Parser, Provider

if TYPE_CHECKING:
    from yarl import URL

    from spendgate.keys import VirtualKey
    from spendgate.ledger import Ledger
    from spendgate.wire.stream import StreamMeter

#: Bedrock tokens per o200k token, biased upward (module docstring)
FACTOR = DEFAULT_FACTOR
PER_MESSAGE = 4
#: the most tokens Claude bills one image (1.15 megapixels)
IMAGE_TOKENS = 1600
BYTES_PER_TOKEN = 12
#: how far a client's X-Amz-Date may be from the proxy's clock (AWS's own limit)
MAX_SKEW_S = 15 * 60
#: the body field a clamp writes; :meth:`Bedrock.upstream` moves it into ``inferenceConfig``
CLAMP_FIELD = "maxTokens"
SERVICE = "bedrock"
DEFAULT_REGION = "us-east-1"
BEARER_ENV = "AWS_BEARER_TOKEN_BEDROCK"

_CONVERSE = "/model/{modelId}/converse"
_STREAM = "/model/{modelId}/converse-stream"
_INVOKE = "/model/{modelId}/invoke"
_INVOKE_STREAM = "/model/{modelId}/invoke-with-response-stream"
_ACTIONS = ("converse-stream", "converse", "invoke-with-response-stream", "invoke")
_AUTH = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/\s,]+)/(\d{8})/([^/\s,]+)/([^/\s,]+)/aws4_request,\s*"
                   r"SignedHeaders=([a-z0-9;\-_.]+),\s*Signature=([0-9a-f]{64})$")
_REGION_IN_HOST = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com")
#: headers that carry the client's signature: never forwarded, the upstream request is signed anew
_SIGNING_HEADERS = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")


def _source_bytes(block: Mapping[str, Any]) -> int:
    source = block.get("source")
    data = source.get("bytes") if isinstance(source, Mapping) else None
    return math.ceil(len(data) * 3 / 4) if isinstance(data, str) else 0


def _block(t: Tally, block: Any, where: str) -> str | None:
    """Count one content block; the cache TTL a ``cachePoint`` block asks for (None: none)."""
    if not isinstance(block, Mapping):
        raise BadRequest(f"`{where}` must be an object, got {type(block).__name__}")
    ttl = None
    for key, value in block.items():
        if key == "text" and isinstance(value, str):
            t.text(value)
        elif key == "image" and isinstance(value, Mapping):
            t.fixed += max(IMAGE_TOKENS, math.ceil(_source_bytes(value) / BYTES_PER_TOKEN))
        elif key in ("document", "video") and isinstance(value, Mapping):
            t.fixed += math.ceil(_source_bytes(value) / BYTES_PER_TOKEN)
            t.text(dumps({k: v for k, v in value.items() if k != "source"}))
        elif key == "cachePoint":
            ttl = "1h" if isinstance(value, Mapping) and value.get("ttl") == "1h" else "5m"
        else:  # a tool call or result, reasoning, a guard: as JSON
            t.text(dumps({key: value}))
    return ttl


def model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("the model is missing: a Bedrock request names it in its path (/model/{modelId}/converse)")
    return model


def converse(body: Mapping[str, Any], stream: bool = False) -> TokenShape:
    """The token shape of a ``Converse`` / ``ConverseStream`` body (its path's model in ``model``)."""
    model = model_of(body)
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise BadRequest(f"`messages` must be a list, got {type(messages).__name__}")
    t = tally(FACTOR)
    system = body.get("system") or []
    if not isinstance(system, list):
        raise BadRequest(f"`system` must be a list, got {type(system).__name__}")
    ttls = [_block(t, block, f"system[{i}]") for i, block in enumerate(system)]
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("content"), list):
            raise BadRequest(f"`messages[{i}]` must be an object with a `content` list")
        ttls += [_block(t, block, f"messages[{i}].content[{j}]") for j, block in enumerate(msg["content"])]
        t.fixed += PER_MESSAGE
    for name in ("toolConfig", "promptVariables"):
        if body.get(name):
            t.text(dumps(body[name]))
            if b'"cachePoint"' in dumps(body[name]).encode():
                ttls.append("1h" if b'"1h"' in dumps(body[name]).encode() else "5m")
    asked = [x for x in ttls if x is not None]
    cache_write = ("1h" if "1h" in asked else "5m") if asked else None
    config = body.get("inferenceConfig") or {}
    if not isinstance(config, Mapping):
        raise BadRequest(f"`inferenceConfig` must be an object, got {type(config).__name__}")
    bound = optional_int(body, CLAMP_FIELD)  # a clamp's edit
    if bound is None:
        bound = optional_int(config, "maxTokens")
    return TokenShape(model=model, input_tokens=t.total(), requested_output=bound, choices=1,
                      cache_write=cache_write, stream=stream, exact=False)


def invoke(body: Mapping[str, Any], stream: bool = False, factor: float = DEFAULT_FACTOR) -> TokenShape:
    """The token shape of an ``InvokeModel`` body: an Anthropic-family body, counted as Anthropic's
    Messages API (module docstring); any other family's is refused."""
    model = model_of(body)
    if "anthropic_version" not in body and ".anthropic." not in f".{model}":
        raise BadRequest(f"/model/{model}/invoke is priced only for Anthropic-family bodies (anthropic_version, "
                         "messages, max_tokens); call other models through Converse (/model/{modelId}/converse)")
    shape = anthropic_messages(body, factor)
    shape.stream = stream
    return shape


# -- AWS event-stream framing ------------------------------------------------------------------------


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return struct.pack("!B", len(n)) + n + b"\x07" + struct.pack("!H", len(v)) + v


def event_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream message (prelude, its CRC, string headers, payload, message CRC): the only
    message spendgate writes is the exception that ends a stream it cannot finish."""
    hdrs = b"".join(_header(k, v) for k, v in headers.items())
    total = 12 + len(hdrs) + len(payload) + 4
    prelude = struct.pack("!II", total, len(hdrs))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    body = prelude + hdrs + payload
    return body + struct.pack("!I", binascii.crc32(body) & 0xFFFFFFFF)


@cache
def meter_class() -> type[StreamMeter]:
    """The meter of a ConverseStream (built on first use: the stream module imports the registry)."""
    from botocore.eventstream import EventStreamBuffer  # type: ignore[import-untyped]

    from spendgate.wire.stream import StreamMeter

    class BedrockMeter(StreamMeter):
        """Relays the bytes as they came; decodes the messages with botocore's parser to read the
        ``metadata`` event's usage and the output text of the ``contentBlockDelta`` events."""

        def __init__(self, provider: str, withhold_usage_chunk: bool = False) -> None:
            super().__init__(provider, withhold_usage_chunk)
            self._frames = EventStreamBuffer()
            self._broken = False

        def feed(self, chunk: bytes) -> bytes:
            if not self._broken:
                self._frames.add_data(chunk)
                try:
                    for message in self._frames:
                        self._message(message.headers, message.payload)
                except Exception:  # a frame botocore cannot read: relay on, charge what is known
                    self._broken = True
            return chunk

        def flush(self) -> bytes:
            return b""

        def _message(self, headers: Mapping[str, Any], payload: bytes) -> None:
            if headers.get(":message-type") != "event":
                return
            kind = headers.get(":event-type")
            if kind not in ("metadata", "contentBlockDelta", "chunk"):
                return
            try:
                obj = json.loads(payload)
                if kind == "chunk":  # InvokeModel's stream: the model's own event, base64-encoded
                    obj = json.loads(base64.b64decode(obj["bytes"], validate=True))
            except (ValueError, KeyError, TypeError):
                return
            if not isinstance(obj, dict):
                return
            if kind == "chunk":
                self._anthropic_event(obj)
                return
            if kind == "metadata":
                self._spec.stream_usage(self, obj)
                return
            delta = obj.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("text"), str):
                    self.text.append(delta["text"])
                tool = delta.get("toolUse")
                if isinstance(tool, dict) and isinstance(tool.get("input"), str):
                    self.text.append(tool["input"])
                reasoning = delta.get("reasoningContent")
                if isinstance(reasoning, dict) and isinstance(reasoning.get("text"), str):
                    self.text.append(reasoning["text"])

        def _anthropic_event(self, obj: dict[str, Any]) -> None:
            kind = obj.get("type")
            if kind in ("message_start", "message_delta"):
                self._spec.stream_usage(self, obj)
            elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
                self.text.extend(obj["delta"][f] for f in ("text", "thinking", "partial_json")
                                 if isinstance(obj["delta"].get(f), str))

    return BedrockMeter


# -- SigV4 ------------------------------------------------------------------------------------------


def _region(url: str) -> str:
    m = _REGION_IN_HOST.search(url)
    if m is not None:
        return m.group(1)
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


@cache
def _session() -> Any:
    import botocore.session  # type: ignore[import-untyped]

    return botocore.session.get_session()


def upstream_credentials() -> Any:
    """The proxy's own AWS credentials from botocore's standard chain (None: none found)."""
    return _session().get_credentials()


def _signature(method: str, url: str, headers: Mapping[str, str], body: bytes, access_key_id: str, secret: str,
               region: str, service: str, amz_date: str) -> str:
    """The SigV4 signature botocore computes for this request at ``amz_date``."""
    from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import Credentials  # type: ignore[import-untyped]

    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    req.context["timestamp"] = amz_date
    req.context["payload_signing_enabled"] = True
    auth = SigV4Auth(Credentials(access_key_id, secret), service, region)
    return str(auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req))


class Bedrock(Provider):
    name = "bedrock"
    default_base_url = "https://bedrock-runtime.us-east-1.amazonaws.com"
    routes: Mapping[str, Parser] = {_CONVERSE: converse, _STREAM: partial(converse, stream=True),
                                    _INVOKE: invoke, _INVOKE_STREAM: partial(invoke, stream=True)}
    output_fields: Mapping[str, tuple[str, ...]] = {_CONVERSE: (CLAMP_FIELD,), _STREAM: (CLAMP_FIELD,),
                                                    _INVOKE: ("max_tokens",), _INVOKE_STREAM: ("max_tokens",)}
    conversation_fields: Mapping[str, str] = {r: "messages" for r in routes}
    chat_route = _CONVERSE
    price_providers = ("bedrock",)
    strict_prices = True
    scaled_counts = True
    credential_headers = ("x-amz-security-token",)
    marker_headers = ("x-amz-date",)
    signed_requests = True
    auth_failure_status = 403
    stream_content_types = ("application/vnd.amazon.eventstream",)
    #: ``spendgate.wrap`` takes a boto3 / botocore ``bedrock-runtime`` client (:meth:`sdk_guard`)
    sdk_package = "botocore"
    sdk_error = "exceptions.ClientError"
    #: the botocore service a wrapped client must be for
    sdk_service = "bedrock-runtime"
    error_types: Mapping[int, str] = {
        400: "ValidationException", 401: "UnrecognizedClientException",
        # a refusal: no AWS error type boto3 retries (ThrottlingException would be sent again)
        402: "SpendgateRefused",
        403: "AccessDeniedException", 404: "ResourceNotFoundException", 413: "ValidationException",
        429: "ThrottlingException", 500: "InternalServerException", 502: "ServiceUnavailableException",
        503: "ServiceUnavailableException", 504: "ModelTimeoutException"}

    def parsers(self, factor: float | None) -> dict[str, Parser]:
        """Invoke bodies are Anthropic's: counted with the policy's ``anthropic_token_factor``."""
        if factor is None:
            return dict(self.routes)
        return {**self.routes, _INVOKE: partial(invoke, factor=factor),
                _INVOKE_STREAM: partial(invoke, stream=True, factor=factor)}

    def body_with(self, route: str, params: Mapping[str, str], body: dict[str, Any]) -> dict[str, Any]:
        model = params.get("modelId")
        return {**body, "model": model} if model else body

    def upstream(self, path: str, params: Mapping[str, str], body: bytes, edited: bool) -> tuple[str, bytes]:
        """The path with the model id percent-encoded as AWS SDKs send it (``%3A``), the model a
        downgrade chose; an edited body without ``model`` and with a clamp under ``inferenceConfig``."""
        model = params.get("modelId", "")
        action = next(a for a in _ACTIONS if path.endswith(f"/{a}"))
        if edited:
            obj = json.loads(body)
            chosen = obj.pop("model", None)
            if isinstance(chosen, str) and chosen:
                model = chosen
            bound = obj.pop(CLAMP_FIELD, None)
            if isinstance(bound, int):
                obj["inferenceConfig"] = {**(obj.get("inferenceConfig") or {}), "maxTokens": max(1, bound)}
            body = json.dumps(obj).encode()
        return f"/model/{quote(model, safe='')}/{action}", body

    def meter(self, withhold: bool = False) -> StreamMeter:
        return meter_class()(self.name, withhold)

    def is_tool_result(self, item: Mapping[str, Any]) -> bool:
        """A ``user`` message carrying tool results (Converse ``toolResult`` blocks, or an Anthropic
        invoke body's ``tool_result``): part of the assistant's tool round."""
        content = item.get("content")
        return isinstance(content, list) and any(
            isinstance(b, Mapping) and ("toolResult" in b or b.get("type") == "tool_result") for b in content)

    def stream_usage(self, meter: StreamMeter, obj: dict[str, Any]) -> bool:
        """ConverseStream: the ``metadata`` event's ``usage`` is the whole usage, final. An invoke
        stream's Anthropic events: ``message_start``'s usage, completed by ``message_delta``'s."""
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
                meter.usage = dict(msg["usage"])
        elif kind == "message_delta":
            if isinstance(obj.get("usage"), dict):
                meter.usage = merge_usage(meter.usage or {}, obj["usage"])
                meter.complete = True
        elif isinstance(obj.get("usage"), dict):
            meter.usage = {"usage": obj["usage"]}
            meter.complete = True
        return True

    def sdk_error_fields(self, status: int) -> dict[str, Any]:
        """``response`` and ``operation_name`` as on botocore's own ``ClientError`` (code read from
        ``e.response["Error"]["Code"]``, status from its ``ResponseMetadata``)."""
        kind = self.error_types.get(status, "InternalServerException")

        def response(err: Exception) -> dict[str, Any]:
            return {"Error": {"Code": kind, "Message": str(err)},
                    "ResponseMetadata": {"HTTPStatusCode": status}}

        return {"response": property(response), "operation_name": None}

    def sdk_guard(self, client: Any, guard: Callable[[Any], Any]) -> Any | None:
        """A boto3 ``bedrock-runtime`` client guarded by handlers on its own botocore events
        (:mod:`spendgate.sdk._botocore`): the same client, returned, nothing patched. ``guard`` is
        ``wrap``'s binder, whose ``guard(library)`` is a :class:`~spendgate.sdk._transport.Guard`."""
        from spendgate.sdk._botocore import guard_client

        return guard_client(client, guard, self.sdk_service)

    def error_body(self, status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"message": message}
        if code is not None:
            body["code"] = code
        if extra:
            body["spendgate"] = dict(extra)
        return body

    def error_headers(self, status: int) -> dict[str, str]:
        return {"x-amzn-ErrorType": self.error_types.get(status, "InternalServerException")}

    def sse_error(self, status: int, message: str, *, code: str | None = None) -> bytes:
        """An ``exception`` message ending the event stream, which boto3 raises."""
        kind = "serviceUnavailableException" if status >= 500 else "validationException"
        return event_message({":message-type": "exception", ":exception-type": kind,
                              ":content-type": "application/json"},
                             json.dumps(self.error_body(status, message, code=code)).encode())

    # -- credentials --------------------------------------------------------------------------

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        return None  # a Bedrock client signs; it sends no key

    def authenticate(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes, store: Ledger,
                     now: float) -> tuple[VirtualKey, str]:
        """The virtual key whose AWS credentials signed this request, and its access key id — or,
        for a Bedrock API key sent as a bearer token (botocore sends one over HTTPS only: ``serve
        --tls-cert``), the spendgate key it is, and that key's id. PermissionError: no signature, an
        access key id or key spendgate did not issue, a bad signature or a stale date. LookupError:
        spendgate has no upstream credentials to sign the call with."""
        from spendgate import keys

        getall = getattr(headers, "getall", None)
        if getall is not None and any(len(getall(h, ())) > 1 for h in ("authorization", "x-amz-date")):
            raise PermissionError("the request carries more than one Authorization or X-Amz-Date header")
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
            vkey = keys.lookup(store, token, now=now) if token.startswith("sg-") else None
            if vkey is None:
                raise PermissionError("the bearer token is not a spendgate key: send a key from spendgate keys "
                                      "create as AWS_BEARER_TOKEN_BEDROCK, or sign with its AWS credentials (--aws)")
            return vkey, vkey.id
        m = _AUTH.match(auth.strip())
        if m is None:
            raise PermissionError("the request is not signed with spendgate's AWS credentials (AWS4-HMAC-SHA256); "
                                  "create them with spendgate keys create --aws")
        access_key_id, day, region, service, signed, sent = m.groups()
        amz_date = headers.get("x-amz-date", "")
        try:
            at = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            raise PermissionError(f"X-Amz-Date: expected a time such as 20261203T120000Z, got {amz_date!r}") from None
        if abs(at.timestamp() - now) > MAX_SKEW_S or day != amz_date[:8]:
            raise PermissionError(f"Signature expired: X-Amz-Date {amz_date} is more than 15 minutes from "
                                  f"spendgate's clock ({dt.datetime.fromtimestamp(now, dt.UTC):%Y%m%dT%H%M%SZ})")
        found = keys.lookup_aws(store, access_key_id, now=now)
        if found is None:
            raise PermissionError(f"unknown or revoked spendgate AWS access key id {access_key_id}")
        vkey, secret = found
        names = signed.split(";")
        if "host" not in names:
            raise PermissionError("the signature must cover the host header")
        sent_hash = headers.get("x-amz-content-sha256")
        if sent_hash is not None and "x-amz-content-sha256" in names \
                and sent_hash != hashlib.sha256(body).hexdigest():
            raise PermissionError("X-Amz-Content-SHA256 is not the body's hash")
        signed_headers = {n: headers.get(n, "") for n in names}
        url = f"http://{headers.get('host', '')}{path_qs}"
        expected = _signature(method, url, signed_headers, body, access_key_id, secret, region, service, amz_date)
        if not hmac.compare_digest(expected.encode(), sent.encode()):
            raise PermissionError("The request signature we calculated does not match the signature you provided. "
                                  "Check your spendgate AWS secret access key and signing method.")
        if not os.environ.get(BEARER_ENV) and upstream_credentials() is None:
            raise LookupError(f"virtual AWS credentials accepted, but spendgate has no AWS credentials of its own "
                              f"(botocore's standard chain) nor {BEARER_ENV} to sign the call to Bedrock with")
        return vkey, access_key_id

    def sign_upstream(self, method: str, url: str, headers: dict[str, str], body: bytes
                      ) -> tuple[str | URL, dict[str, str]]:
        """The upstream request signed with spendgate's own credentials (module docstring); the URL
        kept byte for byte as signed (the model id's ``%3A``)."""
        from yarl import URL

        out = {k: v for k, v in headers.items() if k.lower() not in _SIGNING_HEADERS}
        wire = URL(url, encoded=True)
        bearer = os.environ.get(BEARER_ENV)
        if bearer:
            out["Authorization"] = f"Bearer {bearer}"
            return wire, out
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        creds = upstream_credentials()
        if creds is None:
            raise LookupError(f"spendgate has no AWS credentials nor {BEARER_ENV} to sign the call to Bedrock with")
        req = AWSRequest(method=method, url=url, data=body, headers=out)
        SigV4Auth(creds.get_frozen_credentials(), SERVICE, _region(url)).add_auth(req)
        return wire, dict(req.headers.items())
