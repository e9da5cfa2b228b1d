"""Model prices and how a model id finds its price.

The bundled table (``data/prices.json``) is built by ``scripts/build_prices.py``; prices imported
with ``spendgate prices update --from FILE`` are consulted first. A model id resolves through, in
order: a provider prefix (``anthropic/…``), an exact id or listed alias, the table's curated match
rules, and a dated suffix (``-2024-08-06``, ``-20250929``) stripped back to its base id. A provider
whose table entry ``owns`` a shape of id (Bedrock's model ids and inference profiles,
``us.anthropic.claude-…-v1:0``) is the only one searched for such an id — never another provider's row
that happens to match its name — and is searched for no other id unless the request names it. There is
no loose prefix fallback: ``o1-pro`` never borrows ``o1``'s price. What matches nothing is priced
by the caller's ``unpriced`` policy (see :meth:`PriceTable.dearest`), never at $0.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from spendgate.errors import ConfigError

#: A provider prefix as clients write it -> the table's provider id.
PROVIDER_PREFIXES = {
    "openai": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "google": "google",
    "gemini": "google",
    "vertex_ai": "google",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "xai": "x-ai",
    "x-ai": "x-ai",
    "bedrock": "bedrock",
}
_DATED = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
#: When neither the table nor the request bounds the output: the largest output any current
#: model allows (128K), so an unbounded request is never priced below what it could cost.
FALLBACK_MAX_OUTPUT = 128_000
STALE_AFTER_DAYS = 120
_IMPORTED_ON = re.compile(r"^imported .* on (\d{4}-\d{2}-\d{2})")



#: (the local date, the epoch second the next one starts): asked for on every request's pricing
_DAY: list[tuple[dt.date, float]] = []


def _today() -> dt.date:
    """The local date, worked out once a day: ``date.today()`` reads the time zone each call (a
    stat of /etc/localtime), and every request's price asks for it. Exact at midnight: the cache ends
    at the next local midnight, so a price dated tomorrow applies from its first second."""
    now = time.time()
    if _DAY and now < _DAY[0][1]:
        return _DAY[0][0]
    day = dt.date.today()
    nxt = dt.datetime.combine(day + dt.timedelta(days=1), dt.time()).timestamp()  # local midnight
    _DAY[:] = [(day, nxt)]
    return day

@dataclass(frozen=True, slots=True)
class Rate:
    """A price in USD per million tokens, with optional tiers keyed by the request's input size.

    A tier ``(start, price)`` applies to every token of a request whose input exceeds ``start``
    tokens — how Anthropic and Google bill their long-context tiers.
    """

    base: Decimal
    tiers: tuple[tuple[int, Decimal], ...] = ()

    def at(self, input_tokens: int) -> Decimal:
        price = self.base
        for start, tier_price in self.tiers:
            if input_tokens > start:
                price = tier_price
        return price

    @property
    def top(self) -> Decimal:
        return max([self.base, *(p for _, p in self.tiers)])

    def to_json(self) -> Any:
        if not self.tiers:
            return str(self.base)
        return {"base": str(self.base), "tiers": [[s, str(p)] for s, p in self.tiers]}

    @classmethod
    def from_json(cls, raw: Any) -> Rate:
        if isinstance(raw, dict):
            return cls(Decimal(raw["base"]), tuple((int(s), Decimal(p)) for s, p in raw["tiers"]))
        return cls(Decimal(str(raw)))


#: Per-token rates besides input and output: USD per million tokens of that kind.
UNIT_RATES = ("input_audio", "output_audio", "cache_audio_read", "input_image", "output_image",
              "cache_image_read", "input_video", "output_video")
#: Per-request fees: USD per 1,000 requests (web search / grounding, file search).
FEE_RATES = ("web_search_k", "file_search_k")
RATE_NAMES = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning",
              *UNIT_RATES, *FEE_RATES)
#: The request/response keys a price variant can be selected by, and their values that mean
#: "the standard price" (no variant).
VARIANT_KEYS = ("service_tier", "speed", "processing")
STANDARD = {"service_tier": ("default", "standard", "auto", "standard_only", "on_demand"),
            "speed": ("standard", "normal"), "processing": ("standard", "realtime")}


@dataclass(frozen=True, slots=True)
class Variant:
    """Rates that replace the standard ones when a request runs at, e.g., ``service_tier=priority``.

    ``when`` holds sorted ``(key, value)`` pairs; ``rates`` only the names the variant changes."""

    when: tuple[tuple[str, str], ...]
    rates: Mapping[str, Rate]
    since: str | None = None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.when)

    def to_json(self) -> dict[str, Any]:
        return {"when": dict(self.when), "since": self.since,
                "rates": {k: r.to_json() for k, r in self.rates.items()}}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Variant:
        return cls(tuple(sorted((str(k), str(v)) for k, v in raw["when"].items())),
                   {k: Rate.from_json(v) for k, v in raw["rates"].items()}, raw.get("since"))


def _keep_tiers(rate: Rate, standard: Rate | None) -> Rate:
    """A variant's flat rate over a tiered standard one keeps the standard's steps in proportion
    (gpt-5.5-pro flex is listed flat, but a long prompt costs more at every tier): never a price
    that ignores the long-context step the standard rate has."""
    if rate.tiers or standard is None or not standard.tiers or standard.base <= 0:
        return rate
    ratio = rate.base / standard.base
    return Rate(rate.base, tuple((start, price * ratio) for start, price in standard.tiers))


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Everything spendgate needs to price one model, and where it came from."""

    provider: str
    model: str
    input: Rate
    output: Rate
    cache_read: Rate | None = None
    cache_write: Rate | None = None
    cache_write_1h: Rate | None = None
    reasoning: Rate | None = None
    max_output: int | None = None
    context_window: int | None = None
    source: str = ""
    since: str | None = None
    input_audio: Rate | None = None
    output_audio: Rate | None = None
    cache_audio_read: Rate | None = None
    input_image: Rate | None = None
    output_image: Rate | None = None
    cache_image_read: Rate | None = None
    input_video: Rate | None = None
    output_video: Rate | None = None
    web_search_k: Rate | None = None
    file_search_k: Rate | None = None
    #: service tier / speed / batch prices, each with the date it took effect
    variants: tuple[Variant, ...] = ()
    #: the variant these rates are (``service_tier=priority``), None for the standard price
    variant: str | None = None
    #: False for another vendor's model a provider resells (Claude on Vertex): never a "dearest"
    native: bool = True
    note: str = ""
    #: what ``web_search_k`` is charged per: :data:`PER_SEARCH` (each search the model runs —
    #: Anthropic's and OpenAI's searches, Gemini 3's grounding queries) or :data:`PER_PROMPT` (one fee
    #: per grounded request, whatever it searched — Gemini 1.x/2.x grounding)
    web_search_per: str = "search"

    def output_bound(self, input_tokens: int, requested: int | None) -> tuple[int, str]:
        """The most output tokens a request can be billed for, and why that number."""
        if requested is not None:
            return requested, "request"
        if self.max_output:
            return self.max_output, "model maximum"
        if self.context_window and self.context_window > input_tokens:
            return self.context_window - input_tokens, "context window"
        return FALLBACK_MAX_OUTPUT, "fallback maximum"

    def rates_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in RATE_NAMES:
            rate = getattr(self, name)
            if rate is not None:
                out[name] = rate.to_json()
        return out

    def rates(self) -> dict[str, Rate]:
        return {n: r for n in RATE_NAMES if (r := getattr(self, n)) is not None}

    def in_force(self, day: str) -> tuple[Variant, ...]:
        """The variants in force on ``day`` (ISO date); of several with the same ``when``, the latest."""
        best: dict[tuple[tuple[str, str], ...], Variant] = {}
        for v in self.variants:
            if v.since is None or v.since <= day:
                cur = best.get(v.when)
                if cur is None or (cur.since or "") <= (v.since or ""):
                    best[v.when] = v
        return tuple(best.values())

    def at_variant(self, context: Mapping[str, str], day: str | None = None) -> ModelPrice:
        """These prices for a request whose ``service_tier`` / ``speed`` / ``processing`` are
        ``context``: every in-force variant whose ``when`` the context satisfies overrides the
        rates it names (first listed wins, as in genai-prices). Rates a variant does not name stay
        standard. A context that matches no variant gets the standard price.

        The same context on the same day gets the same price object (:data:`_AT_VARIANT`), so what
        is worked out per price (:mod:`spendgate.pricing.cost`'s integer rates) is worked out once
        per variant, not on every request that asks for one."""
        ctx = {k: v for k, v in context.items() if v not in STANDARD.get(k, ())}
        if not ctx:
            return self
        today = day or _today().isoformat()
        try:
            key = (id(self), tuple(sorted(ctx.items())), today)
            hit = _AT_VARIANT.get(key)
        except TypeError:  # a value that cannot key a dict: worked out, not remembered
            return self._at_variant(ctx, today)
        if hit is not None and hit[0] is self:
            return hit[1]
        found = self._at_variant(ctx, today)
        if len(_AT_VARIANT) >= 4096:
            _AT_VARIANT.clear()
        _AT_VARIANT[key] = (self, found)
        return found

    def _at_variant(self, ctx: Mapping[str, str], today: str) -> ModelPrice:
        """:meth:`at_variant` for a context of non-standard values, on ``today``."""
        overrides: dict[str, Rate] = {}
        labels = []
        for v in self.in_force(today):
            if all(ctx.get(k) == val for k, val in v.when):
                labels.append(v.label)
                for name, rate in v.rates.items():
                    overrides.setdefault(name, _keep_tiers(rate, getattr(self, name, None)))
        if not labels:
            return self
        return replace(self, variant=", ".join(labels), **overrides)  # type: ignore[arg-type]

    def dearest_variant(self, key: str, values: Iterable[str], day: str | None = None) -> ModelPrice:
        """Of the standard price and the variants ``key=value`` for ``values``, the one with the
        highest output rate (then input rate): a request that may run at any of them is held there."""
        best = self
        for value in values:
            cand = self.at_variant({key: value}, day)
            if (cand.output.top, cand.input.top) > (best.output.top, best.input.top):
                best = cand
        return best


