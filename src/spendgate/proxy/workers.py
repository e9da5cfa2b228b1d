"""``spendgate serve --workers N``: N server processes on one port, sharing the store.

One Python process serves about 2,000 guarded requests a second; a machine with more cores serves
more with one process per core. How the processes share the port, and why:

- **The parent binds, the kernel balances.** The parent resolves the address and binds one
  ``SO_REUSEPORT`` socket per worker (after checking, with a plain bind, that nothing else holds
  the port, since ``SO_REUSEPORT`` would otherwise let a stale server of the same user share it
  silently). Each worker gets its own socket; Linux spreads new connections over the group by a
  hash of their addresses, so clients that keep their connections alive are spread evenly too. One
  socket shared by every worker would wake them all for each connection, and a busy event loop
  accepts a whole burst at once: under keep-alive one worker ends up with most of the clients.
  Binding in the parent also keeps the errors where they were: a busy port or a bad host is one
  line before any worker starts, and ``--port 0`` picks one free port for all of them.
- **Workers are fresh interpreters** (``python -m spendgate.proxy.workers``), not forks: the parent
  has read the policy and prices, and a fork of a process that may hold threads or open store
  connections is not safe. Each is told its role and its socket's descriptor in its environment.
  Worker 1 runs the store's upkeep (the sweeper, the spool drain) and sends alerts; the others
  only serve (:attr:`~spendgate.proxy.app.ProxyConfig.upkeep`, ``send_alerts``).
- **Start**: the banner is printed once every worker said it listens. A worker that cannot start
  sends its one-line reason; the parent stops the others and exits with that line.
- **Stop**: ``SIGTERM`` or ``SIGINT`` to the parent reaches each worker once as ``SIGTERM``; each
  stops as a single server does (in-flight requests finish and are captured, its audit writer
  checkpoints). Workers have their own process group, so a terminal's Ctrl-C reaches the parent
  alone and no worker is interrupted twice while it winds down. A worker whose parent is gone
  (killed with ``SIGKILL``) sees its standard input close and stops the same way.
- **Reload**: ``SIGHUP`` to the parent is sent to every worker; each reloads its policy file.
- **A worker that dies** (the OOM killer, a crash in a C extension) is reported and started
  again in its place and role, on a new socket: the other workers kept serving meanwhile, and its
  requests in flight are charged their worst case when the sweeper finds their holds. The
  connections waiting in its socket's queue are reset by the kernel. More than
  :data:`MAX_RESTARTS` deaths within :data:`RESTART_WINDOW_S` is a bug, not bad luck: the server
  stops, with exit status 1, rather than restart forever.
- **Counters**: ``/metrics`` is answered by whichever worker gets the scrape; each worker keeps
  its counters in a file of a directory the parent creates and removes, and a scrape sums them
  all (:mod:`spendgate.observe.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spendgate.errors import ConfigError, SpendgateError

#: the environment variable a worker reads its role from (JSON, see :class:`Role`)
WORKER_ENV = "SPENDGATE_WORKER"
#: more unexpected worker deaths than this within :data:`RESTART_WINDOW_S` stop the server
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
#: what a worker writes to its status pipe once it listens, or before a failed start's reason
READY = b"ready"
ERROR = b"error "
#: what the parent writes to a worker's stdin once the banner is printed
ANNOUNCE = b"announce"


def default_workers() -> int:
    """One per core this process may run on (``os.sched_getaffinity``), but no more than the CPU
    quota of its cgroup allows: a container limited to 2 CPUs on a 64-core host gets 2, not 64."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota is not None else cores)


