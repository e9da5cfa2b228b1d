"""Verify an audit log: every entry signed, every link intact, nothing cut off the end.

Lines (entries and checkpoints, as exported) are grouped by ``chain``, keeping their order. Each
chain is walked from seq 1; the first place it goes wrong is reported as a :class:`Problem` with the
seq of the first chain position that is not as the writer left it, and one reason:

- ``edited``: an entry's hash or signature does not match its content (or it is not an entry);
- ``reordered``: a valid entry is out of seq order (the entry for this seq comes later);
- ``inserted``: an entry that is not part of the chain — a duplicate seq, a signed entry that does
  not link to its predecessor, or a body that does not verify while the chain goes on without it;
- ``missing``: this seq is absent and a later one is present;
- ``truncated after seq N``: a signed checkpoint names a seq (the problem's seq) past the log's end, N;
- ``bad checkpoint``: a checkpoint's signature, or the head hash it names, does not match;
- ``signed by an unknown key``: the chain's first entry verifies with none of the trusted keys.

A chain's key is whichever trusted key verifies its first entry; every later entry and checkpoint
must verify with that one (two writers' keys cannot splice their chains together).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spendgate.events.audit import CHECKPOINT_FIELDS, ENTRY_FIELDS, GENESIS, canonical, signed_body
from spendgate.events.signing import public_hex
from spendgate.ledger.base import Ledger

EDITED = "edited"
REORDERED = "reordered"
INSERTED = "inserted"
MISSING = "missing"
BAD_CHECKPOINT = "bad checkpoint"
UNKNOWN_KEY = "signed by an unknown key"


def truncated(after: int) -> str:
    return f"truncated after seq {after}"


@dataclass(frozen=True, slots=True)
class Problem:
    """The first place a chain goes wrong. ``detail`` says more, for a person."""

    chain: str
    seq: int
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"chain {self.chain}: seq {self.seq}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "seq": self.seq, "reason": self.reason, "detail": self.detail}


@dataclass(slots=True)
class ChainReport:
    """One chain: how many entries its lines hold, the last seq verified in order from seq 1, the
    highest seq a validly signed checkpoint names, and its first problem (if any)."""

    chain: str
    entries: int = 0
    last_seq: int = 0
    checkpoint_seq: int | None = None
    checkpoints: int = 0
    key: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "ok": self.ok, "entries": self.entries, "last_seq": self.last_seq,
                "checkpoint_seq": self.checkpoint_seq, "checkpoints": self.checkpoints, "key": self.key,
                "problems": [p.as_dict() for p in self.problems]}

    def summary(self) -> str:
        if self.problems:
            return str(self.problems[0])
        cp = f"checkpoint at seq {self.checkpoint_seq}" if self.checkpoint_seq is not None else "no checkpoint"
        return f"chain {self.chain}: ok: {self.entries} entries, {cp}"


@dataclass(slots=True)
class Report:
    chains: list[ChainReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains)

    @property
    def problems(self) -> list[Problem]:
        return [p for c in self.chains for p in c.problems]

    def chain(self, chain: str) -> ChainReport:
        return next(c for c in self.chains if c.chain == chain)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "chains": [c.as_dict() for c in self.chains]}


def _verifies(key: Ed25519PublicKey, sig: Any, body: bytes) -> bool:
    if not isinstance(sig, str) or len(sig) != 128:
        return False
    try:
        key.verify(bytes.fromhex(sig), body)
    except (InvalidSignature, ValueError):
        return False
    return True


def _is_seq(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class _Entry:
    """What one line says about itself, checked once."""

    doc: Mapping[str, Any]
    seq: int | None
    prev: Any
    hash: Any
    content_ok: bool  # its hash field is the hash of its content
    body: bytes | None


def _entry(doc: Mapping[str, Any]) -> _Entry:
    seq = doc.get("seq")
    well_formed = set(doc) == set(ENTRY_FIELDS) and _is_seq(seq)
    try:
        body = signed_body(doc)
    except Exception:  # rfc8785 refuses NaN, huge ints, lone surrogates: not an entry we wrote
        body = None
    content_ok = well_formed and body is not None and hashlib.sha256(body).hexdigest() == doc.get("hash")
    return _Entry(doc, seq if _is_seq(seq) else None, doc.get("prev_hash"), doc.get("hash"), content_ok, body)


class _Walk:
    """One chain's entries, walked in file order, with the lookahead the reasons need."""

    def __init__(self, chain: str, docs: Sequence[Mapping[str, Any]], keys: Sequence[Ed25519PublicKey]) -> None:
        self.chain = chain
        self.entries = [_entry(d) for d in docs]
        self.keys = keys
        self.key: Ed25519PublicKey | None = None
        self._authentic: dict[int, bool] = {}
        self.by_seq: dict[int, list[int]] = {}
        for i, e in enumerate(self.entries):
            if e.seq is not None:
                self.by_seq.setdefault(e.seq, []).append(i)

    def signed_by(self, i: int, key: Ed25519PublicKey) -> bool:
        e = self.entries[i]
        return e.content_ok and e.body is not None and _verifies(key, e.doc.get("sig"), e.body)

    def authentic(self, i: int) -> bool:
        """Content matches its hash and the chain's key signed it."""
        if i not in self._authentic:
            self._authentic[i] = self.key is not None and self.signed_by(i, self.key)
        return self._authentic[i]

    def continues(self, i: int, want: int, prev: str) -> bool:
        """Whether the first authentic entry after ``i`` is the one that belongs at ``want``."""
        for j in range(i + 1, len(self.entries)):
            if self.authentic(j):
                e = self.entries[j]
                return e.seq == want and e.prev == prev
        return False

    def comes_later(self, i: int, seq: int) -> bool:
        return any(j > i and self.authentic(j) for j in self.by_seq.get(seq, ()))

    def run(self, report: ChainReport) -> dict[int, str]:
        """Walk until the first problem; the hashes of the entries verified in order, by seq."""
        want, prev = 1, GENESIS
        good: dict[int, str] = {}

        def fail(reason: str, detail: str) -> dict[int, str]:
            report.problems.append(Problem(self.chain, want, reason, detail))
            return good

        # the chain's key: whichever trusted key signed its first intact entry (an edited first
        # line does not hide the key; it is reported as edited below)
        first = next((i for i, e in enumerate(self.entries) if e.content_ok), None)
        if first is not None:
            self.key = next((k for k in self.keys if self.signed_by(first, k)), None)
            if self.key is None:
                return fail(UNKNOWN_KEY, "the chain's first entry verifies with none of the trusted keys")
            report.key = public_hex(self.key)
        for i, e in enumerate(self.entries):
            if not self.authentic(i):
                if self.continues(i, want, prev):
                    return fail(INSERTED, f"line {i + 1} of the chain is not part of it; the chain goes on after it")
                if e.content_ok and any(self.signed_by(i, k) for k in self.keys):
                    return fail(INSERTED, "an entry signed by another chain's key")
                if e.content_ok and (e.seq != want or e.prev != prev):
                    return fail(INSERTED, "a well-formed but unsigned entry that does not link to the chain")
                if e.content_ok:
                    return fail(EDITED, "the signature does not match the content")
                return fail(EDITED, "the hash does not match the content")
            assert e.seq is not None  # authentic entries are well formed
            if e.seq < want:
                what = "a second copy of" if good.get(e.seq) == e.hash else "a second signed entry at"
                return fail(INSERTED, f"{what} seq {e.seq}")
            if e.seq > want:
                if self.comes_later(i, want):
                    return fail(REORDERED, f"seq {e.seq} comes before seq {want}")
                return fail(MISSING, f"seq {want} is absent; seq {e.seq} follows seq {want - 1}")
            if e.prev != prev:
                return fail(INSERTED, "a signed entry that does not link to the previous one")
            good[want] = str(e.hash)
            report.last_seq = want
            want, prev = want + 1, str(e.hash)
        return good


