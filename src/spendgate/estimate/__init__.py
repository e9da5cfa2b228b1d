"""A request's worst case before it is sent: tokens in, the output bound, and their price.

Which routes are priced, how each body is counted and which variant it asks for are the providers'
word (:mod:`spendgate.providers`); this module prices what they read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from spendgate.errors import BadRequest, UnpricedModel
from spendgate.estimate import anthropic
from spendgate.estimate.shape import TokenShape, is_map
from spendgate.money import fmt_usd, usd_to_nanos
from spendgate.pricing import table as _table
from spendgate.pricing.cost import Usage, usage_nanos, worst_case_nanos
from spendgate.pricing.table import PER_PROMPT, ModelPrice, PriceTable, Rate, Resolution

if TYPE_CHECKING:
    from spendgate.providers.base import Provider

log = logging.getLogger("spendgate.estimate")

Unpriced = Literal["dearest", "block"]

#: Output tokens a web search call takes at the least, where a request allows searches without a
#: bound (a provider's :meth:`~spendgate.providers.base.Provider.searches` returns a negative count):
#: the call is a tool call the model writes — its framing (recipient, channel, ``<|call|>``) and a JSON
#: query (``{"query": "…"}``) are well over 10 o200k tokens, so ``output bound ÷ 10`` searches bound
#: what it can run. A request that names its bound (``max_tool_calls``, ``max_uses``) is held at that.
TOKENS_PER_SEARCH = 10


def free_resolution(model: str, table_provider: str) -> Resolution:
    """``model`` at $0: what a configured upstream's ``free`` globs say it costs (a local model)."""
    zero = Rate(Decimal(0))
    return Resolution(model, ModelPrice(table_provider, model, zero, zero, source="free = [...] in [upstreams]"),
                      "free")


def _table_of(provider: str, spec: Provider | None) -> str:
    """The price table's provider ``provider``'s models are looked up under: its own name, or a
    configured upstream's ``prices``."""
    return spec.price_providers[0] if spec is not None and spec.strict_prices and spec.price_providers \
        else provider


@dataclass(slots=True)
class Estimate:
    """The priced worst case of one request."""

    provider: str
    route: str
    shape: TokenShape
    price: Resolution
    #: output tokens bounded for all choices (``bound × n``)
    output_tokens: int
    output_bound_from: str
    cost_nanos: int
    #: the price variant the request asks for (``{"service_tier": "priority"}``), held at its rates
    variant: Mapping[str, str] = field(default_factory=dict)
    #: web searches the request allows at most (Anthropic's ``max_uses``, OpenAI's ``max_tool_calls``,
    #: else the output bound ÷ :data:`TOKENS_PER_SEARCH`; 1 for a model billed per grounded prompt),
    #: held at the model's fee
    searches: int = 0
    #: False when ``searches`` was derived from the output bound (the request named no bound)
    searches_named: bool = True
    #: the model the request names (``shape.model``): set once, read by every step of a decision
    model: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.model = self.shape.model

    @property
    def input_tokens(self) -> int:
        return self.shape.input_tokens

    @property
    def tokens(self) -> int:
        return self.shape.input_tokens + self.output_tokens

    def describe(self) -> str:
        p = self.price
        if self.shape.per_unit is not None and p.price.note.startswith("priced per "):
            kind, option, count = self.shape.per_unit
            return (f"{self.model}: {count:,} {kind}(s)" + (f" at {option}" if option else "") +
                    f" at {p.price.provider}/{p.price.model} (per-{kind} price) = {fmt_usd(self.cost_nanos)}")
        how = {"exact": "listed price", "match": "listed alias", "dated": "base model of a dated id",
               "imported": "imported price", "dearest": "UNPRICED, charged as the dearest model",
               "free": "free by the upstream's configuration"}[p.how]
        if p.price.variant:
            how += f", {p.price.variant} rates"
        return (f"{self.model}: {self.input_tokens} input + {self.output_tokens} output tokens "
                f"({self.output_bound_from}) at {p.price.provider}/{p.price.model} ({how}) "
                f"= {fmt_usd(self.cost_nanos)} worst case")