def _cgroup_cpus(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The cgroup v2 CPU quota in whole CPUs (rounded up); None when unlimited or unknown."""
    try:
        quota, period = Path(path).read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Role:
    """What one worker is told by its parent."""

    index: int  # 1..N
    workers: int
    fds: tuple[int, ...]  # its listening sockets
    metrics_dir: str
    args: dict[str, Any]  # ``spendgate serve``'s parsed flags

    @property
    def upkeep(self) -> bool:
        """Worker 1 runs the store's upkeep and sends alerts: exactly one does."""
        return self.index == 1

    def dumps(self) -> str:
        return json.dumps({"index": self.index, "workers": self.workers, "fds": list(self.fds),
                           "metrics_dir": self.metrics_dir, "args": self.args})

    @classmethod
    def loads(cls, raw: str) -> Role:
        d = json.loads(raw)
        return cls(int(d["index"]), int(d["workers"]), tuple(int(x) for x in d["fds"]), str(d["metrics_dir"]),
                   dict(d["args"]))


# -- the parent ----------------------------------------------------------------------------------


def _addresses(host: str, port: int) -> list[tuple[int, Any]]:
    """(family, sockaddr) for each address ``host`` names, as aiohttp would bind them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: list[tuple[int, Any]] = []
    for family, _, _, _, addr in infos:
        if (family, addr) not in seen and family in (socket.AF_INET, socket.AF_INET6):
            seen.append((family, addr))
    return seen


def _socket(family: int, addr: Any, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """The address the workers share: a probe that nothing else listens there, then one group of
    ``SO_REUSEPORT`` sockets per worker (a list: a host may name IPv4 and IPv6 addresses)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        addrs = _addresses(host, port)
        if not addrs:
            raise OSError(errno.EADDRNOTAVAIL, f"{host} names no address to listen on")
        # a plain bind fails if anyone holds the port, SO_REUSEPORT or not; --port 0 picks one here
        probes: list[socket.socket] = []
        try:
            for family, addr in addrs:
                if port == 0 and probes:
                    addr = (addr[0], probes[0].getsockname()[1], *addr[2:])
                probes.append(_socket(family, addr, reuse_port=False))
            self.port = int(probes[0].getsockname()[1])
        finally:
            for p in probes:
                p.close()
        self.addrs = [(family, (addr[0], self.port, *addr[2:])) for family, addr in addrs]

    def sockets(self) -> list[socket.socket]:
        """A new group of sockets for one worker, listening."""
        made: list[socket.socket] = []
        try:
            for family, addr in self.addrs:
                sock = _socket(family, addr, reuse_port=True)
                made.append(sock)
                sock.listen(128)
        except BaseException:
            for s in made:
                s.close()
            raise
        for s in made:
            s.set_inheritable(True)
        return made


class Supervisor:
    """Starts the workers, waits on them, passes signals on; :meth:`run` returns the exit status."""

    def __init__(self, n: int, listener: Listener, args: dict[str, Any], announce: Callable[[], None],
                 *, python: Sequence[str] = (sys.executable, "-m", "spendgate.proxy.workers")) -> None:
        self.n = n
        self.listener = listener
        self.args = args
        self.announce = announce
        self.python = tuple(python)
        self.metrics_dir = tempfile.mkdtemp(prefix="spendgate-metrics-")
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.deaths: deque[float] = deque()
        self.failure: str | None = None

    def run(self) -> int:
        try:
            return asyncio.run(self._main())
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, bytes]:
        """Start worker ``index`` and wait until it listens; (process, its status line)."""
        socks = self.listener.sockets()
        try:
            role = Role(index, self.n, tuple(s.fileno() for s in socks), self.metrics_dir, self.args)
            proc = await asyncio.create_subprocess_exec(
                *self.python, env={**os.environ, WORKER_ENV: role.dumps()}, pass_fds=role.fds,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, process_group=0)
        finally:
            for s in socks:  # the worker has its own copies: a dead worker's socket closes with it
                s.close()
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).strip()
        return proc, line

    async def _start_all(self) -> SpendgateError | None:
        """Start every worker at once; the first failure (a :class:`ConfigError` when the worker
        found the configuration wrong), or None when all listen."""
        started = await asyncio.gather(*(self._spawn(i) for i in range(1, self.n + 1)))
        failed: SpendgateError | None = None
        for index, (proc, line) in enumerate(started, 1):
            self.procs[index] = proc
            if line != READY and failed is None:
                code = await _exit_status(proc)
                reason = _reason(line, index, code)
                failed = ConfigError(reason) if code == 2 else SpendgateError(reason)
        return failed

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        failed = await self._start_all()
        if failed is not None or stop.is_set():
            await self._stop_all()
            if failed is not None:
                raise failed
            return 0
        self.announce()
        self._tell_all(ANNOUNCE)
        watchers = {i: loop.create_task(self._watch(i, stop)) for i in self.procs}
        await stop.wait()
        self.stopping = True
        for task in watchers.values():
            task.cancel()
        await self._stop_all()
        if self.failure is not None:
            print(f"spendgate: error: {self.failure}", file=sys.stderr, flush=True)
            return 1
        return 0

    async def _watch(self, index: int, stop: asyncio.Event) -> None:
        """Wait on worker ``index``; start it again when it dies unexpectedly, within limits."""
        while True:
            proc = self.procs[index]
            code = await proc.wait()
            if self.stopping:
                return
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and now - self.deaths[0] > RESTART_WINDOW_S:
                self.deaths.popleft()
            what = _status(code)
            if len(self.deaths) > MAX_RESTARTS:
                self.failure = (f"worker {index} (pid {proc.pid}) {what}; {len(self.deaths)} workers died within "
                                f"{RESTART_WINDOW_S:.0f} s, so the server stops instead of starting them again")
                stop.set()
                return
            print(f"spendgate: worker {index} (pid {proc.pid}) {what} unexpectedly; starting it again",
                  file=sys.stderr, flush=True)
            try:
                new, line = await self._spawn(index)
            except OSError as exc:
                self.failure = f"worker {index} could not be started again: {exc}"
                stop.set()
                return
            self.procs[index] = new
            if line != READY:
                self.failure = _reason(line, index, await _exit_status(new))
                stop.set()
                return
            print(f"spendgate: worker {index} (pid {new.pid}) is serving again", file=sys.stderr, flush=True)
            if new.stdin is not None:
                with contextlib.suppress(OSError):
                    new.stdin.write(ANNOUNCE + b"\n")

    def _tell_all(self, message: bytes) -> None:
        for proc in self.procs.values():
            if proc.stdin is not None and proc.returncode is None:
                with contextlib.suppress(OSError):
                    proc.stdin.write(message + b"\n")

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _stop_all(self) -> None:
        """SIGTERM each worker once and wait until every one has finished its requests and exited."""
        self.stopping = True
        # stdin stays open: a worker reads its closing as "the parent is gone", and a second
        # stop signal in the middle of aiohttp's cleanup would cut that cleanup short
        self._signal_all(signal.SIGTERM)
        codes = await asyncio.gather(*(p.wait() for p in self.procs.values()))
        bad = [(i, c) for i, c in zip(self.procs, codes, strict=True) if c not in (0, -signal.SIGTERM)]
        if bad and self.failure is None:
            self.failure = "; ".join(f"worker {i} {_status(c)} while stopping" for i, c in bad)


