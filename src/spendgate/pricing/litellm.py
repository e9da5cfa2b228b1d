"""Import prices from a LiteLLM-format JSON (``model_prices_and_context_window.json``).

That file is the community's shared price list; ``spendgate prices update --from FILE`` converts
it into spendgate's own schema and stores it beside the store, where it is consulted before the
bundled table. Numbers are parsed straight to ``Decimal`` (never through a float), and an entry
without both an input and an output price is skipped and counted — never imported as free.

An import merges, field by field, over the price in force: a rate the file gives replaces that
rate's base (and the tiers the file lists), while tiers, cache rates and variants the file lacks
stay (LiteLLM's claude-sonnet-4-5 row has no >200K tier; the bundled one stays in force). A
negative price refuses the whole file; a $0 price on a model the table prices does too, unless
``allow_free``. Every rate that changes is reported, the ones that went down first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from spendgate.errors import ConfigError
from spendgate.pricing.table import PER_SEARCH, RATE_NAMES, UNIT_RATES, ModelPrice, PriceTable, Rate, Variant

_MTOK = Decimal(1_000_000)
_FIELDS = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cache_read": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
    "reasoning": "output_cost_per_reasoning_token",
}
#: the rates a $0 price is refused on; a $0 cache, reasoning, audio or image rate means "none"
#: (LiteLLM writes 0 for DeepSeek's cache write): it is dropped, and the fallback applies
_CHECKED_ZERO = frozenset({"input_cost_per_token", "output_cost_per_token"})
_FIELDS.update({
    "input_audio": "input_cost_per_audio_token",
    "output_audio": "output_cost_per_audio_token",
    "cache_audio_read": "cache_read_input_audio_token_cost",
    "input_image": "input_cost_per_image_token",
    "output_image": "output_cost_per_image_token",
    "cache_image_read": "cache_read_input_image_token_cost",
})
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


def _check_numbers(model_id: str, entry: dict[str, Any], allow_free: bool) -> str | None:
    """Refuse a negative price (always) and note a zero one (a reason to skip or refuse the row)."""
    zero = None
    for key, v in entry.items():
        if "cost" not in key or isinstance(v, bool) or not isinstance(v, Decimal | int):
            continue
        if v < 0:
            raise ConfigError(f"{model_id}: {key} is {v}; a price is never negative (nothing imported)")
        if v == 0 and not allow_free and zero is None and key in _CHECKED_ZERO:
            if key == "output_cost_per_token" and entry.get("mode") == "embedding":
                continue  # an embedding bills no output: its $0 output is no price at all
            zero = key
    return zero



#: LiteLLM key prefixes naming the provider's own API (``mistral/mistral-large-latest``): such a row
#: is stored under the table's provider id and model (``mistral/mistral-large-latest``,
#: ``google/gemini-2.5-pro``), where a request for that model on that provider finds it. A reseller's
#: prefix (``azure/``, ``vertex_ai/``, ``bedrock/``) is kept as written: its prices are not the
#: provider's own, so they never replace them.
FIRST_PARTY = {"openai": "openai", "anthropic": "anthropic", "gemini": "google", "mistral": "mistral",
               "deepseek": "deepseek", "xai": "x-ai", "x-ai": "x-ai"}


def import_key(model_id: str) -> tuple[str, str | None]:
    """The key a LiteLLM row is stored under, and the table provider a first-party prefix names."""
    key = model_id.lower()
    head, sep, tail = key.partition("/")
    if sep and head in FIRST_PARTY and tail:
        return f"{FIRST_PARTY[head]}/{tail}", FIRST_PARTY[head]
    return key, None


def convert(raw: dict[str, Any], source: str, allow_free: bool = False
            ) -> tuple[dict[str, ModelPrice], list[str], dict[str, str]]:
    """LiteLLM rows -> prices keyed by lower-case model id; also the ids skipped and why, and the
    rows priced at $0 (model id -> field), left out unless ``allow_free``."""
    out: dict[str, ModelPrice] = {}
    skipped: list[str] = []
    free: dict[str, str] = {}
    for model_id, entry in raw.items():
        if not isinstance(entry, dict) or model_id == "sample_spec":
            continue
        if entry.get("mode") not in _PRICED_MODES:
            continue
        zero = _check_numbers(model_id, entry, allow_free)
        if zero is not None:
            free[import_key(model_id)[0]] = zero
            continue
        try:
            rates = {name: _rate(entry, key) for name, key in _FIELDS.items()}
        except ConfigError as exc:
            skipped.append(f"{model_id}: {exc}")
            continue
        if not allow_free:
            rates = {name: r if name in ("input", "output") or r is None or r.base > 0 else None
                     for name, r in rates.items()}
        inp, outp = rates["input"], rates["output"]
        if entry.get("mode") == "embedding" and inp is not None and (outp is None or outp.base == 0):
            outp = inp  # no output tokens; never a $0 rate
        if inp is None or outp is None:
            skipped.append(f"{model_id}: no input or output price")
            continue
        max_out = entry.get("max_output_tokens")
        ctx = entry.get("max_input_tokens")
        key, first_party = import_key(model_id)
        out[key] = ModelPrice(
            provider=first_party or str(entry.get("litellm_provider") or "unknown"),
            model=model_id.split("/", 1)[1] if first_party else model_id,
            input=inp,
            output=outp,
            cache_read=rates["cache_read"],
            cache_write=rates["cache_write"],
            cache_write_1h=rates["cache_write_1h"],
            reasoning=rates["reasoning"],
            max_output=int(max_out) if isinstance(max_out, int | Decimal) else None,
            context_window=int(ctx) if isinstance(ctx, int | Decimal) else None,
            source=source,
            variants=_variants(entry),
            **{name: r for name in UNIT_RATES if (r := rates.get(name)) is not None and r.base > 0},  # type: ignore[arg-type]
        )
    return out, skipped, free


_VARIANT_SUFFIXES = {"priority": (("service_tier", "priority"),), "flex": (("service_tier", "flex"),),
                     "batches": (("processing", "batch"),)}


def _variants(entry: dict[str, Any]) -> tuple[Variant, ...]:
    out = []
    for suffix, when in _VARIANT_SUFFIXES.items():
        rates = {}
        for name, key in _FIELDS.items():
            v = entry.get(f"{key}_{suffix}")
            if isinstance(v, Decimal | int) and not isinstance(v, bool) and v > 0:
                rates[name] = Rate(Decimal(v) * _MTOK)
        if rates:
            out.append(Variant(when, rates))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Change:
    """One rate an import changes: ``old`` None when the rate is new."""

    model: str
    field: str
    old: Decimal | None
    new: Decimal

    @property
    def down(self) -> bool:
        return self.old is not None and self.new < self.old

    def describe(self) -> str:
        if self.old is None:
            return f"{self.model} {self.field}: new, ${_num(self.new)}"
        arrow = "DOWN" if self.down else "up"
        return f"{self.model} {self.field}: ${_num(self.old)} -> ${_num(self.new)} ({arrow})"


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f")


@dataclass(slots=True)
class ImportPlan:
    """What an import would store: every override (earlier imports kept), and what it changes."""

    source: str
    prices: dict[str, ModelPrice]
    changes: list[Change] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    free: dict[str, str] = field(default_factory=dict)
    imported: int = 0

    @property
    def lowered(self) -> list[Change]:
        return [c for c in self.changes if c.down]


def _merge_rate(old: Rate | None, new: Rate | None) -> Rate | None:
    """``new``'s base and tiers over ``old``'s: a tier the file lacks stays in force."""
    if new is None:
        return old
    if old is None:
        return new
    tiers = dict(old.tiers)
    tiers.update(new.tiers)
    return Rate(new.base, tuple(sorted(tiers.items())))


def merge(old: ModelPrice, new: ModelPrice) -> ModelPrice:
    """``new`` (an imported row) over ``old`` (the price in force), field by field: rates, tiers
    and variants the file lacks are kept; the output bound is the larger of the two."""
    rates = {name: _merge_rate(getattr(old, name), getattr(new, name)) for name in RATE_NAMES}
    variants = {v.when: v for v in old.variants}
    for v in new.variants:  # a variant is merged rate by rate too: its tiers and rates the file lacks stay
        was = variants.get(v.when)
        if was is not None:
            names = {*was.rates, *v.rates}
            merged = {n: _merge_rate(was.rates.get(n), v.rates.get(n)) for n in names}
            v = Variant(v.when, {n: r for n, r in merged.items() if r is not None}, v.since or was.since)
        variants[v.when] = v
    bounds = [b for b in (old.max_output, new.max_output) if b]
    return replace(old, **rates, variants=tuple(variants.values()),  # type: ignore[arg-type]
                   max_output=max(bounds) if bounds else None,
                   context_window=new.context_window or old.context_window, source=new.source)


def _changes(key: str, old: ModelPrice | None, new: ModelPrice) -> list[Change]:
    """Every rate (and tier, and variant's rate) ``new`` sets differently from ``old``."""
    out = []
    for name in RATE_NAMES:
        out += _rate_changes(key, name, getattr(old, name) if old is not None else None, getattr(new, name))
    before = {v.when: v for v in old.variants} if old is not None else {}
    for v in new.variants:
        was = before.get(v.when)
        for name, after in v.rates.items():
            out += _rate_changes(key, f"{name} [{v.label}]", was.rates.get(name) if was else None, after)
    return out


def _rate_changes(key: str, name: str, before: Rate | None, after: Rate | None) -> list[Change]:
    if after is None:
        return []
    points = [("", after.base, before.base if before is not None else None)]
    old_tiers = dict(before.tiers) if before is not None else {}
    points += [(f" above {start:,}", p, old_tiers.get(start)) for start, p in after.tiers]
    return [Change(key, name + label, was, now) for label, now, was in points if was != now]


def plan_import(src: Path, table: PriceTable, allow_free: bool = False, skip_free: bool = False) -> ImportPlan:
    """Read ``src`` (LiteLLM format) and merge it over ``table`` (bundled prices and earlier
    imports). Raises :class:`ConfigError` naming the model and field for a negative price, and for
    a $0 price (unless ``allow_free``) on a model the table prices, unless ``skip_free`` leaves
    those rows out (the price in force stays). A $0 row for a model it does not know is left out
    and listed, so that model stays priced as the dearest."""
    blob = src.read_bytes()
    try:
        raw = json.loads(blob, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{src}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a JSON object of model ids, got {type(raw).__name__}")
    digest = hashlib.sha256(blob).hexdigest()[:12]
    source = f"imported from {src.name} (sha256 {digest}) on {dt.date.today().isoformat()}"
    try:
        rows, skipped, free = convert(raw, source, allow_free)
    except ConfigError as exc:
        raise ConfigError(f"{src}: {exc}") from exc
    priced = [(key, fld) for key, fld in free.items() if table.resolve(key) is not None]
    if priced and not skip_free:
        more = f" (and {len(priced) - 1} more)" if len(priced) > 1 else ""
        key, fld = priced[0]
        raise ConfigError(f"{src}: {key}: {fld} is 0{more}; importing it would make a priced model free. "
                          "Nothing imported: pass --skip-free to import the rest and keep those prices, "
                          "or --allow-free if they really are free")
    if not rows:
        raise ConfigError(f"{src}: no model with both an input and an output price")
    plan = ImportPlan(source, dict(table.overrides), skipped=skipped, free=free, imported=len(rows))
    for key, row in rows.items():
        found = table.resolve(key)
        old = found.price if found is not None else None
        merged = merge(old, row) if old is not None else row
        plan.changes += _changes(key, old, merged)
        if old is None:
            plan.added.append(key)
        plan.prices[key] = merged
    return plan


def write_import(plan: ImportPlan, dest: Path) -> None:
    doc = {
        "source": plan.source,
        "models": {
            k: {"provider": p.provider, "model": p.model, "rates": p.rates_json(),
                "variants": [v.to_json() for v in p.variants], "source": p.source,
                "max_output": p.max_output, "context_window": p.context_window,
                **({"web_search_per": p.web_search_per} if p.web_search_per != PER_SEARCH else {})}
            for k, p in plan.prices.items()
        },
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(dest)


def import_file(src: Path, dest: Path, table: PriceTable | None = None,
                allow_free: bool = False) -> tuple[int, list[str]]:
    """Merge ``src`` over ``table`` (default: the bundled table with ``dest``'s earlier imports)
    and write ``dest`` atomically; returns (models imported, skipped)."""
    base = table if table is not None else PriceTable.bundled().with_overrides(dest)
    plan = plan_import(src, base, allow_free)
    write_import(plan, dest)
    return plan.imported, plan.skipped


def load_imported(path: Path) -> dict[str, ModelPrice]:
    """Read what :func:`write_import` wrote."""
    from spendgate.pricing.table import _model_price

    try:
        doc = json.loads(path.read_text())
        return {
            k: _model_price(m["provider"], m["model"], m["rates"], m.get("max_output"),
                            m.get("context_window"), m.get("source") or doc["source"], None,
                            tuple(Variant.from_json(v) for v in m.get("variants", ())),
                            web_search_per=m.get("web_search_per", PER_SEARCH))
            for k, m in doc["models"].items()
        }
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: imported price file is damaged ({exc}); import it again") from exc
