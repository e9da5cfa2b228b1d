"""The Node.js verifier (scripts/verify-audit.mjs), an independent implementation of the format,
accepts what spendgate writes and names the same first problem the Python verifier names."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.events.chain import AuditLog
from spendgate.events.signing import load_key, parse_public, public_hex
from spendgate.events.verify import verify
from spendgate.ledger.base import Event

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "verify-audit.mjs"
VECTORS = ROOT / "tests" / "vectors" / "audit"


def node() -> str:
    found = shutil.which("node")
    assert found is not None, "Node.js (node) is not on PATH: scripts/test.sh installs it; these tests do not skip"
    return found


def run(path: Path, *keys: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node(), str(SCRIPT), str(path), *keys], capture_output=True, text=True, timeout=60)


def python_says(path: Path, *keys: str) -> list[str]:
    """What the Python verifier prints for each chain (its first line per chain)."""
    docs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    report = verify(docs, [parse_public(k) for k in keys])
    return [str(c.problems[0]) if c.problems else f"ok: chain {c.chain}: {c.entries} entries, "
            + (f"checkpoint at seq {c.checkpoint_seq}" if c.checkpoint_seq is not None else "no checkpoint")
            for c in report.chains]


VECTOR_KEY = (VECTORS / "pubkey.txt").read_text().strip()


def test_node_accepts_the_committed_vectors() -> None:
    done = run(VECTORS / "export.jsonl", VECTOR_KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "ok: chain 5eed0a0d17c0ffee: 4 entries, checkpoint at seq 4\n"


def test_node_rejects_an_edited_vector(tmp_path: Path) -> None:
    text = (VECTORS / "export.jsonl").read_text(encoding="utf-8")
    assert '"résumé 📄"' in text
    bad = tmp_path / "edited.jsonl"
    bad.write_text(text.replace('"résumé 📄"', '"resume 📄"'), encoding="utf-8")
    done = run(bad, VECTOR_KEY)
    assert done.returncode == 1
    assert done.stdout == "chain 5eed0a0d17c0ffee: seq 4: edited\n"


def test_node_rejects_the_wrong_key_and_bad_input(tmp_path: Path) -> None:
    other = public_hex(Ed25519PrivateKey.from_private_bytes(bytes(32)))
    done = run(VECTORS / "export.jsonl", other)
    assert done.returncode == 1 and done.stdout == "chain 5eed0a0d17c0ffee: seq 1: signed by an unknown key\n"
    assert run(VECTORS / "export.jsonl", other, VECTOR_KEY).returncode == 0  # any trusted key may sign a chain
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"chain": "a"}\nnot json\n')
    done = run(junk, VECTOR_KEY)
    assert done.returncode == 1 and "line 2 is not JSON" in done.stderr
    assert run(VECTORS / "export.jsonl", "xyz").returncode == 2
    assert run(VECTORS / "export.jsonl").returncode == 2


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, str]:
    """A fresh export of two chains written by AuditLog over SQLite, and the key's public hex."""
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    store = ledger.open(url)
    key = load_key(None)
    for c in range(2):
        log = AuditLog(store, key, flush_s=3600, checkpoint_entries=16)
        for i in range(40):
            kind = ("allow", "capture", "hold", "approval")[i % 4]
            log.add(Event(1796297643.0 + i, kind, f"d-{c}-{i}", "claude-sonnet-4-5", "anthropic", 1234 * i, i, i,
                          dims={"user": "zoé", "tag:📄": "ｍｌ"}, amounts={"estimate_usd": 10**9 + i}), "ab" * 32,
                    b'{"messages":[]}')
        log.close()
    store.close()
    out = tmp_path / "export.jsonl"
    assert main(["audit", "export", "--store", url, "--out", str(out)]) == 0
    return out, public_hex(key)


def test_node_accepts_a_fresh_export(export: tuple[Path, str]) -> None:
    path, pub = export
    done = run(path, pub)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == python_says(path, pub)
    assert all(line.endswith(": 40 entries, checkpoint at seq 40") for line in done.stdout.splitlines())


def test_node_and_python_name_the_same_first_problem(export: tuple[Path, str], tmp_path: Path) -> None:
    path, pub = export
    lines = path.read_text(encoding="utf-8").splitlines()
    first_chain = json.loads(lines[0])["chain"]
    docs = [json.loads(x) for x in lines]
    idx = [i for i, d in enumerate(docs) if d["chain"] == first_chain and d["kind"] != "checkpoint"]
    edited = list(lines)
    did = docs[idx[9]]["decision_id"]
    edited[idx[9]] = edited[idx[9]].replace(f'"{did}"', f'"{did}x"')
    assert edited[idx[9]] != lines[idx[9]]
    swapped = list(lines)
    swapped[idx[2]], swapped[idx[3]] = swapped[idx[3]], swapped[idx[2]]
    deleted = [x for i, x in enumerate(lines) if i != idx[4]]
    duplicated = [*lines[:idx[6]], lines[idx[5]], *lines[idx[6]:]]
    cut = [x for i, x in enumerate(lines) if i not in idx[-5:]]
    cases = {"edited": (edited, "seq 10: edited"), "swapped": (swapped, "seq 3: reordered"),
             "deleted": (deleted, "seq 5: missing"), "duplicated": (duplicated, "seq 7: inserted"),
             "cut": (cut, "seq 40: truncated after seq 35")}
    for name, (new, expected) in cases.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(new) + "\n", encoding="utf-8")
        done = run(p, pub)
        assert done.returncode == 1, (name, done.stdout)
        said = done.stdout.splitlines()
        assert said == python_says(p, pub), name
        assert said[0] == f"chain {first_chain}: {expected}", name  # the export lists chains sorted
