"""Build spendgate's bundled price table (``src/spendgate/pricing/data/prices.json``).

Prices come from pydantic's ``genai-prices`` (Decimal prices, token tiers, 5-minute and
1-hour cache writes, curated model-id match rules, dated price changes, and ``price_variants``:
service tier, Anthropic speed, batch processing — each with its start date; audio, image and video
token rates; web-search and file-search fees per 1,000 requests). That package has no maximum
output per model, which spendgate needs to bound a request that names no ``max_tokens``; those
come from the LiteLLM-format JSON inside the ``litellm`` wheel and the providers' documented
limits, whichever is larger. OpenAI, Anthropic and Google models that only LiteLLM prices per
token are added from it (with its ``_priority`` / ``_flex`` / ``_batches`` rates as variants);
what neither source prices per token (per image, second or character) or prices at $0 is left
out and listed. Both are read as *data* at build time: neither package is a run-time dependency,
and the litellm wheel is only unzipped, never installed or imported.

Run from the repository root (needs network, once, at build time):

    .venv/bin/pip install --target /tmp/gp genai-prices==0.2.3
    PYTHONPATH=/tmp/gp .venv/bin/python scripts/build_prices.py [-v] [--litellm-json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

PROVIDERS = ("openai", "anthropic", "google", "mistral", "deepseek", "x-ai", "aws")
#: genai-prices provider id -> the table's id, where they differ (AWS Bedrock's rows are ``bedrock``'s)
TABLE_IDS = {"aws": "bedrock"}
#: Model ids only that provider serves, whatever rows elsewhere match them: Bedrock's model ids and
#: inference profiles (``[us.|eu.|apac.|global.…]vendor.model…``) are priced from its rows or not at
#: all — never from a row of the vendor's own API (Anthropic's) or a reseller's (Claude on Vertex).
#: A provider that owns ids is consulted for no other id unless a request names it.
OWNS = {"aws": {"regex": r"^(?:(?:us|eu|apac|au|jp|in|ca|us-gov|global|regional)\.)?"
                         r"(?:anthropic|amazon|meta|mistral|cohere|ai21|deepseek|openai|qwen|writer|google|"
                         r"nvidia|moonshotai|zai|minimax|twelvelabs|stability|luma)\.[a-z0-9]"}}
LITELLM_VERSION = "1.109.1"
LITELLM_MEMBER = "litellm/model_prices_and_context_window_backup.json"
OUT = Path(__file__).resolve().parent.parent / "src/spendgate/pricing/data/prices.json"

# genai-prices field -> spendgate rate name (USD per million tokens; ``*_k``: USD per 1,000 requests)
RATE_FIELDS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "cache_write_1h_mtok": "cache_write_1h",
    "input_audio_mtok": "input_audio",
    "output_audio_mtok": "output_audio",
    "cache_audio_read_mtok": "cache_audio_read",
    "input_image_mtok": "input_image",
    "output_image_mtok": "output_image",
    "cache_image_read_mtok": "cache_image_read",
    "input_video_mtok": "input_video",
    "output_video_mtok": "output_video",
    "web_searches_kcount": "web_search_k",
    "storage_searches_kcount": "file_search_k",
}
#: Units priced per hour of audio or per character (whisper, tts): not token-priced, so kept apart as
#: per-unit prices (``per_unit``: USD per minute, per character), which routes priced per unit and
#: ``spendgate prices show`` read.
UNTOKENED = {"audio_hours": ("minute", Decimal(60)), "input_audio_hours": ("minute", Decimal(60)),
             "input_mchars": ("character", Decimal(1_000_000))}
#: Models OpenAI prices per image by size and quality, from its published price list (the sources
#: carry none of them): dall-e-2 and dall-e-3, which OpenAI retired from its own API on 2026-05-12
#: and OpenAI-compatible and Azure upstreams may still serve. Option: ``quality/size``.
DOCUMENTED_PER_IMAGE = {
    "dall-e-3": {"standard/1024x1024": "0.04", "standard/1024x1792": "0.08", "standard/1792x1024": "0.08",
                 "hd/1024x1024": "0.08", "hd/1024x1792": "0.12", "hd/1792x1024": "0.12"},
    "dall-e-2": {"standard/256x256": "0.016", "standard/512x512": "0.018", "standard/1024x1024": "0.02"},
}
DOCUMENTED_PER_IMAGE_SOURCE = "OpenAI's published per-image prices (openai.com/api/pricing, 2023-11-06 to retirement)"
#: Per-token rates LiteLLM has for a model genai-prices lists without them (gpt-4o-audio-preview's
#: audio rates, gpt-image-1's image output rate): merged into the genai-prices row, never replacing a
#: rate it has. Only these kinds: a model's text rates stay genai-prices'.
MERGED_UNIT_RATES = ("input_audio", "output_audio", "cache_audio_read", "input_image", "output_image",
                     "cache_image_read")
#: Maximum output per the providers' own model pages, where LiteLLM has none or has less
#: (claude-3-7-sonnet: 128K with the output-128k beta header; Gemini 2.5+: 65,536, LiteLLM says 65,535).
#: A bound is the larger of this and LiteLLM's, never smaller than either.
DOCUMENTED_MAX_OUTPUT = {
    "claude-2": 4_096, "claude-v1": 4_096, "claude-3-haiku": 4_096, "claude-3-opus-latest": 4_096,
    "claude-3-sonnet": 4_096, "claude-3-5-haiku-latest": 8_192, "claude-3-5-sonnet": 8_192,
    "claude-3-7-sonnet-latest": 128_000, "claude-3-7-sonnet": 128_000,
    "claude-opus-4-0": 32_000, "claude-4-opus": 32_000, "claude-opus-4-1": 32_000,
    "claude-sonnet-4-0": 64_000, "claude-4-sonnet": 64_000,
    "gemini-1.5-flash": 8_192, "gemini-1.5-pro": 8_192, "gemini-flash-1.5": 8_192,
    "gemini-flash-1.5-8b": 8_192, "gemini-pro-1.5": 8_192, "gemini-2.0-flash": 8_192,
    "gemini-2.0-flash-lite": 8_192, "gemini-pro": 8_192, "gemini-1.0-pro-vision-001": 2_048,
}
#: LiteLLM providers whose rows are OpenAI's, Anthropic's or Google's own, and the table's id for them.
LITELLM_PROVIDERS = {"openai": "openai", "text-completion-openai": "openai", "anthropic": "anthropic",
                     "gemini": "google", "vertex_ai-language-models": "google"}
#: The modes the table covers (chat, responses, embedding, image, audio).
LITELLM_MODES = {"chat", "responses", "completion", "embedding", "image_generation", "realtime",
                 "audio_speech", "audio_transcription"}


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f")


def _rate(value: Any) -> Any:
    from genai_prices import types

    if isinstance(value, types.TieredPrices):
        return {"base": _num(value.base), "tiers": [[t.start, _num(t.price)] for t in value.tiers]}
    return _num(Decimal(value))


def _clause(c: Any) -> Any:
    from genai_prices import types

    if isinstance(c, types.ClauseEquals):
        return {"equals": c.equals}
    if isinstance(c, types.ClauseStartsWith):
        return {"starts_with": c.starts_with}
    if isinstance(c, types.ClauseEndsWith):
        return {"ends_with": c.ends_with}
    if isinstance(c, types.ClauseContains):
        return {"contains": c.contains}
    if isinstance(c, types.ClauseRegex):
        return {"regex": c.regex}
    if isinstance(c, types.ClauseOr):
        return {"or": [_clause(x) for x in c.or_]}
    if isinstance(c, types.ClauseAnd):
        return {"and": [_clause(x) for x in c.and_]}
    raise TypeError(f"unknown match clause {c!r}")


def _rates(model_price: Any) -> dict[str, Any]:
    out = {}
    for src, dst in RATE_FIELDS.items():
        v = getattr(model_price, src, None)
        if v is not None:
            out[dst] = _rate(v)
    return out


def _complete(rates: dict[str, Any], note: list[str]) -> dict[str, Any]:
    """Rates with an ``input`` and an ``output`` price, filled conservatively where the source has
    none: an embedding (no output tokens) or an image/audio model (output priced per image or audio
    token) gets the dearest rate it has, never zero."""
    if "input" not in rates:
        for alt in ("input_audio", "input_image"):
            if alt in rates:
                rates["input"] = rates[alt]
                note.append(f"text input priced at the {alt} rate (the source has no text input price)")
                break
    if "output" not in rates and "input" in rates:
        alts = [k for k in ("output_image", "output_audio", "output_video") if k in rates]
        pick = max(alts, key=lambda k: Decimal(_base(rates[k]))) if alts else "input"
        rates["output"] = rates[pick]
        note.append(f"output priced at the {pick} rate (the source has no text output price)")
    return rates


def _base(rate: Any) -> str:
    return str(rate["base"]) if isinstance(rate, dict) else str(rate)


def _price_periods(model: Any, note: list[str]) -> list[dict[str, Any]]:
    """Dated price periods, oldest first; the resolver picks the last one already in force."""
    from genai_prices import types

    if isinstance(model.prices, list):
        periods = []
        for cp in model.prices:
            since = None
            if isinstance(cp.constraint, types.StartDateConstraint):
                since = cp.constraint.start_date.isoformat()
            elif cp.constraint is not None:
                continue  # time-of-day discounts never raise a worst case; skip them
            periods.append({"since": since, "rates": _complete(_rates(cp.prices), note)})
        return periods
    return [{"since": None, "rates": _complete(_rates(model.prices), note)}]


def _variants(model: Any) -> list[dict[str, Any]]:
    """genai-prices' ``price_variants`` (service tier, speed, batch processing): partial rates that
    replace the standard ones when the request (or the response's served tier) matches ``when``."""
    from genai_prices import types

    out = []
    for v in model.price_variants or ():
        since = None
        if isinstance(v.constraint, types.StartDateConstraint):
            since = v.constraint.start_date.isoformat()
        elif v.constraint is not None:
            continue
        out.append({"when": dict(v.when), "since": since, "rates": _rates(v.prices)})
    return out


def _litellm_table(path: Path | None) -> dict[str, Any]:
    if path is not None:
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
             f"litellm=={LITELLM_VERSION}"],
            check=True,
        )
        wheel = next(Path(tmp).glob("litellm-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            return json.loads(zf.read(LITELLM_MEMBER))


def _max_output(litellm: dict[str, Any], provider: str, ids: list[str]) -> int | None:
    """The largest maximum output any source gives for ``ids``: LiteLLM's rows under every prefix
    and dated snapshot, and the providers' documented limits. Never the smaller of two sources."""
    prefixes = {"google": ("gemini/", "vertex_ai/"), "x-ai": ("xai/",), "aws": ("bedrock/", "bedrock/converse/")
                }.get(provider, (f"{provider}/",))
    if provider == "aws":  # genai-prices' ``regional.`` rows are LiteLLM's un-prefixed and ``us.`` ids
        bare = [i.removeprefix("regional.") for i in ids]
        ids = [*ids, *bare, *(f"us.{i}" for i in bare if not i.startswith("global."))]
    found = [DOCUMENTED_MAX_OUTPUT[i] for i in ids if i in DOCUMENTED_MAX_OUTPUT]
    for mid in ids:
        for key in (mid, *(p + mid for p in prefixes)):
            entry = litellm.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("max_output_tokens"), int):
                found.append(int(entry["max_output_tokens"]))
    # LiteLLM often lists only the dated snapshot (claude-opus-4-1-20250805)
    alternatives = "|".join(re.escape(i) for i in ids)
    dated = re.compile(rf"^(?:[\w-]+/)?(?:{alternatives})-\d{{8}}$")
    found += [int(v["max_output_tokens"]) for k, v in litellm.items()
              if dated.match(k) and isinstance(v, dict) and isinstance(v.get("max_output_tokens"), int)]
    if not found:
        return None
    best = max(found)
    return 65_536 if best == 65_535 else best  # Gemini's documented limit is 2**16; LiteLLM says 65,535


def _equals_ids(clause: dict[str, Any]) -> list[str]:
    if "equals" in clause:
        return [clause["equals"]]
    if "starts_with" in clause:
        return [clause["starts_with"]]
    return [i for sub in clause.get("or", []) for i in _equals_ids(sub)]


# -- LiteLLM rows genai-prices lacks ---------------------------------------------------------------

_MTOK = Decimal(1_000_000)
_LITELLM_RATES = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cache_read": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
    "input_audio": "input_cost_per_audio_token",
    "output_audio": "output_cost_per_audio_token",
    "cache_audio_read": "cache_read_input_audio_token_cost",
    "input_image": "input_cost_per_image_token",
    "output_image": "output_cost_per_image_token",
    "cache_image_read": "cache_read_input_image_token_cost",
    "output_reasoning": "output_cost_per_reasoning_token",
}
_LITELLM_VARIANTS = {"priority": {"service_tier": "priority"}, "flex": {"service_tier": "flex"},
                     "batches": {"processing": "batch"}}


