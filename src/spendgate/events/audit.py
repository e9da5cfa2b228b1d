"""The audit entry format: one JSON object per decision, approval or charge, hash-chained and signed.

An entry's ``hash`` is the SHA-256 of the RFC 8785 (JCS) canonical JSON of the entry without ``hash``
and ``sig``; ``sig`` is the Ed25519 signature of those same bytes; ``prev_hash`` is the previous
entry's ``hash`` (:data:`GENESIS` for seq 1). JCS is used because it is specified byte for byte, so
any language can recompute the hash from the parsed object (``scripts/verify-audit.mjs`` does, in
Node) — the stored text's own spacing and key order never matter.

Every value in an entry is a string, an integer, a bool or null — never a float — so canonical
bytes cannot depend on how a language prints numbers. Money is a dollar string made from integer
nano-dollars (:func:`spendgate.money.nanos_to_usd`), exact.

A checkpoint (``kind`` "checkpoint") signs a chain's head (its seq and hash); it is kept apart from
the entries, so cutting entries off the end of the log is caught by a checkpoint naming a later seq.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring as _quote
from typing import TYPE_CHECKING, Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate.ledger.base import Event
from spendgate.money import nanos_to_usd

if TYPE_CHECKING:
    from spendgate.events.signing import Signer

#: the ``prev_hash`` of a chain's first entry
GENESIS = "0" * 64

#: kinds that answer a request: they carry the request body's hash
DECISION_KINDS = frozenset({"allow", "downgrade", "clamp", "truncate", "alert", "block", "hold", "deny",
                            "would_refuse"})
#: kinds that charge a budget: they carry the cost and token counts
CHARGE_KINDS = frozenset({"capture", "unknown", "expired"})
KINDS = DECISION_KINDS | CHARGE_KINDS | {"approval", "released"}

#: every field of an entry, in the order a person reads them (the canonical order is JCS's)
ENTRY_FIELDS = ("chain", "seq", "ts", "kind", "decision_id", "request_hash", "rule", "bucket", "amounts",
                "model", "provider", "dims", "estimated", "policy_hash", "prev_hash", "hash", "sig")
CHECKPOINT_FIELDS = ("kind", "chain", "seq", "head", "ts", "sig")
#: the fields a signature does not cover (the hash and the signature themselves)
UNSIGNED_FIELDS = ("hash", "sig")


def rfc3339(ts: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds ("2026-12-03T11:34:03.123Z").

    Whole milliseconds are computed first and split after, so rounding never prints ".1000"."""
    ms = round(ts * 1000)
    secs, frac = divmod(ms, 1000)
    return f"{_second(secs)}.{frac:03d}Z"


@functools.lru_cache(maxsize=64)
def _second(secs: int) -> str:
    """The date and time of a whole second: the writer stamps many entries in the same second, and
    ``strftime`` cost more than all the rest of an entry's timestamp."""
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")


#: JCS numbers are IEEE doubles: integers beyond this are refused by rfc8785 (an entry has none)
_SAFE_INT = 2**53


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The RFC 8785 canonical JSON of ``doc`` (UTF-8): the bytes that are hashed and signed.

    For what an entry holds — strings, safe integers, bools, null, objects of them — whose keys all
    lie in the Basic Multilingual Plane, JCS *is* Python's ``json.dumps`` with sorted keys, no spaces
    and no ASCII escaping: the same escapes (``\\"`` ``\\\\`` ``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t``,
    lowercase ``\\u00xx`` for other controls), the same integers, and sorting by code point equals
    JCS's sorting by UTF-16 code unit below U+10000. That path costs a sixth of rfc8785's pure-Python
    serializer, and the signing thread runs it twice per request; anything else (a float, a key
    outside the BMP, a lone surrogate) goes through rfc8785 itself. A property test holds the two to
    the same bytes."""
    if _plain(doc):
        try:
            return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # a lone surrogate: rfc8785 decides what to do with it
            pass
    return rfc8785.dumps(doc)


def _plain(value: Any) -> bool:
    """True when ``value`` has only the shapes for which ``json.dumps`` equals JCS (see canonical)."""
    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, int):
        return -_SAFE_INT < value < _SAFE_INT
    if isinstance(value, dict):
        return all(isinstance(k, str) and (k.isascii() or max(k) <= "\uffff") and _plain(v)
                   for k, v in value.items())
    return False


def signed_body(doc: Mapping[str, Any]) -> bytes:
    """The canonical bytes of an entry or checkpoint without ``hash`` and ``sig``."""
    return canonical({k: v for k, v in doc.items() if k not in UNSIGNED_FIELDS})


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of the entry's canonical bytes without ``hash`` and ``sig``."""
    return hashlib.sha256(signed_body(entry)).hexdigest()


