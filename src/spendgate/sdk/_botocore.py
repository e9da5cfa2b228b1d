"""``spendgate.wrap`` of a botocore client (``boto3.client("bedrock-runtime")``), on botocore's own
event hooks: nothing is monkey-patched, and only the wrapped client's ``meta.events`` carries them.

botocore emits, for each attempt of a call (a retry is a new attempt, signed anew):

- ``before-sign``: the request is built but not yet signed. The guard prices it here and holds its
  worst case; an edit (a clamp, a downgrade) is written into the body and the path *before* the
  signature is computed, so the request the upstream verifies is the edited one. A refusal raises
  spendgate's error (a ``botocore`` ``ClientError`` and a :class:`spendgate.BudgetExceeded`), so
  nothing is sent;
- ``response-received``: the attempt's outcome. An error status releases the hold (nothing was
  generated); a JSON body is settled from its ``usage`` (InvokeModel's answer, a streaming blob, is
  read whole for it and handed back as a body over the same bytes); an event stream (``ConverseStream``,
  ``InvokeModelWithResponseStream``) is settled as the caller reads it, through the provider's
  stream meter over the raw bytes botocore's ``EventStream`` parses — at its end from the usage
  event, or, read partly and closed (or broken off), for the input plus the output relayed.
  A send that failed before any byte left (no connection) releases the hold; one that failed
  after (a read timeout, a dropped connection) is charged its worst case, the outcome unknown;
- ``after-call-error``: the call raised before its attempt ended (signing failed after the hold,
  a response botocore could not parse): a hold still open is released, or charged its worst case
  when a response had arrived.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from spendgate.engine import Decision
from spendgate.sdk._transport import Guard
from spendgate.wire.stream import StreamMeter

#: the key of the open hold in botocore's per-call ``context``
_HOLD = "spendgate.hold"
#: a wrapped client's attribute holding its guard: ``wrap`` of a wrapped client returns it as it is
_MARK = "_spendgate_guard"


class _MeteredRaw:
    """The raw HTTP body an ``EventStream`` reads, relayed chunk by chunk through a meter that
    settles once: when the stream is read to its end, breaks off, or is closed early."""

    def __init__(self, raw: Any, meter: StreamMeter, settle: Callable[[], None]) -> None:
        self._raw, self._meter, self._settle, self._done = raw, meter, settle, False

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        try:
            for chunk in self._raw.stream(*args, **kwargs):
                self._meter.feed(chunk)
                yield chunk
        finally:  # the end, an error reading, or the generator closed
            self._finish()

    def close(self) -> None:
        self._finish()
        self._raw.close()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._settle()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class BotocoreBinding:
    """The event handlers of one wrapped client: decide before signing, settle per attempt."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        exc = importlib.import_module("botocore.exceptions")
        self._sent_errors: tuple[type[BaseException], ...] = (exc.HTTPClientError,)
        parsers = importlib.import_module("botocore.parsers")
        self._parse_errors: tuple[type[BaseException], ...] = (parsers.ResponseParserError,)
        self._event_stream: type[Any] = importlib.import_module("botocore.eventstream").EventStream
        self._streaming_body: type[Any] = importlib.import_module("botocore.response").StreamingBody

    def register(self, events: Any, service_id: str) -> None:
        events.register_last(f"before-sign.{service_id}", self.before_sign, unique_id=f"spendgate-sign-{id(self)}")
        events.register_last(f"response-received.{service_id}", self.response_received,
                             unique_id=f"spendgate-response-{id(self)}")
        events.register_last(f"after-call-error.{service_id}", self.after_call_error,
                             unique_id=f"spendgate-error-{id(self)}")

    # -- before -------------------------------------------------------------------------------

    def before_sign(self, request: Any, **_: Any) -> None:
        """Price and hold the built request; write an edit into it before it is signed."""
        context: dict[str, Any] = request.context
        self._release_open(context)  # a retry's new attempt: the last one's hold was settled already
        parts = urlsplit(request.url)
        path = unquote(parts.path)

        def read() -> bytes:
            data = request.data
            if hasattr(data, "read"):  # a file-like InvokeModel body: read once, sent as bytes
                data = data.read()
                request.data = data
            if isinstance(data, str):
                data = data.encode()
            return bytes(data or b"")

        priced = self.guard.price(request.method, path, request.headers, read)
        if priced.decision is None:
            return
        context[_HOLD] = priced
        try:
            if priced.body is not priced.raw:
                request.data = priced.body
                if "Content-Length" in request.headers:  # computed again for the new body
                    del request.headers["Content-Length"]
                request.url = urlunsplit(parts._replace(path=priced.path))
        except BaseException:
            self._release_open(context)
            raise

    # -- after --------------------------------------------------------------------------------

    def response_received(self, context: dict[str, Any], exception: BaseException | None = None,
                          response_dict: dict[str, Any] | None = None,
                          parsed_response: dict[str, Any] | None = None, **_: Any) -> None:
        priced = context.pop(_HOLD, None)
        if priced is None:
            return
        d: Decision = priced.decision
        engine = self.guard._engine()
        if exception is not None or response_dict is None:
            if isinstance(exception, self._sent_errors):
                engine.charge_unknown(d)  # sent, outcome unknown: the worst case
            else:
                engine.release(d)  # it never left: no connection, or a handler refused it
            return
        status = int(response_dict.get("status_code", 0))
        parsed = parsed_response if parsed_response is not None else {}
        stream = next((v for v in parsed.values() if isinstance(v, self._event_stream)), None)
        if stream is None or status >= 400:
            body = response_dict.get("body")
            if status < 400:
                body = self._read_blob(d, parsed, body)
            self.guard.settle_body(d, status, body if isinstance(body, bytes) else b"")
            return
        meter = (priced.spec or self.guard._spec).meter(priced.withhold)
        stream._raw_stream = _MeteredRaw(stream._raw_stream, meter, lambda: self.guard.settle_stream(d, meter))

    def _read_blob(self, d: Decision, parsed: dict[str, Any], body: Any) -> Any:
        """InvokeModel's answer is a streaming blob (``out["body"]``): read whole here to settle
        from its usage, and handed back to the caller as a fresh body over the same bytes."""
        key = next((k for k, v in parsed.items() if isinstance(v, self._streaming_body)), None)
        if key is None:
            return body
        try:
            data: bytes = parsed[key].read()
        except BaseException:
            self.guard._engine().charge_unknown(d)  # sent, the answer lost on the way: the worst case
            raise
        parsed[key] = self._streaming_body(io.BytesIO(data), len(data))
        return data

    def after_call_error(self, context: dict[str, Any], exception: BaseException | None = None,
                         **_: Any) -> None:
        """The call raised with a hold still open: released (never sent), or charged its worst case
        when a response arrived that botocore could not read."""
        priced = context.pop(_HOLD, None)
        if priced is None:
            return
        if isinstance(exception, self._parse_errors):
            self.guard._engine().charge_unknown(priced.decision)
        else:
            self.guard._engine().release(priced.decision)

    def _release_open(self, context: dict[str, Any]) -> None:
        priced = context.pop(_HOLD, None)
        if priced is not None:
            self.guard._engine().release(priced.decision)


def guard_client(client: Any, binder: Any, service: str) -> Any:
    """``client`` (a botocore client of ``service``) with spendgate's handlers on its own events;
    ``binder`` is ``wrap``'s (its ``guard(library)`` builds the :class:`Guard`). The handlers are per
    client: another client of the same session is not guarded."""
    meta: Any = getattr(client, "meta", None)
    model = getattr(meta, "service_model", None)
    if model is None or model.service_name != service:
        name = getattr(model, "service_name", type(client).__name__)
        raise TypeError(f"spendgate.wrap: expected a boto3 {service!r} client, got one for {name!r}")
    if getattr(client, _MARK, None) is not None:
        return client  # already guarded
    binding = BotocoreBinding(binder.guard(importlib.import_module("botocore")))
    binding.register(meta.events, model.service_id.hyphenize())
    setattr(client, _MARK, binding)
    return client