def _litellm_rate(entry: dict[str, Any], key: str, suffix: str = "") -> Any:
    v = entry.get(key + suffix)
    if not isinstance(v, int | float | Decimal) or isinstance(v, bool):
        return None
    base = _num(Decimal(str(v)) * _MTOK)
    tiers = []
    stem = key.removesuffix("_per_token")
    for k, tv in entry.items():
        m = re.match(rf"^(?:{re.escape(key)}|{re.escape(stem)})_above_(\d+)k_tokens{re.escape(suffix)}$", k)
        if m and isinstance(tv, int | float):
            tiers.append([int(m.group(1)) * 1000, _num(Decimal(str(tv)) * _MTOK)])
    return {"base": base, "tiers": sorted(tiers)} if tiers else base


def _litellm_row(key: str, entry: dict[str, Any]) -> dict[str, Any] | str:
    """A table row for a LiteLLM entry, or why it is left out."""
    rates = {}
    zero: list[str] = []
    for name, field in _LITELLM_RATES.items():
        r = _litellm_rate(entry, field)
        if r is None or name == "output_reasoning":
            continue
        if Decimal(_base(r)) == 0:
            if name == "output" and entry.get("mode") == "embedding":
                continue  # an embedding has no output tokens; its $0 output is no price at all
            if name not in ("input", "output"):
                # a $0 cache-read or audio rate beside priced text (gemini-robotics-er-1.5-preview):
                # left out, so those tokens cost what a text token does, never nothing
                zero.append(name)
                continue
            return f"{entry.get('mode')}: {field} is $0 (a free tier is not a price)"
        rates[name] = r
    note: list[str] = [f"{', '.join(zero)} listed at $0 by LiteLLM: charged at the text rate"] if zero else []
    rates = _complete(rates, note)
    if "input" not in rates or "output" not in rates:
        return f"{entry.get('mode')}: not priced per token"
    variants = []
    for suffix, when in _LITELLM_VARIANTS.items():
        vr = {n: r for n, f in _LITELLM_RATES.items() if n != "output_reasoning"
              and (r := _litellm_rate(entry, f, "_" + suffix)) is not None}
        if vr:
            variants.append({"when": when, "since": None, "rates": vr})
    model_id = key.split("/", 1)[-1]
    out = entry.get("max_output_tokens")
    return {
        "id": model_id,
        "name": model_id,
        "match": {"equals": model_id.lower()},
        "context_window": entry.get("max_input_tokens") if isinstance(entry.get("max_input_tokens"), int) else None,
        "max_output": (65_536 if out == 65_535 else out) if isinstance(out, int) else None,
        "source": f"litellm {LITELLM_VERSION} ({entry.get('mode')})",
        "prices": [{"since": None, "rates": rates}],
        **({"variants": variants} if variants else {}),
        **({"note": "; ".join(note)} if note else {}),
    }