def _amount(name: str, value: int) -> str:
    if name.endswith("_tokens"):
        return str(int(value))
    # every other name is nano-dollars (Event.amounts' rule); ``_usd`` names say so explicitly
    return str(nanos_to_usd(int(value)))


def _text(value: str) -> str:
    """``value`` as text every JSON reader accepts: a lone surrogate (a client's model name or tag
    can carry one, as JSON ``"\\ud800"``) becomes U+FFFD. Without this the entry could not be
    canonicalized, and a client could keep its own decision out of the log."""
    if value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _amounts(event: Event) -> dict[str, str]:
    amounts = {str(k): _amount(str(k), v) for k, v in event.amounts.items()}
    if event.kind in CHARGE_KINDS:
        amounts["cost_usd"] = str(nanos_to_usd(int(event.cost)))
        amounts["input_tokens"] = str(int(event.input_tokens))
        amounts["output_tokens"] = str(int(event.output_tokens))
    return amounts


def _request_hash(event: Event, request: bytes | str | None) -> str | None:
    if request is not None and event.kind in DECISION_KINDS:
        return request if isinstance(request, str) else hashlib.sha256(request).hexdigest()
    return None


def entry_from_event(event: Event, *, chain: str, seq: int, prev_hash: str, policy_hash: str,
                     request: bytes | str | None) -> dict[str, Any]:
    """The unsealed entry (no ``hash``/``sig``) for ``event`` at ``seq`` of ``chain``.

    ``request`` is the raw request body, or its SHA-256 already in hex (a writer in another process
    is sent the digest, never the body): only the digest is kept, and only for decision kinds, so a
    decision can be matched to the request a client kept without the log holding any prompt."""
    return {
        "chain": chain,
        "seq": seq,
        "ts": rfc3339(event.ts),
        "kind": _text(event.kind),
        "decision_id": _text(event.decision_id),
        "request_hash": _request_hash(event, request),
        "rule": _text(event.rule) or None,
        "bucket": _text(event.bucket) or None,
        "amounts": _amounts(event),
        "model": _text(event.model) or None,
        "provider": _text(event.provider) or None,
        "dims": {_text(str(k)): _text(str(v)) for k, v in event.dims.items()},
        "estimated": bool(event.estimated),
        "policy_hash": policy_hash,
        "prev_hash": prev_hash,
    }


def entry_body(event: Event, *, chain: str, seq: int, prev_hash: str, policy_hash: str,
               request: bytes | str | None) -> bytes:
    """``signed_body(entry_from_event(...))`` — the bytes an entry's hash and signature are over —
    written straight from the event, for the writer (it seals every entry the server logs).

    The generic path checks every value's type, builds the entry, lets :func:`json.dumps` sort and
    walk it and then copies it without ``hash``/``sig``; here the fields are known, so the canonical
    text is one format of escaped strings in JCS key order, about a third of the cost. Anything this
    path does not cover — a lone surrogate, a value of an unexpected type, any error — goes the
    generic way, which writes the same bytes or raises what it always raised. A property test holds
    the two to the same bytes as ``rfc8785.dumps`` of the entry."""
    try:
        text = _entry_text(event, chain, seq, prev_hash, policy_hash, request)
        if text is not None:
            return text.encode()
    except Exception:  # the generic path below raises the real error, or succeeds
        pass
    return signed_body(entry_from_event(event, chain=chain, seq=seq, prev_hash=prev_hash, policy_hash=policy_hash,
                                        request=request))


