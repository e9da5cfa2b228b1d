"""Import prices from a LiteLLM-format JSON (``model_prices_and_context_window.json``).

That file is the community's shared price list; ``spendgate prices update --from FILE`` converts
it into spendgate's own schema and stores it beside the store, where it is consulted before the
bundled table. Numbers are parsed straight to ``Decimal`` (never through a float), and an entry
without both an input and an output price is skipped and counted — never imported as free.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

from spendgate.errors import ConfigError
from spendgate.pricing.table import ModelPrice, Rate

_MTOK = Decimal(1_000_000)
_FIELDS = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cache_read": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
    "reasoning": "output_cost_per_reasoning_token",
}
_TIER = re.compile(r"^(?P<field>[a-z_]+?)_above_(?P<k>\d+)k_tokens$")
_PRICED_MODES = {"chat", "completion", "responses", "embedding", None}


def _rate(entry: dict[str, Any], key: str) -> Rate | None:
    base = entry.get(key)
    if base is None:
        return None
    if not isinstance(base, Decimal | int):
        raise ConfigError(f"{key}: expected a number, got {base!r}")
    tiers = []
    for k, v in entry.items():
        m = _TIER.match(k)
        if m and m.group("field") in (key, key.removesuffix("_per_token")) and v is not None:
            tiers.append((int(m.group("k")) * 1000, Decimal(v) * _MTOK))
    return Rate(Decimal(base) * _MTOK, tuple(sorted(tiers)))


def convert(raw: dict[str, Any], source: str) -> tuple[dict[str, ModelPrice], list[str]]:
    """LiteLLM rows -> prices keyed by lower-case model id; also the ids skipped, and why."""
    out: dict[str, ModelPrice] = {}
    skipped: list[str] = []
    for model_id, entry in raw.items():
        if not isinstance(entry, dict) or model_id == "sample_spec":
            continue
        if entry.get("mode") not in _PRICED_MODES:
            continue
        try:
            rates = {name: _rate(entry, key) for name, key in _FIELDS.items()}
        except ConfigError as exc:
            skipped.append(f"{model_id}: {exc}")
            continue
        inp, outp = rates["input"], rates["output"]
        if inp is None or (outp is None and entry.get("mode") != "embedding"):
            skipped.append(f"{model_id}: no input or output price")
            continue
        max_out = entry.get("max_output_tokens")
        ctx = entry.get("max_input_tokens")
        out[model_id.lower()] = ModelPrice(
            provider=str(entry.get("litellm_provider") or "unknown"),
            model=model_id,
            input=inp,
            output=outp if outp is not None else Rate(Decimal(0)),
            cache_read=rates["cache_read"],
            cache_write=rates["cache_write"],
            cache_write_1h=rates["cache_write_1h"],
            reasoning=rates["reasoning"],
            max_output=int(max_out) if isinstance(max_out, int | Decimal) else None,
            context_window=int(ctx) if isinstance(ctx, int | Decimal) else None,
            source=source,
        )
    return out, skipped


def import_file(src: Path, dest: Path) -> tuple[int, list[str]]:
    """Convert ``src`` and write it to ``dest`` atomically; returns (models imported, skipped)."""
    blob = src.read_bytes()
    try:
        raw = json.loads(blob, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{src}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a JSON object of model ids, got {type(raw).__name__}")
    digest = hashlib.sha256(blob).hexdigest()[:12]
    source = f"imported from {src.name} (sha256 {digest}) on {dt.date.today().isoformat()}"
    prices, skipped = convert(raw, source)
    if not prices:
        raise ConfigError(f"{src}: no model with both an input and an output price")
    doc = {
        "source": source,
        "models": {
            k: {"provider": p.provider, "model": p.model, "rates": p.rates_json(),
                "max_output": p.max_output, "context_window": p.context_window}
            for k, p in prices.items()
        },
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(dest)
    return len(prices), skipped


def load_imported(path: Path) -> dict[str, ModelPrice]:
    """Read what :func:`import_file` wrote."""
    from spendgate.pricing.table import _model_price

    try:
        doc = json.loads(path.read_text())
        return {
            k: _model_price(m["provider"], m["model"], m["rates"], m.get("max_output"),
                            m.get("context_window"), doc["source"], None)
            for k, m in doc["models"].items()
        }
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: imported price file is damaged ({exc}); import it again") from exc
