"""A server's audit chain, written by a child process: the signing stays off the server's interpreter.

Sealing an entry (canonical JSON, SHA-256, an Ed25519 signature) costs tens of microseconds of
CPU with the GIL held; a thread doing that beside an event loop makes every request wait for the
GIL each time the loop comes back from I/O. So ``spendgate serve`` only queues events
(:meth:`AuditChild.add`, one deque append) and, every :data:`PUMP_EVERY_S`, writes them as one
batch to a child process (``python -m spendgate.events.process``), which runs an
:class:`~spendgate.events.chain.AuditLog` over its own connection to the same store. Only the
request body's digest crosses the pipe, never the body.

A batch is a frame: its length (4 bytes, big-endian), then the list of its events' fields as
:mod:`marshal` writes it. The child is the same interpreter (``sys.executable``) reading what its
own parent wrote, so marshal's format is the same at both ends, and it carries every value exactly
as it was — integers of any size, floats to the bit, text with a lone surrogate — in C at both
ends: JSON lines cost the child a parse of a few microseconds per event (a tenth of its work
beside the signature) and the server a serialization, and needed care for big integers.

What a crash can lose: the events queued in the server since the last pump (at most
:data:`PUMP_EVERY_S` worth while the writer keeps up) if the server dies, and those the child had
not stored if the child dies (it stores as often). The writer runs only on CPU the server's
requests leave, so under a sustained overload it falls behind; once :data:`MAX_BACKLOG` events wait
in the server, new requests wait for it, which bounds the server's memory and what its crash could
lose. When the server stops cleanly, or merely dies, the child reads the end of its input, stores
everything it was sent and writes a final checkpoint. A child that dies
is started again on the same chain, which it continues from the stored head.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import marshal
import os
import secrets
import signal
import struct
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from spendgate.ledger.base import Event

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("spendgate.audit")
#: how often the server hands its queued events to the child, and the child stores them (measured:
#: every 10 ms instead cost the server more, in wake-ups, than the smaller rounds saved)
PUMP_EVERY_S = 0.1
#: how much lower than the server's the writer's CPU priority is where ``SCHED_IDLE`` is not to be had
WRITER_NICENESS = 10
#: events queued in the server, unsent because the writer is behind, past which requests wait for it
MAX_BACKLOG = 20_000
#: the environment variable the child reads its store URL from
STORE_ENV = "SPENDGATE_AUDIT_STORE"
#: how much of the pipe the child reads at once (more when a frame says it is longer)
READ_BYTES = 1 << 16
#: a frame's header: the length of the marshalled batch that follows
_FRAME = struct.Struct(">I")
#: what crosses the pipe for one event: its fields in :class:`Event`'s order, the policy hash and
#: the request digest
Record = tuple[Any, ...]


class AuditChild:
    """The server side: queue events on the request path, hand them to the child in batches."""

    def __init__(self, store_url: str, key_spec: str | None, *, checkpoint_entries: int,
                 checkpoint_seconds: float, chain: str | None = None) -> None:
        self.store_url = store_url
        self.key_spec = key_spec
        self.chain = chain or secrets.token_hex(8)
        self.checkpoint_entries = checkpoint_entries
        self.checkpoint_seconds = checkpoint_seconds
        self._queue: deque[tuple[Event, str, bytes | None]] = deque()
        self._proc: asyncio.subprocess.Process | None = None
        self.max_backlog = MAX_BACKLOG
        #: set when a pump takes the queue (requests waiting for the writer to catch up wait on it)
        self._taken: asyncio.Event | None = None
        #: events the child was sent
        self.sent = 0

    def add(self, event: Event, policy_hash: str, request: bytes | None = None) -> None:
        """Queue ``event`` (O(1); the request path never waits for the child)."""
        self._queue.append((event, policy_hash, request))

    @property
    def behind(self) -> bool:
        """Whether :data:`MAX_BACKLOG` events wait in this process for a writer that is not reading."""
        return len(self._queue) >= self.max_backlog

    async def caught_up(self) -> None:
        """Wait until the writer has taken the backlog (see :func:`main` for why it can fall behind:
        it runs only on CPU the server leaves; a request waiting here leaves it some). Memory stays
        bounded and what a crash of the server could lose stays bounded too."""
        import asyncio

        while self.behind:
            if self._taken is None:
                self._taken = asyncio.Event()
            await self._taken.wait()

    async def start(self) -> None:
        import asyncio  # here, not at the top: the writer process imports this module and never needs it

        # the store URL may carry a password: it goes in the environment, never on a command line
        env = {**os.environ, STORE_ENV: self.store_url}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spendgate.events.process", "--chain", self.chain,
            "--key", self.key_spec or "", "--checkpoint-entries", str(self.checkpoint_entries),
            "--checkpoint-seconds", repr(self.checkpoint_seconds), stdin=asyncio.subprocess.PIPE, env=env)
        # the log may lag a little; the server's requests must not: the writer runs only on CPU they
        # leave (Linux's SCHED_IDLE: a request arriving on a core the writer is using takes the core
        # at once, where a lower priority merely shortens the writer's turn — at c=1 about 0.5 ms
        # off the p99). Its input waits in the pipe and this queue; once MAX_BACKLOG events wait,
        # requests wait (:meth:`caught_up`), which leaves the writer the CPU to catch up.
        _make_idle(self._proc.pid)

    async def run(self) -> None:
        """Pump every :data:`PUMP_EVERY_S` until cancelled."""
        import asyncio

        while True:
            await asyncio.sleep(PUMP_EVERY_S)
            try:
                await self.pump()
            except Exception:  # the writer could not be started: say so, keep the queue, try again
                log.exception("audit chain %s: handing events to the writer process failed", self.chain)

    async def pump(self) -> None:
        """Hand everything queued to the child (one write); start it again if it died."""
        if not self._queue:
            return
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            log.error("the audit log's writer process exited (status %s); starting it again on chain %s",
                      None if proc is None else proc.returncode, self.chain)
            await self.start()  # may raise: the queue is still whole
            proc = self._proc
            assert proc is not None and proc.stdin is not None
        batch = [self._queue.popleft() for _ in range(len(self._queue))]
        if self._taken is not None:
            self._taken.set()
            self._taken = None
        try:
            proc.stdin.write(_frame(batch, self.chain))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            # back to the front of the queue for the next writer: the log may then hold a decision
            # twice (if the dying writer stored part of the batch), never miss one
            self._queue.extendleft(reversed(batch))
            log.error("audit chain %s: the writer process stopped reading (%s); %d events kept for the next one",
                      self.chain, exc, len(batch))
            return
        self.sent += len(batch)

    async def close(self) -> None:
        """Hand over what is left, then let the child store it, checkpoint the head and exit."""
        await self.pump()
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        proc.stdin.close()
        code = await proc.wait()
        if code != 0:
            log.error("audit chain %s: the writer process exited with status %d", self.chain, code)


def _make_idle(pid: int) -> None:
    """Put process ``pid`` in Linux's SCHED_IDLE class, where the platform has it (else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def _idle(pid: int) -> bool:
    try:
        return os.sched_getscheduler(pid) == os.SCHED_IDLE
    except (OSError, AttributeError):
        return False