def _entry_text(event: Event, chain: str, seq: int, prev_hash: str, policy_hash: str,
                request: bytes | str | None) -> str | None:
    """The canonical text of the entry's body, or None when it is not one :func:`entry_body` covers.

    Text goes in as it is, not through :func:`_text`: a lone surrogate (all ``_text`` changes) makes
    the caller's ``encode`` fail, and that entry goes the generic way."""
    if not (type(chain) is str and type(prev_hash) is str and type(policy_hash) is str and type(seq) is int
            and -_SAFE_INT < seq < _SAFE_INT):
        return None
    request_hash = _request_hash(event, request)
    if request_hash is None:
        rh = "null"
    elif type(request_hash) is str:
        rh = _quote(request_hash)
    else:
        return None
    q = _quote
    dims = _str_object({str(k): str(v) for k, v in event.dims.items()})
    return (f'{{"amounts":{_str_object(_amounts(event))},"bucket":{_opt(event.bucket)},"chain":{q(chain)},'
            f'"decision_id":{q(event.decision_id)},"dims":{dims},'
            f'"estimated":{"true" if event.estimated else "false"},"kind":{q(event.kind)},'
            f'"model":{_opt(event.model)},"policy_hash":{q(policy_hash)},"prev_hash":{q(prev_hash)},'
            f'"provider":{_opt(event.provider)},"request_hash":{rh},"rule":{_opt(event.rule)},"seq":{seq},'
            f'"ts":"{rfc3339(event.ts)}"}}')


def _opt(value: str) -> str:
    """An optional text field: "" is null (as in :func:`entry_from_event`); anything but text raises."""
    if value:
        return _quote(value)
    if type(value) is str:
        return "null"
    raise TypeError(f"expected text, got {type(value).__name__}")


def _str_object(doc: dict[str, str]) -> str:
    """``doc`` (text to text) as a canonical JSON object. JCS sorts keys by UTF-16 code unit, which
    is code point order until a key holds a character outside the BMP (rare: then it sorts again)."""
    keys = sorted(doc)
    for k in keys:
        if not k.isascii() and max(k) > "\uffff":
            keys.sort(key=_utf16)
            break
    return "{" + ",".join([f"{_quote(k)}:{_quote(doc[k])}" for k in keys]) + "}"


def _utf16(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def seal_body(body: bytes, key: Signer) -> tuple[str, str]:
    """Hash and sign an entry's canonical ``body``: its ``hash`` and the JSON text to store (one
    line) — the canonical body with ``hash`` and ``sig`` appended. That text is not itself canonical
    (the two keys come last), which no reader needs."""
    digest = hashlib.sha256(body).hexdigest()
    sig = key.sign(body).hex()
    return digest, body.decode()[:-1] + f',"hash":"{digest}","sig":"{sig}"}}'


def seal_text(entry: Mapping[str, Any], key: Ed25519PrivateKey) -> tuple[str, str]:
    """Hash and sign ``entry``: its ``hash`` and the JSON text to store (see :func:`seal_body`)."""
    return seal_body(signed_body(entry), key)


def seal(entry: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``entry`` with its ``hash`` and ``sig`` (replacing any it had)."""
    body = signed_body(entry)
    doc = {k: v for k, v in entry.items() if k not in UNSIGNED_FIELDS}
    doc["hash"] = hashlib.sha256(body).hexdigest()
    doc["sig"] = key.sign(body).hex()
    return doc


def checkpoint(chain: str, seq: int, head: str, ts: float, key: Signer) -> dict[str, Any]:
    """A signed statement that ``chain`` had ``seq`` entries ending in ``head`` at ``ts`` (epoch s)."""
    doc: dict[str, Any] = {"kind": "checkpoint", "chain": chain, "seq": seq, "head": head, "ts": rfc3339(ts)}
    doc["sig"] = key.sign(canonical(doc)).hex()
    return doc


def dumps(doc: Mapping[str, Any]) -> str:
    """One JSONL line for an entry or checkpoint (non-ASCII kept as is, no spaces)."""
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