def _status(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with status {code}"


async def _exit_status(proc: asyncio.subprocess.Process) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        return await proc.wait()


def _reason(line: bytes, index: int, code: int) -> str:
    """What a worker that did not start said (its one line), else how it ended."""
    said = line[len(ERROR):].decode(errors="replace").strip() if line.startswith(ERROR) else ""
    if said:
        return f"{said} (worker {index} did not start; exit status {code})"
    return f"worker {index} did not start: it {_status(code)} (its output is above)"


# -- a worker ------------------------------------------------------------------------------------


def worker_main() -> int:
    """A worker's life: read the role, serve on the sockets given, report ready or why not."""
    import argparse

    from spendgate.cli import serve

    role = Role.loads(os.environ.pop(WORKER_ENV))
    # fd 1 becomes the status pipe alone; what the worker (and its audit writer) prints goes to stderr
    status = os.dup(1)
    os.dup2(2, 1)
    args = argparse.Namespace(**role.args)

    listening = False

    def ready() -> None:
        nonlocal listening
        listening = True
        os.write(status, READY + b"\n")

    try:
        serve.run_worker(args, role, ready)
    except (SpendgateError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        line = str(exc).replace("\n", " ")
        if listening:  # the parent no longer reads the status pipe: say it where the logs go
            print(f"spendgate: worker {role.index}: error: {line}", file=sys.stderr, flush=True)
        else:
            with contextlib.suppress(OSError):
                os.write(status, ERROR + line.encode() + b"\n")
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


def watch_parent(loop: asyncio.AbstractEventLoop, announce: Callable[[], None],
                 gone: Callable[[], None] | None = None) -> None:
    """Listen to the parent on stdin: :data:`ANNOUNCE` once the banner is out (what this worker has
    to say about its policy follows the banner, never precedes it), and its end closing when the
    parent is gone — then tell ``gone`` and stop as SIGTERM does."""
    pending = bytearray()

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            if gone is not None:
                gone()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        pending.extend(data)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            if line == ANNOUNCE:
                announce()

    os.set_blocking(0, False)
    loop.add_reader(0, readable)


if __name__ == "__main__":
    sys.exit(worker_main())
