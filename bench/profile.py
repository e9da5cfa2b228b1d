"""Where a proxied request's CPU goes: the request path's profile, phase by phase.

    .venv/bin/python bench/profile.py [--n 3000] [--concurrency 1] [--store URL]

Runs ``spendgate serve`` under cProfile (the default policy, SQLite unless ``--store``) in front of
the fake upstream, drives ``--n`` requests of each case (OpenAI and Anthropic, streamed and not),
stops it, and attributes every function's own time to one phase of the request path:

parse, identity, estimate, policy match, ledger (holds and captures: the store's transactions),
forward, relay, capture (reading the usage and pricing it), event (decision events, metrics, the
audit log's pipe), HTTP server (aiohttp reading requests and routing), and the event loop.

A function that belongs to no phase (the standard library, builtins such as ``json.dumps`` or
SQLite's ``execute``) is charged to the phases of its callers, in proportion to the time each
caller spent in it. cProfile slows Python code more than C code, so the shares are read as a
ranking of where to cut, and the µs column scales them to the CPU the same server's process used
per request in a run without the profiler (measured by this script from ``/proc``); the audit log's
writer, a process of its own, is its own row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import proxy as bench  # the bench's fake upstream, load driver and helpers

Func = tuple[str, int, str]

#: (phase, module path fragment, function names or None for the whole module), first match wins
RULES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("forward", "spendgate/proxy/app.py", frozenset({"_forward_plain", "_upstream_url", "_outgoing_headers"})),
    ("relay", "spendgate/proxy/app.py", frozenset({"_relay_stream", "_pump", "_reply_headers", "_relay_flat",
                                                "usd_text"})),
    ("capture", "spendgate/proxy/app.py", frozenset({"_settle", "_settle_plain", "_finish_stream", "_unknown",
                                                     "_settle_later", "_settled"})),
    ("parse", "spendgate/proxy/app.py", None),
    ("parse", "spendgate/proxy/envelope.py", None),
    ("parse", "spendgate/request.py", None),
    ("parse", "spendgate/wire/edits.py", None),
    ("identity", "spendgate/proxy/identity.py", None),
    ("identity", "spendgate/keys.py", None),
    ("relay", "spendgate/wire/", None),
    ("capture", "spendgate/usage.py", None),
    ("capture", "spendgate/pricing/cost.py", frozenset({"usage_nanos", "_tiered", "_rate_for"})),
    ("estimate", "spendgate/estimate/", None),
    ("estimate", "spendgate/pricing/", None),
    ("capture", "spendgate/engine.py", frozenset({"acapture", "_capture", "_settle", "_served_price", "_unknown",
                                                  "acharge_unknown", "_token_parts"})),
    ("event", "spendgate/engine.py", frozenset({"emit", "_event", "decision_event", "_alerts"})),
    ("estimate", "spendgate/engine.py", frozenset({"_estimate", "_price"})),
    ("policy match", "spendgate/engine.py", None),
    ("policy match", "spendgate/buckets.py", None),
    ("policy match", "spendgate/policy/", None),
    ("policy match", "spendgate/approvals.py", None),
    ("ledger", "spendgate/ledger/", None),
    ("event", "spendgate/events/", None),
    ("event", "spendgate/observe/", None),
    ("parse", "spendgate/providers/", None),
    ("forward", "aiohttp/client", None),
    ("forward", "aiohttp/connector.py", None),
    ("relay", "aiohttp/web_response.py", None),
    ("relay", "aiohttp/http_writer.py", None),
    ("HTTP server", "aiohttp/", None),
    ("HTTP server", "multidict", None),
    ("HTTP server", "yarl", None),
    ("event loop", "asyncio/", None),
    ("event loop", "uvloop", None),
)
PHASES = ("parse", "identity", "estimate", "policy match", "ledger", "forward", "relay", "capture", "event",
          "HTTP server", "event loop", "other")


def phase_of(func: Func) -> str | None:
    path, _, name = func
    for phase, fragment, names in RULES:
        if fragment in path and (names is None or name in names):
            return phase
    return None


def attribute(stats: pstats.Stats, top: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Seconds of own time per phase; unclassified functions pass theirs up to their callers."""
    raw = stats.stats  # type: ignore[attr-defined]
    memo: dict[Func, dict[str, float]] = {}

    busy: set[Func] = set()  # on the current walk up the callers: a recursive cycle is cut there

    def shares(func: Func) -> dict[str, float]:
        if func in memo:
            return memo[func]
        phase = phase_of(func)
        if phase is not None:
            memo[func] = {phase: 1.0}
            return memo[func]
        busy.add(func)
        callers = raw[func][4] if func in raw else {}
        weights = {c: v[3] for c, v in callers.items() if c not in busy}
        total = sum(weights.values())
        acc: dict[str, float] = defaultdict(float)
        if not total:
            acc["other"] = 1.0
        else:
            for caller, w in weights.items():
                for p, f in shares(caller).items():
                    acc[p] += f * w / total
        busy.discard(func)
        memo[func] = dict(acc)
        return memo[func]

    totals: dict[str, float] = defaultdict(float)
    for func, (_, _, tt, _, _) in raw.items():
        for phase, f in shares(func).items():
            totals[phase] += tt * f
            if top is not None:
                top[phase][f"{Path(func[0]).name}:{func[1]}({func[2]})"] += tt * f
    return totals


