"""The worst case of an image generation request (``POST /v1/images/generations``).

GPT Image models bill the prompt as text input tokens and each image as image *output* tokens whose
number OpenAI publishes per size and quality (gpt-image-1, gpt-image-1-mini and gpt-image-1.5 alike:
1024x1024 is 272 / 1,056 / 4,160 tokens at low / medium / high; 1024x1536 408 / 1,584 / 6,240;
1536x1024 400 / 1,568 / 6,208), plus 100 image output tokens per partial image a stream asks for.
A request is held at that count × ``n`` for its size and quality; ``auto`` (the default for both) or
a value the table lacks is held at the dearest the table allows. A GPT Image model with no published
count (gpt-image-2 and later take any size) is held at spendgate's fallback maximum output per image,
128K tokens, well above the largest count published for any size (gpt-image-2 high at 3584x2048:
about 12,300). The capture reads the response's ``usage`` (:mod:`spendgate.usage`).

The prompt counts one token per UTF-8 byte: a byte-level BPE count of a text never exceeds its bytes,
and how OpenAI wraps the prompt for the image model is not published, so its o200k count would be a
guess that could be low. Prompts are short (32,000 characters at most), so the bound costs little.

dall-e-2 and dall-e-3 bill per image by size and quality and report no usage: the hold is the exact
price of ``n`` images, and the capture, having no usage to read, charges the hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendgate.errors import BadRequest
from spendgate.estimate.shape import TokenShape, optional_int
from spendgate.pricing.table import FALLBACK_MAX_OUTPUT

#: OpenAI's published image output tokens per image, by quality and size, for the GPT Image models
#: that share one table (the image generation guide's cost table).
GPT_IMAGE_TOKENS: Mapping[str, Mapping[str, int]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
#: The models (and their dated snapshots) billed by :data:`GPT_IMAGE_TOKENS`.
TABLED_MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
#: Image output tokens each partial image of a stream adds (the image generation guide).
PARTIAL_IMAGE_TOKENS = 100
#: Parameters only the GPT Image models take: a request naming no model but one of these is served by
#: a GPT Image model (gpt-image-1), else by dall-e-2 (the API's documented default).
GPT_IMAGE_ONLY = ("background", "moderation", "output_compression", "output_format", "partial_images", "stream")
#: dall-e sizes and qualities: the API's defaults, and what each accepts.
DALLE = {"dall-e-2": ("1024x1024", "standard", ("256x256", "512x512", "1024x1024"), ("standard",)),
         "dall-e-3": ("1024x1024", "standard", ("1024x1024", "1024x1792", "1792x1024"), ("standard", "hd"))}


def is_image_model(model: str) -> bool:
    """A model that generates images on ``/v1/images/generations`` (GPT Image, dall-e)."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return name.startswith(("gpt-image-", "chatgpt-image-", "dall-e-"))


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return "gpt-image-1" if any(k in body for k in GPT_IMAGE_ONLY) else "dall-e-2"
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("`model` must be a string naming the image model")
    return model


def _option(body: Mapping[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise BadRequest(f"`{key}` must be a string, got {v!r}")
    return v


def _base_id(model: str) -> str:
    name = model.strip().lower().rsplit("/", 1)[-1]
    for base in sorted(TABLED_MODELS, key=len, reverse=True):
        if name == base or (name.startswith(base + "-") and name[len(base) + 1:][:1].isdigit()):
            return base
    return name


def tokens_per_image(model: str, size: str | None, quality: str | None) -> tuple[int, str]:
    """The most image output tokens one image of ``model`` at ``size`` and ``quality`` can bill,
    and why: the published count, the dearest one when ``auto`` or unlisted, or the fallback maximum
    for a model with no published count."""
    if _base_id(model) not in TABLED_MODELS:
        return FALLBACK_MAX_OUTPUT, "fallback maximum per image (no published token count)"
    qualities = [quality] if quality is not None and quality in GPT_IMAGE_TOKENS else list(GPT_IMAGE_TOKENS)
    sizes = GPT_IMAGE_TOKENS["high"]
    picked = [size] if size is not None and size in sizes else list(sizes)
    tokens = max(GPT_IMAGE_TOKENS[q][s] for q in qualities for s in picked)
    exact = len(qualities) == 1 and len(picked) == 1
    kind = "published" if exact else "dearest published"
    return tokens, f"{kind} image tokens at {quality or 'auto'} {size or 'auto'}"


def generations(body: Mapping[str, Any]) -> TokenShape:
    """``POST /v1/images/generations``: the prompt as input, ``n`` images as output."""
    model = _model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("`prompt` must be a string")
    n = optional_int(body, "n")
    n = 1 if n is None else n
    if n < 1:
        raise BadRequest(f"`n` must be at least 1, got {n}")
    size, quality = _option(body, "size"), _option(body, "quality")
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name in DALLE:
        default_size, default_quality, sizes, qualities = DALLE[name]
        size, quality = size or default_size, quality or default_quality
        if size not in sizes or quality not in qualities:
            raise BadRequest(f"{name} takes size {', '.join(sizes)} and quality {', '.join(qualities)}; "
                             f"got {size} {quality}")
        return TokenShape(model=model, input_tokens=0, requested_output=0, choices=n, fixed_output=True,
                          per_unit=("image", f"{quality}/{size}", n), output_why=f"{n} image(s) at {quality} {size}")
    per_image, why = tokens_per_image(model, size, quality)
    partial = optional_int(body, "partial_images") or 0
    if partial:
        per_image += PARTIAL_IMAGE_TOKENS * partial
        why += f" + {partial} partial image(s)"
    return TokenShape(model=model, input_tokens=len(prompt.encode()), requested_output=per_image, choices=n,
                      stream=body.get("stream") is True, output_why=why, fixed_output=True)