class Estimator:
    """Prices request bodies; shared by the engine, the proxy and the SDK."""

    #: The tier a request that names none (or ``"auto"``) is held at: the project's default tier,
    #: ``default`` unless an admin set the project to ``fast`` (then set this to ``"fast"``).
    #: Capture always charges the tier the response says it served.
    openai_auto_tier = "default"

    def __init__(self, prices: PriceTable, unpriced: Unpriced = "dearest",
                 anthropic_factor: float = anthropic.DEFAULT_FACTOR) -> None:
        from spendgate import providers  # the registry's modules count with this package's primitives

        self.prices = prices
        self.unpriced = unpriced
        #: the upward factor over offline counts, for providers whose tokenizer is not published
        self.anthropic_factor = anthropic_factor
        self._providers = {p.name: p for p in providers.all_providers()}
        self._parsers: dict[tuple[str, str], Callable[[Mapping[str, Any]], TokenShape]] = {
            (p.name, route): parser for p in self._providers.values()
            for route, parser in p.parsers(anthropic_factor if p.scaled_counts else None).items()}
        self._warned: set[str] = set()
        #: (model, provider) -> (table, provider spec, day, unpriced policy, resolution): see :meth:`resolve`
        self._resolved: dict[tuple[str, str], tuple[PriceTable, Provider | None, date, str, Resolution]] = {}

    def _spec(self, provider: str) -> Provider | None:
        """The provider called ``provider``: a built-in one, or one configured (``[upstreams.NAME]``)
        after this estimator was built, whose parsers are taken on first use."""
        spec = self._providers.get(provider)
        if spec is None:
            from spendgate import providers

            spec = providers.find(provider)
            if spec is not None:
                self._providers[provider] = spec
                self._parsers.update({(provider, route): parser for route, parser in
                                      spec.parsers(self.anthropic_factor if spec.scaled_counts else None).items()})
        return spec

    def _table_provider(self, provider: str) -> str:
        """The price table's provider ``provider``'s models are looked up under: its own name, or
        a configured upstream's ``prices``."""
        return _table_of(provider, self._spec(provider))

    def is_free(self, provider: str, route: str) -> bool:
        """A route that costs nothing (a token count, a model list): passed through unpriced."""
        spec = self._spec(provider)
        return spec is not None and route in spec.free_routes

    def output_fields(self, provider: str, route: str) -> tuple[str, ...]:
        """The body fields bounding a request's output on ``route``, the one a clamp edits first."""
        spec = self._spec(provider)
        return (spec.output_fields.get(route) if spec is not None else None) or ("max_tokens",)

    def shape(self, provider: str, route: str, body: Any) -> TokenShape:
        parser = self._parsers.get((provider, route))
        if parser is None and self._spec(provider) is not None:
            parser = self._parsers.get((provider, route))
        if parser is None:
            raise BadRequest(f"{provider} route {route} cannot be priced")
        if not is_map(body):
            raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
        return parser(body)

    def variant(self, provider: str, body: Any) -> dict[str, str]:
        """The price variant a request body asks for (a service tier, a speed), as its provider
        reads it; a tier left to the provider is :attr:`openai_auto_tier`."""
        spec = self._spec(provider)
        if not is_map(body) or spec is None:
            return {}
        return spec.variant(body, self.openai_auto_tier)

    def resolve(self, model: str, provider: str) -> Resolution:
        """``model``'s price on ``provider``'s route, or the dearest model's when it has none.

        The answer depends only on the model, the provider's configuration, the table, the day and
        the ``unpriced`` policy: it is worked out once per model and day and remembered for as long
        as the table and the provider are the same objects (a reloaded table is asked again)."""
        return self._resolution(model, provider, self._spec(provider))

    def _resolution(self, model: str, provider: str, spec: Provider | None) -> Resolution:
        """:meth:`resolve` with the provider's spec already looked up."""
        day = _table._today()  # the day the table's own lookups price at
        key = (model, provider)
        hit = self._resolved.get(key)
        if hit is not None and hit[0] is self.prices and hit[1] is spec and hit[2] == day \
                and hit[3] == self.unpriced:
            return hit[4]
        found = self._resolve(model, provider, spec)
        if len(self._resolved) >= 4096:  # model names are the client's: bounded
            self._resolved.clear()
        self._resolved[key] = (self.prices, spec, day, self.unpriced, found)
        return found

    def _resolve(self, model: str, provider: str, spec: Provider | None) -> Resolution:
        table = _table_of(provider, spec)
        if spec is not None and spec.is_free_model(model):
            return free_resolution(model, table)
        found = self.prices.resolve(model, table)
        if found is not None and spec is not None and spec.strict_prices \
                and found.price.provider not in spec.price_providers:
            found = None  # another provider's row sharing the name is not this upstream's price
        if found is not None:
            stale = self.prices.stale_note(found.price)
            return replace(found, warning=stale) if stale else found
        if self.unpriced == "block":
            raise UnpricedModel(f"no price is known for model {model!r} and the policy says "
                                f"unpriced = \"block\"; import prices with `spendgate prices update`")
        dear = self.prices.dearest(table)
        warning = (f"no price is known for {model!r}: priced as the dearest {dear.provider} model, "
                   f"{dear.model} (${dear.input.top}/${dear.output.top} per Mtok in/out)")
        if model not in self._warned:
            self._warned.add(model)
            log.warning(warning)
        return Resolution(model, dear, "dearest", warning)

    def searches(self, provider: str, body: Any) -> int:
        """The most web searches a request allows before send, as its provider bounds them (a
        search it leaves unbounded is charged on capture from the usage)."""
        spec = self._spec(provider)
        if not is_map(body) or spec is None:
            return 0
        return spec.searches(body)

    def per_unit(self, provider: str, route: str, shape: TokenShape) -> Estimate | None:
        """A model priced per unit (dall-e-2/3 per image, tts-1 per character): the units the request
        asks for at the price of the option it names — exact, since such a model bills nothing else.
        None when the table prices the model per token (gpt-4o-mini-tts on the speech route): the
        token counts price it. A model known to neither, on a route whose models are priced per image,
        is priced at the dearest per-image price of its provider (or refused with ``unpriced = "block"``)."""
        assert shape.per_unit is not None
        kind, option, count = shape.per_unit
        table = self._table_provider(provider)
        unit = self.prices.unit_price(shape.model, table)
        warning = None
        if unit is None or unit.unit != kind:
            if kind != "image" or self.prices.resolve(shape.model, table) is not None:
                return None
            if self.unpriced == "block":
                raise UnpricedModel(f"no per-image price is known for model {shape.model!r} and the policy says "
                                    "unpriced = \"block\"")
            images = [u for u in self.prices.units.get(table, ()) if u.unit == kind] or \
                [u for us in self.prices.units.values() for u in us if u.unit == kind]
            if not images:
                raise UnpricedModel(f"no per-{kind} price is known for model {shape.model!r}")
            unit = max(images, key=lambda u: u.top)
            warning = f"no per-image price is known for {shape.model!r}: priced as {unit.model}'s dearest image"
        each = unit.price_of(option)
        if each is None:
            each = unit.top
        cost = usd_to_nanos(each * count)
        # any token the provider might report is priced as one unit: never below the hold's basis
        per_token = Rate(each * 1_000_000)
        mp = ModelPrice(unit.provider, unit.model, per_token, per_token, source=unit.source, since=unit.since,
                        note=f"priced per {kind}" + (f": {option}" if option else "") + f" at ${each}")
        res = Resolution(shape.model, mp, "exact" if warning is None else "dearest", warning)
        return Estimate(provider, route, shape, res, 0, shape.output_why or f"per {kind}", cost)

    def price(self, provider: str, route: str, shape: TokenShape,
              variant: Mapping[str, str] | None = None, searches: int = 0) -> Estimate:
        return self._price(provider, route, shape, variant, searches, self._spec(provider))

    def _price(self, provider: str, route: str, shape: TokenShape, variant: Mapping[str, str] | None,
               searches: int, spec: Provider | None) -> Estimate:
        """:meth:`price` with the provider's spec already looked up."""
        if shape.per_unit is not None:
            unit_priced = self.per_unit(provider, route, shape)
            if unit_priced is not None:
                return unit_priced
        res = self._resolution(shape.model, provider, spec)
        at = res.price.at_variant(variant) if variant else res.price
        requested = shape.requested_output
        if requested is None and shape.api_default_output is not None:
            bound, why = shape.api_default_output, "API default"
        elif requested is None and res.how == "dearest":
            # an unknown model may write as much as any model of its provider, not only the dearest
            bound = self.prices.largest_output(_table_of(provider, spec))
            why = "largest maximum output of the provider"
        else:
            bound, why = res.price.output_bound(shape.input_tokens, requested)
            if requested is not None and shape.output_why:
                why = shape.output_why
        out = bound * max(shape.choices, 1)
        if shape.cache_write is None and spec is not None and spec.writes_cache_itself \
                and res.price.cache_write is not None:
            # a provider that writes the prompt cache by itself and bills the write (OpenAI's
            # gpt-5.6, gpt-6): any input may be a cache write, so it is held at the dearer rate
            shape = replace(shape, cache_write="5m")
        cost = worst_case_nanos(res.price, shape.input_tokens, out, shape.cache_write, shape.input_audio)
        if at is not res.price:
            # a dearer variant (priority, fast) is held at its rates; a cheaper one (flex) at the
            # standard rates, since the provider may serve and bill the standard tier instead, and
            # capture re-prices at the tier the response says it served
            dearer = worst_case_nanos(at, shape.input_tokens, out, shape.cache_write, shape.input_audio)
            if dearer >= cost:
                res, cost = replace(res, price=at, standard=res.price), dearer
        named = searches >= 0
        if searches and res.price.web_search_per == PER_PROMPT:
            # a model billed once per grounded prompt (Gemini 2.x grounding): one fee, however many
            # searches the request allows or the model runs
            searches = 1
        elif searches < 0:
            # web search allowed with no bound on the request (no ``max_tool_calls``): each search is
            # a tool call the model writes into its output, so the output bound bounds them
            searches = -(-out // TOKENS_PER_SEARCH)
        if searches:
            cost += usage_nanos(res.price, Usage(web_searches=searches))
        return Estimate(provider, route, shape, res, out, why, cost, dict(variant or {}), searches, named)

    def estimate(self, provider: str, route: str, body: Any) -> Estimate:
        """:meth:`shape`, :meth:`variant` and :meth:`searches` of ``body``, priced (:meth:`price`),
        with the provider looked up once for all of them."""
        spec = self._spec(provider)
        shape = self.shape(provider, route, body)  # refuses a body that is not an object
        if spec is None:
            variant: dict[str, str] = {}
            searches = 0
        else:
            variant, searches = spec.variant(body, self.openai_auto_tier), spec.searches(body)
        est = self._price(provider, route, shape, variant, searches, spec)
        if spec is None or not spec.strict_prices:
            return est
        # an OpenAI-compatible router's fallbacks (OpenRouter's "models"): the upstream may serve any
        # of them, so the request is held at the dearest — a free first choice never prices the rest
        fallbacks = body.get("models") if is_map(body) else None
        if not isinstance(fallbacks, list):
            return est
        for m in fallbacks:
            if isinstance(m, str) and m and m != shape.model:
                other = self._price(provider, route, replace(shape, model=m), variant, searches, spec)
                if other.cost_nanos > est.cost_nanos:
                    est = replace(other, shape=shape)
        return est

    def with_output(self, est: Estimate, max_output: int) -> Estimate:
        """``est`` re-priced with its per-choice output bound set to ``max_output`` (a clamp). A
        request whose output no body field bounds (an image: its size and quality set it) keeps its
        cost — a clamp cannot lower it — and is marked as having no output left to clamp, so the
        rule, finding nothing more to take, refuses it."""
        if est.shape.fixed_output:
            return replace(est, output_tokens=0, output_bound_from=f"{est.output_bound_from}; cannot be clamped")
        return self.price(est.provider, est.route, replace(est.shape, requested_output=max_output), est.variant,
                          est.searches if est.searches_named else -1)