def _record(event: Event, policy_hash: str, request: bytes | None) -> Record:
    digest = hashlib.sha256(request).hexdigest() if request is not None else None
    return (event.ts, event.kind, event.decision_id, event.model, event.provider, event.cost, event.input_tokens,
            event.output_tokens, event.estimated, dict(event.dims), event.rule, event.bucket, dict(event.amounts),
            policy_hash, digest)


def _frame(batch: Sequence[tuple[Event, str, bytes | None]], chain: str) -> bytes:
    """One pump's events as a frame for the child. An event holding a value marshal cannot write
    (a field of some class of its own) is reported and left out; the rest go."""
    records = [_record(*item) for item in batch]
    try:
        blob = marshal.dumps(records)
    except ValueError:
        kept = []
        for rec in records:
            try:
                marshal.dumps(rec)
            except ValueError as exc:
                log.error("audit chain %s: event %r cannot be handed to the writer (%s); left out of the log",
                          chain, rec[2], exc)
            else:
                kept.append(rec)
        blob = marshal.dumps(kept)
    return _FRAME.pack(len(blob)) + blob


def main(argv: Sequence[str] | None = None) -> int:
    """The child: read event frames from stdin until its end, write them to the chain, checkpoint."""
    from spendgate import ledger
    from spendgate.errors import SpendgateError
    from spendgate.events.chain import AuditLog
    from spendgate.events.signing import load_key

    ap = argparse.ArgumentParser(prog="python -m spendgate.events.process")
    ap.add_argument("--chain", required=True)
    ap.add_argument("--key", default="")
    ap.add_argument("--checkpoint-entries", type=int, required=True)
    ap.add_argument("--checkpoint-seconds", type=float, required=True)
    args = ap.parse_args(argv)
    # the server's end of the pipe decides when this ends: a Ctrl-C or SIGTERM sent to the whole
    # process group must not stop the writer before the server has handed over its last events
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the log may lag a little; the server's requests must not (the server made this process
    # SCHED_IDLE where it can; elsewhere a lower priority is the next best thing)
    if not _idle(os.getpid()):
        with contextlib.suppress(OSError):
            os.nice(WRITER_NICENESS)
    logging.basicConfig(level=logging.WARNING, format="spendgate audit: %(message)s")
    try:
        store = ledger.open(os.environ[STORE_ENV])
        audit = AuditLog(store, load_key(args.key or None), chain=args.chain, flush_s=PUMP_EVERY_S,
                         checkpoint_entries=args.checkpoint_entries, checkpoint_seconds=args.checkpoint_seconds)
    except SpendgateError as exc:
        print(f"spendgate audit: {exc}", file=sys.stderr)
        return 2
    try:
        for batch in _batches(sys.stdin.buffer.fileno(), args.chain):
            for event, policy_hash, digest in batch:
                audit.add(event, policy_hash, digest)
    finally:
        try:
            audit.close()
        except SpendgateError as exc:
            print(f"spendgate audit: {exc}", file=sys.stderr)
            return 1
        finally:
            store.close()
    return 0


