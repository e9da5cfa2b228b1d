"""Write the audit log's test vectors (tests/vectors/audit/) from a fixed key and fixed events.

The committed files are the vectors: another implementation of the format (the Node verifier, an
auditor's own script) checks itself against them, and tests/test_audit_format.py checks that this
code still reproduces them byte for byte. Ed25519 signatures are deterministic, so running this again
writes the same files; a change in them is a change of the format.

    python scripts/make_audit_vectors.py [OUT_DIR]
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate.events.audit import GENESIS, canonical, checkpoint, dumps, entry_from_event, seal, seal_text
from spendgate.events.signing import public_hex
from spendgate.ledger.base import Event

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "audit"
SEED = hashlib.sha256(b"spendgate audit test vectors").hexdigest()
CHAIN = "5eed0a0d17c0ffee"
POLICY_HASH = hashlib.sha256(b"a policy").hexdigest()
REQUEST = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":500}'
CHECKPOINT_TS = 1796297645.5

#: (event, raw request body or None): a decision, a hold, an approval, a charge with non-ASCII dims
EVENTS: list[tuple[Event, bytes | None]] = [
    (Event(1796297643.123, "allow", "dec-0001", "gpt-4o", "openai", 0,
           dims={"user": "alice", "team": "ml", "route": "/v1/chat/completions", "key": "k-3f2a"},
           amounts={"estimate_usd": 5_012_500}), REQUEST),
    (Event(1796297643.9995, "hold", "dec-0002", "o1-pro", "openai", 0,
           dims={"user": "alice", "team": "ml", "session": "s-42"}, rule="per-call", bucket="per-call:team=ml",
           amounts={"estimate_usd": 1_210_000_000, "limit_usd": 1_000_000_000, "used_usd": 0,
                    "estimate_tokens": 2010}), REQUEST),
    (Event(1796297644.5, "approval", "dec-0002", "o1-pro", "openai", 0,
           dims={"channel": "operator", "by": "cli", "granted_usd": "5", "session": "s-42"}, rule="per-call",
           bucket="per-call:team=ml", amounts={"granted_usd": 5_000_000_000}), None),
    (Event(1796297645.0, "capture", "dec-0003", "claude-sonnet-4-5", "anthropic", 1_201_500_000, 10, 2000,
           estimated=True, dims={"user": "zoé", "feature": "résumé 📄", "tag:team": "ml",
                 # JCS sorts keys by UTF-16 code units: U+FF4D sorts after the surrogate pair of U+1F4C4
                 "tag:ｍｌ": "全角", "tag:📄": "doc"}), REQUEST),
]


def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SEED))


def _event_doc(event: Event) -> dict[str, Any]:
    return {"ts": event.ts, "kind": event.kind, "decision_id": event.decision_id, "model": event.model,
            "provider": event.provider, "cost": event.cost, "input_tokens": event.input_tokens,
            "output_tokens": event.output_tokens, "estimated": event.estimated, "dims": dict(event.dims),
            "rule": event.rule, "bucket": event.bucket, "amounts": dict(event.amounts)}


def build() -> dict[str, str]:
    """File name -> content of every vector file."""
    k = key()
    vectors: list[dict[str, Any]] = []
    lines: list[str] = []
    prev = GENESIS
    for seq, (event, request) in enumerate(EVENTS, 1):
        entry = entry_from_event(event, chain=CHAIN, seq=seq, prev_hash=prev, policy_hash=POLICY_HASH,
                                 request=request)
        body = canonical(entry)
        sealed = seal(entry, k)
        digest, text = seal_text(entry, k)
        assert digest == sealed["hash"] == hashlib.sha256(body).hexdigest()
        vectors.append({
            "event": _event_doc(event),
            "request_base64": None if request is None else base64.b64encode(request).decode(),
            "seq": seq, "prev_hash": prev,
            "entry": sealed,
            "canonical": body.decode("utf-8"),
            "hash": sealed["hash"],
            "sig": sealed["sig"],
        })
        lines.append(text)
        prev = digest
    cp = checkpoint(CHAIN, len(EVENTS), prev, CHECKPOINT_TS, k)
    cp_body = canonical({n: v for n, v in cp.items() if n != "sig"})
    doc = {
        "about": ("spendgate audit log test vectors (scripts/make_audit_vectors.py). hash = SHA-256 of the UTF-8 "
                  "bytes of 'canonical' (RFC 8785 of the entry without hash and sig); sig = Ed25519 over the same "
                  "bytes with the key whose 32-byte seed is key.seed_hex; export.jsonl is the chain as stored."),
        "key": {"seed_hex": SEED, "public_hex": public_hex(k)},
        "chain": CHAIN,
        "policy_hash": POLICY_HASH,
        "entries": vectors,
        "checkpoint": {"checkpoint": cp, "canonical": cp_body.decode("utf-8")},
    }
    return {
        "vectors.json": json.dumps(doc, ensure_ascii=False, indent=2) + "\n",
        "export.jsonl": "".join(line + "\n" for line in [*lines, dumps(cp)]),
        "pubkey.txt": public_hex(k) + "\n",
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    for name, content in build().items():
        (out / name).write_text(content, encoding="utf-8")
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
