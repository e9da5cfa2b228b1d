"""Metering a server-sent-event stream while relaying it event by event.

Usage arrives at the end, in events each provider shapes its own way (its module's
``stream_usage`` reads them, and may withhold a usage chunk the client did not ask for). Output
text seen so far is kept so a stream cut short can be charged for what it produced.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from spendgate import providers
from spendgate.estimate.tokens import counter
from spendgate.pricing.cost import Usage
from spendgate.usage import UnreadableUsage, read_usage

_SEP = (b"\r\n\r\n", b"\n\n")
#: either separator, wherever it comes first: one scan of the buffer per chunk
_SEP_RX = re.compile(b"|".join(re.escape(s) for s in _SEP))


def data_of(event: bytes) -> bytes:
    """The ``data:`` lines of one event, joined (what a client's SSE parser hands on). An event of
    one or two ``\n``-ended lines — nearly all of them: ``data: {…}``, or ``event: …`` then ``data:
    {…}`` — is read without splitting it into a list of lines and a generator over them."""
    line = event.rstrip(b"\r\n")
    if b"\r" not in line:
        nl = line.find(b"\n")
        if nl < 0:
            return line[5:].lstrip() if line.startswith(b"data:") else b""
        if line.find(b"\n", nl + 1) < 0:
            first, second = line[:nl], line[nl + 1:]
            if not first.startswith(b"data:"):
                return second[5:].lstrip() if second.startswith(b"data:") else b""
    return b"".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))


class StreamMeter:
    #: the bytes an event carrying usage contains: only those events are parsed as they pass
    usage_marker = b'"usage"'

    def __init__(self, provider: str, withhold_usage_chunk: bool = False) -> None:
        self.provider = provider
        self._spec = providers.get(provider)
        self.withhold = withhold_usage_chunk
        self.usage: dict[str, Any] | None = None
        self.text: list[str] = []
        self.complete = False  # the final usage arrived
        self._buf = b""
        self._unread: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        """Take upstream bytes; return the complete events to relay now (partial ones wait)."""
        buf = self._buf + chunk if self._buf else chunk
        out = []
        start = 0
        for sep in _SEP_RX.finditer(buf):  # each event ends at the earliest separator after the last
            event, start = buf[start:sep.end()], sep.end()
            if self._observe(event):
                out.append(event)
        self._buf = buf[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        if rest and self._observe(rest):
            return rest
        return b""

    def _observe(self, event: bytes) -> bool:
        """Read one event; False when it must not reach the client.

        Only events that carry usage are parsed as they pass; the others (the bulk: text deltas)
        are kept raw and read only if the stream is cut short and its output must be counted."""
        data = data_of(event)
        if not data or data == b"[DONE]" or data[:1] != b"{":
            return True
        if self.usage_marker not in data:
            self._unread.append(data)
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        self._texts_of(obj)
        return self._spec.stream_usage(self, obj)

    def _texts_of(self, obj: dict[str, Any]) -> None:
        """The output text one event carries, in each provider's delta shape."""
        kind = obj.get("type")
        if kind == "content_block_delta":  # Anthropic
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self.text.extend(delta[f] for f in ("text", "thinking", "partial_json")
                                 if isinstance(delta.get(f), str))
        elif isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta") \
                and isinstance(obj.get("delta"), str):  # Responses API
            self.text.append(obj["delta"])
        for choice in obj.get("choices") or ():  # chat completions
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    self.text.append(delta["content"])
                for call in delta.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        self.text.append(fn["arguments"])

    def capture_args(self, anthropic_factor: float) -> tuple[Usage | dict[str, Any] | None, int | None]:
        """``(usage, output_seen)`` for ``Engine.capture`` once the final usage arrived: the usage,
        read; or, when it is unreadable, the raw usage (the engine logs which field is bad) and the
        output tokens relayed, so the charge is input + output seen rather than the whole worst
        case. The output is counted only then: a stream with good usage never pays to tokenize."""
        try:
            return read_usage(self.usage), None
        except UnreadableUsage:
            return self.usage, self.output_tokens(anthropic_factor)

    def output_tokens(self, anthropic_factor: float) -> int | None:
        """Tokens of the output seen so far (None if none was seen), for a stream cut short; scaled
        by the same upward factor as the input estimates of a provider whose counts are scaled."""
        for data in self._unread:
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self._texts_of(obj)
        self._unread.clear()
        if not self.text:
            return None
        n = counter("o200k_base").count("".join(self.text))
        return math.ceil(n * anthropic_factor) if self._spec.scaled_counts else n