#: (id(price), sorted context, day) -> (the price, its variant's price): the price is held so its
#: id stays its own; a request at ``service_tier=priority`` is priced at one object, not a new one each time
_AT_VARIANT: dict[tuple[int, tuple[tuple[str, str], ...], str], tuple[ModelPrice, ModelPrice]] = {}

#: ``web_search_per`` values: a fee per search the model runs, or one per request it grounds
PER_SEARCH, PER_PROMPT = "search", "prompt"


#: The units a model priced per unit (not per token) is billed in, and how a price is quoted.
UNIT_LABELS = {"image": "per image", "character": "per character", "minute": "per minute of audio"}


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """A model billed per image, per character or per minute of audio rather than per token
    (dall-e-2/3, tts-1, whisper-1): its prices by option (``"hd/1024x1792"`` for an image,
    ``""`` when one price fits all), with their source and date like every price."""

    provider: str
    model: str
    unit: str
    prices: Mapping[str, Decimal]
    source: str
    since: str | None = None
    match: Predicate | None = field(default=None, compare=False)

    def price_of(self, option: str) -> Decimal | None:
        """The price of one unit with ``option`` (None: the model has no such option)."""
        return self.prices.get(option)

    @property
    def top(self) -> Decimal:
        return max(self.prices.values())

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "quoted": UNIT_LABELS.get(self.unit, self.unit),
                "prices": {k: str(v) for k, v in self.prices.items()}, "source": self.source, "since": self.since}


