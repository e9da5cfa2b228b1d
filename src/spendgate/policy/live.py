"""The policy a running server decides under: the file's, plus what the store holds, kept current.

``serve`` reads the policy file once at start, but an operator changes budgets while it runs: a
run-time rule, one user's limit or a pause lands in the store (:mod:`spendgate.policy.runtime`) and
must apply on every instance sharing it within a second; an edited file must apply on ``SIGHUP`` or
when its mtime or size changes. :class:`LivePolicy` owns both halves and hands the engine the
combined policy — only when something changed, so a quiet store costs one read every
:data:`~spendgate.policy.runtime.REFRESH_S` and no rebuild.

Whatever fails keeps what is in force: a policy file that does not validate is logged with the key
it names and the old policy stays (a server never runs with no policy); a store that cannot be read
keeps the last overlay and is logged once, not every half second. A reloaded file whose
``effective_from`` is still ahead is staged and takes over when that instant comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from spendgate.engine import Engine
from spendgate.errors import ConfigError
from spendgate.ledger import Ledger
from spendgate.policy import runtime
from spendgate.policy.model import Policy, Rule
from spendgate.policy.parse import load

log = logging.getLogger("spendgate.policy")

#: how often a server looks at the policy file's mtime and size (seconds)
FILE_CHECK_S = 2.0


def describe(policy: Policy, digest: str) -> str:
    """How a log line names a policy: its hash, and its version when the file gives one."""
    version = f"version {policy.version}" if policy.version is not None else "no version"
    return f"policy {digest[:16]} ({version})"


class LivePolicy:
    """The file policy and the store's overlay, applied to ``engine`` whenever either changes.

    ``clock`` is the wall clock (epoch seconds) that ``effective_from`` is compared with; a test
    injects its own. Thread-safe: the serve loop refreshes on a worker thread while the admin API
    may ask for a refresh after a change it made.
    """

    def __init__(self, engine: Engine, store: Ledger, file_path: str | None, file_policy: Policy, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine, self.store, self.clock = engine, store, clock
        self.file_path = file_path
        self.file_policy = file_policy
        #: a reloaded policy waiting for its ``effective_from``
        self.staged: Policy | None = None
        self.overlay = runtime.Overlay()
        self._fingerprint: str | None = None  # None: the store was never read
        self._file_sig = self._stat()
        self._lock = threading.RLock()
        self._store_failing = False
        self._dropped: frozenset[str] = frozenset()
        self._applied_hash: str | None = None
        self._next_refresh = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._reloads: set[asyncio.Task[bool]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._announce: list[tuple[int, str]] = []  # said once the server is up (start_serve reads the banner)
        self._quiet = False
        #: called after each change applied (the proxy forgets the refusals it would repeat)
        self.on_change: list[Callable[[], None]] = []

    # -- the store ------------------------------------------------------------------------------

    def refresh_now(self) -> bool:
        """Re-read the store's rules, limits and pauses; apply them if anything changed (True).
        A store that fails keeps the last state in force, logged once until it answers again."""
        with self._lock:
            try:
                overlay = runtime.load(self.store, now=self.clock(), default_tz=self.file_policy.timezone)
            except Exception as exc:  # a store error must never leave the server without a policy
                if not self._store_failing:
                    self._store_failing = True
                    self._say(logging.WARNING, f"cannot read run-time budgets from the store ({exc}); the last "
                                               "ones read stay in force until it answers")
                if self._take_due():  # a staged file policy does not wait for the store
                    self._apply()
                    return True
                return False
            if self._store_failing:
                self._store_failing = False
                self._say(logging.INFO, "the store answers again; run-time budgets are read from it")
            due = self._take_due()
            if overlay.fingerprint == self._fingerprint and not due:
                return False
            self.overlay, self._fingerprint = overlay, overlay.fingerprint
            self._apply()
            return True

    def maybe_refresh(self) -> None:
        """:meth:`refresh_now` at most once per :data:`~spendgate.policy.runtime.REFRESH_S`, inline:
        the SDK calls this from its request path, so it costs a clock read between refreshes, and a
        caller that finds another thread refreshing goes on at once. Never raises."""
        now = time.monotonic()
        if now < self._next_refresh or not self._lock.acquire(blocking=False):
            return
        try:
            if now < self._next_refresh:
                return
            self._next_refresh = now + runtime.REFRESH_S
            self.refresh_now()
        except Exception:  # pragma: no cover - refresh_now already keeps store errors to itself
            log.exception("refreshing the policy failed; the one in force stays")
        finally:
            self._lock.release()

    # -- the file -------------------------------------------------------------------------------

    def reload_file(self, reason: str = "reload") -> bool:
        """Read the policy file again. A file that fails validation keeps the policy in force (the
        error, naming its key, is logged); one whose ``effective_from`` is ahead is staged. True
        when the policy in force or staged changed."""
        if self.file_path is None:
            return False
        with self._lock:
            self._file_sig = self._stat()
            try:
                policy = load(self.file_path)
            except ConfigError as exc:
                self._say(logging.ERROR, f"{reason}: the policy file was not loaded, the policy in force stays "
                                         f"({describe(self.engine.policy, self.engine.policy_hash)}): {exc}")
                return False
            now = self.clock()
            if policy.effective_from is not None and policy.effective_from > now:
                self.staged = policy
                self._say(logging.INFO, f"{reason}: {describe(policy, _hash(policy))} staged; it takes over at "
                                        f"{_when(policy.effective_from)} (effective_from)")
                return True
            self.staged = None
            self.file_policy = policy
            self._apply()
            return True

    def file_changed(self) -> bool:
        """Whether the file's mtime or size differs from when it was last read."""
        return self.file_path is not None and self._stat() != self._file_sig

    def _stat(self) -> tuple[int, int] | None:
        if self.file_path is None:
            return None
        try:
            st = os.stat(Path(self.file_path).expanduser())
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def tick(self) -> bool:
        """Apply a staged policy whose ``effective_from`` has come (True if one did)."""
        with self._lock:
            if not self._take_due():
                return False
            self._apply()
            return True

    def _take_due(self) -> bool:
        staged = self.staged
        if staged is None or staged.effective_from is None or staged.effective_from > self.clock():
            return False
        self.staged, self.file_policy = None, staged
        self._say(logging.INFO, f"{describe(staged, _hash(staged))} takes over: its effective_from "
                                f"{_when(staged.effective_from)} has come")
        return True

    # -- applying -------------------------------------------------------------------------------

    def effective(self) -> Policy:
        """The file policy with the run-time rules appended; a run-time rule that takes a file rule's
        name is dropped (the file is the operator's word), with a warning the first time."""
        names = {r.name for r in self.file_policy.rules}
        kept: list[Rule] = []
        dropped = set()
        for r in self.overlay.rules:
            if r.name in names:
                dropped.add(r.name)
            else:
                kept.append(r)
        for name in sorted(dropped - self._dropped):
            self._say(logging.WARNING, f'run-time budget "{name}" is ignored: the policy file has a budget of '
                                       "that name, and the file's wins")
        self._dropped = frozenset(dropped)
        return replace(self.file_policy, rules=(*self.file_policy.rules, *kept))

    def _apply(self) -> None:
        policy = self.effective()
        self.engine.set_policy(policy)
        self.engine.set_overrides(self.overlay.limits, self.overlay.pauses)
        for hook in self.on_change:
            hook()
        if self.engine.policy_hash != self._applied_hash:
            self._applied_hash = self.engine.policy_hash
            extra = len(policy.rules) - len(self.file_policy.rules)
            self._say(logging.INFO, f"{describe(policy, self.engine.policy_hash)} in force: "
                                    f"{len(self.file_policy.rules)} rule(s) from {policy.source}, {extra} "
                                    "run-time rule(s)")

    def _say(self, level: int, message: str) -> None:
        if self._quiet:
            self._announce.append((level, message))
        else:
            log.log(level, message)

    # -- serving --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Apply what the store holds now, then keep it current: the store every
        :data:`~spendgate.policy.runtime.REFRESH_S`, the file every :data:`FILE_CHECK_S` and on
        ``SIGHUP``. What this says before the server listens waits for :meth:`announce`."""
        self._quiet = True
        try:
            with self._lock:
                eff = self.file_policy.effective_from
                if eff is not None and eff > self.clock():
                    self._say(logging.WARNING, f"{describe(self.file_policy, _hash(self.file_policy))} has "
                                               f"effective_from {_when(eff)}, still ahead; at start it applies "
                                               "at once (there is no earlier policy to keep)")
            await asyncio.to_thread(self.refresh_now)
            if self._applied_hash is None:  # the store failed: the file's policy alone, never none
                await asyncio.to_thread(self._apply_locked)
        finally:
            self._quiet = False
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._tasks = [loop.create_task(self._every(runtime.REFRESH_S, self._refresh_pass)),
                       loop.create_task(self._every(FILE_CHECK_S, self._file_pass))]
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals: not the main thread
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def announce(self) -> None:
        """Log what :meth:`start` found (the policy in force, a start-time warning), once the server
        has said it is listening."""
        pending, self._announce = self._announce, []
        for level, message in pending:
            log.log(level, message)

    async def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.remove_signal_handler(signal.SIGHUP)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for reload in list(self._reloads):  # a SIGHUP's reload in flight finishes: it is a file read
            with contextlib.suppress(Exception):
                await reload
        self._tasks = []
        self._announce = []  # a server that never listened has no policy in force to report

    def _apply_locked(self) -> None:
        with self._lock:
            self._apply()

    def _on_hup(self) -> None:
        assert self._loop is not None
        task = self._loop.create_task(asyncio.to_thread(self.reload_file, "SIGHUP"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _refresh_pass(self) -> None:
        await asyncio.to_thread(self.refresh_now)

    async def _file_pass(self) -> None:
        if self.file_changed():
            await asyncio.to_thread(self.reload_file, "the policy file changed")

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:  # one failed pass must not end the loop
                log.exception("a policy refresh pass failed; the policy in force stays")


def _hash(policy: Policy) -> str:
    from spendgate.policy.model import policy_hash

    return policy_hash(policy)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))