def _check_checkpoints(walk: _Walk, cps: Sequence[Mapping[str, Any]], good: Mapping[int, str],
                       report: ChainReport) -> None:
    chain = walk.chain
    first: Problem | None = None
    for cp in cps:
        raw_seq = cp.get("seq")
        at = raw_seq if _is_seq(raw_seq) else 0
        sig = cp.get("sig")
        ok_shape = (set(cp) == set(CHECKPOINT_FIELDS) and _is_seq(raw_seq)
                    and isinstance(cp.get("head"), str))
        try:
            body = canonical({k: v for k, v in cp.items() if k != "sig"}) if ok_shape else b""
        except Exception:
            ok_shape = False
            body = b""
        keys = [walk.key] if walk.key is not None else list(walk.keys)
        signed = ok_shape and any(_verifies(k, sig, body) for k in keys)
        if not signed:
            first = first or Problem(chain, at, BAD_CHECKPOINT, "its signature does not verify")
            continue
        report.checkpoints += 1
        report.checkpoint_seq = max(report.checkpoint_seq or 0, at)
        if at in good and good[at] != cp["head"]:
            first = first or Problem(chain, at, BAD_CHECKPOINT, "the head it names is not the entry at its seq")
    if report.problems:
        return  # the entries' problem comes first
    if first is not None:
        report.problems.append(first)
    elif report.checkpoint_seq is not None and report.checkpoint_seq > report.last_seq:
        report.problems.append(Problem(chain, report.checkpoint_seq, truncated(report.last_seq),
                                       f"a signed checkpoint names seq {report.checkpoint_seq}; "
                                       f"the log ends at seq {report.last_seq}"))


def verify(lines: Iterable[Mapping[str, Any]], keys: Sequence[Ed25519PublicKey]) -> Report:
    """Verify entries and checkpoints (any mix, grouped by ``chain`` in the given order)."""
    entries: dict[str, list[Mapping[str, Any]]] = {}
    cps: dict[str, list[Mapping[str, Any]]] = {}
    for line in lines:
        chain = line.get("chain")
        name = chain if isinstance(chain, str) else json.dumps(chain)
        (cps if line.get("kind") == "checkpoint" else entries).setdefault(name, []).append(line)
        entries.setdefault(name, [])
    report = Report()
    for chain in sorted(entries):
        cr = ChainReport(chain, entries=len(entries[chain]))
        walk = _Walk(chain, entries[chain], keys)
        good = walk.run(cr)
        _check_checkpoints(walk, cps.get(chain, ()), good, cr)
        report.chains.append(cr)
    return report


def store_lines(store: Ledger, chain: str | None = None) -> Iterable[dict[str, Any]]:
    """Every entry then every checkpoint of each chain (or of ``chain``), parsed, in stored order.

    The checkpoints are read first: a writer stores entries before the checkpoint naming them, so
    every checkpoint read is covered by the entries read after it — a chain growing while it is read
    (a live server) is never mistaken for a truncated one."""
    for c in [chain] if chain is not None else store.audit_chains():
        cps = store.audit_checkpoints(c)
        for text in store.audit_entries(c):
            yield json.loads(text)
        for text in cps:
            yield json.loads(text)


def verify_store(store: Ledger, keys: Sequence[Ed25519PublicKey], chain: str | None = None) -> Report:
    """Verify the store's chains (or one) as they are stored."""
    return verify(store_lines(store, chain), keys)
