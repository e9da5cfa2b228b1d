"""The audit entry format: the committed vectors reproduce byte for byte, the hash and signature
cover exactly the entry without them, any event becomes an entry that verifies, any change to any
field of it does not — and the key is found, created and refused as the format says."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.events import audit
from spendgate.events.audit import (
    CHARGE_KINDS,
    DECISION_KINDS,
    ENTRY_FIELDS,
    GENESIS,
    KINDS,
    canonical,
    checkpoint,
    entry_body,
    entry_from_event,
    entry_hash,
    rfc3339,
    seal,
    seal_body,
    seal_text,
)
from spendgate.events.signing import AuditKeyError, load_key, parse_public, public_hex
from spendgate.events.verify import verify
from spendgate.ledger.base import Event
from tests.conftest import race

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors" / "audit"
DOC: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(DOC["key"]["seed_hex"]))
PUB = KEY.public_key()
PH = "ab" * 32


def _event(doc: dict[str, Any]) -> Event:
    return Event(**doc)


# -- the committed vectors ------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(len(DOC["entries"])))
def test_each_vector_reproduces_exactly(i: int) -> None:
    v = DOC["entries"][i]
    request = None if v["request_base64"] is None else base64.b64decode(v["request_base64"])
    entry = entry_from_event(_event(v["event"]), chain=DOC["chain"], seq=v["seq"], prev_hash=v["prev_hash"],
                             policy_hash=DOC["policy_hash"], request=request)
    body = canonical(entry)
    assert body.decode("utf-8") == v["canonical"]
    assert hashlib.sha256(body).hexdigest() == v["hash"] == entry_hash(v["entry"])
    assert KEY.sign(body).hex() == v["sig"]
    assert seal(entry, KEY) == v["entry"]
    PUB.verify(bytes.fromhex(v["sig"]), v["canonical"].encode("utf-8"))  # raises if not


def test_the_vectors_cover_the_kinds_and_the_text_they_claim() -> None:
    kinds = [v["entry"]["kind"] for v in DOC["entries"]]
    assert kinds == ["allow", "hold", "approval", "capture"]
    capture = DOC["entries"][3]
    assert "é" in capture["canonical"] and "📄" in capture["canonical"]
    # JCS sorts keys by UTF-16 code units: the astral 📄 (D83D DCC4) before the fullwidth ｍ (FF4D),
    # the opposite of code point order
    assert capture["canonical"].index('"tag:📄"') < capture["canonical"].index('"tag:ｍｌ"')
    assert [v["entry"]["prev_hash"] for v in DOC["entries"]] == [GENESIS] + [v["hash"] for v in DOC["entries"][:-1]]
    assert DOC["key"]["public_hex"] == public_hex(KEY) == (VECTORS / "pubkey.txt").read_text().strip()


def test_the_vector_checkpoint_and_export_reproduce() -> None:
    cp = DOC["checkpoint"]["checkpoint"]
    assert canonical({k: v for k, v in cp.items() if k != "sig"}).decode() == DOC["checkpoint"]["canonical"]
    again = checkpoint(cp["chain"], cp["seq"], cp["head"], 0, KEY)
    assert set(again) == {"kind", "chain", "seq", "head", "ts", "sig"}
    PUB.verify(bytes.fromhex(cp["sig"]), DOC["checkpoint"]["canonical"].encode())
    lines = (VECTORS / "export.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [v["entry"] for v in DOC["entries"]] + [cp]
    report = verify([json.loads(x) for x in lines], [PUB])
    assert report.ok and report.chains[0].entries == 4 and report.chains[0].checkpoint_seq == 4


def test_the_generator_writes_the_committed_files_byte_for_byte() -> None:
    spec = importlib.util.spec_from_file_location("make_audit_vectors", ROOT / "scripts" / "make_audit_vectors.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built: dict[str, str] = mod.build()
    assert sorted(built) == sorted(p.name for p in VECTORS.iterdir())
    for name, content in built.items():
        assert (VECTORS / name).read_text(encoding="utf-8") == content, name


# -- the rules --------------------------------------------------------------------------------------

def _entry(**over: Any) -> dict[str, Any]:
    e = Event(1796297643.5, "capture", "d-1", "gpt-4o", "openai", 1_500, 3, 4, dims={"user": "u"})
    return entry_from_event(e, chain="c" * 16, seq=1, prev_hash=GENESIS, policy_hash=PH, request=b"{}") | over


def test_canonical_bytes_are_rfc8785() -> None:
    doc = {"b": [1, None, True, "é"], "a": {"z": "1", "\uff4d": "2", "\u20ac": "4", "\U0001f600": "3"}}
    assert audit.rfc8785 is rfc8785
    assert canonical(doc) == rfc8785.dumps(doc)
    assert canonical(doc) == '{"a":{"z":"1","€":"4","😀":"3","ｍ":"2"},"b":[1,null,true,"é"]}'.encode()


_JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text()
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.dictionaries(st.text(), inner, max_size=6), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(), _JSON, max_size=8))
def test_the_fast_canonical_path_is_byte_for_byte_rfc8785(doc: dict[str, Any]) -> None:
    """Any entry-shaped document (strings with every kind of character — controls, U+2028, lone
    surrogates, astral keys —, safe integers, bools, null, nested objects) canonicalizes to exactly
    what rfc8785 writes, or fails as it does."""
    try:
        expected = rfc8785.dumps(doc)
    except Exception as exc:  # whatever rfc8785 refuses, canonical refuses too
        with pytest.raises(type(exc)):
            canonical(doc)
        return
    assert canonical(doc) == expected


def test_a_float_or_an_unsafe_integer_goes_to_rfc8785() -> None:
    assert canonical({"a": 1.5, "b": 1e21}) == rfc8785.dumps({"a": 1.5, "b": 1e21})
    with pytest.raises(rfc8785.IntegerDomainError):
        canonical({"n": 2**60})


def test_hash_and_sig_cover_the_entry_without_hash_and_sig() -> None:
    entry = _entry()
    sealed = seal(entry, KEY)
    body = canonical(entry)
    assert sealed["hash"] == hashlib.sha256(body).hexdigest() == entry_hash(sealed)
    PUB.verify(bytes.fromhex(sealed["sig"]), body)
    assert seal(sealed, KEY) == sealed  # sealing again ignores the old hash and sig
    digest, text = seal_text(entry, KEY)
    assert digest == sealed["hash"] and json.loads(text) == sealed and "\n" not in text
    assert list(sealed) == list(ENTRY_FIELDS)


def test_entry_fields_follow_the_format() -> None:
    e = entry_from_event(
        Event(1796297643.0, "block", "d-2", "", "", 0, dims={"team": "ml"}, rule="daily", bucket="daily:team=ml",
              amounts={"estimate_usd": 1_230_000_000, "limit_usd": 5_000_000_000, "held_tokens": 12, "used": 7}),
        chain="c" * 16, seq=3, prev_hash="f" * 64, policy_hash=PH, request=b'{"model":"x"}')
    assert e["request_hash"] == hashlib.sha256(b'{"model":"x"}').hexdigest()
    assert e["amounts"] == {"estimate_usd": "1.23", "limit_usd": "5", "held_tokens": "12", "used": "7E-9"}
    assert (e["model"], e["provider"], e["rule"], e["bucket"]) == (None, None, "daily", "daily:team=ml")
    assert e["ts"] == "2026-12-03T11:34:03.000Z" and e["estimated"] is False
    charge = _entry()
    assert charge["amounts"] == {"cost_usd": "0.0000015", "input_tokens": "3", "output_tokens": "4"}
    assert charge["request_hash"] is None  # a charge is not a decision: no request hash
    approval = entry_from_event(Event(1.0, "approval", "d", "m", "p", 0, dims={"channel": "operator"}),
                                chain="c", seq=1, prev_hash=GENESIS, policy_hash=PH, request=b"x")
    assert approval["request_hash"] is None and approval["amounts"] == {}


@pytest.mark.parametrize(("ts", "text"), [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1796297643.123, "2026-12-03T11:34:03.123Z"),
    (1796297643.9996, "2026-12-03T11:34:04.000Z"),  # rounds into the next second, never ".1000"
    (1796297643.0004, "2026-12-03T11:34:03.000Z"),
])
def test_timestamps_are_rfc3339_utc_milliseconds(ts: float, text: str) -> None:
    assert rfc3339(ts) == text


# -- any event, every field -------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_amount_name = st.builds(lambda base, suffix: base + suffix, st.text("abcdefgh_", min_size=1, max_size=8),
                         st.sampled_from(["_usd", "_tokens", ""]))
_events = st.builds(
    Event,
    ts=st.floats(0, 4_102_444_800, allow_nan=False),
    kind=st.sampled_from(sorted(KINDS)),
    decision_id=_text,
    model=_text,
    provider=_text,
    cost=st.integers(0, 10**15),
    input_tokens=st.integers(0, 10**9),
    output_tokens=st.integers(0, 10**9),
    estimated=st.booleans(),
    dims=st.dictionaries(_text, _text, max_size=5),
    rule=_text,
    bucket=_text,
    amounts=st.dictionaries(_amount_name, st.integers(0, 10**15), max_size=5),
)


def _no_floats(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _no_floats(v) for k, v in value.items())
    return value is None or isinstance(value, bool | int | str)


def _tampered(value: Any) -> Any:
    """A different value of the same shape."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        if len(value) in (64, 128) and all(c in "0123456789abcdef" for c in value):
            return ("1" if value[0] == "0" else "0") + value[1:]  # one hex digit of a hash or signature
        return value + "x"
    if isinstance(value, dict):
        return {**value, "x": "1"} if value else {"x": "1"}
    return "x"  # None


