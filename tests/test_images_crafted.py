"""An inline image whose header says it has no pixels is malformed: a 400 in the provider's own
envelope naming the problem — not a division by zero (a plain-text 500), not a free image."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from spendgate.errors import BadRequest
from spendgate.estimate.images import anthropic_tokens, openai_tiles, size_of
from spendgate.policy import default_policy
from tests.harness import Servers
from tests.test_images import gif, jpeg, png


def webp_lossy(w: int, h: int) -> bytes:
    """A VP8 (lossy) WebP: its 14-bit sizes can be 0 (VP8X and VP8L store size − 1)."""
    frame = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", w, h)
    body = b"VP8 " + struct.pack("<I", len(frame)) + frame
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


@pytest.mark.parametrize(("make", "kind"), [(png, "PNG"), (jpeg, "JPEG"), (gif, "GIF"), (webp_lossy, "WebP")])
@pytest.mark.parametrize(("w", "h"), [(0, 16), (16, 0), (0, 0)])
def test_a_zero_sized_header_is_malformed_in_every_format(make: Callable[[int, int], bytes], kind: str,
                                                          w: int, h: int) -> None:
    with pytest.raises(BadRequest, match=f"its {kind} header says {w}×{h} pixels"):
        size_of(make(w, h))
    assert size_of(make(3, 5)) == (3, 5)


def test_the_formulas_refuse_a_size_with_no_pixels() -> None:
    for w, h in ((0, 0), (0, 16), (16, 0)):
        with pytest.raises(BadRequest):
            openai_tiles(w, h)
        with pytest.raises(BadRequest):
            anthropic_tokens(w, h)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers(default_policy(), "memory://")
    yield s
    s.close()


def data_url(w: int, h: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(w, h)).decode()


@pytest.mark.parametrize(("w", "h"), [(0, 16), (0, 0)])
@pytest.mark.parametrize("api", ["chat", "responses", "anthropic"])
def test_a_crafted_image_is_a_400_in_the_providers_envelope_and_the_proxy_keeps_serving(
        servers: Servers, api: str, w: int, h: int) -> None:
    s = servers
    before = s.mock.reached()
    oc = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-key", max_retries=0)
    ac = anthropic.Anthropic(base_url=s.url, api_key="sk-ant-test", max_retries=0)
    err: Any
    if api == "chat":
        with pytest.raises(openai.BadRequestError) as e:
            oc.chat.completions.create(model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": data_url(w, h)}}]}])
        err = e.value
    elif api == "responses":
        with pytest.raises(openai.BadRequestError) as e:
            oc.responses.create(model="gpt-4o", max_output_tokens=10, input=[{"role": "user", "content": [
                {"type": "input_text", "text": "what is this?"},
                {"type": "input_image", "image_url": data_url(w, h), "detail": "auto"}]}])
        err = e.value
    else:
        with pytest.raises(anthropic.BadRequestError) as ea:
            ac.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": data_url(w, h).split(",", 1)[1]}}]}])
        err = ea.value
    assert err.status_code == 400 and f"PNG header says {w}×{h} pixels" in err.message
    if api == "anthropic":
        assert err.body["type"] == "error" and err.body["error"]["type"] == "invalid_request_error"
    else:
        assert err.body["type"] == "invalid_request_error"
    assert s.mock.reached() == before, "nothing was sent"
    ok = oc.chat.completions.create(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(16, 16)}}]}])
    assert ok.choices[0].message.content == "hello", "the server keeps serving"
