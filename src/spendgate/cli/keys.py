"""``spendgate keys create | list | rotate | revoke``: virtual keys (sg-…), stored hashed.

``keys list`` reads each key's own budget from the store (its buckets, as the engine counts them),
so what it shows as spent and remaining is what the next request with the key is weighed against.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from spendgate.cli.context import open_store
from spendgate.cli.output import emit_json, styled, table, usd, when
from spendgate.errors import ConfigError, SpendgateError

if TYPE_CHECKING:
    from spendgate.keys import VirtualKey
    from spendgate.ledger import Ledger

UNIT_LABEL = {"usd": "", "tokens": " tok", "requests": " req"}


def _create_args(args: argparse.Namespace, now: float) -> dict[str, Any]:
    """What ``keys create`` was given, checked before the store is opened: each bad value is refused
    naming its flag."""
    from spendgate import approvals, keys
    from spendgate.policy.parse import parse_usd
    from spendgate.request import parse_tags

    try:
        tags = parse_tags(",".join(args.tag or ()))
    except ValueError as exc:
        raise ConfigError(f"--tag: {exc}") from None
    try:
        pre = approvals.parse_max(args.preapprove_max) if args.preapprove_max is not None else None
    except ValueError as exc:
        raise ConfigError(f"--preapprove-max: {exc}") from None
    amount = parse_usd(args.usd.strip().lstrip("$"), "--usd") if args.usd is not None else None
    window = keys.check_budget(amount, args.tokens, args.requests, args.window)
    if args.capability is not None:
        keys.check_capability(args.capability)
    return {"user": args.user, "team": args.team, "tags": tags, "preapprove_max_usd": pre,
            "usd": amount, "tokens": args.tokens, "requests": args.requests, "window": window,
            "models": keys.parse_models(args.models), "capability": args.capability,
            "expires_at": keys.parse_expires(args.expires, now) if args.expires is not None else None, "now": now}


def _exact(unit: str, n: int) -> str:
    from spendgate.money import nanos_to_usd

    return str(nanos_to_usd(n)) if unit == "usd" else str(n)


def _shown(unit: str, n: int) -> str:
    from spendgate.money import nanos_to_usd

    return usd(nanos_to_usd(n)) if unit == "usd" else f"{n:,}{UNIT_LABEL[unit]}"


def budget_of(store: Ledger, key: VirtualKey, now: float) -> list[tuple[str, int, int, int]]:
    """Each unit of the key's own budget as (unit, limit, spent, held) — dollars in nano-dollars —
    read from the buckets the engine counts it in (scope ``global=(none)`` of rule ``key:<id>``)."""
    from spendgate.buckets import rule_buckets
    from spendgate.request import NONE

    rule = key.rule()
    if rule is None:
        return []
    rbs = list(rule_buckets(rule, f"global={NONE}", now))
    states = store.states([rb.bucket() for rb in rbs], now=now)
    return [(rb.unit, rb.limit, st.spent, st.held) for rb, st in zip(rbs, states, strict=True)]


#: ``keys list`` columns shown only when some key sets them (a store of plain keys lists as it always did)
OPTIONAL = ("budget", "spent", "remaining", "models", "capability", "expires", "aws access key id")


def _listing(store: Ledger, found: list[VirtualKey], now: float
             ) -> tuple[list[dict[str, Any]], tuple[str, ...], list[tuple[Any, ...]]]:
    """``keys list``: one JSON document per key (exact strings), and the table's headers and rows."""
    from spendgate.keys import aws_access_key_ids

    docs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    aws = aws_access_key_ids(store, now=now)  # the ids only: a secret is never listed
    for k in sorted(found, key=lambda k: k.created):
        budget = [(unit, limit, spent, held, max(0, limit - spent - held))
                  for unit, limit, spent, held in budget_of(store, k, now)]
        expired = k.expired(now)
        doc = k.as_dict()
        doc["status"] = "expired" if expired else "active"
        doc["budget"] = {unit: {"limit": _exact(unit, limit), "spent": _exact(unit, spent), "held": _exact(unit, held),
                                "remaining": _exact(unit, left)} for unit, limit, spent, held, left in budget}
        if aws.get(k.id):
            doc["aws_access_key_ids"] = aws[k.id]
        docs.append(doc)
        expires = (("expired " if expired else "") + when(k.expires_at)) if k.expires_at is not None else ""
        rows.append({"id": k.id, "user": k.user or "", "team": k.team or "",
                     "budget": " + ".join(_shown(u, lim) for u, lim, *_ in budget) + f" / {k.window}"
                     if budget else "",
                     "spent": " + ".join(_shown(u, sp + hd) for u, _, sp, hd, _ in budget),
                     "remaining": " + ".join(_shown(u, left) for u, *_, left in budget),
                     "models": ",".join(k.models), "capability": k.capability or "",
                     "expires": styled(expires, "bold red") if expired else expires,
                     "aws access key id": ",".join(aws.get(k.id, ())),
                     "tags": ",".join(f"{a}={b}" for a, b in k.tags.items()),
                     "preapprove max": usd(k.preapprove_max_usd) if k.preapprove_max_usd is not None else "",
                     "created": when(k.created) if k.created else ""})
    used = {c for c in OPTIONAL if any(str(r[c]) for r in rows)}
    headers = tuple(c for c in ("id", "user", "team", *OPTIONAL, "tags", "preapprove max", "created")
                    if c not in OPTIONAL or c in used)
    return docs, headers, [tuple(r[c] for c in headers) for r in rows]