def _coverage(table: dict[str, Any], litellm: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """LiteLLM's OpenAI/Anthropic/Google rows the table does not resolve: the token-priced ones to
    add, and the rest (priced per second, character or image only) to report."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from spendgate.pricing.table import PriceTable

    resolver = PriceTable.from_json(table)
    add: dict[str, list[dict[str, Any]]] = {}
    left_out = []
    seen: set[tuple[str, str]] = set()
    for key, entry in sorted(litellm.items()):
        if not isinstance(entry, dict) or entry.get("mode") not in LITELLM_MODES:
            continue
        prov = LITELLM_PROVIDERS.get(str(entry.get("litellm_provider")))
        if prov is None:
            continue
        model_id = key.split("/", 1)[-1].lower()
        if (prov, model_id) in seen or resolver.resolve(model_id, prov) is not None \
                or resolver.unit_price(model_id, prov) is not None:
            continue
        seen.add((prov, model_id))
        row = _litellm_row(key, entry)
        summary = model_id.rsplit("/", 1)[-1]
        if isinstance(row, str) and "/" in model_id and resolver.resolve(summary, prov) is not None:
            left_out.append(f"{prov}/{model_id} (a per-image summary of {summary}, priced by its image tokens)")
        elif isinstance(row, str):
            left_out.append(f"{prov}/{model_id} ({row})")
        else:
            add.setdefault(prov, []).append(row)
    return add, left_out


def _litellm_entries(litellm: dict[str, Any], provider: str, ids: list[str]) -> list[dict[str, Any]]:
    """LiteLLM's rows for ``ids`` of ``provider``: the ids themselves, with or without a provider
    prefix, and their dated snapshots (``gpt-4o-audio-preview-2024-12-17``)."""
    alternatives = "|".join(re.escape(i.lower()) for i in ids)
    rx = re.compile(rf"^(?:[\w-]+/)?(?:{alternatives})(?:-\d{{4}}-\d{{2}}-\d{{2}}|-\d{{8}})?$")
    return [v for k, v in litellm.items() if isinstance(v, dict) and rx.match(k.lower())
            and LITELLM_PROVIDERS.get(str(v.get("litellm_provider"))) == TABLE_IDS.get(provider, provider)]


def _merge_units(litellm: dict[str, Any], provider: str, ids: list[str], periods: list[dict[str, Any]],
                 variants: list[dict[str, Any]], note: list[str]) -> list[str]:
    """Merge the audio and image token rates LiteLLM has for a model into genai-prices' row where
    that row lacks them (:data:`MERGED_UNIT_RATES`); of several LiteLLM snapshots, the dearest rate.
    genai-prices lists a GPT Image model's image output rate as its ``output`` when it has no text
    output (gpt-image-1: $40): the merged ``output_image`` equals it, and each variant (batch) gets
    its own ``output`` as its ``output_image`` too. Returns what was merged, for the build report."""
    entries = _litellm_entries(litellm, provider, ids)
    merged = []
    for name in MERGED_UNIT_RATES:
        found = [r for e in entries if (r := _litellm_rate(e, _LITELLM_RATES[name])) is not None]
        if not found:
            continue
        rate = max(found, key=lambda r: Decimal(_base(r)))
        applied = False
        for period in periods:
            if name not in period["rates"]:
                period["rates"][name] = rate
                applied = True
        if not applied:
            continue
        merged.append(f"{name} {_base(rate)}")
        if name == "output_image":
            standard = periods[-1]["rates"]
            if _base(standard.get("output", "")) == _base(rate):
                for v in variants:
                    if "output" in v["rates"] and "output_image" not in v["rates"]:
                        v["rates"]["output_image"] = v["rates"]["output"]
    if merged:
        note.append(f"{', '.join(merged)} per Mtok from litellm {LITELLM_VERSION} (genai-prices lacks them)")
    return merged


def _per_unit(model: Any, match: Any) -> dict[str, Any] | None:
    """A per-unit price row (per minute of audio, per character) for a genai-prices model priced in
    :data:`UNTOKENED` units only; None when it has token prices or none at all."""
    prices = model.prices if not isinstance(model.prices, list) else None
    if prices is None:
        return None
    found: dict[str, Decimal] = {}
    for field, (unit, per) in UNTOKENED.items():
        v = getattr(prices, field, None)
        if v is not None:
            found[unit] = max(found.get(unit, Decimal(0)), Decimal(v) / per)
    if len(found) != 1:
        return None
    [(unit, price)] = found.items()
    return {"id": model.id, "match": match, "unit": unit, "prices": {"": _num(price)},
            "source": f"genai-prices {_genai_version()} (pydantic)", "since": None}


def _genai_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("genai-prices")


def build(litellm_json: Path | None) -> tuple[dict[str, Any], list[str]]:
    import importlib.metadata

    from genai_prices import data

    litellm = _litellm_table(litellm_json)
    report: list[str] = []
    providers = []
    for p in data.providers:
        if p.id not in PROVIDERS:
            continue
        models = []
        per_unit = []
        for m in p.models:
            note: list[str] = []
            periods = _price_periods(m, note)
            match = _clause(m.match)
            if any("input" not in q["rates"] or "output" not in q["rates"] for q in periods):
                unit_row = _per_unit(m, match)
                if unit_row is not None:
                    per_unit.append(unit_row)
                    report.append(f"genai-prices {p.id}/{m.id}: priced per {unit_row['unit']}, not per token")
                else:
                    report.append(f"genai-prices {p.id}/{m.id}: left out, not priced per token")
                continue
            ids = [m.id, *_equals_ids(match)]
            native = p.model_match is None or _matches(p.model_match, m.id)
            variants = _variants(m)
            merged = _merge_units(litellm, p.id, ids, periods, variants, note)
            if merged:
                report.append(f"genai-prices {p.id}/{m.id}: {', '.join(merged)} merged from LiteLLM")
            models.append({
                "id": m.id,
                "name": m.name,
                "match": match,
                "context_window": m.context_window,
                "max_output": _max_output(litellm, p.id, ids),
                "prices": periods,
                **({"variants": variants} if variants else {}),
                **({"note": "; ".join(note)} if note else {}),
                **({} if native else {"native": False}),
            })
        if p.id == "openai":
            known = {u["id"] for u in per_unit}
            per_unit.extend({"id": mid, "match": {"equals": mid}, "unit": "image", "prices": dict(prices),
                             "source": DOCUMENTED_PER_IMAGE_SOURCE, "since": "2023-11-06"}
                            for mid, prices in DOCUMENTED_PER_IMAGE.items() if mid not in known)
            for alias in _dated_unit_aliases(per_unit, litellm):
                report.append(f"litellm openai/{alias}: a snapshot of a per-unit model at its price, matched to it")
        providers.append({
            "id": TABLE_IDS.get(p.id, p.id),
            "name": p.name,
            "model_match": _clause(p.model_match) if p.model_match else None,
            **({"owns": OWNS[p.id]} if p.id in OWNS else {}),
            "models": models,
            **({"per_unit": per_unit} if per_unit else {}),
        })
    # a provider that owns ids is searched after every other one for an id that names no provider
    providers.sort(key=lambda prov: "owns" in prov)
    built = dt.date.today().isoformat()
    table = {
        "source": {
            "prices": f"genai-prices {importlib.metadata.version('genai-prices')} (pydantic)",
            "max_output": f"litellm {LITELLM_VERSION} model_prices_and_context_window_backup.json "
                          "and the providers' documented limits",
            "built": built,
        },
        "unit": "USD per million tokens (*_k: USD per 1,000 requests)",
        "providers": providers,
    }
    add, left_out = _coverage(table, litellm)
    for prov in providers:
        extra = add.get(prov["id"], [])
        prov["models"].extend(extra)
        for row in extra:
            report.append(f"litellm {prov['id']}/{row['id']}: not in genai-prices, added from LiteLLM")
    report.extend(f"litellm {x}: left out" for x in left_out)
    report.extend(_unread_fields(litellm))
    for prov in providers:
        for row in prov["models"]:
            if _grounding_per_prompt(prov["id"], row["id"]):
                row["web_search_per"] = "prompt"
    return table, report


def _dated_unit_aliases(per_unit: list[dict[str, Any]], litellm: dict[str, Any]) -> list[str]:
    """LiteLLM's snapshots of an OpenAI model priced per character (``tts-1-1106``, ``tts-1-hd-1106``:
    the base id and a 4-digit ``MMDD`` suffix, which the resolver does not strip) at the same price as
    the base row: added to that row's match. A snapshot at another price is left out, never priced
    as its base."""
    added = []
    for row in per_unit:
        if row["unit"] != "character" or set(row["prices"]) != {""}:
            continue
        for key, entry in litellm.items():
            if not isinstance(entry, dict) or entry.get("litellm_provider") != "openai":
                continue
            m = re.fullmatch(re.escape(row["id"]) + r"-\d{4}", key)
            cost = entry.get("input_cost_per_character")
            if m is None or not isinstance(cost, int | float) or Decimal(str(cost)) != Decimal(row["prices"][""]):
                continue
            row["match"] = {"or": [*row["match"].get("or", [row["match"]]), {"equals": key}]}
            added.append(key)
    return added


#: Gemini 1.x and 2.x models: Google bills Grounding with Google Search once per grounded prompt
#: ($35 per 1,000), whatever the model searched; Gemini 3 and later per search query the model runs
#: ($14 per 1,000). genai-prices has the fee (``web_searches_kcount``) but not what it counts, so the
#: unit is set here from Google's pricing pages (https://ai.google.dev/gemini-api/docs/pricing,
#: https://cloud.google.com/vertex-ai/generative-ai/pricing — "per 1,000 grounded prompts" for the
#: 2.x models, "per 1,000 search queries" for the 3.x ones; read 2026-12-03). A row it does not mark
#: is charged per search, the larger hold.
_PER_PROMPT_GROUNDING = re.compile(r"^gemini-[12](?:[.-]|$)")


def _grounding_per_prompt(provider: str, model_id: str) -> bool:
    return provider == "google" and _PER_PROMPT_GROUNDING.match(model_id) is not None


#: LiteLLM cost fields the build reads (per token, per image/character/second for left-out rows)
_READ_FIELDS = {*_LITELLM_RATES.values(), "input_cost_per_image", "input_cost_per_pixel", "output_cost_per_pixel",
                "input_cost_per_character", "input_cost_per_second", "output_cost_per_second"}


def _unread_fields(litellm: dict[str, Any]) -> list[str]:
    """The cost fields LiteLLM gives OpenAI, Anthropic and Google rows that the table has no rate for
    (per-query search context, Maps grounding, code interpreter sessions…), with how many rows give
    each: what that source has that the table lacks, beyond whole models."""
    counts: dict[str, int] = {}
    for entry in litellm.values():
        if not isinstance(entry, dict) or LITELLM_PROVIDERS.get(str(entry.get("litellm_provider"))) is None:
            continue
        for field, v in entry.items():
            # a number, or a table of them (search context cost per query, by context size)
            priced = (isinstance(v, int | float) and v > 0) or (isinstance(v, dict) and bool(v))
            if ("cost" in field or "price" in field) and priced:
                stem = re.sub(r"(?:_above_\d+k_tokens|_priority|_flex|_batches|_above_1hr)+$", "", field)
                if field not in _READ_FIELDS and stem not in _READ_FIELDS:
                    counts[stem] = counts.get(stem, 0) + 1
    return [f"litellm field {f} ({n} OpenAI/Anthropic/Google rows): not in the table"
            for f, n in sorted(counts.items())]


def _matches(clause: Any, model_id: str) -> bool:
    from genai_prices import types

    if isinstance(clause, types.ClauseOr):
        return any(_matches(c, model_id) for c in clause.or_)
    c = _clause(clause)
    if "contains" in c:
        return bool(c["contains"] in model_id)
    if "starts_with" in c:
        return model_id.startswith(c["starts_with"])
    if "equals" in c:
        return bool(model_id == c["equals"])
    if "regex" in c:
        return re.search(c["regex"], model_id) is not None
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--litellm-json", type=Path, help="use this LiteLLM JSON instead of downloading the wheel")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="list every model each source has that the table lacks")
    args = ap.parse_args()
    table, report = build(args.litellm_json)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    n = sum(len(p["models"]) for p in table["providers"])
    added = sum(1 for r in report if r.endswith("added from LiteLLM"))
    lacking = [r for r in report if r.endswith("left out") or "left out," in r or r.endswith("not in the table")]
    print(f"wrote {n} models from {len(table['providers'])} providers to {args.out}")
    print(f"{added} models only LiteLLM prices were added; {len(lacking)} models the sources have are "
          "not in the table (not priced per token, or $0):")
    for line in (report if args.verbose else lacking):
        print(f"  {line}")


if __name__ == "__main__":
    main()
