"""``spendgate prices show MODEL`` and ``spendgate prices update --from FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from spendgate import ledger
from spendgate.cli.context import Context
from spendgate.cli.output import WARN, emit_json, say, table, usd, working
from spendgate.pricing.table import FEE_RATES, PER_PROMPT, PER_SEARCH, UNIT_LABELS, ModelPrice, Rate, UnitPrice

#: what a per-request fee counts, by rate name (a web search fee by how the model bills it)
_FEE_UNITS = {"web_search_k": {PER_SEARCH: "per 1,000 searches", PER_PROMPT: "per 1,000 grounded prompts"}}


def _rate_cells(name: str, rate: Rate, search_per: str = PER_SEARCH) -> tuple[str, str, str]:
    unit = _FEE_UNITS.get(name, {}).get(search_per, "per 1,000 requests") if name in FEE_RATES else "per Mtok"
    tiers = ", ".join(f"{usd(p)} above {s:,} tokens" for s, p in rate.tiers)
    return name, f"{usd(rate.base)} {unit}", tiers


def _variant_rows(p: ModelPrice) -> list[tuple[str, str, str]]:
    rows = []
    for v in p.variants:
        if not v.rates:
            rows.append((v.label, "standard rates", v.since or ""))
            continue
        rates = ", ".join(f"{n} {usd(r.base)}" + (" (+tiers)" if r.tiers else "") for n, r in v.rates.items())
        rows.append((v.label, rates, v.since or ""))
    return rows


#: where a model priced per unit is priced: image generation is a priced route; speech,
#: transcription and translation bodies are not read, so their routes pass only under ``flat_holds``
UNIT_ROUTES = {"image": "/v1/images/generations: held and charged at this price per image",
               "character": "/v1/audio/speech: not priced by spendgate; pass it with flat_holds",
               "minute": "/v1/audio/transcriptions, /v1/audio/translations: not priced by spendgate; "
                         "pass them with flat_holds"}


def _show_unit(ctx: Context, args: argparse.Namespace, unit: UnitPrice) -> int:
    """A model priced per image, character or minute of audio rather than per token."""
    warning = ctx.prices.stale_warning()
    doc = {"model": args.model, "known": True, "resolved": f"{unit.provider}/{unit.model}", "how": "per unit",
           **unit.to_json(), "route": UNIT_ROUTES.get(unit.unit), "table_built": ctx.prices.built,
           "warning": warning}
    if args.json:
        emit_json(doc)
        return 0
    print(f"{args.model} -> {unit.provider}/{unit.model} (priced {UNIT_LABELS.get(unit.unit, unit.unit)})")
    table(("option", "USD"), [(opt or "any", f"{usd(p)} {UNIT_LABELS.get(unit.unit, unit.unit)}")
                              for opt, p in unit.prices.items()])
    if unit.unit in UNIT_ROUTES:
        print(f"route: {UNIT_ROUTES[unit.unit]}")
    print(f"source: {unit.source}" + (f", price since {unit.since}" if unit.since else "") +
          f"; table built {ctx.prices.built}")
    if warning:
        say(f"warning: {warning}", WARN)
    return 0


def cmd_prices_show(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    res = ctx.prices.resolve(args.model, args.provider)
    unit = ctx.prices.unit_price(args.model, args.provider) if res is None else None
    if unit is not None:
        return _show_unit(ctx, args, unit)
    if res is None:
        dear = ctx.prices.dearest(args.provider)
        doc: dict[str, Any] = {
            "model": args.model, "known": False, "unpriced_policy": ctx.policy.unpriced,
            "charged_as": f"{dear.provider}/{dear.model}" if ctx.policy.unpriced == "dearest" else None,
            "rates_usd_per_mtok": dear.rates_json() if ctx.policy.unpriced == "dearest" else None}
        if args.json:
            emit_json(doc)
        else:
            msg = (f"charged as the dearest known model, {dear.provider}/{dear.model}"
                   if ctx.policy.unpriced == "dearest" else "refused (unpriced = \"block\")")
            print(f"{args.model}: no price known; {msg}.")
        return 1
    p = res.price
    warning = ctx.prices.stale_note(p) or ctx.prices.stale_warning()
    doc = {"model": args.model, "known": True, "resolved": f"{p.provider}/{p.model}", "how": res.how,
           "rates_usd_per_mtok": p.rates_json(), "max_output": p.max_output,
           "variants": [v.to_json() for v in p.variants],
           "context_window": p.context_window, "source": p.source, "price_since": p.since,
           "price_checked": ctx.prices.price_date(p), "note": p.note or None,
           "table_built": ctx.prices.built, "warning": warning}
    if args.json:
        emit_json(doc)
        return 0
    print(f"{args.model} -> {p.provider}/{p.model} ({res.how})")
    table(("rate", "USD", "tiers"), [_rate_cells(n, r, p.web_search_per) for n, r in p.rates().items()])
    if p.variants:
        print("variants (a request or response naming one is priced at its rates; the rest stay standard):")
        table(("when", "rates (USD per Mtok)", "since"), _variant_rows(p))
    print(f"max output: {p.max_output or 'unknown (bounded by the context window)'}; "
          f"context window: {p.context_window or 'unknown'}")
    if p.note:
        print(f"note: {p.note}")
    print(f"source: {p.source}" + (f", price since {p.since}" if p.since else "") +
          f"; table built {ctx.prices.built}")
    if warning:
        say(f"warning: {warning}", WARN)
    return 0


def cmd_prices_update(args: argparse.Namespace) -> int:
    from spendgate.pricing.litellm import plan_import, write_import

    ctx = Context.from_args(args)
    dest = ledger.home() / "prices.json"
    with working(f"reading {args.source}"):  # a spinner on a terminal while a large file is merged
        plan = plan_import(Path(args.source), ctx.prices, allow_free=args.allow_free, skip_free=args.skip_free)
        if not args.dry_run:
            write_import(plan, dest)
    down = plan.lowered
    doc = {"imported": plan.imported, "added": len(plan.added), "changed": len(plan.changes),
           "lowered": [{"model": c.model, "field": c.field, "from": str(c.old), "to": str(c.new)} for c in down],
           "raised_or_new": [{"model": c.model, "field": c.field, "from": None if c.old is None else str(c.old),
                              "to": str(c.new)} for c in plan.changes if not c.down],
           "skipped": len(plan.skipped), "skipped_examples": plan.skipped[:10],
           "free_left_out": sorted(plan.free), "dry_run": args.dry_run, "path": str(dest)}
    if args.json:
        emit_json(doc)
        return 0
    verb = "would import" if args.dry_run else "imported"
    ups = [c for c in plan.changes if not c.down and c.old is not None]
    print(f"{verb} {plan.imported} model prices into {dest}: {len(plan.added)} new models; "
          f"{len(down)} rates DOWN, {len(ups)} up, {len(plan.changes) - len(down) - len(ups)} new; "
          f"{len(plan.skipped)} entries skipped (no complete price), {len(plan.free)} left out for a $0 price")
    if down:
        say("rates that went DOWN:", WARN)
        for c in down:
            say(f"  {c.describe()}", WARN)
    if ups:
        print("rates that went up:")
        for c in ups:
            print(f"  {c.describe()}")
    if args.dry_run:
        print("dry run: nothing written")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``prices`` command group."""
    prices = sub.add_parser("prices", parents=[common], help="show or import model prices")
    psub = prices.add_subparsers(dest="prices_command", required=True, metavar="ACTION")
    show = psub.add_parser("show", parents=[common], help="a model's rates, variants and where they came from")
    show.add_argument("model")
    show.add_argument("--provider", help="search this provider first (openai, anthropic, google, …)")
    show.set_defaults(func=cmd_prices_show)
    upd = psub.add_parser("update", parents=[common],
                          help="merge a LiteLLM-format price JSON over the prices in force")
    upd.add_argument("--from", dest="source", required=True, metavar="FILE")
    upd.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    free = upd.add_mutually_exclusive_group()
    free.add_argument("--allow-free", action="store_true",
                      help="import $0 input/output prices (refused by default on a priced model)")
    free.add_argument("--skip-free", action="store_true",
                      help="leave rows with a $0 input/output price out and import the rest")
    upd.set_defaults(func=cmd_prices_update)
