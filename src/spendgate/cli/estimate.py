"""``spendgate estimate FILE.json``: a request body's worst case, priced before anything is sent."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from spendgate.cli.context import Context
from spendgate.cli.output import WARN, emit_json, say
from spendgate.errors import BadRequest, ConfigError
from spendgate.money import nanos_to_usd
from spendgate.pricing.table import PriceTable


def _infer_route(body: dict[str, Any], prices: PriceTable) -> tuple[str, str]:
    """The provider serving the body's model first-hand, and the route a body of its shape goes to."""
    from spendgate import providers

    spec = providers.for_model(str(body.get("model", "")), prices)
    return spec.name, spec.route_for(body)


def cmd_estimate(args: argparse.Namespace) -> int:
    from spendgate import providers
    from spendgate.estimate import Estimator

    ctx = Context.from_args(args)
    name = "stdin" if args.file == "-" else args.file
    try:
        # "-" reads the body from stdin, so a request can be piped in (`… | spendgate estimate -`)
        body = json.loads(sys.stdin.read() if args.file == "-" else Path(args.file).read_text())
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{name}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(body, dict):
        raise BadRequest(f"{name}: expected a JSON object (a request body)")
    provider, route = _infer_route(body, ctx.prices)
    if args.route:
        priced = providers.priced_routes()
        matches = sorted(k for k in priced if k[1] == args.route and (args.provider in (None, k[0])))
        if not matches:
            raise ConfigError(f"--route {args.route}: not a priced route; known: "
                              + ", ".join(sorted({r for _, r in priced})))
        provider, route = matches[0]
    elif args.provider:
        provider = args.provider
        route = providers.get(provider).route_for(body)
    kwargs = {"anthropic_factor": ctx.policy.anthropic_token_factor} if ctx.policy.anthropic_token_factor else {}
    # the estimator logs an unpriced model's warning for servers; here the command prints it once itself
    quiet, est_log = logging.NullHandler(), logging.getLogger("spendgate.estimate")
    est_log.addHandler(quiet)
    try:
        est = Estimator(ctx.prices, ctx.policy.unpriced, **kwargs).estimate(provider, route, body)
    finally:
        est_log.removeHandler(quiet)
    doc = {"provider": provider, "route": route, "model": est.model,
           "priced_as": f"{est.price.price.provider}/{est.price.price.model}", "how": est.price.how,
           "input_tokens": est.input_tokens, "input_exact": est.shape.exact,
           "output_tokens": est.output_tokens, "output_bound": est.output_bound_from,
           "cache_write": est.shape.cache_write, "worst_case_usd": str(nanos_to_usd(est.cost_nanos)),
           "warning": est.price.warning}
    if args.json:
        emit_json(doc)
    else:
        print(est.describe())
        if est.price.warning:
            say(f"warning: {est.price.warning}", WARN)
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate estimate``."""
    est = sub.add_parser("estimate", parents=[common], help="price a request body's worst case")
    est.add_argument("file", metavar="FILE.json", help="the request body; - reads it from stdin")
    from spendgate import providers

    est.add_argument("--provider", choices=[p.name for p in providers.all_providers()])
    est.add_argument("--route", help="e.g. /v1/chat/completions (inferred from the body when absent)")
    est.set_defaults(func=cmd_estimate)