@settings(max_examples=60, deadline=None)
@given(event=_events, request=st.none() | st.binary(max_size=64), seq=st.integers(1, 10**6))
def test_any_event_becomes_an_entry_that_verifies_and_any_edit_is_caught(
        event: Event, request: bytes | None, seq: int) -> None:
    entry = entry_from_event(event, chain="0123456789abcdef", seq=1, prev_hash=GENESIS, policy_hash=PH,
                             request=request)
    assert _no_floats(entry) and set(entry) == set(ENTRY_FIELDS) - {"hash", "sig"}
    assert (entry["request_hash"] is not None) == (request is not None and event.kind in DECISION_KINDS)
    if event.kind in CHARGE_KINDS:
        assert {"cost_usd", "input_tokens", "output_tokens"} <= set(entry["amounts"])
    sealed = seal(entry, KEY)
    assert verify([sealed], [PUB]).ok
    _, text = seal_text(entry, KEY)
    assert verify([json.loads(text)], [PUB]).ok
    for name in ENTRY_FIELDS:
        if name == "chain":
            continue  # a changed chain id is another chain (see below)
        bad = {**sealed, name: _tampered(sealed[name])}
        report = verify([bad], [PUB])
        assert not report.ok, name
        assert report.problems[0].reason in ("edited", "signed by an unknown key"), name
    moved = {**sealed, "chain": "fedcba9876543210"}
    assert not verify([moved], [PUB]).ok
    assert not verify([{**sealed, "extra": "1"}], [PUB]).ok


