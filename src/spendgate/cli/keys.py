"""``spendgate keys create | list | revoke``: virtual keys (sg-…), stored hashed."""

from __future__ import annotations

import argparse
from typing import Any

from spendgate.cli.context import open_store
from spendgate.cli.output import emit_json, table, usd, when
from spendgate.errors import ConfigError, SpendgateError


def cmd_keys(args: argparse.Namespace) -> int:
    from spendgate import approvals, keys
    from spendgate.request import parse_tags

    if args.keys_command == "create":
        try:
            tags = parse_tags(",".join(args.tag or ()))
        except ValueError as exc:
            raise ConfigError(f"--tag: {exc}") from None
        try:
            pre = approvals.parse_max(args.preapprove_max) if args.preapprove_max is not None else None
        except ValueError as exc:
            raise ConfigError(f"--preapprove-max: {exc}") from None
    store = open_store(args, create=args.keys_command == "create")
    listing: list[tuple[str, ...]] = []
    try:
        if args.keys_command == "create":
            secret, key = keys.create(store, user=args.user, team=args.team, tags=tags, preapprove_max_usd=pre)
            doc: Any = {"key": secret, **key.as_dict()}
            text = (f"{secret}\n(key id {key.id}, for keys list and keys revoke; the key itself is shown once: "
                    "spendgate stores only its hash)")
        elif args.keys_command == "list":
            found = keys.list_keys(store)
            doc = {"keys": [k.as_dict() for k in found]}
            text = "" if found else "no keys"
            listing = [(k.id, k.user or "", k.team or "", ",".join(f"{a}={b}" for a, b in k.tags.items()),
                        usd(k.preapprove_max_usd) if k.preapprove_max_usd is not None else "",
                        when(k.created) if k.created else "") for k in sorted(found, key=lambda k: k.created)]
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
        table(("id", "user", "team", "tags", "preapprove max", "created"), listing)
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate keys …``."""
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