#: runs ``spendgate serve`` with a profiler that SIGUSR1 turns on and SIGUSR2 turns off and writes,
#: so the profile holds the measured requests only (not start-up: loading the vocabularies); timed by
#: the process's CPU clock, so a system call's wait for the other end, or the scheduler giving the core
#: to another process, is not counted as the function's cost
PROFILED_SERVE = """
import cProfile, signal, sys, time
from spendgate.cli.main import main
prof, out = cProfile.Profile(time.process_time), sys.argv.pop(1)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
signal.signal(signal.SIGUSR2, lambda *_: (prof.disable(), prof.dump_stats(out)))
sys.exit(main(sys.argv[1:]))
"""


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid`` itself and of its children (the audit writer)."""
    both = bench.cpu_seconds(pid)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own, both - own


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)


def run(args: argparse.Namespace, profiled: bool) -> tuple[tuple[float, float], int, Path | None]:
    """Serve the cases' requests; (CPU seconds of the server and of its audit writer, requests, the
    profile's file)."""
    tmp = Path(tempfile.mkdtemp())
    up_port, sg_port = bench.free_port(), bench.free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    env = {**os.environ, "HOME": str(tmp), "SPENDGATE_OPENAI_BASE_URL": upstream,
           "SPENDGATE_ANTHROPIC_BASE_URL": upstream, "SPENDGATE_GEMINI_BASE_URL": upstream}
    prof = tmp / "serve.prof" if profiled else None
    serve = [sys.executable, *(["-c", PROFILED_SERVE, str(prof)] if prof else ["-m", "spendgate.cli.main"]),
             "serve", "--port", str(sg_port), "--workers", "1", "--store", args.store or f"sqlite:///{tmp}/profile.db"]
    procs = [start([sys.executable, bench.__file__, "--role", "upstream", "--port", str(up_port)], env),
             start(serve, env)]
    try:
        for port in (up_port, sg_port):
            bench.wait_listening(port)
        base = {"spendgate": f"http://127.0.0.1:{sg_port}"}
        cases = [(n, bench.CASES[n]) for n in ("openai chat", "anthropic messages")]
        path, body = cases[0][1]
        asyncio.run(bench.drive(base, path, body, 200, args.concurrency))  # warm: connections, caches
        before = cpu_split(procs[1].pid)
        if prof:
            procs[1].send_signal(signal.SIGUSR1)
        total = 0
        for name, (path, body) in cases:
            for stream in (False, True):
                print(f"  {'profiled' if profiled else 'timed'}: {name}{' stream' if stream else ''} ×{args.n}",
                      file=sys.stderr, flush=True)
                asyncio.run(bench.drive(base, path, {**body, "stream": True} if stream else body, args.n,
                                        args.concurrency))
                total += args.n + max(1, args.n // 10 // args.concurrency) * args.concurrency
        after = cpu_split(procs[1].pid)
        cpu = (after[0] - before[0], after[1] - before[1])
        if prof:
            procs[1].send_signal(signal.SIGUSR2)
            for _ in range(200):  # written by the server's main thread at its next bytecode
                if prof.exists():
                    break
                time.sleep(0.05)
    finally:
        procs[1].send_signal(signal.SIGINT)
        try:
            procs[1].wait(timeout=30)
        except subprocess.TimeoutExpired:
            procs[1].kill()
        procs[0].kill()
    return cpu, total, prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per case (four cases)")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--store", help="spendgate's store URL (default: a fresh SQLite file)")
    ap.add_argument("--top", type=int, default=0, metavar="K", help="also list each phase's K costliest functions")
    ap.add_argument("--keep", metavar="FILE", help="keep the profile in FILE (for pstats, snakeviz …)")
    args = ap.parse_args()
    cpu, requests, _ = run(args, profiled=False)
    _, profiled_requests, prof = run(args, profiled=True)
    assert prof is not None and prof.exists(), "the profiled server wrote no profile"
    if args.keep:
        Path(args.keep).write_bytes(prof.read_bytes())
    top: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    totals = attribute(pstats.Stats(str(prof)), top)
    request_path = {p: s for p, s in totals.items()}
    whole = sum(request_path.values())
    per_request, writer = cpu[0] / requests * 1e6, cpu[1] / requests * 1e6
    print(f"\nspendgate serve, {requests:,} requests at c={args.concurrency} (OpenAI and Anthropic, streamed and "
          f"not), store {args.store or 'sqlite'}: {per_request + writer:,.0f} µs of CPU per request unprofiled "
          f"({per_request:,.0f} the server's process, {writer:,.0f} its audit writer)\n")
    print(f"{'phase':22} {'share':>7} {'≈ µs / request':>15}")
    for phase in PHASES:
        share = request_path.get(phase, 0.0) / whole if whole else 0.0
        print(f"{phase:22} {share:7.1%} {share * per_request:15.0f}")
    print(f"{'audit writer (process)':22} {'':7} {writer:15.0f}")
    for phase in PHASES if args.top else ():
        print(f"\n{phase}:")
        for name, t in sorted(top[phase].items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {t / profiled_requests * 1e6:7.1f} µs  {name}")
    print(f"\n(profile: {profiled_requests:,} requests after a warm-up; shares of the server process's CPU time)")


if __name__ == "__main__":
    main()
