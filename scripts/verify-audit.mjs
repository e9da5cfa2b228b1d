#!/usr/bin/env node
// Verify a spendgate audit export with nothing but Node.js (v20+, built-in crypto): a second,
// independent implementation of the format, so trusting the log does not mean trusting spendgate.
//
//   node scripts/verify-audit.mjs EXPORT.jsonl PUBKEY_HEX [PUBKEY_HEX ...]
//
// Each entry's hash is SHA-256 of the RFC 8785 (JCS) canonical JSON of the entry without "hash" and
// "sig"; "sig" is Ed25519 over the same bytes; "prev_hash" links to the previous entry (64 zeros
// first). Checkpoints (kind "checkpoint") sign a chain's head, so a log cut short is caught.
// Prints "ok ..." per chain and exits 0, or the first problem per chain ("chain C: seq N: reason")
// and exits 1. Reasons and seqs are the ones `spendgate audit verify` gives.
import { createHash, createPublicKey, verify as edVerify } from "node:crypto";
import { readFileSync } from "node:fs";

const GENESIS = "0".repeat(64);
const ENTRY_FIELDS = ["chain", "seq", "ts", "kind", "decision_id", "request_hash", "rule", "bucket", "amounts",
  "model", "provider", "dims", "estimated", "policy_hash", "prev_hash", "hash", "sig"];
const CHECKPOINT_FIELDS = ["kind", "chain", "seq", "head", "ts", "sig"];

// RFC 8785 for the values an entry holds: strings, numbers, booleans, null, objects, arrays.
// JSON.stringify already writes strings and numbers the way JCS specifies; objects need their keys
// sorted by UTF-16 code units, which is what the default Array sort compares.
function jcs(v) {
  if (Array.isArray(v)) return "[" + v.map(jcs).join(",") + "]";
  if (v !== null && typeof v === "object") {
    return "{" + Object.keys(v).sort().map((k) => JSON.stringify(k) + ":" + jcs(v[k])).join(",") + "}";
  }
  if (typeof v === "number" && !Number.isFinite(v)) throw new Error("not a finite number");
  return JSON.stringify(v);
}

const sha256 = (buf) => createHash("sha256").update(buf).digest("hex");
const sameKeys = (doc, fields) => {
  const keys = Object.keys(doc);
  return keys.length === fields.length && fields.every((f) => Object.hasOwn(doc, f));
};
const isSeq = (v) => Number.isInteger(v);

function bodyOf(doc, drop) {
  const rest = {};
  for (const [k, v] of Object.entries(doc)) if (!drop.includes(k)) rest[k] = v;
  return Buffer.from(jcs(rest), "utf8");
}

function sigOk(key, sig, body) {
  if (typeof sig !== "string" || !/^[0-9a-f]{128}$/.test(sig)) return false;
  try {
    return edVerify(null, body, key, Buffer.from(sig, "hex"));
  } catch {
    return false;
  }
}

function publicKey(hex) {
  if (!/^[0-9a-fA-F]{64}$/.test(hex)) throw new Error(`public key ${hex}: expected 64 hex digits`);
  const x = Buffer.from(hex, "hex").toString("base64url");
  return createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x }, format: "jwk" });
}

function entryInfo(doc) {
  const wellFormed = sameKeys(doc, ENTRY_FIELDS) && isSeq(doc.seq);
  let body = null;
  try {
    body = bodyOf(doc, ["hash", "sig"]);
  } catch {
    body = null;
  }
  const contentOk = wellFormed && body !== null && sha256(body) === doc.hash;
  return { doc, seq: isSeq(doc.seq) ? doc.seq : null, prev: doc.prev_hash, hash: doc.hash, contentOk, body };
}

