"""Image generation through the proxy (``POST /v1/images/generations``): held at the worst case of
the request's ``n``, size and quality, captured from the response's ``usage`` with image output at
the image output rate — every figure computed here from OpenAI's published rates and token counts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate import ledger
from spendgate.demo.background import BackgroundLoop
from spendgate.engine import Engine
from spendgate.estimate import Estimator
from spendgate.money import usd_to_nanos
from spendgate.policy import default_policy, parse
from spendgate.policy.model import Policy
from spendgate.pricing import PriceTable
from spendgate.pricing.cost import usage_nanos
from spendgate.proxy.app import Proxy, ProxyConfig
from spendgate.usage import read_usage

MTOK = Decimal(1_000_000)
#: OpenAI's published prices, USD per Mtok: (text in, image out)
PUBLISHED = {"gpt-image-1": (Decimal(5), Decimal(40)), "gpt-image-1-mini": (Decimal(2), Decimal(8)),
             "gpt-image-1.5": (Decimal(5), Decimal(32))}
#: published image output tokens per image
TOKENS = {("low", "1024x1024"): 272, ("medium", "1024x1536"): 1584, ("high", "1024x1024"): 4160,
          ("high", "1024x1536"): 6240, ("high", "1536x1024"): 6208}


def nanos(usd: Decimal) -> int:
    n = usd * 1_000_000_000
    assert n == n.to_integral_value(), usd
    return int(n)


class ImagesUpstream:
    """OpenAI's images endpoint on loopback: ``x-mock-usage`` is the usage it reports (absent for
    dall-e, which reports none); a streamed request gets its partial images and a completed event."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.generations)
        return app

    async def generations(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        raw = request.headers.get("x-mock-usage")
        usage = json.loads(raw) if raw else None
        n = body.get("n") or 1
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(body.get("partial_images") or 0):
                ev = {"type": "image_generation.partial_image", "b64_json": "AAAA", "partial_image_index": i,
                      "created_at": 1, "size": "1024x1024", "quality": "high", "background": "opaque",
                      "output_format": "png"}
                await resp.write(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode())
            done = {"type": "image_generation.completed", "b64_json": "AAAA", "created_at": 1, "size": "1024x1024",
                    "quality": "high", "background": "opaque", "output_format": "png", "usage": usage}
            await resp.write(f"event: {done['type']}\ndata: {json.dumps(done)}\n\n".encode())
            await resp.write_eof()
            return resp
        out: dict[str, Any] = {"created": 1, "data": [{"b64_json": "AAAA"} for _ in range(n)]}
        if usage is not None:
            out["usage"] = usage
        return web.json_response(out)


class Rig:
    def __init__(self, policy: Policy) -> None:
        self.bg = BackgroundLoop()
        self.upstream = ImagesUpstream()
        self.store = ledger.open("memory://")
        self.engine = Engine(policy, self.store)
        up = self.bg.serve(self.upstream.app())
        self.proxy = Proxy(self.engine, ProxyConfig(upstreams={"openai": f"http://127.0.0.1:{up}"}))
        self.url = f"http://127.0.0.1:{self.bg.serve(self.proxy.app())}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="sk-test-key", max_retries=0)

    def captured(self, raw: Any) -> tuple[int, bool]:
        self.bg.run(self.proxy.settled())
        did = raw.headers["x-spendgate-decision"]
        [ev] = [e for e in self.store.events(0) if e.decision_id == did and e.kind in ("capture", "unknown")]
        return int(ev.cost), bool(ev.estimated)

    def close(self) -> None:
        self.bg.close()
        self.store.close()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = Rig(default_policy())
    yield r
    r.close()


def held(raw: Any) -> int:
    return usd_to_nanos(Decimal(raw.headers["x-spendgate-estimate-usd"]))


def usage(text: int, image_in: int, out: int) -> dict[str, Any]:
    return {"input_tokens": text + image_in, "output_tokens": out, "total_tokens": text + image_in + out,
            "input_tokens_details": {"text_tokens": text, "image_tokens": image_in}}


def generate(rig: Rig, body: dict[str, Any], reported: dict[str, Any] | None) -> tuple[Any, int, bool]:
    extra = {"x-mock-usage": json.dumps(reported)} if reported is not None else {}
    raw = rig.client.images.with_raw_response.generate(**body, extra_headers=extra)
    raw.parse()
    cost, estimated = rig.captured(raw)
    return raw, cost, estimated


@pytest.mark.parametrize(("model", "quality", "size"), [
    ("gpt-image-1", "high", "1024x1024"), ("gpt-image-1", "low", "1024x1024"),
    ("gpt-image-1.5", "medium", "1024x1536"), ("gpt-image-1-mini", "high", "1536x1024"),
])
def test_gpt_image_hold_is_the_published_tokens_and_capture_bills_image_output(
        rig: Rig, model: str, quality: str, size: str) -> None:
    prompt = "a watercolour fox in the snow"
    text_in, image_out = PUBLISHED[model]
    per_image = TOKENS[(quality, size)]
    raw, cost, estimated = generate(rig, {"model": model, "prompt": prompt, "n": 2, "quality": quality,
                                          "size": size}, usage(9, 0, 2 * per_image))
    assert not estimated
    # capture: 9 text tokens at the text rate, every output token at the image output rate
    assert cost == nanos((9 * text_in + 2 * per_image * image_out) / MTOK)
    # hold: the prompt's UTF-8 bytes at the text rate + n x the published tokens at the image rate
    assert held(raw) == nanos((len(prompt.encode()) * text_in + 2 * per_image * image_out) / MTOK)
    assert held(raw) >= cost
    assert rig.upstream.bodies[-1]["n"] == 2


def test_gpt_image_1_5_text_output_is_billed_at_the_text_rate_when_the_usage_splits_it(rig: Rig) -> None:
    reported = {**usage(20, 0, 4160 + 30), "output_tokens_details": {"image_tokens": 4160, "text_tokens": 30}}
    _, cost, _ = generate(rig, {"model": "gpt-image-1.5", "prompt": "a fox", "quality": "high",
                                  "size": "1024x1024"}, reported)
    assert cost == nanos((20 * Decimal(5) + 4160 * Decimal(32) + 30 * Decimal(10)) / MTOK)


def test_auto_size_and_quality_are_held_at_the_dearest_published_image(rig: Rig) -> None:
    raw, cost, _ = generate(rig, {"model": "gpt-image-1", "prompt": "x"}, usage(1, 0, 6240))
    assert held(raw) == nanos((1 * Decimal(5) + 6240 * Decimal(40)) / MTOK)
    assert cost == held(raw)  # the dearest image, billed: the hold was exactly enough


def test_input_images_and_cached_text_in_the_usage_are_billed_at_their_rates(rig: Rig) -> None:
    reported = {**usage(40, 300, 272)}
    reported["input_tokens_details"]["cached_tokens"] = 10
    _, cost, _ = generate(rig, {"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"},
                          reported)
    # 30 uncached text at $5, 10 cached text at $1.25, 300 image in at $10, 272 image out at $40
    assert cost == nanos((30 * Decimal(5) + 10 * Decimal("1.25") + 300 * Decimal(10) + 272 * Decimal(40)) / MTOK)


def test_a_streamed_image_with_partial_images_is_held_for_them_and_captured_from_the_completed_event(
        rig: Rig) -> None:
    reported = usage(5, 0, 4160 + 200)
    raw = rig.client.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a fox", quality="high", size="1024x1024", stream=True, partial_images=2,
        extra_headers={"x-mock-usage": json.dumps(reported)})
    events = list(raw.parse())
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    cost, estimated = rig.captured(raw)
    assert not estimated
    assert cost == nanos((5 * Decimal(5) + 4360 * Decimal(40)) / MTOK)
    assert held(raw) == nanos((len(b"a fox") * Decimal(5) + (4160 + 2 * 100) * Decimal(40)) / MTOK)


