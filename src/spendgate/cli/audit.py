"""``spendgate audit export | verify | pubkey``: the signed decision log."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from spendgate import ledger
from spendgate.cli.context import Context
from spendgate.cli.output import OK, REFUSED, emit_json, say
from spendgate.errors import SpendgateError

#: entries read from the store per call while exporting (a chain is never held in memory whole)
PAGE = 5000


def _chain_pages(store: ledger.Ledger, chain: str) -> Iterator[list[str]]:
    after = 0
    while True:
        page = store.audit_entries(chain, after, PAGE)
        if not page:
            return
        yield page
        after += len(page)


def _active_since(store: ledger.Ledger, chain: str, cutoff: str) -> bool:
    """Whether ``chain`` has an entry stamped at or after ``cutoff`` (RFC 3339 UTC strings of one
    fixed format compare as their times do)."""
    return any(str(json.loads(text).get("ts", "")) >= cutoff for page in _chain_pages(store, chain) for text in page)


def _line(text: str) -> str:
    """A stored JSON text as one line (ours always are; anything else is re-serialized, unchanged in meaning)."""
    return text if "\n" not in text and "\r" not in text else json.dumps(json.loads(text), ensure_ascii=False)


def cmd_export(args: argparse.Namespace) -> int:
    from spendgate.events.audit import rfc3339
    from spendgate.policy.parse import parse_duration

    ctx = Context.from_args(args)
    cutoff = rfc3339(time.time() - parse_duration(args.since, "--since")) if args.since else None
    store = ledger.open(ctx.store_url, create=False)
    entries = checkpoints = 0
    chains: list[str] = []
    try:
        known = store.audit_chains()
        if args.chain is not None and args.chain not in known:
            raise SpendgateError(f"--chain {args.chain}: no such audit chain in {ctx.store_url}")
        with ExitStack() as stack:
            out: TextIO = (stack.enter_context(Path(args.out).open("w", encoding="utf-8", newline="\n"))
                           if args.out else sys.stdout)
            for chain in [args.chain] if args.chain is not None else known:
                if cutoff is not None and not _active_since(store, chain, cutoff):
                    continue
                chains.append(chain)
                cps = store.audit_checkpoints(chain)  # first: then every one is covered by the entries read
                for page in _chain_pages(store, chain):
                    out.write("".join(_line(t) + "\n" for t in page))
                    entries += len(page)
                out.write("".join(_line(t) + "\n" for t in cps))
                checkpoints += len(cps)
            out.flush()
    except OSError as exc:
        raise SpendgateError(f"--out {args.out}: cannot write ({exc.strerror})") from None
    finally:
        store.close()
    if args.out:
        if args.json:
            emit_json({"out": args.out, "chains": chains, "entries": entries, "checkpoints": checkpoints})
        else:
            print(f"exported {entries} entries and {checkpoints} checkpoints of {len(chains)} chain(s) to {args.out}")
    return 0


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The objects of a JSONL file; anything else is an error naming the line."""
    docs: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    doc = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise SpendgateError(f"{path}: line {n} is not JSON ({exc.msg}); expected an audit export "
                                         "(one JSON object per line)") from None
                if not isinstance(doc, dict):
                    raise SpendgateError(f"{path}: line {n} is not a JSON object; expected an audit export")
                docs.append(doc)
    except OSError as exc:
        raise SpendgateError(f"--from {path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise SpendgateError(f"{path}: not UTF-8 text ({exc.reason}); expected an audit export") from None
    return docs


def cmd_verify(args: argparse.Namespace) -> int:
    from spendgate.events.signing import load_key, parse_public
    from spendgate.events.verify import Report, verify, verify_store

    ctx = Context.from_args(args)
    if args.pubkey:
        keys = [parse_public(h) for h in args.pubkey]
    else:
        keys = [load_key(ctx.policy.audit.key, create=False).public_key()]
    report: Report
    if args.source:
        source = args.source
        report = verify(read_jsonl(args.source), keys)
    else:
        source = ctx.store_url
        store = ledger.open(ctx.store_url, create=False)
        try:
            report = verify_store(store, keys)
        finally:
            store.close()
    ok = report.ok and bool(report.chains)
    if args.json:
        emit_json({"source": source, **report.as_dict(), "ok": ok})
        return 0 if ok else 1
    if not report.chains:
        print(f"nothing to verify: no audit entries in {source}")
        return 1
    for chain in report.chains:
        say(chain.summary(), REFUSED if chain.problems else OK)
        if chain.problems and chain.problems[0].detail:
            say(f"  {chain.problems[0].detail}", REFUSED)
    return 0 if ok else 1


def cmd_pubkey(args: argparse.Namespace) -> int:
    from spendgate.events.signing import key_path, load_key, public_hex

    ctx = Context.from_args(args)
    pub = public_hex(load_key(ctx.policy.audit.key))
    if args.json:
        emit_json({"pubkey": pub, "key_file": str(key_path(ctx.policy.audit.key)[0])})
    else:
        print(pub)
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate audit …``."""
    audit = sub.add_parser("audit", parents=[common], help="the signed, hash-chained decision log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    ex = asub.add_parser("export", parents=[common], help="write the log as JSONL (entries, then checkpoints)")
    ex.add_argument("--since", metavar="DURATION",
                    help="only chains with an entry in the last DURATION (e.g. 24h, 7d); whole chains, so "
                         "the export still verifies")
    ex.add_argument("--chain", metavar="ID", help="only this chain")
    ex.add_argument("--out", metavar="FILE", help="write here (default: standard output)")
    ex.set_defaults(func=cmd_export)

    ve = asub.add_parser("verify", parents=[common],
                         help="check every signature, link and checkpoint; exit 1 on any problem")
    ve.add_argument("--from", dest="source", metavar="FILE", help="an export (default: the store itself)")
    ve.add_argument("--pubkey", action="append", metavar="HEX",
                    help="a trusted public key, 64 hex (repeatable; default: this machine's audit key)")
    ve.set_defaults(func=cmd_verify)

    pk = asub.add_parser("pubkey", parents=[common], help="print the audit key's public key (64 hex)")
    pk.set_defaults(func=cmd_pubkey)