// One chain: walk from seq 1 to the first problem (the same reasons as spendgate's verifier).
function verifyChain(chain, docs, cps, keys) {
  const entries = docs.map(entryInfo);
  const signedBy = (i, key) => entries[i].contentOk && sigOk(key, entries[i].doc.sig, entries[i].body);
  let key = null;
  const authenticCache = new Map();
  const authentic = (i) => {
    if (!authenticCache.has(i)) authenticCache.set(i, key !== null && signedBy(i, key));
    return authenticCache.get(i);
  };
  const bySeq = new Map();
  entries.forEach((e, i) => {
    if (e.seq !== null) bySeq.set(e.seq, [...(bySeq.get(e.seq) ?? []), i]);
  });
  const result = { chain, entries: entries.length, lastSeq: 0, checkpointSeq: null, problem: null };
  let want = 1;
  let prev = GENESIS;
  const good = new Map();
  const fail = (reason) => {
    result.problem = { seq: want, reason };
  };

  walk: {
    const first = entries.findIndex((e) => e.contentOk);
    if (first >= 0) {
      key = keys.find((k) => signedBy(first, k)) ?? null;
      if (key === null) {
        fail("signed by an unknown key");
        break walk;
      }
    }
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i];
      if (!authentic(i)) {
        let next = -1;
        for (let j = i + 1; j < entries.length; j++) if (authentic(j)) { next = j; break; }
        if (next >= 0 && entries[next].seq === want && entries[next].prev === prev) fail("inserted");
        else if (e.contentOk && keys.some((k) => signedBy(i, k))) fail("inserted");
        else if (e.contentOk && (e.seq !== want || e.prev !== prev)) fail("inserted");
        else fail("edited");
        break walk;
      }
      if (e.seq < want) { fail("inserted"); break walk; }
      if (e.seq > want) {
        const later = (bySeq.get(want) ?? []).some((j) => j > i && authentic(j));
        fail(later ? "reordered" : "missing");
        break walk;
      }
      if (e.prev !== prev) { fail("inserted"); break walk; }
      good.set(want, e.hash);
      result.lastSeq = want;
      want += 1;
      prev = e.hash;
    }
  }

  let cpProblem = null;
  for (const cp of cps) {
    const at = isSeq(cp.seq) ? cp.seq : 0;
    let signed = false;
    if (sameKeys(cp, CHECKPOINT_FIELDS) && isSeq(cp.seq) && typeof cp.head === "string") {
      try {
        const body = bodyOf(cp, ["sig"]);
        signed = (key !== null ? [key] : keys).some((k) => sigOk(k, cp.sig, body));
      } catch {
        signed = false;
      }
    }
    if (!signed) {
      cpProblem ??= { seq: at, reason: "bad checkpoint" };
      continue;
    }
    result.checkpointSeq = Math.max(result.checkpointSeq ?? 0, at);
    if (good.has(at) && good.get(at) !== cp.head) cpProblem ??= { seq: at, reason: "bad checkpoint" };
  }
  if (result.problem === null) {
    if (cpProblem !== null) result.problem = cpProblem;
    else if (result.checkpointSeq !== null && result.checkpointSeq > result.lastSeq) {
      result.problem = { seq: result.checkpointSeq, reason: `truncated after seq ${result.lastSeq}` };
    }
  }
  return result;
}

function main(argv) {
  if (argv.length < 2) {
    console.error("usage: node verify-audit.mjs EXPORT.jsonl PUBKEY_HEX [PUBKEY_HEX ...]");
    return 2;
  }
  const [path, ...hexKeys] = argv;
  let keys;
  let text;
  try {
    keys = hexKeys.map(publicKey);
    text = readFileSync(path, "utf8");
  } catch (err) {
    console.error(`error: ${err.message}`);
    return 2;
  }
  const entries = new Map();
  const cps = new Map();
  const lines = text.split("\n");
  for (let n = 0; n < lines.length; n++) {
    if (!lines[n].trim()) continue;
    let doc;
    try {
      doc = JSON.parse(lines[n]);
    } catch (err) {
      console.error(`error: ${path}: line ${n + 1} is not JSON (${err.message})`);
      return 1;
    }
    if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
      console.error(`error: ${path}: line ${n + 1} is not a JSON object`);
      return 1;
    }
    const chain = typeof doc.chain === "string" ? doc.chain : JSON.stringify(doc.chain ?? null);
    if (!entries.has(chain)) entries.set(chain, []);
    if (doc.kind === "checkpoint") {
      if (!cps.has(chain)) cps.set(chain, []);
      cps.get(chain).push(doc);
    } else {
      entries.get(chain).push(doc);
    }
  }
  if (entries.size === 0) {
    console.log(`nothing to verify: no audit entries in ${path}`);
    return 1;
  }
  let ok = true;
  for (const chain of [...entries.keys()].sort()) {
    const r = verifyChain(chain, entries.get(chain), cps.get(chain) ?? [], keys);
    if (r.problem) {
      ok = false;
      console.log(`chain ${chain}: seq ${r.problem.seq}: ${r.problem.reason}`);
    } else {
      const cp = r.checkpointSeq === null ? "no checkpoint" : `checkpoint at seq ${r.checkpointSeq}`;
      console.log(`ok: chain ${chain}: ${r.entries} entries, ${cp}`);
    }
  }
  return ok ? 0 : 1;
}

process.exitCode = main(process.argv.slice(2));
