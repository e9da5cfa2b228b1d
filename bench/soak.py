"""Soak: does a long run at full speed keep the SQLite store and the proxy's memory bounded?

    .venv/bin/python bench/soak.py [--n 100000] [--concurrency 16]

Starts the fake upstream and ``spendgate serve`` on a SQLite store in a temporary directory, with a
policy whose budgets are large enough that nothing is refused (every request is authorized,
forwarded and captured: the store's write path on every call). Sessions rotate — a new session
every ``--per-session`` requests, users across 100 values — so buckets keep being created, as when
clients invent session ids. Every ``--every`` requests it prints: requests done, the WAL's and the
database's size, the proxy's resident memory (VmRSS) and the block's throughput and latency.

Acceptance (SPEC §7: stores stay bounded under sustained load): the WAL ends under 64 MB and the
proxy's RSS within 50 MB of where it was after the warm-up. Exit status 1 when either fails.

``--sweep-every S --retention R`` also runs the store's upkeep (``Ledger.sweep``) every S seconds
from a second connection in this process, deleting events older than R seconds: the database then
stops growing too (freed pages are reused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

from proxy import stop_all  # bench/proxy.py, beside this script
from spendgate import ledger
from spendgate.ledger import Swept

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024
WAL_LIMIT = 64 * MB
RSS_GROWTH_LIMIT = 50 * MB
BODY = {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "Say hello."}]}
POLICY = """
[[budget]]
name = "session-hour"
usd = 1000000
window = "1h"
per = "session"
action = "hold"

[[budget]]
name = "user-day"
usd = 1000000
tokens = 100000000000
window = "day"
per = "user"
action = "block"

[[budget]]
name = "global-total"
usd = 1000000
window = "total"
action = "block"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    """A process in another address space cannot be awaited: poll its port briefly."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sweeping(url: str, every: float, retention: float, stop: threading.Event, totals: list[Swept]) -> None:
    """The upkeep a long-running proxy does, here from a second connection to the same file."""
    store = ledger.open(url, create=False)
    try:
        while not stop.wait(every):
            totals.append(store.sweep(time.time(), retention_s=retention))
    finally:
        store.close()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def soak(base: str, n: int, warmup: int, concurrency: int, every: int, per_session: int, db: Path,
               pid: int) -> tuple[int, int, int]:
    """Drive ``warmup + n`` requests; (RSS after warm-up, final RSS, final WAL bytes)."""
    payload = json.dumps(BODY).encode()
    wal = db.with_name(db.name + "-wal")
    total = warmup + n
    issued = 0
    lat: list[float] = []
    state: dict[str, int] = {"start_rss": 0, "done": 0}
    block_t = time.perf_counter()
    print(f"{'requests':>9} {'WAL MB':>8} {'DB MB':>8} {'RSS MB':>8} {'RSS Δ MB':>9} {'req/s':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7}", flush=True)

    def row() -> None:
        nonlocal block_t
        now = time.perf_counter()
        r = rss(pid)
        print(f"{state['done'] - warmup:9,d} {size(wal) / MB:8.1f} {size(db) / MB:8.1f} {r / MB:8.1f} "
              f"{(r - state['start_rss']) / MB:+9.1f} {every / (now - block_t):7,.0f} "
              f"{pct(lat, .5):7.2f} {pct(lat, .99):7.2f}", flush=True)
        lat.clear()
        block_t = now

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        async def worker() -> None:
            nonlocal issued, block_t
            while issued < total:
                i = issued
                issued += 1
                headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-soak",
                           "X-Spendgate-Session": f"s{i // per_session}", "X-Spendgate-User": f"u{i % 100}"}
                t = time.perf_counter()
                async with client.post(base + "/v1/chat/completions", data=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"request {i}: HTTP {resp.status}: {await resp.text()}")
                state["done"] += 1
                done = state["done"]
                if done <= warmup:
                    if done == warmup:
                        state["start_rss"], block_t = rss(pid), time.perf_counter()
                        print(f"{'warm-up':>9} {size(wal) / MB:8.1f} {size(db) / MB:8.1f} "
                              f"{state['start_rss'] / MB:8.1f}", flush=True)
                    continue
                lat.append((time.perf_counter() - t) * 1e3)
                if (done - warmup) % every == 0:
                    row()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return state["start_rss"], rss(pid), size(wal)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="requests after the warm-up (default 100,000)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--every", type=int, default=10_000, help="print a row every this many requests")
    ap.add_argument("--warmup", type=int, default=2_000, help="requests before the RSS baseline is taken")
    ap.add_argument("--per-session", type=int, default=100, help="requests per session id before a new one")
    ap.add_argument("--sweep-every", type=float, help="run the store's sweep every this many seconds")
    ap.add_argument("--retention", type=float, default=60.0, help="with --sweep-every: keep events this long (s)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="spendgate-soak-"))
    (tmp / "policy.toml").write_text(POLICY)
    db = tmp / "soak.db"
    up_port, sg_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    env = {**os.environ, "HOME": str(tmp), "SPENDGATE_HOME": str(tmp / ".spendgate"),
           "SPENDGATE_OPENAI_BASE_URL": upstream, "SPENDGATE_ANTHROPIC_BASE_URL": upstream}
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "proxy.py"), "--role", "upstream", "--port", str(up_port)]),
        subprocess.Popen([sys.executable, "-m", "spendgate.cli.main", "serve", "--port", str(sg_port),
                          "--workers", "1", "--store", f"sqlite:///{db}", "--config", str(tmp / "policy.toml")],
                         env=env, stderr=subprocess.DEVNULL),
    ]
    try:
        for port, proc in ((up_port, procs[0]), (sg_port, procs[1])):
            wait_listening(port, proc)
        stop, swept = threading.Event(), list[Swept]()
        if args.sweep_every:
            threading.Thread(target=sweeping, args=(f"sqlite:///{db}", args.sweep_every, args.retention, stop, swept),
                             daemon=True).start()
        print(f"soak: {args.n:,} requests at c={args.concurrency} through spendgate serve on {db} "
              f"({os.cpu_count()} cores, load generator included)", flush=True)
        t = time.perf_counter()
        start_rss, end_rss, wal = asyncio.run(soak(f"http://127.0.0.1:{sg_port}", args.n, args.warmup,
                                                   args.concurrency, args.every, args.per_session, db,
                                                   procs[1].pid))
        wall = time.perf_counter() - t
        stop.set()
    finally:
        stop_all(procs)
    if swept:
        print(f"{len(swept)} sweeps: {sum(s.expired for s in swept)} holds expired, "
              f"{sum(s.pruned for s in swept):,} buckets pruned, {sum(s.events_deleted for s in swept):,} events "
              f"deleted (retention {args.retention:g} s)")
    grew = end_rss - start_rss
    ok = wal < WAL_LIMIT and grew < RSS_GROWTH_LIMIT
    print(f"\n{args.warmup + args.n:,} requests in {wall:,.0f} s; WAL {wal / MB:.1f} MB (limit "
          f"{WAL_LIMIT // MB}), RSS {grew / MB:+.1f} MB since warm-up (limit {RSS_GROWTH_LIMIT // MB}): "
          f"{'PASS' if ok else 'FAIL'}")
    shutil.rmtree(tmp)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
