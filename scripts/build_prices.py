"""Build spendgate's bundled price table (``src/spendgate/pricing/data/prices.json``).

Prices come from pydantic's ``genai-prices`` (Decimal prices, token tiers, 5-minute and
1-hour cache writes, curated model-id match rules, dated price changes). That package has no
maximum output per model, which spendgate needs to bound a request that names no
``max_tokens``; those come from the LiteLLM-format JSON inside the ``litellm`` wheel. Both are
read as *data* at build time: neither package is a run-time dependency, and the litellm wheel
is only unzipped, never installed or imported.

Run from the repository root (needs network, once, at build time):

    .venv/bin/pip install genai-prices==0.2.3
    .venv/bin/python scripts/build_prices.py
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

PROVIDERS = ("openai", "anthropic", "google", "mistral", "deepseek", "x-ai")
LITELLM_VERSION = "1.109.1"
LITELLM_MEMBER = "litellm/model_prices_and_context_window_backup.json"
OUT = Path(__file__).resolve().parent.parent / "src/spendgate/pricing/data/prices.json"

# genai-prices field -> spendgate rate name
RATE_FIELDS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "cache_write_1h_mtok": "cache_write_1h",
}


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


def _price_periods(model: Any) -> list[dict[str, Any]]:
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
            periods.append({"since": since, "rates": _rates(cp.prices)})
        return periods
    return [{"since": None, "rates": _rates(model.prices)}]


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
    prefixes = {"google": ("gemini/", "vertex_ai/"), "x-ai": ("xai/",)}.get(provider, (f"{provider}/",))
    for mid in ids:
        for key in (mid, *(p + mid for p in prefixes)):
            entry = litellm.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("max_output_tokens"), int):
                return int(entry["max_output_tokens"])
    # LiteLLM often lists only the dated snapshot (claude-opus-4-1-20250805): take the largest.
    alternatives = "|".join(re.escape(i) for i in ids)
    dated = re.compile(rf"^(?:[\w-]+/)?(?:{alternatives})-\d{{8}}$")
    found = [int(v["max_output_tokens"]) for k, v in litellm.items()
             if dated.match(k) and isinstance(v, dict) and isinstance(v.get("max_output_tokens"), int)]
    return max(found) if found else None


def _equals_ids(clause: dict[str, Any]) -> list[str]:
    if "equals" in clause:
        return [clause["equals"]]
    if "starts_with" in clause:
        return [clause["starts_with"]]
    return [i for sub in clause.get("or", []) for i in _equals_ids(sub)]


def build(litellm_json: Path | None) -> dict[str, Any]:
    import importlib.metadata

    from genai_prices import data

    litellm = _litellm_table(litellm_json)
    providers = []
    for p in data.providers:
        if p.id not in PROVIDERS:
            continue
        models = []
        for m in p.models:
            periods = _price_periods(m)
            if any("input" not in q["rates"] or "output" not in q["rates"] for q in periods):
                continue  # not priced per text token (audio, image, realtime): resolves as unknown
            match = _clause(m.match)
            models.append({
                "id": m.id,
                "name": m.name,
                "match": match,
                "context_window": m.context_window,
                "max_output": _max_output(litellm, p.id, [m.id, *_equals_ids(match)]),
                "prices": periods,
            })
        providers.append({
            "id": p.id,
            "name": p.name,
            "model_match": _clause(p.model_match) if p.model_match else None,
            "models": models,
        })
    return {
        "source": {
            "prices": f"genai-prices {importlib.metadata.version('genai-prices')} (pydantic)",
            "max_output": f"litellm {LITELLM_VERSION} model_prices_and_context_window_backup.json",
            "built": dt.date.today().isoformat(),
        },
        "unit": "USD per million tokens",
        "providers": providers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--litellm-json", type=Path, help="use this LiteLLM JSON instead of downloading the wheel")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    table = build(args.litellm_json)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    n = sum(len(p["models"]) for p in table["providers"])
    print(f"wrote {n} models from {len(table['providers'])} providers to {args.out}")


if __name__ == "__main__":
    main()
