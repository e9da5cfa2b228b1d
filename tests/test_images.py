"""Inline image sizes read from their headers, and the providers' documented token formulas."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from spendgate.estimate import anthropic, openai
from spendgate.estimate.images import anthropic_tokens, openai_tiles, size_of, size_of_data_url


def png(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00"


def webp(w: int, h: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (w - 1).to_bytes(3, "little") + \
        (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


@pytest.mark.parametrize("make", [png, jpeg, gif, webp])
def test_sizes_are_read_from_each_format(make: object) -> None:
    assert size_of(make(1234, 567)) == (1234, 567)  # type: ignore[operator]


def test_openai_tiling_matches_the_documented_examples() -> None:
    assert openai_tiles(1024, 1024) == 4  # 765 tokens on gpt-4o
    assert openai_tiles(2048, 4096) == 6  # 1105 tokens


def test_anthropic_formula_and_cap() -> None:
    assert anthropic_tokens(1092, 1092) == 1590
    assert anthropic_tokens(200, 200) == 54
    assert anthropic_tokens(8000, 6000) == 1600


def _data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def test_inline_images_are_counted_by_size_and_unknown_ones_at_the_worst() -> None:
    def chat(url: str, detail: str = "auto") -> int:
        return openai.chat({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]}).input_tokens

    empty = openai.chat({"model": "gpt-4o", "messages": [{"role": "user", "content": []}]}).input_tokens
    assert chat(_data_url(png(1024, 1024))) - empty == 765
    assert chat(_data_url(jpeg(2048, 4096), "jpeg")) - empty == 1105
    assert chat("https://example.invalid/cat.png") - empty == openai.IMAGE_WORST
    assert chat(_data_url(b"not an image")) - empty == openai.IMAGE_WORST
    assert size_of_data_url("data:image/png;base64,!!!") is None

    def claude(data: bytes) -> int:
        return anthropic.messages({"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": base64.b64encode(data).decode()}}]}]}
        ).input_tokens

    base = anthropic.messages({"model": "claude-sonnet-4-5", "max_tokens": 1,
                               "messages": [{"role": "user", "content": []}]}).input_tokens
    assert claude(png(200, 200)) - base == 54
    assert claude(b"garbage") - base == anthropic.IMAGE_WORST
