"""Stream metering: usage from each provider's events, partial events held back, output counted when cut."""

from __future__ import annotations

import json
from typing import Any

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