def cmd_keys(args: argparse.Namespace) -> int:
    from spendgate import keys

    now = time.time()
    made = _create_args(args, now) if args.keys_command == "create" else None
    store = open_store(args, create=args.keys_command == "create")
    rows: list[tuple[Any, ...]] = []
    headers: tuple[str, ...] = ()
    try:
        if made is not None:
            secret, key = keys.create(store, **made)
            doc: Any = {"key": secret, **key.as_dict()}
            text = (f"{secret}\n(key id {key.id}, for keys list, keys rotate and keys revoke; the key itself is "
                    "shown once: spendgate stores only its hash)")
            if args.aws:
                akid, asecret = keys.create_aws(store, key)
                doc.update(aws_access_key_id=akid, aws_secret_access_key=asecret)
                text += (f"\naws_access_key_id = {akid}\naws_secret_access_key = {asecret}\n(AWS credentials "
                         "for SigV4 clients such as boto3's bedrock-runtime; the secret is kept in the store, "
                         "which spendgate needs to check each signature)")
        elif args.keys_command == "list":
            docs, headers, rows = _listing(store, keys.list_keys(store), now)
            doc = {"keys": docs}
            text = "" if docs else "no keys"
        elif args.keys_command == "rotate":
            got = keys.rotate(store, args.id, now=now)
            if got is None:
                raise SpendgateError(f"no key with id {args.id!r}; see spendgate keys list")
            secret, key = got
            doc = {"key": secret, **key.as_dict()}
            text = (f"{secret}\n(key id {key.id}: same key, same budget; the previous secret no longer works. "
                    "The new one is shown once)")
        else:
            if not keys.revoke(store, args.id):
                raise SpendgateError(f"no key with id {args.id!r}; see spendgate keys list")
            doc, text = {"revoked": args.id}, f"revoked {args.id}"
    finally:
        store.close()
    if args.json:
        emit_json(doc)
    elif text:
        print(text)
    else:  # keys list: printed after the store is closed, as the other actions' text
        table(headers, rows)
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate keys …``."""
    from spendgate.policy.model import CAPABILITIES

    keys = sub.add_parser("keys", parents=[common], help="spendgate virtual keys (sg-…), stored hashed")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", parents=[common], help="create a key for a user and team")
    kc.add_argument("--user", help="the user every request with this key counts under (no header overrides it)")
    kc.add_argument("--team", help="the team every request with this key counts under")
    kc.add_argument("--tag", action="append", metavar="NAME=VALUE", help="a tag the key binds (repeatable)")
    kc.add_argument("--preapprove-max", metavar="USD",
                    help="let X-Spendgate-Allow pre-approve up to this many dollars per budget and window")
    kc.add_argument("--usd", metavar="USD", help="the key's own budget in dollars per --window: once spent, the "
                                                 "key is refused whatever other rules say (no approval lifts it)")
    kc.add_argument("--tokens", type=int, metavar="N", help="the key's own budget in tokens per --window")
    kc.add_argument("--requests", type=int, metavar="N", help="the key's own budget in requests per --window")
    kc.add_argument("--window", metavar="WINDOW",
                    help="the window of the key's own budget: total (default), day, week, month or a duration "
                         "such as 24h")
    kc.add_argument("--models", metavar="GLOBS", help="the models the key may call, as globs separated by commas "
                                                      "('gpt-4o*,claude-*'); others are refused before pricing")
    kc.add_argument("--expires", metavar="WHEN", help="when the key stops working: a duration from now (30d, 12h) "
                                                      "or a date-time with its offset (2027-01-31T18:00:00+01:00)")
    kc.add_argument("--aws", action="store_true",
                    help="also issue an AWS access key id and secret for this key (boto3 bedrock-runtime clients)")
    kc.add_argument("--capability", metavar="CAPABILITY",
                    help=f"what the key's requests may be trusted with: one of {', '.join(CAPABILITIES)} "
                         "(a budget's requires_capability refuses requests without enough)")
    kc.set_defaults(func=cmd_keys)
    ksub.add_parser("list", parents=[common],
                    help="list keys: each key's budget, spent and remaining, models, capability and expiry"
                    ).set_defaults(func=cmd_keys)
    kt = ksub.add_parser("rotate", parents=[common],
                         help="a new secret for a key (same id, budget and buckets); the old one stops working")
    kt.add_argument("id")
    kt.set_defaults(func=cmd_keys)
    kr = ksub.add_parser("revoke", parents=[common], help="revoke a key by id")
    kr.add_argument("id")
    kr.set_defaults(func=cmd_keys)