def test_a_gpt_image_model_without_published_counts_is_held_at_the_fallback_maximum(rig: Rig) -> None:
    raw, cost, _ = generate(rig, {"model": "gpt-image-2", "prompt": "x", "size": "2048x1152", "quality": "high"},
                            usage(1, 0, 9000))
    assert held(raw) == nanos((1 * Decimal(5) + 128_000 * Decimal(30)) / MTOK)
    assert cost == nanos((1 * Decimal(5) + 9000 * Decimal(30)) / MTOK)


@pytest.mark.parametrize(("body", "usd"), [
    ({"model": "dall-e-3", "quality": "hd", "size": "1792x1024"}, Decimal("0.12")),
    ({"model": "dall-e-3"}, Decimal("0.04")),
    ({"model": "dall-e-2", "size": "256x256", "n": 3}, Decimal("0.048")),
    ({}, Decimal("0.02")),  # no model: the API's default, dall-e-2 at 1024x1024
])
def test_dall_e_is_held_and_charged_its_per_image_price(rig: Rig, body: dict[str, Any], usd: Decimal) -> None:
    raw, cost, _ = generate(rig, {"prompt": "a lighthouse", **body}, None)
    assert held(raw) == nanos(usd)
    assert cost == nanos(usd)  # no usage to read: the hold, which is the exact price