@dataclass(frozen=True, slots=True)
class Resolution:
    """A resolved price and how it was found; ``how`` is shown in every decision."""

    requested: str
    price: ModelPrice
    how: str  # exact | match | dated | imported | dearest
    warning: str | None = None
    #: the standard price when ``price`` is a variant's (``service_tier=priority``); capture
    #: re-prices from it at the tier the provider says it served
    standard: ModelPrice | None = None

    @property
    def estimated_price(self) -> bool:
        return self.how == "dearest"


Predicate = Callable[[str], bool]


def _compile(clause: Mapping[str, Any]) -> Predicate:
    if "equals" in clause:
        v = clause["equals"].lower()
        return lambda s: s == v
    if "starts_with" in clause:
        v = clause["starts_with"].lower()
        return lambda s: s.startswith(v)
    if "ends_with" in clause:
        v = clause["ends_with"].lower()
        return lambda s: s.endswith(v)
    if "contains" in clause:
        v = clause["contains"].lower()
        return lambda s: v in s
    if "regex" in clause:
        rx = re.compile(clause["regex"])
        return lambda s: rx.search(s) is not None
    if "or" in clause:
        subs = [_compile(c) for c in clause["or"]]
        return lambda s: any(p(s) for p in subs)
    if "and" in clause:
        subs = [_compile(c) for c in clause["and"]]
        return lambda s: all(p(s) for p in subs)
    raise ConfigError(f"price table: unknown match clause {clause!r}")


