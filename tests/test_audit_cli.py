"""``spendgate audit export | verify | pubkey`` against a SQLite store an AuditLog wrote."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.events.chain import AuditLog
from spendgate.events.signing import load_key, public_hex
from spendgate.ledger.base import Event

PH = "ef" * 32


def populate(url: str, key: Ed25519PrivateKey, chains: int = 2, n: int = 30, ts: float | None = None) -> list[str]:
    store = ledger.open(url)
    names = []
    for c in range(chains):
        log = AuditLog(store, key, flush_s=3600, checkpoint_entries=10)
        for i in range(n):
            log.add(Event(ts if ts is not None else time.time(), "allow" if i % 2 else "capture", f"d-{c}-{i}",
                          "gpt-4o", "openai", 1000, 1, 2, dims={"user": "zoé"}), PH, b"{}")
        log.close()
        names.append(log.chain)
    store.close()
    return names


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'spend.db'}"


def test_export_then_verify_the_file_and_the_store(url: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    chains = sorted(populate(url, load_key(None)))
    out = tmp_path / "audit.jsonl"
    assert main(["audit", "export", "--store", url, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"exported 60 entries and 6 checkpoints of 2 chain(s) to {out}\n"
    docs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    # chain by chain (sorted), its entries in order, then its checkpoints
    assert [(d["chain"], d["kind"] == "checkpoint", d["seq"]) for d in docs] == [
        (c, cp, s) for c in chains for cp, s in [(False, s) for s in range(1, 31)] + [(True, s) for s in (10, 20, 30)]]
    assert main(["audit", "verify", "--from", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said == [f"chain {c}: ok: 30 entries, checkpoint at seq 30" for c in chains]
    assert main(["audit", "verify", "--store", url]) == 0
    assert capsys.readouterr().out.splitlines() == said
    assert main(["audit", "export", "--store", url]) == 0  # to standard output, nothing else on it
    assert capsys.readouterr().out == out.read_text(encoding="utf-8")


def test_verify_names_the_first_problem_and_exits_1(url: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    chains = sorted(populate(url, load_key(None)))
    out = tmp_path / "audit.jsonl"
    main(["audit", "export", "--store", url, "--out", str(out)])
    lines = out.read_text(encoding="utf-8").splitlines()
    del lines[6]  # the first chain's seq 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["audit", "verify", "--from", str(bad)]) == 1
    said = capsys.readouterr().out.splitlines()
    assert said == [f"chain {chains[0]}: seq 7: missing", "  seq 7 is absent; seq 8 follows seq 6",
                    f"chain {chains[1]}: ok: 30 entries, checkpoint at seq 30"]
    assert main(["audit", "verify", "--from", str(bad), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["source"] == str(bad)
    assert doc["chains"][0]["problems"] == [{"chain": chains[0], "seq": 7, "reason": "missing",
                                             "detail": "seq 7 is absent; seq 8 follows seq 6"}]
    assert doc["chains"][1] | {"key": None} == {"chain": chains[1], "ok": True, "entries": 30, "last_seq": 30,
                                                "checkpoint_seq": 30, "checkpoints": 3, "key": None, "problems": []}


def test_pubkey_and_explicit_trusted_keys(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    populate(url, load_key(None), chains=1)
    assert main(["audit", "pubkey"]) == 0
    pub = capsys.readouterr().out.strip()
    assert pub == public_hex(load_key(None)) and len(pub) == 64
    assert main(["audit", "pubkey", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "pubkey": pub, "key_file": str(Path(os.environ["SPENDGATE_HOME"]) / "audit.key")}
    other = public_hex(Ed25519PrivateKey.generate())
    assert main(["audit", "verify", "--store", url, "--pubkey", other]) == 1
    assert capsys.readouterr().out.splitlines()[0].endswith(": seq 1: signed by an unknown key")
    assert main(["audit", "verify", "--store", url, "--pubkey", other, "--pubkey", pub]) == 0
    assert main(["audit", "verify", "--store", url, "--pubkey", "nothex"]) == 2
    assert "expected 64 hex digits" in capsys.readouterr().err


def test_the_policy_audit_key_is_used_and_never_created(url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "op.key"
    policy = tmp_path / "spendgate.toml"
    policy.write_text(f'audit_key = "file:{key_file}"\n')
    assert main(["audit", "pubkey", "--config", str(policy)]) == 2
    assert f"audit key {key_file}: no such file" in capsys.readouterr().err
    assert not key_file.exists()
    key = Ed25519PrivateKey.generate()
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    populate(url, key, chains=1)
    assert main(["audit", "pubkey", "--config", str(policy)]) == 0
    assert capsys.readouterr().out.strip() == public_hex(key)
    assert main(["audit", "verify", "--store", url, "--config", str(policy)]) == 0
    # without the policy, the default key is not created to verify with: an error that names it
    assert main(["audit", "verify", "--store", url]) == 2
    assert "audit.key: no such file" in capsys.readouterr().err
    assert not (Path(os.environ["SPENDGATE_HOME"]) / "audit.key").exists()


def test_a_file_that_is_not_jsonl_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_key(None)
    for content, message in (('{"chain": "a"}\n\n{oops\n', "line 3 is not JSON"),
                             ('[1, 2]\n', "line 1 is not a JSON object")):
        path = tmp_path / "x.jsonl"
        path.write_text(content)
        assert main(["audit", "verify", "--from", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: {message}" in err
    assert main(["audit", "verify", "--from", str(tmp_path / "none.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["audit", "verify", "--from", str(empty)]) == 1
    assert capsys.readouterr().out == f"nothing to verify: no audit entries in {empty}\n"


def test_export_since_and_chain_take_whole_chains(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = load_key(None)
    (old,) = populate(url, key, chains=1, n=5, ts=time.time() - 3 * 86400)
    (new,) = populate(url, key, chains=1, n=7)
    out = tmp_path / "recent.jsonl"
    assert main(["audit", "export", "--store", url, "--since", "1d", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "chains": [new], "entries": 7, "checkpoints": 1}
    assert {json.loads(x)["chain"] for x in out.read_text().splitlines()} == {new}
    assert main(["audit", "verify", "--from", str(out)]) == 0
    capsys.readouterr()
    assert main(["audit", "export", "--store", url, "--chain", old]) == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [1, 2, 3, 4, 5, 5]
    assert main(["audit", "export", "--store", url, "--chain", "nope"]) == 1
    assert "--chain nope: no such audit chain" in capsys.readouterr().err
    assert main(["audit", "export", "--store", url, "--since", "soon"]) == 2


def test_export_of_a_missing_store_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "none.db"
    assert main(["audit", "export", "--store", f"sqlite:///{path}"]) == 1
    assert not path.exists()


class _Growing:
    """A store whose chain grows (entries, then a checkpoint naming them) while it is being read:
    a server still writing while an operator verifies or exports."""

    def __init__(self, store: ledger.Ledger, log: AuditLog) -> None:
        self._store, self._log = store, log

    def audit_entries(self, chain: str, after_seq: int = 0, limit: int | None = None) -> list[str]:
        out = self._store.audit_entries(chain, after_seq, limit)
        for i in range(4):
            self._log.add(Event(time.time(), "allow", f"late-{i}", "gpt-4o", "openai", 0), "ab" * 32)
        self._log.close()  # the entries, then a checkpoint naming them
        return out

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_chain_that_grows_while_it_is_verified_is_not_called_truncated(url: str) -> None:
    from spendgate.events.verify import verify_store

    key = load_key()
    store = ledger.open(url)
    log = AuditLog(store, key, flush_s=60, checkpoint_entries=4)
    for i in range(4):
        log.add(Event(time.time(), "allow", f"d-{i}", "gpt-4o", "openai", 0), "ab" * 32)
    log.flush()
    report = verify_store(_Growing(store, log), [key.public_key()])  # type: ignore[arg-type]
    assert report.ok, [str(p) for p in report.problems]
    store.close()


def test_status_writes_the_holds_it_expires_to_the_audit_log(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from spendgate.engine import Engine
    from spendgate.policy import default_policy
    from spendgate.request import Identity, Request

    store = ledger.open(url)
    engine = Engine(default_policy(), store)
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    d = engine.decide(Request("openai", "/v1/chat/completions", body, Identity(session="s1")), now=1_000_000.0)
    assert d.allowed  # its hold is long stale by now: nobody captured it
    store.close()
    assert main(["status", "--store", url]) == 0
    store = ledger.open(url)
    try:
        (chain,) = store.audit_chains()
        (entry,) = [json.loads(t) for t in store.audit_entries(chain)]
        assert (entry["kind"], entry["decision_id"], entry["estimated"]) == ("expired", d.id, True)
    finally:
        store.close()
