"""Image sizes from inline (base64) images, so their tokens can be counted, not assumed.

Only the header is decoded (PNG, JPEG, GIF, WebP). An image whose size cannot be read — a URL, an
unknown format — is counted by the caller at the most an image can cost. A header that *says* the
image has no pixels (0×16) is malformed, not unknown: the provider would reject it, so it is a
:class:`~spendgate.errors.BadRequest` naming the problem (the proxy's 400), never a division by zero.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct

from spendgate.errors import BadRequest

_HEAD_B64_CHARS = 64 * 1024  # enough base64 to reach a JPEG's size marker in practice


def size_of_data_url(url: str) -> tuple[int, int] | None:
    """(width, height) of a ``data:image/…;base64,`` URL, or None when it cannot be read."""
    if not url.startswith("data:") or ";base64," not in url[:100]:
        return None
    b64 = url.split(",", 1)[1][:_HEAD_B64_CHARS]
    b64 = b64[: len(b64) - len(b64) % 4]
    try:
        return size_of(base64.b64decode(b64))
    except (binascii.Error, ValueError):
        return None


def size_of(head: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's first bytes; None when the format or size is unknown.
    Raises BadRequest when the header gives a zero width or height."""
    size, kind = None, ""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        size, kind = struct.unpack(">II", head[16:24]), "PNG"
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        size, kind = struct.unpack("<HH", head[6:10]), "GIF"
    elif head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        size, kind = _webp(head), "WebP"
    elif head.startswith(b"\xff\xd8"):
        size, kind = _jpeg(head), "JPEG"
    if size is None:
        return None
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise BadRequest(f"an inline image is malformed: its {kind} header says {w}×{h} pixels")
    return w, h


def _webp(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8X" and len(head) >= 30:
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if kind == b"VP8 " and len(head) >= 30:
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg(head: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", head[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", head[i + 5:i + 9])
            return int(w), int(h)
        i += 2 + length
    return None


def _check(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise BadRequest(f"an image of {width}×{height} pixels cannot be priced")


def openai_tiles(width: int, height: int) -> int:
    """512-px tiles after OpenAI's resizing: fit in 2048×2048, then the shortest side to 768."""
    _check(width, height)
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h)) if min(w, h) > 0 else 1.0
    w, h = w * scale, h * scale
    return math.ceil(w / 512) * math.ceil(h / 512)


#: Anthropic scales an image down until it bills at most about this many tokens.
ANTHROPIC_IMAGE_MAX = 1600


def anthropic_tokens(width: int, height: int) -> int:
    """Anthropic's documented ``width × height / 750``, after its resizing: a long edge over 1568 px is
    scaled down, and so is any image that would bill more than ~1,600 tokens."""
    _check(width, height)
    scale = min(1.0, 1568 / max(width, height, 1))
    return min(math.ceil(width * scale * height * scale / 750), ANTHROPIC_IMAGE_MAX)