@dataclass(slots=True)
class _Entry:
    provider: str
    model: str
    match: Predicate
    periods: list[tuple[str | None, dict[str, Any]]]
    max_output: int | None
    context_window: int | None
    variants: tuple[Variant, ...] = ()
    native: bool = True
    note: str = ""
    source: str | None = None
    web_search_per: str = PER_SEARCH

    def price(self, today: str, source: str) -> ModelPrice:
        since, rates = self.periods[0]
        for p_since, p_rates in self.periods:
            if p_since is None or p_since <= today:
                since, rates = p_since, p_rates
        return _model_price(self.provider, self.model, rates, self.max_output,
                            self.context_window, self.source or source, since, self.variants,
                            self.native, self.note, self.web_search_per)


def _model_price(provider: str, model: str, rates: Mapping[str, Any], max_output: int | None,
                 context_window: int | None, source: str, since: str | None,
                 variants: tuple[Variant, ...] = (), native: bool = True, note: str = "",
                 web_search_per: str = "search") -> ModelPrice:
    def get(name: str) -> Rate | None:
        return Rate.from_json(rates[name]) if name in rates else None

    inp, out = get("input"), get("output")
    if inp is None or out is None:
        raise ConfigError(f"price table: {provider}/{model} lacks an input or output price")
    extra = {name: get(name) for name in (*UNIT_RATES, *FEE_RATES)}
    return ModelPrice(provider, model, inp, out, get("cache_read"), get("cache_write"),
                      get("cache_write_1h"), get("reasoning"), max_output, context_window,
                      source, since, variants=variants, native=native, note=note,
                      web_search_per=_search_unit(provider, model, web_search_per), **extra)  # type: ignore[arg-type]


def _search_unit(provider: str, model: str, unit: Any) -> str:
    """A row's ``web_search_per``: :data:`PER_PROMPT` only where the table says so; absent is
    :data:`PER_SEARCH`, which holds the more (one fee per search, the searches bounded by the
    output bound); any other value is refused, so a misspelt row never prices searches as less."""
    if unit not in (PER_SEARCH, PER_PROMPT):
        raise ConfigError(f"price table: {provider}/{model} has web_search_per {unit!r}, "
                          f"not {PER_SEARCH!r} or {PER_PROMPT!r}")
    return str(unit)


