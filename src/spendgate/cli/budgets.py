"""``spendgate budgets add | set | remove | list | limit | topup``: budgets kept in the store at run time.

A run-time budget is a ``[[budget]]`` table kept in the store, so every ``serve`` sharing it applies
it within a second (see :mod:`spendgate.policy.runtime`). It is built here from flags (or a TOML
``--table``) into exactly the table the file would hold and validated by the file's own parser, so
errors read the same (``budget "x".usd: …``). The file's rules stay the operator's word: a run-time
budget never takes one of their names, but a per-scope limit or a top-up applies to either.
Every change is an event in the store and in the audit log.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import time
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from spendgate.cli.context import Context, audit_log, open_store
from spendgate.cli.output import OK, WARN, emit_json, say, table, when
from spendgate.errors import ConfigError, SpendgateError
from spendgate.ledger import Event, Ledger
from spendgate.money import nanos_to_usd, usd_to_nanos
from spendgate.policy import policy_hash
from spendgate.policy.model import Rule

#: flag -> table key, for the flags that carry a value as it is
_PLAIN = (("usd", "usd"), ("tokens", "tokens"), ("requests", "requests"), ("window", "window"), ("per", "per"),
          ("action", "action"), ("mode", "mode"), ("min_output", "min_output"), ("timezone", "timezone"),
          ("requires_capability", "requires_capability"), ("immutable", "immutable"))


def operator(args: argparse.Namespace) -> str:
    """Who made a change: ``--by``, else ``$USER@hostname``."""
    given = getattr(args, "by", None)
    if given:
        return str(given)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container): the uid's host still says where
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def record(ctx: Context, store: Ledger, event: Event) -> None:
    """Keep an operator's change in the store's events and in the signed audit log (as ``approve``)."""
    store.record(event)
    log = audit_log(ctx.policy, store)
    if log is not None:
        try:
            log.add(event, policy_hash(ctx.policy))
        finally:
            log.close()


# -- building a table from flags ----------------------------------------------------------------------


def _pairs(text: str, flag: str) -> list[tuple[str, str]]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{flag}: expected name=value[,name=value…], got {part!r}")
        out.append((name.strip(), value.strip()))
    return out


def parse_match(text: str) -> dict[str, Any]:
    """``model=gpt-4o*,tier=frontier,tag:env=prod`` as a ``match`` table; a name given twice takes
    either value (a list), as in the file. Unknown names are left for the rule's own check."""
    match: dict[str, Any] = {}
    for name, value in _pairs(text, "--match"):
        if name.startswith("tag:") or name.startswith("tags."):
            tags = match.setdefault("tags", {})
            tag = name.split(":", 1)[1] if name.startswith("tag:") else name.split(".", 1)[1]
            tags[tag] = [*_list(tags.get(tag)), value] if tag in tags else value
        else:
            match[name] = [*_list(match[name]), value] if name in match else value
    return match


def _list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list) else [v] if v is not None else []