# -- the writer's direct path -------------------------------------------------------------------------

#: any text: controls, U+2028, astral characters and lone surrogates (st.text leaves those out)
_any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)
_odd_text = st.sampled_from(["", "a", "\ud800", "\U0001f600", "\uff4d", "\u20ac", "\u2028", "\x00", '"', "\\"])
_wild_text = st.one_of(_any_text, _odd_text)
_wild_events = st.builds(
    Event,
    ts=st.floats(0, 4_102_444_800, allow_nan=False) | st.integers(0, 4_102_444_800),
    kind=st.sampled_from(sorted(KINDS)) | _wild_text,
    decision_id=_wild_text,
    model=_wild_text,
    provider=_wild_text,
    cost=st.integers(0, 10**30),
    input_tokens=st.integers(0, 10**20),
    output_tokens=st.integers(0, 10**9),
    estimated=st.booleans(),
    dims=st.dictionaries(_wild_text, _wild_text | st.integers(-5, 5), max_size=5),
    rule=_wild_text,
    bucket=_wild_text,
    amounts=st.dictionaries(_amount_name | _wild_text, st.integers(0, 10**25), max_size=5),
)


@settings(max_examples=500, deadline=None)
@given(event=_wild_events, chain=st.sampled_from(["0123456789abcdef"]) | _wild_text,
       seq=st.integers(1, 10**6) | st.sampled_from([2**53 - 1, 2**53, -(2**53) + 1, -(2**53)]) | st.booleans(),
       prev_hash=st.sampled_from([GENESIS]) | _wild_text, policy_hash=st.sampled_from([PH]) | _wild_text | st.none(),
       request=st.none() | st.binary(max_size=32) | _wild_text)
def test_the_writers_entry_body_is_byte_for_byte_rfc8785_of_the_entry(
        event: Event, chain: str, seq: int, prev_hash: str, policy_hash: str, request: bytes | str | None) -> None:
    """What the writer signs — :func:`entry_body`, written straight from the event — is exactly
    ``rfc8785.dumps`` of the entry :func:`entry_from_event` makes, for any event (every kind of
    character, astral keys sorted by UTF-16 code unit, lone surrogates, integers past 2**53, a bool or an unsafe seq, a
    non-text policy hash), or it fails as that does."""
    kw: dict[str, Any] = {"chain": chain, "seq": seq, "prev_hash": prev_hash, "policy_hash": policy_hash,
                          "request": request}
    try:
        expected = rfc8785.dumps(entry_from_event(event, **kw))
    except Exception as exc:
        with pytest.raises(type(exc)):
            entry_body(event, **kw)
        return
    assert entry_body(event, **kw) == expected


