"""``spendgate`` — subcommands over the engine. Every command that prints data takes ``--json``.

Settings come from flags first, then the environment (``SPENDGATE_STORE``, ``SPENDGATE_CONFIG``,
``SPENDGATE_HOME``), then the policy file, then the embedded defaults.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spendgate import ledger
from spendgate.cli.alerts import add_parser as alerts_parser
from spendgate.cli.audit import add_parser as audit_parser
from spendgate.cli.output import Progress, bar, emit_json, table, usd, when
from spendgate.cli.prices import add_parser as prices_parser
from spendgate.cli.reconcile import add_parser as reconcile_parser
from spendgate.errors import BadRequest, ConfigError, SpendgateError
from spendgate.money import fmt_usd, nanos_to_usd
from spendgate.policy import Policy, default_policy, load, policy_hash
from spendgate.pricing.table import PriceTable

if TYPE_CHECKING:
    from spendgate.approvals import Pending
    from spendgate.events.chain import AuditLog


@dataclass
class Context:
    """What a command runs against, resolved once from flags, environment and policy."""

    policy: Policy
    store_url: str
    prices: PriceTable

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        path = getattr(args, "config", None) or os.environ.get("SPENDGATE_CONFIG")
        policy = load(path) if path else default_policy()
        store = args.store or os.environ.get("SPENDGATE_STORE") or policy.store or ledger.default_url()
        prices = PriceTable.bundled().with_overrides(ledger.home() / "prices.json")
        return cls(policy, store, prices)


# -- estimate ---------------------------------------------------------------------------------

def _infer_route(body: dict[str, Any], prices: PriceTable) -> tuple[str, str]:
    model = str(body.get("model", ""))
    res = prices.resolve(model)
    if "messages" in body and res is not None and res.price.provider == "anthropic":
        return "anthropic", "/v1/messages"
    if "messages" in body:
        return "openai", "/v1/chat/completions"
    if "prompt" in body:
        return "openai", "/v1/completions"
    if "input" in body and "embedding" in model:
        return "openai", "/v1/embeddings"
    return "openai", "/v1/responses"


def cmd_estimate(args: argparse.Namespace) -> int:
    from spendgate.estimate import ROUTES, Estimator

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
        matches = [k for k in ROUTES if k[1] == args.route and (args.provider in (None, k[0]))]
        if not matches:
            raise ConfigError(f"--route {args.route}: not a priced route; known: "
                              + ", ".join(sorted({r for _, r in ROUTES})))
        provider, route = matches[0]
    elif args.provider:
        provider = args.provider
        route = "/v1/messages" if provider == "anthropic" else route
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
            print(f"warning: {est.price.warning}")
    return 0


# -- config -----------------------------------------------------------------------------------

def cmd_config_check(args: argparse.Namespace) -> int:
    from spendgate.events.signing import load_key

    try:
        policy = load(args.file)
        if policy.audit.enabled and policy.audit.key is not None:
            load_key(policy.audit.key)  # an operator's key must be readable now, not when serve starts
    except ConfigError as exc:
        if not args.json:
            raise
        # a script reading --json gets its one document on a failure too, and the exit status
        emit_json({"ok": False, "file": args.file, "errors": [str(exc)]})
        return 2
    doc = {"ok": True, "file": args.file, "budgets": [
        {"name": r.name, "usd": str(r.usd) if r.usd is not None else None, "tokens": r.tokens,
         "window": r.window.text, "per": r.per, "action": r.action, "immutable": r.immutable}
        for r in policy.rules]}
    if args.json:
        emit_json(doc)
    else:
        print(f"{args.file}: OK, {len(policy.rules)} budget(s)")
        table(("name", "limit", "window", "per", "action"),
              [(r.name, " / ".join(x for x in (usd(r.usd) if r.usd is not None else "",
                                                f"{r.tokens:,} tokens" if r.tokens is not None else "") if x),
                r.window.text, r.per, r.action + (" (immutable)" if r.immutable else ""))
               for r in policy.rules])
    return 0


# -- replay -----------------------------------------------------------------------------------

def cmd_replay(args: argparse.Namespace) -> int:
    from spendgate.replay import read_trace, replay

    ctx = Context.from_args(args)
    if args.chart and not Path(args.chart).parent.is_dir():  # said now, not after the whole replay
        raise ConfigError(f"--chart {args.chart}: cannot write the chart (no directory {Path(args.chart).parent})")
    path = Path(args.trace)
    total = sum(1 for line in path.open() if line.strip()) if path.exists() else 0
    result = replay(read_trace(path, ctx.prices), ctx.policy, ctx.prices, approve=args.approve,
                    persist=args.persist, progress=Progress(total, "replaying") if total > 1000 else None)
    if args.chart:
        from spendgate.chart import write_chart

        try:
            write_chart(result, Path(args.chart))
        except OSError as exc:
            raise ConfigError(f"--chart {args.chart}: cannot write the chart ({exc.strerror or exc})") from exc
    if args.json:
        emit_json(result.as_dict())
        return 0
    doc = result.as_dict()
    print(f"{result.requests} requests: {result.forwarded} forwarded, {result.refused} refused "
          f"under {ctx.policy.source}")
    table(("", "USD"), [("total (no guard)", fmt_usd(result.total_nanos)),
                        ("forwarded", fmt_usd(result.forwarded_nanos)),
                        ("refused", fmt_usd(result.refused_nanos)),
                        ("reduction", f"{result.reduction:.1%}")])
    if doc["rules"]:
        print()
        table(("rule", "action", "fired"), [(r["rule"], r["action"], r["count"]) for r in doc["rules"]])
        first = result.firings[0]
        print(f"\nfirst firing: {first.as_dict()['timestamp']} {first.rule} ({first.action}) "
              f"session {first.session}: {first.detail}")
    return 0


# -- status and report ------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    from spendgate.report import status

    ctx = Context.from_args(args)
    store = ledger.open(ctx.store_url, create=False)
    expired = _ExpiryLog(ctx.policy, store)
    try:
        rows = status(store, on_expired=expired)
    finally:
        expired.close()
        store.close()
    docs: list[dict[str, Any]] = []
    rows_out: list[tuple[str, ...]] = []
    for b, st in rows:
        limit = (st.limit or 0) + st.granted if st.limit is not None else None
        money = b.unit == "usd"

        def fmt(n: int, money: bool = money) -> str:
            return fmt_usd(n) if money else f"{n:,} tok"

        rows_out.append((b.key, fmt(st.spent), fmt(st.held), fmt(limit) if limit is not None else "-",
                         bar(st.used / limit) if limit else ""))
        docs.append({"bucket": b.key, "unit": b.unit,
                     "spent": str(nanos_to_usd(st.spent)) if money else st.spent,
                     "held": str(nanos_to_usd(st.held)) if money else st.held,
                     "limit": (str(nanos_to_usd(limit)) if money else limit) if limit is not None else None,
                     "granted": str(nanos_to_usd(st.granted)) if money else st.granted})
    # a budget no request has reached yet has no bucket in the store; it is in force all the same,
    # so it is listed at $0 (a fresh store would otherwise look unguarded)
    used = {b.key.split("|", 1)[0] for b, _ in rows}
    idle = [r for r in ctx.policy.rules if r.name not in used and (r.usd is not None or r.tokens is not None)]
    for r in idle:
        per_call = r.window.kind == "request"
        zero = "-" if per_call else "$0.00" if r.usd is not None else "0 tok"
        scope = "each request" if per_call else \
            f"{'all requests' if r.per == 'global' else 'each ' + r.per}, {r.window.text}"
        rows_out.append((f"{r.name} ({scope})", zero, zero,
                         " / ".join(x for x in (usd(r.usd) if r.usd is not None else "",
                                                f"{r.tokens:,} tok" if r.tokens is not None else "") if x),
                         "" if per_call else bar(0)))
    if args.json:
        emit_json({"store": ctx.store_url, "buckets": docs,
                   "unused_budgets": [{"rule": r.name, "per": r.per, "window": r.window.text,
                                       "limit_usd": str(r.usd) if r.usd is not None else None,
                                       "limit_tokens": r.tokens} for r in idle],
                   "price_table": {"built": ctx.prices.built, "warning": ctx.prices.stale_warning()}})
    else:
        if not docs:
            print(f"no budget has been used yet in {ctx.store_url}; the limits in force:")
        table(("bucket", "spent", "held", "limit", "use"), rows_out)
    if not args.json and ctx.prices.stale_warning():
        print(f"warning: {ctx.prices.stale_warning()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from spendgate.policy.parse import parse_duration
    from spendgate.report import approvals, report

    ctx = Context.from_args(args)
    by = [f.strip() for f in args.by.split(",") if f.strip()]
    if not by:
        raise ConfigError("--by: name at least one field, such as user,model")
    store = ledger.open(ctx.store_url, create=False)
    expired = _ExpiryLog(ctx.policy, store)
    try:
        rows = report(store, by, args.since, on_expired=expired)
        granted = approvals(store, args.since)
    finally:
        expired.close()
        store.close()
    if args.json:
        emit_json({"since": args.since, "by": by, "rows": [r.as_dict(by) for r in rows],
                   "total_usd": str(nanos_to_usd(sum(r.cost for r in rows))), "approvals": granted})
        return 0
    if granted:
        table(("approved at", "channel", "by", "rule", "bucket", "granted"),
              [(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["ts"])), a["channel"], a["by"], a["rule"],
                a["bucket"], a["granted_usd"] if a["granted_usd"] in ("once", "") else usd(a["granted_usd"]))
               for a in granted])
        print()
    if not rows:
        print(f"no spend in the last {args.since}")
        return 0
    table((*by, "requests", "spent", "in tok", "out tok", "estimated", "refused"),
          [(*r.group, r.requests, fmt_usd(r.cost), f"{r.input_tokens:,}", f"{r.output_tokens:,}",
            r.estimated or "", r.refused or "") for r in rows])
    start = time.time() - parse_duration(args.since, "--since")
    print(f"total {fmt_usd(sum(r.cost for r in rows))} since {when(start)} ({args.since})")
    return 0


# -- the proxy and its approvals ----------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from spendgate.proxy.app import build

    ctx = Context.from_args(args)
    token = args.admin_token or os.environ.get("SPENDGATE_ADMIN_TOKEN")
    proxy = build(ctx.policy, ctx.store_url, token, upstream_timeout_s=args.upstream_timeout, prices=ctx.prices,
                  admin_base=f"http://{args.host}:{args.port}")
    ups = ", ".join(f"{k} -> {v}" for k, v in proxy.config.upstreams.items())
    listening = False

    def started(_aiohttp_banner: str) -> None:
        """aiohttp calls its ``print`` once every socket is bound: only then is "guarding" true."""
        nonlocal listening
        listening = True
        print(f"spendgate: guarding http://{args.host}:{args.port} (store {ctx.store_url}; policy "
              f"{ctx.policy.source}; upstreams {ups}; admin API {'on' if token else 'off'})",
              file=sys.stderr, flush=True)
        stale = ctx.prices.stale_warning()
        if stale:
            print(f"spendgate: warning: {stale}", file=sys.stderr, flush=True)

    try:
        web.run_app(proxy.app(), host=args.host, port=args.port, print=started, access_log=None,
                    handle_signals=True, loop=_fast_loop())
    except OSError as exc:
        if listening:
            raise
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {_os_reason(exc)} "
                          "(is another server on that port? choose one with --port)") from exc
    return 0


def _os_reason(exc: OSError) -> str:
    """The reason alone, without the errno number or a repeat of the address."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    return exc.strerror or str(exc)


