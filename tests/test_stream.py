"""Stream metering: usage from each provider's events, partial events held back, output counted when cut."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.estimate.tokens import encoding
from spendgate.wire.stream import StreamMeter


def sse(*events: Any, named: bool = False) -> bytes:
    out = b""
    for e in events:
        head = f"event: {e['type']}\n" if named and isinstance(e, dict) and "type" in e else ""
        out += (head + "data: " + (e if isinstance(e, str) else json.dumps(e)) + "\n\n").encode()
    return out


def chunk(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def test_openai_usage_chunk_is_read_and_withheld_and_partial_events_wait() -> None:
    m = StreamMeter("openai", withhold_usage_chunk=True)
    usage = {"prompt_tokens": 7, "completion_tokens": 3}
    raw = sse(chunk("hel"), chunk("lo"), {"choices": [], "usage": usage}, "[DONE]")
    cut = len(sse(chunk("hel"))) + 5
    first = m.feed(raw[:cut])
    assert first == sse(chunk("hel")), "the second event is incomplete: it waits"
    rest = m.feed(raw[cut:]) + m.flush()
    assert b'"usage"' not in first + rest and rest.endswith(b"data: [DONE]\n\n")
    assert m.complete and m.usage == usage


def test_a_cut_stream_counts_the_output_it_produced() -> None:
    m = StreamMeter("openai")
    text = ["The quick brown ", "fox jumps over ", "the lazy dog."]
    m.feed(sse(*(chunk(t) for t in text)))
    assert not m.complete
    assert m.output_tokens(1.0) == len(encoding("o200k_base").encode_ordinary("".join(text)))


def test_anthropic_usage_merges_start_and_delta_and_text_is_scaled() -> None:
    m = StreamMeter("anthropic")
    m.feed(sse({"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1,
                                                               "cache_read_input_tokens": 4}}},
               {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello world"}},
               named=True))
    assert not m.complete
    n = len(encoding("o200k_base").encode_ordinary("hello world"))
    assert m.output_tokens(2.0) == 2 * n
    m.feed(sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 12}}, named=True))
    assert m.complete and m.usage == {"input_tokens": 10, "output_tokens": 12, "cache_read_input_tokens": 4}


def test_responses_completed_carries_usage() -> None:
    m = StreamMeter("openai")
    m.feed(sse({"type": "response.created", "response": {"usage": None}},
               {"type": "response.output_text.delta", "delta": "hi"},
               {"type": "response.completed", "response": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
               named=True))
    assert m.complete and m.usage == {"input_tokens": 5, "output_tokens": 1}


def test_usage_is_read_from_a_body_without_parsing_its_text() -> None:
    from spendgate.usage import parse_usage, usage_from_body

    tricky = {"choices": [{"message": {"content": 'he said "usage": {"prompt_tokens": 999} ' * 50}}],
              "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    got = usage_from_body(json.dumps(tricky).encode())
    assert got == {"usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    u = parse_usage(got)
    assert u is not None and (u.input, u.output) == (12, 3)
    gemini = {"candidates": [], "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2}}
    assert usage_from_body(json.dumps(gemini).encode()) == {"usageMetadata": gemini["usageMetadata"]}
    assert usage_from_body(b'{"id": "x"}') == {"id": "x"}, "no usage: the body itself (charged worst case)"
    assert usage_from_body(b"not json") is None


def _events_by_the_old_rule(raw: bytes) -> tuple[list[bytes], bytes]:
    """The events a stream holds, cut as the meter always cut them: at whichever separator comes
    first, one at a time (the reference for the one-scan cut)."""
    seps, events = (b"\r\n\r\n", b"\n\n"), []
    while True:
        cut = min(((i, len(s)) for s in seps if (i := raw.find(s)) >= 0), default=None)
        if cut is None:
            return events, raw
        end = cut[0] + cut[1]
        events.append(raw[:end])
        raw = raw[end:]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from([b"data: {\"x\":1}", b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n", b"event: e",
                                       b"data: [DONE]", b"data: \xc3\xa9"]), max_size=40),
       cuts=st.lists(st.integers(0, 400), max_size=8))
def test_events_are_cut_where_they_always_were_however_the_bytes_arrive(parts: list[bytes], cuts: list[int]) -> None:
    raw = b"".join(parts)
    bounds = sorted({c for c in cuts if c <= len(raw)} | {0, len(raw)})
    m = StreamMeter("openai")
    relayed = b"".join(m.feed(raw[a:b]) for a, b in itertools.pairwise(bounds))
    events, rest = _events_by_the_old_rule(raw)
    assert relayed == b"".join(events) and m.flush() == rest


def test_an_absurd_but_well_formed_usage_count_is_read_as_the_integer_it_is() -> None:
    """A count past 64 bits is charged as billed (README: usage read strictly): read exactly, never
    turned into a float the strict reader would call unreadable."""
    m = StreamMeter("openai")
    usage = {"prompt_tokens": 2**70, "completion_tokens": 3}
    m.feed(sse({"choices": [], "usage": usage}, "[DONE]"))
    assert m.complete and m.usage == usage and isinstance(m.usage["prompt_tokens"], int)
