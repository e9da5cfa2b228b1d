"""The writer of one audit chain: events in on the request path, sealed entries out in the background.

:meth:`AuditLog.add` only appends a tuple to a deque: no hashing, no JSON, no lock, no store call,
so the audit log adds nothing a request waits for. A daemon thread wakes every ``flush_s``, drains
what is queued, converts, chains (seq, prev_hash), hashes and signs each entry, and stores the batch
with one :meth:`~spendgate.ledger.Ledger.append_audit` call. After every ``checkpoint_entries``
entries (batches are cut at that boundary, so checkpoints land on exact multiples), and after
``checkpoint_seconds`` with anything new, it stores a signed checkpoint of the head.

A store that fails leaves the sealed batch in hand: it is retried as is (``append_audit`` is
idempotent for the same entries at the same seqs) before anything newer is sealed, so an outage
delays entries but never reorders, renumbers or drops them; the queue grows in memory meanwhile.

Crash semantics: entries still queued or sealed but unstored when the process dies — at most about
``flush_s`` worth, or the whole backlog during a store outage — are lost, and nothing can show they
existed. Everything stored stays verifiable: a checkpoint is only written after the entries it names
are stored, so it never names an entry that is not in the store.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate.errors import StoreError
from spendgate.events.audit import GENESIS, checkpoint, dumps, entry_body, seal_body
from spendgate.events.signing import fast_signer
from spendgate.ledger.base import Event, Ledger

log = logging.getLogger("spendgate.audit")


class AuditLog:
    """One writer's hash chain in ``store``, signed with ``key``. Thread-safe; see the module doc.

    ``chain`` names an existing chain to continue (its head is read from the store); by default a
    new random one (16 hex digits) is started, one per process, so writers never share a chain."""

    def __init__(self, store: Ledger, key: Ed25519PrivateKey, *, chain: str | None = None, flush_s: float = 0.1,
                 checkpoint_entries: int = 256, checkpoint_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if flush_s <= 0 or checkpoint_entries < 1 or checkpoint_seconds <= 0:
            raise ValueError("flush_s and checkpoint_seconds must be above 0, checkpoint_entries at least 1")
        self.store = store
        self.key = key
        self._signer = fast_signer(key)
        self.chain = chain or secrets.token_hex(8)
        self.flush_s = flush_s
        self.checkpoint_entries = checkpoint_entries
        self.checkpoint_seconds = checkpoint_seconds
        #: measures checkpoint_seconds (a test passes its own)
        self._clock = clock
        #: entries this writer has stored
        self.written = 0
        #: checkpoints this writer has stored
        self.checkpoints = 0
        self._queue: deque[tuple[Event, str, bytes | str | None]] = deque()
        #: one drainer at a time (the thread, or a caller of flush/close); add() never takes it
        self._lock = threading.Lock()
        self._seq, self._head = 0, GENESIS  # the stored head
        #: sealed and not yet stored: (first seq, entry texts, last hash) — retried before anything newer
        self._batch: tuple[int, list[str], str] | None = None
        self._cp_seq = 0
        self._cp_at = clock()
        self._failing = False
        self._closed = False
        if chain is not None:
            self._resume()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"spendgate-audit-{self.chain}", daemon=True)
        self._thread.start()

    # -- the request path ------------------------------------------------------------------------

    def add(self, event: Event, policy_hash: str, request: bytes | str | None = None) -> None:
        """Queue ``event`` for the log (O(1); never blocks, never touches the store). ``request`` is
        the raw body of a decision's request, or its SHA-256 in hex."""
        self._queue.append((event, policy_hash, request))

    # -- writing -----------------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The seq of the last stored entry (0: none yet)."""
        return self._seq

    @property
    def pending(self) -> int:
        """Events queued or sealed but not yet stored."""
        return len(self._queue) + (len(self._batch[1]) if self._batch else 0)

    def flush(self) -> None:
        """Store everything queued when called, from the caller's thread; raises StoreError if the
        store fails (nothing is lost: the thread retries it)."""
        with self._lock:
            self._write(len(self._queue))

    def close(self) -> None:
        """Stop the thread, store what is queued and a final checkpoint of the head. Raises
        StoreError (after stopping) if the store fails; what was not stored is then lost."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        with self._lock:
            try:
                self._write(len(self._queue))
                if self._cp_seq < self._seq:
                    self._checkpoint()
            except StoreError as exc:
                lost = self.pending
                log.error("audit chain %s: closing with %d entries not stored: %s", self.chain, lost, exc)
                raise StoreError(f"audit chain {self.chain}: {lost} entries could not be stored: {exc}") from exc

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            with self._lock:
                try:
                    self._write(len(self._queue))
                except StoreError:
                    pass  # warned once in _write; the sealed batch is retried next round
                except Exception:  # a bug must not end the log: say so loudly and keep going
                    log.exception("audit chain %s: writing failed", self.chain)

    def _write(self, n: int) -> None:
        """Store the pending batch, then ``n`` queued events, checkpointing on the way (lock held)."""
        try:
            self._store_batch()
            self._maybe_checkpoint()
            while n > 0:
                take = max(1, min(n, self.checkpoint_entries - (self._seq - self._cp_seq)))
                n -= take
                self._seal(take)
                self._store_batch()
                self._maybe_checkpoint()
        except StoreError as exc:
            if not self._failing:
                log.warning("audit chain %s: the store failed (%s); %d entries kept and retried",
                            self.chain, exc, self.pending)
                self._failing = True
            raise
        if self._failing:
            log.warning("audit chain %s: the store is back; the log is caught up to seq %d", self.chain, self._seq)
            self._failing = False

    def _seal(self, n: int) -> None:
        """Turn the next ``n`` queued events into the pending batch of signed entries."""
        first = seq = self._seq + 1
        head = self._head
        texts: list[str] = []
        for _ in range(n):
            event, policy_hash, request = self._queue.popleft()
            try:
                body = entry_body(event, chain=self.chain, seq=seq, prev_hash=head, policy_hash=policy_hash,
                                  request=request)
                head, text = seal_body(body, self._signer)
            except Exception:  # an event that cannot be an entry is reported, never allowed to stall the chain
                log.exception("audit chain %s: cannot log event %s (%s)", self.chain,
                              getattr(event, "decision_id", "?"), getattr(event, "kind", "?"))
                continue
            texts.append(text)
            seq += 1
        if texts:
            self._batch = (first, texts, head)

    def _store_batch(self) -> None:
        if self._batch is None:
            return
        first, texts, head = self._batch
        self.store.append_audit(self.chain, first, texts)
        self._batch = None
        self._seq, self._head = first + len(texts) - 1, head
        self.written += len(texts)

    def _maybe_checkpoint(self) -> None:
        new = self._seq - self._cp_seq
        if new >= self.checkpoint_entries or (new > 0 and self._clock() - self._cp_at >= self.checkpoint_seconds):
            self._checkpoint()

    def _checkpoint(self) -> None:
        doc = checkpoint(self.chain, self._seq, self._head, time.time(), self._signer)
        self.store.put_checkpoint(self.chain, dumps(doc))
        self._cp_seq, self._cp_at = self._seq, self._clock()
        self.checkpoints += 1

    def _resume(self) -> None:
        """Continue a named chain from its stored head, found in O(log n) reads."""

        def has(seq: int) -> bool:
            return bool(self.store.audit_entries(self.chain, seq - 1, 1))

        if not has(1):
            return
        lo, hi = 1, 2
        while has(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if has(mid) else (lo, mid)
        last = json.loads(self.store.audit_entries(self.chain, lo - 1, 1)[0])
        self._seq, self._head = lo, str(last["hash"])
        cps = [json.loads(t) for t in self.store.audit_checkpoints(self.chain)]
        self._cp_seq = max((int(c["seq"]) for c in cps), default=0)