def test_a_budget_that_fits_a_low_image_but_not_a_high_one_refuses_the_high_one() -> None:
    est = Estimator(PriceTable.bundled())
    low = est.estimate("openai", "/v1/images/generations",
                       {"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"})
    limit = Decimal(low.cost_nanos * 2) / 1_000_000_000
    r = Rig(parse({"budget": [{"name": "per-call", "usd": str(limit), "window": "request"}]}))
    try:
        ok, _, _ = generate(r, {"model": "gpt-image-1", "prompt": "x", "quality": "low", "size": "1024x1024"},
                            usage(1, 0, 272))
        assert held(ok) == low.cost_nanos
        with pytest.raises(openai.APIStatusError) as err:
            r.client.images.generate(model="gpt-image-1", prompt="x", quality="high", size="1024x1024")
        assert err.value.status_code == 402
        assert len(r.upstream.bodies) == 1, "the refused request never left"
    finally:
        r.close()


def test_the_bundled_gpt_image_rows_carry_the_published_image_output_rates() -> None:
    table = PriceTable.bundled()
    for model, (text_in, image_out) in PUBLISHED.items():
        res = table.resolve(model, "openai")
        assert res is not None
        assert res.price.input.base == text_in
        assert res.price.output_image is not None and res.price.output_image.base == image_out, model
    batch = table.resolve("gpt-image-1", "openai").price.at_variant({"processing": "batch"}, "2026-12-01")  # type: ignore[union-attr]
    assert batch.output_image is not None and batch.output_image.base == Decimal(20)


def test_images_usage_reads_output_as_image_tokens_but_responses_usage_does_not() -> None:
    img = read_usage({"usage": usage(10, 5, 100)})
    assert (img.input, img.input_image, img.output, img.output_image) == (10, 5, 100, 100)
    resp = read_usage({"usage": {"input_tokens": 10, "output_tokens": 100, "total_tokens": 110,
                                 "input_tokens_details": {"cached_tokens": 0}}})
    assert resp.output_image == 0


def test_a_clamp_rule_cannot_shrink_an_image_and_refuses_it_rather_than_under_hold() -> None:
    r = Rig(parse({"budget": [{"name": "per-call", "usd": "0.05", "window": "request", "action": "clamp",
                               "min_output": 1}]}))
    try:
        with pytest.raises(openai.APIStatusError) as err:  # $0.16642 worst case: over $0.05, not clampable
            r.client.images.generate(model="gpt-image-1", prompt="x", quality="high", size="1024x1024")
        assert err.value.status_code == 402
        assert r.upstream.bodies == [], "never sent (with or without a max_tokens it would ignore)"
    finally:
        r.close()


def test_an_image_body_is_read_as_an_image_request_by_spendgate_estimate() -> None:
    from spendgate import providers

    spec = providers.get("openai")
    assert spec.route_for({"model": "gpt-image-1", "prompt": "x"}) == "/v1/images/generations"
    assert spec.route_for({"prompt": "x", "size": "256x256"}) == "/v1/images/generations"
    assert spec.route_for({"model": "gpt-3.5-turbo-instruct", "prompt": "x"}) == "/v1/completions"


@given(model=st.sampled_from(sorted(PUBLISHED)), quality=st.sampled_from(["low", "medium", "high", "auto", None]),
       size=st.sampled_from(["1024x1024", "1024x1536", "1536x1024", "auto", None]), n=st.integers(1, 10),
       prompt=st.text(max_size=200), cached=st.integers(0, 50))
@settings(max_examples=300, deadline=None)
def test_the_hold_bounds_every_capture_the_published_counts_allow(model: str, quality: str | None, size: str | None,
                                                                   n: int, prompt: str, cached: int) -> None:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "n": n}
    if quality:
        body["quality"] = quality
    if size:
        body["size"] = size
    est = Estimator(PriceTable.bundled()).estimate("openai", "/v1/images/generations", body)
    # the most the provider can bill: every prompt byte a text token, the dearest image it may make
    q = [quality] if quality in ("low", "medium", "high") else ["low", "medium", "high"]
    s = [size] if size in ("1024x1024", "1024x1536", "1536x1024") else ["1024x1024", "1024x1536", "1536x1024"]
    worst_out = n * max(tok for (qq, ss), tok in _ALL_TOKENS.items() if qq in q and ss in s)
    text = len(prompt.encode())
    reported = usage(text, 0, worst_out)
    reported["input_tokens_details"]["cached_tokens"] = min(cached, text)
    price = PriceTable.bundled().resolve(model, "openai").price  # type: ignore[union-attr]
    assert est.cost_nanos >= usage_nanos(price, read_usage(reported))


_ALL_TOKENS = {(q, s): t for q, row in {"low": (272, 408, 400), "medium": (1056, 1584, 1568),
                                        "high": (4160, 6240, 6208)}.items()
               for s, t in zip(("1024x1024", "1024x1536", "1536x1024"), row, strict=True)}