def _batches(fd: int, chain: str) -> Iterator[list[tuple[Event, str, str | None]]]:
    """The events of each frame read from the pipe ``fd``, until the pipe's end.

    A whole pump's frame usually comes in one read. A frame that cannot be read, or an event in it
    of the wrong shape, is reported and skipped: a bug in the server is never a reason to stop
    logging. A frame cut short by the pipe's end (the server died mid-write) is reported."""
    buf = bytearray()
    want = _FRAME.size
    while True:
        chunk = os.read(fd, max(READ_BYTES, want - len(buf)))
        if not chunk:
            break
        buf += chunk
        while len(buf) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buf)
            want = _FRAME.size + size
            if len(buf) < want:
                break
            blob = bytes(buf[_FRAME.size:want])
            del buf[:want]
            want = _FRAME.size
            yield _events(blob, chain)
    if buf:
        log.error("audit chain %s: the server's last batch was cut short (%d bytes); it is not in the log",
                  chain, len(buf))


def _events(blob: bytes, chain: str) -> list[tuple[Event, str, str | None]]:
    """The well-formed events of a frame as (event, policy hash, request digest)."""
    try:
        records = list(marshal.loads(blob))
    except (ValueError, EOFError, TypeError) as exc:
        log.error("audit chain %s: an unreadable batch of events was skipped (%s)", chain, exc)
        return []
    out = []
    for rec in records:
        try:
            *fields, policy_hash, digest = rec
            out.append((Event(*fields), policy_hash, digest))
        except (ValueError, TypeError) as exc:
            log.error("audit chain %s: an unreadable event was skipped (%s)", chain, exc)
    return out


if __name__ == "__main__":
    sys.exit(main())