@pytest.mark.parametrize("i", range(len(DOC["entries"])))
def test_each_vector_comes_out_of_the_writers_path_exactly(i: int) -> None:
    v = DOC["entries"][i]
    request = None if v["request_base64"] is None else base64.b64decode(v["request_base64"])
    body = entry_body(_event(v["event"]), chain=DOC["chain"], seq=v["seq"], prev_hash=v["prev_hash"],
                      policy_hash=DOC["policy_hash"], request=request)
    assert body.decode("utf-8") == v["canonical"]
    assert audit._entry_text(_event(v["event"]), DOC["chain"], v["seq"], v["prev_hash"], DOC["policy_hash"],
                             request) is not None, "an ordinary entry is written directly, not the generic way"
    digest, text = seal_body(body, KEY)
    assert digest == v["hash"] and json.loads(text) == v["entry"]


# -- the key ----------------------------------------------------------------------------------------

def test_the_default_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = Path(os.environ["SPENDGATE_HOME"]) / "audit.key"
    assert not path.exists()
    key = load_key(None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted: openssl reads it
    assert public_hex(load_key(None)) == public_hex(key)
    assert path.read_bytes() == pem


def test_processes_starting_at_once_agree_on_one_key() -> None:
    keys = race(8, lambda: public_hex(load_key(None)))
    assert len(set(keys)) == 1
    assert [p.name for p in Path(os.environ["SPENDGATE_HOME"]).iterdir()] == ["audit.key"]


def test_a_verifier_never_creates_the_key() -> None:
    with pytest.raises(AuditKeyError, match=r"audit\.key: no such file"):
        load_key(None, create=False)
    assert not (Path(os.environ["SPENDGATE_HOME"]) / "audit.key").exists()


def _write_pem(path: Path, key: Any, mode: int = 0o600) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(mode)


def test_an_operator_key_is_read_and_never_created(tmp_path: Path) -> None:
    path = tmp_path / "op.key"
    with pytest.raises(AuditKeyError, match=f"{path}: no such file"):
        load_key(f"file:{path}")
    assert not path.exists()
    _write_pem(path, KEY)
    assert public_hex(load_key(f"file:{path}")) == public_hex(KEY)
    assert public_hex(load_key(f"file://{path}")) == public_hex(KEY)


@pytest.mark.parametrize(("content", "message"), [
    (b"not a key", "not a PEM private key"),
    (None, "key; expected Ed25519"),
    (b"", "not a PEM private key"),
])
def test_an_unusable_key_is_a_clear_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.key"
    if content is None:
        _write_pem(path, rsa.generate_private_key(public_exponent=65537, key_size=1024))
    else:
        path.write_bytes(content)
    with pytest.raises(AuditKeyError) as err:
        load_key(f"file:{path}")
    assert str(err.value).startswith(f"audit key {path}: ") and message in str(err.value)


def test_an_encrypted_key_and_a_bad_spec_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    path.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(AuditKeyError, match="encrypted"):
        load_key(f"file:{path}")
    with pytest.raises(AuditKeyError, match="expected file:/path"):
        load_key("/etc/audit.key")


def test_a_key_others_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "open.key"
    _write_pem(path, KEY, 0o644)
    with caplog.at_level(logging.WARNING, logger="spendgate.audit"):
        load_key(f"file:{path}")
    assert f"audit key {path} is readable by group or others (mode 644)" in caplog.text


def test_public_keys_parse_from_64_hex() -> None:
    assert public_hex(parse_public(public_hex(KEY))) == public_hex(KEY)
    for bad in ("", "zz" * 32, "ab" * 31, "ab" * 33):
        with pytest.raises(AuditKeyError, match="expected 64 hex digits"):
            parse_public(bad)


@given(st.binary(max_size=2048))
def test_the_writers_signer_signs_exactly_as_the_key_does(data: bytes) -> None:
    """The writer signs through libsodium; Ed25519 is deterministic, so its signature must be the
    key's own (OpenSSL's) byte for byte, and verify with the public key."""
    from spendgate.events.signing import fast_signer

    sig = fast_signer(KEY).sign(data)
    assert sig == KEY.sign(data)
    KEY.public_key().verify(sig, data)