def table_from_args(args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``[[budget]]`` table ``args`` describe: ``base`` (``set`` starts from the stored one), then
    ``--table``, then each flag given. The name is the positional NAME."""
    doc: dict[str, Any] = dict(base or {})
    if args.table is not None:
        try:
            given = tomllib.loads(args.table)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--table: not a TOML table body ({exc}); e.g. 'usd = 10\nwindow = \"day\"'") from None
        if "name" in given and given["name"] != args.name:
            raise ConfigError(f'budget "{args.name}".name: --table names {given["name"]!r}; leave it out or give '
                              "the same name")
        doc.update(given)
    for flag, key in _PLAIN:
        value = getattr(args, flag, None)
        if value is not None:
            doc[key] = value
    if args.match is not None:
        doc["match"] = parse_match(args.match)
    if args.alert_at is not None:
        doc["alert_at"] = [v.strip() for v in args.alert_at.split(",") if v.strip()]
    if args.downgrade is not None:
        doc["downgrade"] = dict(_pairs(args.downgrade, "--downgrade"))
    for key in getattr(args, "unset", None) or ():
        doc.pop(key, None)
    doc["name"] = args.name
    return doc


# -- the commands ---------------------------------------------------------------------------------------


def cmd_budgets(args: argparse.Namespace) -> int:
    action = args.budgets_command
    ctx = Context.from_args(args)
    store = open_store(args, create=action != "list")
    try:
        if action == "list":
            return _list_rules(args, ctx, store)
        if action in ("add", "set"):
            return _put(args, ctx, store)
        if action == "remove":
            return _remove(args, ctx, store)
        if action == "limit":
            return _limit(args, ctx, store)
        return _topup(args, ctx, store)
    finally:
        store.close()


def _put(args: argparse.Namespace, ctx: Context, store: Ledger) -> int:
    from spendgate.policy import runtime

    add = args.budgets_command == "add"
    base = None
    if not add:
        base = runtime.get_table(store, args.name)
        if base is None:
            if any(r.name == args.name for r in ctx.policy.rules):
                raise ConfigError(f'budget "{args.name}": it is in the policy file ({ctx.policy.source}); change it '
                                  "there, or give one scope its own limit with spendgate budgets limit")
            raise ConfigError(f'budget "{args.name}": no run-time budget of this name; add it with spendgate '
                              "budgets add")
    table_doc = table_from_args(args, base)
    by, now = operator(args), time.time()
    rule = runtime.put_rule(store, table_doc, file_rules=ctx.policy.rules, by=by, create=add,
                            default_tz=ctx.policy.timezone, now=now)
    change = "add" if add else "set"
    record(ctx, store, runtime.change_event(change, by=by, rule=rule.name, now=now,
                                            amounts={"limit_usd": usd_to_nanos(rule.usd)} if rule.usd is not None
                                            else {}))
    doc = runtime.rule_doc(rule, "store", mode=ctx.policy.mode_of(rule),
                           record=runtime.rule_records(store, now=now).get(rule.name))
    if args.json:
        emit_json({"change": change, "budget": doc})
    else:
        say(f"{'added' if add else 'changed'} budget {rule.name}: {_limits_text(doc)} {_window_text(rule)} "
            f"{_per_text(rule)}, {rule.action}{' (shadow: records, never refuses)' if doc['mode'] == 'shadow' else ''}",
            OK)
        print("every spendgate serve on this store applies it within a second")
    return 0


def _remove(args: argparse.Namespace, ctx: Context, store: Ledger) -> int:
    from spendgate.policy import runtime

    if not runtime.remove_rule(store, args.name, file_rules=ctx.policy.rules):
        raise SpendgateError(f'budget "{args.name}": no run-time budget of this name; see spendgate budgets list')
    by = operator(args)
    record(ctx, store, runtime.change_event("remove", by=by, rule=args.name))
    if args.json:
        emit_json({"change": "remove", "removed": args.name})
    else:
        say(f"removed budget {args.name} (what its buckets counted stays in the ledger)", OK)
    return 0


def _list_rules(args: argparse.Namespace, ctx: Context, store: Ledger) -> int:
    from spendgate.policy import runtime

    docs = runtime.listing(store, ctx.policy)
    if args.json:
        emit_json({"budgets": docs})
        return 0
    rows: list[tuple[str, ...]] = []
    for d in docs:
        origin = d["source"] if d["source"] != "store" else f"store ({d['by']}, {when(d['at'])})"
        rows.append((d["name"], _limits_text(d), d["window"], d["per"], d["action"], d["mode"], origin))
        for lim in d["limits"]:
            rows.append((f"  {lim['scope']}", _limits_text(lim), "", "", "", "", f"limit ({lim['by']}, "
                                                                                 f"{when(lim['at'])})"))
    table(("budget", "limit", "window", "per", "action", "mode", "source"), rows)
    return 0


def _limits_text(d: Mapping[str, Any]) -> str:
    parts = []
    if d.get("usd") is not None:
        parts.append(f"${d['usd']}")
    if d.get("tokens") is not None:
        parts.append(f"{d['tokens']:,} tok")
    if d.get("requests") is not None:
        parts.append(f"{d['requests']:,} req")
    return " + ".join(parts) or "-"


def _window_text(rule: Rule) -> str:
    kind = rule.window.kind
    return {"total": "in total", "request": "per request"}.get(kind, f"per {rule.window.text}")


def _per_text(rule: Rule) -> str:
    return "for everyone" if rule.per == "global" else f"per {rule.per}"


def _rule(ctx: Context, store: Ledger, name: str) -> tuple[Rule, str]:
    from spendgate.policy import runtime

    found = runtime.find_rule(store, name, ctx.policy.rules, default_tz=ctx.policy.timezone)
    if found is None:
        raise SpendgateError(f'budget "{name}": no such budget in the policy file or the store; see spendgate '
                             "budgets list")
    return found


def _bucket_text(row: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"${v}" if row["unit"] == "usd" else f"{v:,} {'tok' if row['unit'] == 'tokens' else 'req'}"

    return (f"{row['bucket']}: limit {fmt(row['limit'])}, spent {fmt(row['spent'])}, held {fmt(row['held'])}, "
            f"remaining {fmt(row['remaining'])}")


def _limit(args: argparse.Namespace, ctx: Context, store: Ledger) -> int:
    from spendgate.policy import runtime

    rule, source = _rule(ctx, store, args.rule)
    scope = runtime.limit_scope(store, rule, runtime.parse_scope(args.scope))
    by, now = operator(args), time.time()
    if args.clear:
        if not runtime.clear_limit(store, rule.name, scope):
            raise SpendgateError(f'budget "{rule.name}": {scope} has no limit of its own; see spendgate budgets list')
        amounts: dict[str, int] = {}
    else:
        lim = runtime.set_limit(store, rule, scope, usd=args.usd, tokens=args.tokens, requests=args.requests,
                                by=by, now=now)
        amounts = {f"limit_{u}": v for u, v in (("usd", lim.usd), ("tokens", lim.tokens),
                                                 ("requests", lim.requests)) if v is not None}
    rows = runtime.bucket_rows(store, rule, scope, now)
    record(ctx, store, runtime.change_event("limit", by=by, rule=rule.name, scope=scope, now=now,
                                            bucket=rows[0]["bucket"] if rows else "", amounts=amounts,
                                            cleared="true" if args.clear else "false"))
    refused = [r for r in rows if r["refuses"]]
    if args.json:
        emit_json({"change": "limit", "rule": rule.name, "source": source, "scope": scope, "cleared": args.clear,
                   "buckets": rows, "refuses": bool(refused)})
        return 0
    say(f"{rule.name} {scope}: " + ("back to the budget's own limit" if args.clear else "limit set")
        + " (what was spent stays counted)", OK)
    for r in rows:
        print("  " + _bucket_text(r))
    if refused:
        frees = "until it is topped up (spendgate budgets topup) or the limit is raised" \
            if rule.window.kind == "total" else f"until the {rule.window.text} window frees room"
        say(f"{scope} has already used {'/'.join(r['unit'] for r in refused)} up to this limit: further requests "
            f"in this bucket are refused {frees}", WARN)
    return 0


def _topup(args: argparse.Namespace, ctx: Context, store: Ledger) -> int:
    from spendgate.policy import runtime
    from spendgate.policy.parse import parse_usd

    rule, _ = _rule(ctx, store, args.rule)
    scope = runtime.bucket_scope(store, rule, runtime.parse_scope(args.scope))
    nanos = usd_to_nanos(parse_usd(args.usd, "--usd"))
    by, now = operator(args), time.time()
    rb = runtime.topup(store, rule, scope, nanos, by=by, now=now,
                       override=runtime.get_limit(store, rule.name, scope, now=now))
    [row] = [r for r in runtime.bucket_rows(store, rule, scope, now) if r["unit"] == "usd"]
    record(ctx, store, runtime.change_event("topup", by=by, rule=rule.name, scope=scope, bucket=rb.key, now=now,
                                            amounts={"topup_usd": nanos, "limit_usd": usd_to_nanos(row["limit"])}))
    if args.json:
        emit_json({"change": "topup", "rule": rule.name, "scope": scope, "bucket": rb.key,
                   "topup_usd": str(nanos_to_usd(nanos)), "limit_usd": row["limit"], "spent_usd": row["spent"],
                   "held_usd": row["held"], "remaining_usd": row["remaining"]})
    else:
        say(f"topped up {rule.name} {scope} by ${nanos_to_usd(nanos)}: limit now ${row['limit']}, spent "
            f"${row['spent']}, held ${row['held']}, remaining ${row['remaining']} (spend is not reset)", OK)
    return 0


# -- the parser ---------------------------------------------------------------------------------------------


def _rule_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the budget's name (not one of the policy file's)")
    p.add_argument("--table", metavar="TOML",
                   help="the whole [[budget]] table body, e.g. 'usd = 10\\nwindow = \"day\"'")
    p.add_argument("--usd", help="limit in dollars, e.g. 10 or 0.50")
    p.add_argument("--tokens", type=int, help="limit in tokens")
    p.add_argument("--requests", type=int, help="limit in requests (with --window 1m: per minute)")
    p.add_argument("--window", help="request, total, day, week, month or a duration (30s, 15m, 1h, 7d)")
    p.add_argument("--per", help="global, key, user, team, session, agent, feature, model, provider, tier or tag:NAME")
    p.add_argument("--match", metavar="NAME=VALUE,…", help="which requests count, e.g. model=gpt-4o*,tier=frontier,"
                                                            "tag:env=prod")
    p.add_argument("--action", help="block, hold, downgrade, clamp or alert")
    p.add_argument("--alert-at", metavar="F,F,…", help="alert at these fractions of the limit, e.g. 0.5,0.8,1")
    p.add_argument("--immutable", action=argparse.BooleanOptionalAction, default=None,
                   help="no approval lifts it")
    p.add_argument("--mode", help="enforce or shadow (records would-be refusals, refuses nothing)")
    p.add_argument("--downgrade", metavar="FROM=TO,…", help="with --action downgrade: model -> cheaper model")
    p.add_argument("--min-output", type=int, help="with --action clamp: the fewest output tokens worth sending")
    p.add_argument("--timezone", help="for day/week/month windows, e.g. Europe/Berlin")
    p.add_argument("--requires-capability", help="the lowest capability a matching request must carry")
    p.add_argument("--by", help="who makes the change (default $USER@hostname)")


def _scope_help() -> str:
    return "user=alice, team=ml, key=<id>, tag:env=prod … (global for a per-global budget)"


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate budgets …``."""
    b = sub.add_parser("budgets", parents=[common], help="budgets kept in the store, changed while serve runs")
    bsub = b.add_subparsers(dest="budgets_command", required=True, metavar="ACTION")
    add = bsub.add_parser("add", parents=[common], help="add a run-time budget (fields as a [[budget]] table)")
    _rule_flags(add)
    add.set_defaults(func=cmd_budgets)
    st = bsub.add_parser("set", parents=[common], help="change fields of a run-time budget")
    _rule_flags(st)
    st.add_argument("--unset", action="append", metavar="FIELD", help="drop a field from the table (repeatable)")
    st.set_defaults(func=cmd_budgets)
    rm = bsub.add_parser("remove", parents=[common], help="remove a run-time budget")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--by", help="who makes the change (default $USER@hostname)")
    rm.set_defaults(func=cmd_budgets)
    bsub.add_parser("list", parents=[common], help="every budget in force, where it comes from, per-scope limits") \
        .set_defaults(func=cmd_budgets)
    lim = bsub.add_parser("limit", parents=[common], help="one scope's own limit under a per budget (spend is kept)")
    lim.add_argument("rule", metavar="RULE")
    lim.add_argument("scope", metavar="SCOPE", help=_scope_help())
    lim.add_argument("--usd", help="this scope's limit in dollars")
    lim.add_argument("--tokens", type=int, help="this scope's limit in tokens")
    lim.add_argument("--requests", type=int, help="this scope's limit in requests")
    lim.add_argument("--clear", action="store_true", help="drop this scope's own limit: the budget's applies again")
    lim.add_argument("--by", help="who makes the change (default $USER@hostname)")
    lim.set_defaults(func=cmd_budgets)
    top = bsub.add_parser("topup", parents=[common], help='add headroom to a window = "total" (prepaid) budget')
    top.add_argument("rule", metavar="RULE")
    top.add_argument("scope", metavar="SCOPE", help=_scope_help())
    top.add_argument("--usd", required=True, help="dollars to add")
    top.add_argument("--by", help="who makes the change (default $USER@hostname)")
    top.set_defaults(func=cmd_budgets)


__all__: Sequence[str] = ("add_parser", "operator", "parse_match", "record", "table_from_args")
