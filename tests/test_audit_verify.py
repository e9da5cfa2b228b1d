"""The verifier names the first thing wrong with each chain — edited, reordered, inserted, missing,
truncated, a bad checkpoint, an unknown key — with the seq where the chain stops being what its
writer left, and passes an untouched log."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate import ledger
from spendgate.events.audit import GENESIS, checkpoint, dumps, entry_from_event, seal, seal_text
from spendgate.events.verify import Report, verify, verify_store
from spendgate.ledger.base import Event

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PH = "ab" * 32
CHAIN = "00112233aabbccdd"


def _event(i: int) -> Event:
    kind = ("allow", "capture", "block", "approval")[i % 4]
    return Event(1796297643.0 + i, kind, f"dec-{i}", "gpt-4o", "openai", 1000 * i, i, 2 * i,
                 dims={"user": "zoé", "n": str(i)}, amounts={"estimate_usd": 5000 * i})


def build(n: int = 20, *, chain: str = CHAIN, key: Ed25519PrivateKey = KEY, every: int = 5) -> list[str]:
    """``n`` entries as stored (JSON text), then checkpoints every ``every`` seqs and at the head."""
    entries: list[str] = []
    cps: list[str] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        prev, text = seal_text(entry_from_event(_event(seq), chain=chain, seq=seq, prev_hash=prev, policy_hash=PH,
                                                request=b"{}"), key)
        entries.append(text)
        if seq % every == 0 or seq == n:
            cps.append(dumps(checkpoint(chain, seq, prev, 1796297700.0 + seq, key)))
    return entries + cps


def check(lines: list[str], *keys: Ed25519PrivateKey) -> Report:
    return verify([json.loads(x) for x in lines], [k.public_key() for k in keys or (KEY,)])


def first(report: Report) -> tuple[int, str]:
    assert not report.ok
    p = report.problems[0]
    return p.seq, p.reason


def test_an_untouched_log_passes_with_its_counts() -> None:
    report = check(build(20))
    assert report.ok
    (c,) = report.chains
    assert (c.chain, c.entries, c.last_seq, c.checkpoint_seq, c.checkpoints) == (CHAIN, 20, 20, 20, 4)
    assert c.summary() == f"chain {CHAIN}: ok: 20 entries, checkpoint at seq 20"


def test_one_edited_byte_is_named_with_its_seq() -> None:
    lines = build(20)
    assert '"n":"7"' in lines[6]
    lines[6] = lines[6].replace('"n":"7"', '"n":"8"')
    assert first(check(lines)) == (7, "edited")
    assert str(check(lines).problems[0]) == f"chain {CHAIN}: seq 7: edited"


@pytest.mark.parametrize("field", ["hash", "sig", "prev_hash", "ts", "amounts"])
def test_an_edit_of_any_field_is_edited(field: str) -> None:
    lines = build(20)
    doc = json.loads(lines[9])
    doc[field] = {"x": "1"} if field == "amounts" else ("0" if doc[field][0] != "0" else "1") + doc[field][1:]
    lines[9] = json.dumps(doc)
    assert first(check(lines)) == (10, "edited")


def test_an_edited_first_entry_is_edited_not_an_unknown_key() -> None:
    lines = build(20)
    lines[0] = lines[0].replace('"n":"1"', '"n":"2"')
    assert first(check(lines)) == (1, "edited")


def test_an_edit_rehashed_without_the_key_is_still_edited() -> None:
    lines = build(20)
    doc = json.loads(lines[4])
    doc["amounts"] = {"estimate_usd": "0"}
    lines[4] = json.dumps(seal(doc, OTHER) | {"sig": json.loads(lines[4])["sig"]})  # right hash, old signature
    assert first(check(lines)) == (5, "edited")


def test_two_swapped_entries_are_reordered_at_the_first_seq_out_of_place() -> None:
    lines = build(20)
    lines[2], lines[3] = lines[3], lines[2]
    assert first(check(lines)) == (3, "reordered")
    far = build(20)
    far[4], far[11] = far[11], far[4]
    assert first(check(far)) == (5, "reordered")


def test_a_deleted_entry_is_missing() -> None:
    lines = build(20)
    del lines[4]
    assert first(check(lines)) == (5, "missing")
    assert check(lines).problems[0].detail == "seq 5 is absent; seq 6 follows seq 4"


def test_an_inserted_entry_is_inserted() -> None:
    lines = build(20)
    forged = json.loads(lines[10])
    forged["amounts"] = {"estimate_usd": "0"}
    forged = seal(forged, OTHER)  # a well-formed body nobody trusted signed
    lines.insert(10, dumps(forged))
    assert first(check(lines)) == (11, "inserted")
    junk = build(20)
    junk.insert(3, json.dumps({"chain": CHAIN, "seq": 4, "kind": "allow"}))
    assert first(check(junk)) == (4, "inserted")


def test_a_duplicated_entry_is_inserted() -> None:
    lines = build(20)
    lines.insert(6, lines[5])
    assert first(check(lines)) == (7, "inserted")
    assert check(lines).problems[0].detail == "a second copy of seq 6"


def test_an_entry_signed_by_another_trusted_key_is_inserted() -> None:
    lines = build(20)
    doc = json.loads(lines[12])
    doc["amounts"] = {"estimate_usd": "0"}
    lines[12] = dumps(seal(doc, OTHER))
    assert first(check(lines, KEY, OTHER)) == (13, "inserted")


def test_cutting_the_last_five_is_truncated_after_the_last_seq_left() -> None:
    lines = build(20)
    cut = lines[:15] + lines[20:]
    assert first(check(cut)) == (20, "truncated after seq 15")
    assert str(check(cut).problems[0]) == f"chain {CHAIN}: seq 20: truncated after seq 15"
    everything = lines[20:]  # every entry gone, the checkpoints kept apart remain
    assert first(check(everything)) == (20, "truncated after seq 0")


def test_truncation_without_its_checkpoints_is_the_limit_of_the_log() -> None:
    lines = build(20)
    # cut the tail and the checkpoints naming it: the log verifies up to the last checkpoint left
    report = check(lines[:15] + lines[20:23])
    assert report.ok and report.chains[0].checkpoint_seq == 15


def test_the_wrong_key_is_an_unknown_key() -> None:
    assert first(check(build(20), OTHER)) == (1, "signed by an unknown key")
    assert check(build(20), OTHER, KEY).ok


def test_a_bad_checkpoint_is_named() -> None:
    lines = build(20)
    cp = json.loads(lines[-1])
    lines[-1] = json.dumps(cp | {"seq": 19})  # signature no longer matches
    assert first(check(lines)) == (19, "bad checkpoint")
    wrong_head = build(20)
    wrong_head[-1] = dumps(checkpoint(CHAIN, 20, "f" * 64, 0, KEY))
    assert first(check(wrong_head)) == (20, "bad checkpoint")
    foreign = build(20)
    foreign[-1] = dumps(checkpoint(CHAIN, 20, json.loads(foreign[19])["hash"], 0, OTHER))
    assert first(check(foreign, KEY, OTHER)) == (20, "bad checkpoint")


def test_chains_are_verified_apart_and_each_names_its_own_problem() -> None:
    a = build(10, chain="a" * 16)
    b = build(10, chain="b" * 16, key=OTHER)
    del b[3]
    mixed = [x for pair in zip(a, b, strict=False) for x in pair]
    report = check(mixed, KEY, OTHER)
    assert [c.ok for c in report.chains] == [True, False]
    assert [str(p) for p in report.problems] == [f"chain {'b' * 16}: seq 4: missing"]


def test_verify_store_reads_through_the_ledger() -> None:
    store = ledger.open("memory://")
    lines = build(12)
    docs: list[dict[str, Any]] = [json.loads(x) for x in lines]
    store.append_audit(CHAIN, 1, [x for x, d in zip(lines, docs, strict=True) if d["kind"] != "checkpoint"])
    for x, d in zip(lines, docs, strict=True):
        if d["kind"] == "checkpoint":
            store.put_checkpoint(CHAIN, x)
    report = verify_store(store, [KEY.public_key()])
    assert report.ok and report.chains[0].entries == 12 and report.chains[0].checkpoint_seq == 12
    assert verify_store(store, [KEY.public_key()], chain=CHAIN).ok
    assert not verify_store(store, [OTHER.public_key()]).ok