def _fast_loop() -> Any:
    """uvloop where it is installed (Linux, macOS): it roughly halves the event loop's share of
    each proxied request; the standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on the platforms it supports
        import asyncio

        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def cmd_demo(args: argparse.Namespace) -> int:
    from spendgate.demo.run import run

    result = run(json=args.json)
    return 0 if result.turns_sent and result.refused else 1


def _open_store(args: argparse.Namespace, create: bool = True) -> ledger.Ledger:
    """The store the flags name; ``create=False`` for commands that only read, so a mistyped path
    is an error rather than a new, empty store."""
    return ledger.open(Context.from_args(args).store_url, create=create)


def cmd_approvals(args: argparse.Namespace) -> int:
    from spendgate import approvals

    store = _open_store(args, create=False)
    try:
        items = approvals.pending(store)
    finally:
        store.close()
    now = time.time()
    if args.json:
        emit_json({"pending": [{"id": p.id, "session": p.session, "model": _held_model(p), "rule": p.rule,
                                "estimate_usd": p.estimate_usd, "status": p.status,
                                "expires_in_s": int(p.expires_at - now)} for p in items]})
    elif not items:
        print("no held requests")
    else:
        table(("id", "session", "model", "rule", "estimate", "status", "expires"),
              [(p.id, p.session, _held_model(p), p.rule, usd(p.estimate_usd), p.status,
                f"{int(p.expires_at - now)} s") for p in items])
    return 0


def _held_model(p: Pending) -> str:
    """The model a held request asked for, read from its kept body: what an operator weighs first."""
    try:
        body = json.loads(p.body)
    except ValueError:
        return ""
    return str(body.get("model", "")) if isinstance(body, dict) else ""


def cmd_approve(args: argparse.Namespace) -> int:
    from spendgate import approvals

    try:
        max_usd = approvals.parse_max(args.max) if args.max is not None else None
    except ValueError as exc:
        raise ConfigError(f"--max: {exc}") from None
    ctx = Context.from_args(args)
    store = _open_store(args, create=False)
    audit = _audit_log(ctx.policy, store)
    on_event = None if audit is None else partial(audit.add, policy_hash=policy_hash(ctx.policy))
    try:
        p = approvals.approve(store, args.id, max_usd, on_event=on_event) if not args.deny \
            else approvals.deny(store, args.id, on_event=on_event)
    except (KeyError, ValueError) as exc:
        raise SpendgateError(str(exc.args[0])) from None
    finally:
        if audit is not None:
            audit.close()
        store.close()
    if args.json:
        emit_json({"id": p.id, "status": p.status, "max_usd": args.max})
    elif p.status == "denied":
        print(f"denied {p.id}")
    elif p.status == "approved":
        print(f"approved {p.id}: {usd(max_usd or 0)} more for {p.rule}; the session will not be asked again until "
              "it is used")
    else:
        print(f"approved {p.id} once: its next retry (or a 'yes' reply) goes through")
    return 0


def _audit_log(policy: Policy, store: ledger.Ledger) -> AuditLog | None:
    """A chain of the signed log for this one command (an operator's approval is a decision too)."""
    from spendgate.events.chain import AuditLog
    from spendgate.events.signing import load_key

    if not policy.audit.enabled:
        return None
    return AuditLog(store, load_key(policy.audit.key), checkpoint_entries=policy.audit.checkpoint_entries,
                    checkpoint_seconds=policy.audit.checkpoint_seconds)


class _ExpiryLog:
    """``status`` and ``report`` charge stale holds before reading; each such charge is a decision
    the audit log must hold, so a chain is written for it — only when a hold did expire."""

    def __init__(self, policy: Policy, store: ledger.Ledger) -> None:
        self.policy, self.store = policy, store
        self.log: AuditLog | None = None

    def __call__(self, event: ledger.Event) -> None:
        if self.log is None:
            try:
                self.log = _audit_log(self.policy, self.store)
            except ConfigError as exc:  # the read goes on; the charge is in the ledger all the same
                print(f"spendgate: warning: an expired hold is not in the audit log: {exc}", file=sys.stderr)
                self.policy = replace(self.policy, audit=replace(self.policy.audit, enabled=False))
                return
        if self.log is not None:
            self.log.add(event, policy_hash(self.policy))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def cmd_keys(args: argparse.Namespace) -> int:
    from spendgate import approvals, keys
    from spendgate.proxy.identity import parse_tags

    if args.keys_command == "create":
        try:
            tags = parse_tags(",".join(args.tag or ()))
        except ValueError as exc:
            raise ConfigError(f"--tag: {exc}") from None
        try:
            pre = approvals.parse_max(args.preapprove_max) if args.preapprove_max is not None else None
        except ValueError as exc:
            raise ConfigError(f"--preapprove-max: {exc}") from None
    store = _open_store(args, create=args.keys_command == "create")
    try:
        if args.keys_command == "create":
            secret, key = keys.create(store, user=args.user, team=args.team, tags=tags, preapprove_max_usd=pre)
            doc: Any = {"key": secret, **key.as_dict()}
            text = (f"{secret}\n(key id {key.id}, for keys list and keys revoke; the key itself is shown once: "
                    "spendgate stores only its hash)")
        elif args.keys_command == "list":
            found = keys.list_keys(store)
            doc = {"keys": [k.as_dict() for k in found]}
            listing = io.StringIO()
            table(("id", "user", "team", "tags", "preapprove max", "created"),
                  [(k.id, k.user or "", k.team or "", ",".join(f"{a}={b}" for a, b in k.tags.items()),
                    usd(k.preapprove_max_usd) if k.preapprove_max_usd is not None else "",
                    when(k.created) if k.created else "") for k in sorted(found, key=lambda k: k.created)],
                  out=listing)
            text = listing.getvalue().rstrip("\n") if found else "no keys"
        else:
            if not keys.revoke(store, args.id):
                raise SpendgateError(f"no key with id {args.id!r}; see spendgate keys list")
            doc, text = {"revoked": args.id}, f"revoked {args.id}"
    finally:
        store.close()
    if args.json:
        emit_json(doc)
    else:
        print(text)
    return 0


# -- wiring -----------------------------------------------------------------------------------

def _add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    """The flags people put either side of the command: ``spendgate --store URL status`` and
    ``spendgate status --store URL`` mean the same.

    The top-level parser holds the defaults; each command's copy defaults to ``SUPPRESS`` so that
    argparse, which copies a subcommand's namespace over the top-level one, only overwrites a
    value given after the command (the later flag wins) and never resets one given before it."""
    parser.add_argument("--store", default=default(None),
                        help="store URL (memory://, sqlite:///path, redis://host/db); env SPENDGATE_STORE")
    parser.add_argument("--config", default=default(None), help="policy file (spendgate.toml); env SPENDGATE_CONFIG")
    parser.add_argument("--json", action="store_true", default=default(False), help="print one JSON document")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="on an error, show the traceback instead of one line")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, lambda _: argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="spendgate", description="A pre-send spend guard for LLM API calls.")
    p.add_argument("--version", action="version", version=f"spendgate {_version()}")
    _add_common(p, lambda value: value)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prices_parser(sub, common)

    est = sub.add_parser("estimate", parents=[common], help="price a request body's worst case")
    est.add_argument("file", metavar="FILE.json", help="the request body; - reads it from stdin")
    est.add_argument("--provider", choices=("openai", "anthropic"))
    est.add_argument("--route", help="e.g. /v1/chat/completions (inferred from the body when absent)")
    est.set_defaults(func=cmd_estimate)

    cfg = sub.add_parser("config", help="validate a policy file")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    chk = csub.add_parser("check", parents=[common], help="validate without starting anything")
    chk.add_argument("file")
    chk.set_defaults(func=cmd_config_check)

    rep = sub.add_parser("replay", parents=[common], help="what a policy would have saved on a trace")
    rep.add_argument("trace")
    # --config is the policy flag everywhere; --policy stays as replay's older name for the same thing
    rep.add_argument("--policy", dest="config", default=argparse.SUPPRESS,
                     help="the same as --config: the policy file to judge the trace by (default: the built-in one)")
    rep.add_argument("--approve", action="store_true", help="answer every hold yes (once)")
    rep.add_argument("--persist", action="store_true",
                     help="a refused session keeps sending (default: a 'no' ends the session)")
    rep.add_argument("--chart", metavar="OUT.html", help="write cumulative spend with and without the guard")
    rep.set_defaults(func=cmd_replay)

    st = sub.add_parser("status", parents=[common], help="every budget: spent, held, limit")
    st.set_defaults(func=cmd_status)
    rp = sub.add_parser("report", parents=[common], help="spend grouped by fields")
    rp.add_argument("--by", default="model", help="comma-separated: user, team, session, model, feature, …")
    rp.add_argument("--since", default="24h", help="a duration such as 1h, 24h, 7d")
    rp.set_defaults(func=cmd_report)
    sv = sub.add_parser("serve", parents=[common], help="run the guarding proxy")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8787)
    sv.add_argument("--admin-token", help="token for /spendgate/… (env SPENDGATE_ADMIN_TOKEN); off when unset")
    sv.add_argument("--upstream-timeout", type=_seconds, metavar="S",
                    help="seconds to wait for an upstream's next bytes (default: the policy's upstream_timeout_s, 600)")
    sv.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="a runaway agent held by the guard, offline, no API key")
    demo.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print only one JSON document with the summary")
    demo.set_defaults(func=cmd_demo)

    ap = sub.add_parser("approvals", parents=[common], help="requests held for approval")
    ap.set_defaults(func=cmd_approvals)
    ok = sub.add_parser("approve", parents=[common], help="approve a held request by id")
    ok.add_argument("id")
    ok.add_argument("--max", help="grant this many dollars of headroom to the tripped budget")
    ok.set_defaults(func=cmd_approve, deny=False)
    no = sub.add_parser("deny", parents=[common], help="deny a held request by id")
    no.add_argument("id")
    no.set_defaults(func=cmd_approve, deny=True, max=None)

    keys = sub.add_parser("keys", help="spendgate virtual keys (sg-…), stored hashed")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", parents=[common], help="create a key for a user and team")
    kc.add_argument("--user", help="the user every request with this key counts under (no header overrides it)")
    kc.add_argument("--team", help="the team every request with this key counts under")
    kc.add_argument("--tag", action="append", metavar="NAME=VALUE", help="a tag the key binds (repeatable)")
    kc.add_argument("--preapprove-max", metavar="USD",
                    help="let X-Spendgate-Allow pre-approve up to this many dollars per budget and window")
    kc.set_defaults(func=cmd_keys)
    ksub.add_parser("list", parents=[common], help="list keys (ids only)").set_defaults(func=cmd_keys)
    kr = ksub.add_parser("revoke", parents=[common], help="revoke a key by id")
    kr.add_argument("id")
    kr.set_defaults(func=cmd_keys)

    reconcile_parser(sub, common)
    audit_parser(sub, common)
    alerts_parser(sub, common)
    return p


def _version() -> str:
    """The installed distribution's version, so ``--version`` names what pip installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spendgate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
        return "unknown (not installed)"


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {raw!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        # `spendgate report | head` ends quietly, like any Unix tool — only as the command itself:
        # a program calling main([...]) keeps its own handling of writes to closed sockets
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (SpendgateError, OSError) as exc:
        # an expected failure (a bad file, flag or store, a busy port, a disk) is one line that
        # names what and where; --debug shows the traceback instead, for a bug report
        if args.debug:
            raise
        print(f"spendgate: error: {_one_line(exc, args)}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return code


def _one_line(exc: BaseException, args: argparse.Namespace) -> str:
    if not isinstance(exc, OSError) or isinstance(exc, SpendgateError):
        return str(exc)
    command = " ".join(str(c) for c in (args.command, *(getattr(args, a, None) for a in _ACTIONS)) if c)
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return f"{command}: {where}{_os_reason(exc)}"


#: the attributes holding a command group's action (``prices update``, ``keys create``, …)
_ACTIONS = ("prices_command", "config_command", "keys_command", "audit_command")


if __name__ == "__main__":
    sys.exit(main())