@dataclass
class PriceTable:
    """The price list: bundled rows plus imported overrides, resolved strictly."""

    source: str
    built: str
    entries: dict[str, list[_Entry]]
    overrides: dict[str, ModelPrice] = field(default_factory=dict)
    #: provider -> the model ids only it serves (its entry's ``owns`` clause)
    owners: dict[str, Predicate] = field(default_factory=dict)
    #: provider -> its models priced per image, character or minute rather than per token
    units: dict[str, list[UnitPrice]] = field(default_factory=dict)
    _cache: dict[tuple[str, str | None, str], Resolution | None] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PriceTable:
        src = raw["source"]
        entries: dict[str, list[_Entry]] = {}
        owners: dict[str, Predicate] = {}
        units: dict[str, list[UnitPrice]] = {}
        for prov in raw["providers"]:
            rows = entries.setdefault(prov["id"], [])
            for u in prov.get("per_unit", ()):
                units.setdefault(prov["id"], []).append(UnitPrice(
                    prov["id"], u["id"], u["unit"], {k: Decimal(v) for k, v in u["prices"].items()},
                    u["source"], u.get("since"), _compile(u["match"])))
            if prov.get("owns"):
                owners[prov["id"]] = _compile(prov["owns"])
            for m in prov["models"]:
                periods = [(p["since"], p["rates"]) for p in m["prices"]]
                variants = tuple(Variant.from_json(v) for v in m.get("variants", ()))
                rows.append(_Entry(prov["id"], m["id"], _compile(m["match"]), periods,
                                   m.get("max_output"), m.get("context_window"), variants,
                                   m.get("native", True), m.get("note", ""), m.get("source"),
                                   m.get("web_search_per", PER_SEARCH)))
        return cls(source=src["prices"], built=src["built"], entries=entries, owners=owners, units=units)

    @classmethod
    def bundled(cls) -> PriceTable:
        return cls.from_json(_bundled_json())

    def with_overrides(self, path: Path | None) -> PriceTable:
        """This table with the imported prices in ``path`` (if it exists) consulted first."""
        if path is None or not path.exists():
            return self
        from spendgate.pricing.litellm import load_imported

        table = PriceTable(self.source, self.built, self.entries, load_imported(path), self.owners, self.units)
        return table

    def unit_price(self, model: str, provider: str | None = None) -> UnitPrice | None:
        """The per-unit price of ``model`` (dall-e-3 per image, tts-1 per character), or None when
        it is not priced per unit. A provider prefix or a dated suffix is stripped as for tokens."""
        name = model.strip().lower()
        provs = [provider] if provider in self.units else list(self.units)
        if "/" in name:
            head, name = name.split("/", 1)
            if head not in PROVIDER_PREFIXES:
                return None
            provs = [PROVIDER_PREFIXES[head]]
        for candidate in dict.fromkeys((name, _DATED.sub("", name))):
            for prov in provs:
                for u in self.units.get(prov, ()):
                    if u.model.lower() == candidate or (u.match is not None and u.match(candidate)):
                        return u
        return None

    # -- resolution ---------------------------------------------------------------------------

    def resolve(self, model: str, provider: str | None = None,
                today: dt.date | None = None) -> Resolution | None:
        """Find ``model``'s price; ``provider`` (from the route) is searched first."""
        day = (today or _today()).isoformat()
        key = (model, provider, day)
        if key in self._cache:
            return self._cache[key]
        found = self._resolve(model, provider, day)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _resolve(self, model: str, provider: str | None, day: str) -> Resolution | None:
        name = model.strip().lower()
        providers = self._search_order(provider)
        if "/" in name:
            head, tail = name.split("/", 1)
            if head not in PROVIDER_PREFIXES:
                imported = self.overrides.get(name)
                return Resolution(model, imported, "imported") if imported else None
            providers, name = [PROVIDER_PREFIXES[head]], tail
        owner = next((prov for prov, owns in self.owners.items() if owns(name)), None)
        if owner is not None:
            providers = [owner]
        for candidate, how in ((name, None), (_DATED.sub("", name), "dated")):
            if how and candidate == name:
                continue
            imported = self.overrides.get(candidate)
            if imported is not None:
                return Resolution(model, imported, "imported")
            for prov in providers:
                # an imported row a file keyed by provider (``mistral/mistral-large-latest``)
                imported = self.overrides.get(f"{prov}/{candidate}")
                if imported is not None:
                    return Resolution(model, imported, "imported")
                hit = self._match(prov, candidate, day)
                if hit is not None:
                    price, kind = hit
                    return Resolution(model, price, how or kind)
        return None

    def _search_order(self, provider: str | None) -> list[str]:
        """The providers to search, the route's first; one that owns its ids only when named."""
        order = [p for p in self.entries if p not in self.owners or p == provider]
        if provider in self.entries:
            order.remove(provider)
            order.insert(0, provider)
        return order

    def _match(self, provider: str, name: str, day: str) -> tuple[ModelPrice, str] | None:
        rows = self.entries.get(provider, [])
        for row in rows:  # an exact id always beats an earlier, broader rule
            if row.model.lower() == name:
                return row.price(day, self.source), "exact"
        for row in rows:
            if row.match(name):
                return row.price(day, self.source), "match"
        return None

    def dearest(self, provider: str | None, today: dt.date | None = None) -> ModelPrice:
        """The dearest current model of ``provider`` (of all providers when it is unknown).

        "Dearest" orders by output rate, then input rate, at their highest tier: an unknown model
        is assumed to cost what the most expensive known one does.
        """
        day = (today or _today()).isoformat()
        provs = [provider] if provider in self.entries else list(self.entries)
        best: ModelPrice | None = None
        for prov in provs:
            for row in self.entries[prov]:
                if not row.native:
                    continue  # Claude on Vertex is not what an unknown Google model costs
                p = row.price(day, self.source)
                if best is None or (p.output.top, p.input.top) > (best.output.top, best.input.top):
                    best = p
        assert best is not None, "price table is empty"
        return best

    def largest_output(self, provider: str | None) -> int:
        """The largest maximum output of any model of ``provider`` (all when unknown), at least
        :data:`FALLBACK_MAX_OUTPUT`: the output bound of an unknown model, which may be any of them."""
        provs = [provider] if provider in self.entries else list(self.entries)
        found = [row.max_output for prov in provs for row in self.entries[prov] if row.max_output]
        return max([FALLBACK_MAX_OUTPUT, *found])

    def models(self, provider: str | None = None) -> Iterable[str]:
        for prov, rows in self.entries.items():
            if provider is None or prov == provider:
                for row in rows:
                    yield f"{prov}/{row.model}"

    def age_days(self, today: dt.date | None = None) -> int:
        return ((today or _today()) - dt.date.fromisoformat(self.built)).days

    def price_date(self, price: ModelPrice) -> str:
        """When ``price`` was last checked: its import date, or the bundled table's build date."""
        m = _IMPORTED_ON.search(price.source)
        return m.group(1) if m else self.built

    def stale_note(self, price: ModelPrice, today: dt.date | None = None) -> str | None:
        """A note for a decision priced at ``price`` when that price is older than the threshold."""
        checked = self.price_date(price)
        age = ((today or _today()) - dt.date.fromisoformat(checked)).days
        if age > STALE_AFTER_DAYS:
            return (f"the price of {price.provider}/{price.model} was last checked {age} days ago ({checked}); "
                    "import a current table with `spendgate prices update --from FILE`")
        return None

    def stale_warning(self, today: dt.date | None = None) -> str | None:
        age = self.age_days(today)
        if age > STALE_AFTER_DAYS:
            return (f"the bundled price table is {age} days old (built {self.built}); import a "
                    "current one with `spendgate prices update --from FILE`")
        return None


@lru_cache(maxsize=1)
def _bundled_json() -> dict[str, Any]:
    text = resources.files("spendgate.pricing").joinpath("data/prices.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data
