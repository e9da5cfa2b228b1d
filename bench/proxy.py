"""Proxy overhead: added latency against a direct call and against a bare passthrough, and throughput.

    .venv/bin/python bench/proxy.py [--n 2000] [--audit-off] [--baseline DIR] [--also-store URL] [--workers N]
                                    [--load python|wrk]

Starts three processes on loopback — the fake upstream, a bare aiohttp passthrough (a pooled
aiohttp client relaying bytes, no guard), and ``spendgate serve`` on the embedded defaults (SQLite
store, default policy: the full guard) — and drives each from this process with a pooled aiohttp
client. Prints one table: p50/p99 latency per path and the overhead the proxy adds, at concurrency
1 and 8, streaming and not, OpenAI, Anthropic and Gemini shapes; then requests/s through spendgate at
concurrency 16 and its CPU time per request. Targets: SPEC §11.

Each option adds a server measured in the same alternating blocks, a column of its p50/p99 and what it
adds over the build under test: ``--audit-off`` the same build with ``[audit] enabled = false``;
``--also-store URL`` the same build on another store (``redis://…?leases=on`` beside SQLite);
``--baseline DIR`` another checkout (a ``git worktree`` of the previous release) — before and after
in one run, on a machine whose speed drifts between runs. ``--workers N`` compares the throughput of
``serve --workers N`` with one worker's at c=32.

Throughput is driven by this process's aiohttp client, or with ``--load wrk`` by ``wrk`` (Debian's
``wrk`` package: a C load generator, one thread), which takes a small fraction of the CPU the Python
client does — on a 2-core machine the load generator shares the cores with the servers it measures,
so a costly one caps what ``--workers 2`` can show. The fake upstream and the bare passthrough run
on uvloop, as ``spendgate serve`` does: the passthrough is the floor on the same event loop, so the
difference between the two is the guard alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

CASES = {
    "openai chat": ("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 64,
                                             "messages": [{"role": "user", "content": "Say hello in five words."}]}),
    "anthropic messages": ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 64,
                                            "messages": [{"role": "user", "content": "Say hello in five words."}]}),
    "gemini generateContent": ("/v1beta/models/gemini-2.5-flash:generateContent",
                               {"contents": [{"role": "user", "parts": [{"text": "Say hello in five words."}]}],
                                "generationConfig": {"maxOutputTokens": 64}}),
}
#: cases whose stream is another route rather than a body flag (Gemini: the model and method are in the path)
STREAMED = {"gemini generateContent": "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the two helper roles, run as their own processes ------------------------------------------

def serve_upstream(port: int) -> None:
    from spendgate.demo.upstream import FakeUpstream

    class Quiet(FakeUpstream):
        async def _record(self, request: web.Request) -> tuple[dict[str, Any], str]:
            body = await request.read()
            return json.loads(body), ""

    web.run_app(Quiet().app(), host="127.0.0.1", port=port, print=None, access_log=None, loop=_loop())


def serve_bare(port: int, upstream: str) -> None:
    """The floor: an aiohttp server relaying bytes through a pooled aiohttp client, no guard."""
    state: dict[str, aiohttp.ClientSession] = {}

    async def start(_: web.Application) -> None:
        state["c"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with state["c"].post(upstream + request.path_qs, data=body, headers=headers) as up:
            if up.content_type == "text/event-stream":
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)

    async def stop(_: web.Application) -> None:
        await state["c"].close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/{tail:.*}", relay)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=_loop())


def _loop() -> asyncio.AbstractEventLoop:
    """The event loop ``spendgate serve`` runs on (uvloop where installed), for the helpers too."""
    from spendgate.cli.serve import fast_loop

    loop: asyncio.AbstractEventLoop = fast_loop()
    return loop


# -- the load ----------------------------------------------------------------------------------

ROUNDS = 5


async def drive(bases: dict[str, str], path: str, body: dict[str, Any], n: int,
                concurrency: int) -> dict[str, list[float]]:
    """Latencies per path, measured in alternating blocks (direct, passthrough, spendgate, direct, …)
    so that drift in the machine's speed hits every column alike, while within a block only one
    path is busy, as in a real deployment."""
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", "x-api-key": "sk-bench",
               "anthropic-version": "2023-06-01", "x-goog-api-key": "sk-bench"}
    lat: dict[str, list[float]] = {k: [] for k in bases}
    client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    async with client:
        async def worker(name: str, count: int, keep: bool) -> None:
            for _ in range(count):
                t = time.perf_counter()
                async with client.post(bases[name] + path, data=payload, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{bases[name]}{path}: HTTP {r.status}: {await r.text()}")
                if keep:
                    lat[name].append((time.perf_counter() - t) * 1e6)

        for name in bases:  # warm-up: connections, caches
            await asyncio.gather(*(worker(name, max(1, n // 10 // concurrency), False) for _ in range(concurrency)))
        for _ in range(ROUNDS):
            for name in bases:
                await asyncio.gather(*(worker(name, max(1, n // ROUNDS // concurrency), True)
                                       for _ in range(concurrency)))
    return lat


def drive_wrk(url: str, path: str, body: dict[str, Any], seconds: int, concurrency: int) -> tuple[int, float]:
    """``wrk`` posting ``body`` to ``url + path`` for ``seconds`` over ``concurrency`` connections:
    (requests answered, seconds taken). Any answer but a 2xx, or a socket error, stops the run."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", "x-api-key": "sk-bench",
               "anthropic-version": "2023-06-01", "x-goog-api-key": "sk-bench"}
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{json.dumps(body)}]==]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", f.name, url + path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if bad:
        raise RuntimeError(f"wrk against {url}{path}: {bad.group(0)}\n{out}")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    if m is None:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    return int(m.group(1)), float(m.group(2)) * scale


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of every live process under it (spendgate serve's audit writer; the
    workers of ``serve --workers`` and their audit writers)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        me = int(stat.parent.name)
        parent[me], ticks[me] = int(fields[1]), int(fields[11]) + int(fields[12])

    def under(p: int) -> bool:
        while p > 1:
            if p == pid:
                return True
            p = parent.get(p, 0)
        return False

    return sum(t for p, t in ticks.items() if under(p)) / os.sysconf("SC_CLK_TCK")


def throughput(url: str, proc: subprocess.Popen[bytes], path: str, body: dict[str, Any], n: int,
               concurrency: int = 16) -> tuple[float, float]:
    """``n`` requests through ``url`` at ``concurrency``: (requests per second, CPU µs per request of
    ``proc`` and its children)."""
    before = cpu_seconds(proc.pid)
    t = time.perf_counter()
    asyncio.run(drive({"x": url}, path, body, n, concurrency))
    wall = time.perf_counter() - t
    return n / wall, (cpu_seconds(proc.pid) - before) / n * 1e6


def throughputs(targets: dict[str, tuple[str, subprocess.Popen[bytes]]], path: str, body: dict[str, Any], n: int,
                concurrency: int = 16, rounds: int = ROUNDS, load: str = "python",
                seconds: int = 2) -> dict[str, tuple[float, float]]:
    """:func:`throughput` of every target — ``n`` requests each, or with ``load="wrk"`` ``seconds``
    of wrk per block — measured in ``rounds`` blocks whose order rotates: the one measured first in
    a run otherwise gets the machine's better moments (a server against itself measured ~10 % apart)."""
    wall = dict.fromkeys(targets, 0.0)
    cpu = dict.fromkeys(targets, 0.0)
    done = dict.fromkeys(targets, 0)
    names = list(targets)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            url, proc = targets[name]
            before = cpu_seconds(proc.pid)
            if load == "wrk":
                count, took = drive_wrk(url, path, body, seconds, concurrency)
            else:
                t = time.perf_counter()
                asyncio.run(drive({"x": url}, path, body, n // rounds, concurrency))
                count, took = n // rounds, time.perf_counter() - t
            wall[name] += took
            done[name] += count
            cpu[name] += cpu_seconds(proc.pid) - before
    return {name: (done[name] / wall[name], cpu[name] / done[name] * 1e6) for name in names}


def wait_listening(port: int, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="requests per measurement")
    ap.add_argument("--store", help="spendgate's store URL (default: a fresh SQLite file, the embedded default)")
    ap.add_argument("--sustain", type=int, default=0, metavar="N",
                    help="then N more requests at c=16 through each proxy: CPU per request under sustained load")
    ap.add_argument("--audit-off", action="store_true",
                    help="also measure the same build with the audit log off, side by side")
    ap.add_argument("--runtime-rules", type=int, default=0, metavar="N",
                    help="also run spendgate with N run-time budgets (spendgate budgets add) in its store — once "
                         "scoped to other models (loaded, weighed, not applying), once all applying to every "
                         "request — and print what each adds")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run spendgate from another checkout (its root or its src/ directory, e.g. a "
                         "`git worktree` of the previous release) in the same alternating blocks, and print "
                         "what this build adds or saves against it")
    ap.add_argument("--also-store", metavar="URL",
                    help="also run this build on another store (e.g. redis://…?leases=on) in the same blocks")
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="also run `spendgate serve --workers N` and compare its throughput at c=32 with one "
                         "worker's")
    ap.add_argument("--load", choices=("python", "wrk"), default="python",
                    help="what drives the throughput measurements: this process's aiohttp client, or wrk "
                         "(Debian's wrk package; far less CPU on the cores the servers share)")
    ap.add_argument("--role", choices=("upstream", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "upstream":
        return serve_upstream(args.port)
    if args.role == "bare":
        return serve_bare(args.port, args.upstream)
    if args.load == "wrk" and shutil.which("wrk") is None:
        ap.error("--load wrk: no wrk on PATH (apt-get install wrk)")

    up_port, bare_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "SPENDGATE_OPENAI_BASE_URL": upstream, "SPENDGATE_ANTHROPIC_BASE_URL": upstream,
           "SPENDGATE_GEMINI_BASE_URL": upstream, "HOME": tmp}
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--port", str(up_port)]),
             subprocess.Popen([sys.executable, __file__, "--role", "bare", "--port", str(bare_port), "--upstream",
                               upstream])]
    #: every spendgate server of the run: label -> (its process, its URL); "spendgate" is the build under
    #: test on --store, the others are measured in the same alternating blocks and compared with it
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def serve(label: str, store: str, *extra: str, src: str | None = None) -> None:
        port = free_port()
        # one worker unless asked (the default is one per core); a baseline checkout may predate --workers
        knows = not src or "--workers" in Path(src, "spendgate", "cli", "serve.py").read_text()
        one = ["--workers", "1"] if knows and "--workers" not in extra else []
        proc = subprocess.Popen([sys.executable, "-m", "spendgate.cli.main", "serve", "--port", str(port),
                                 "--store", store, *one, *extra], stderr=subprocess.DEVNULL,
                                env={**env, "PYTHONPATH": src} if src else env)
        procs.append(proc)
        servers[label] = (proc, f"http://127.0.0.1:{port}")

    serve("spendgate", args.store or f"sqlite:///{tmp}/bench.db")
    if args.audit_off:
        Path(tmp, "audit-off.toml").write_text("[audit]\nenabled = false\n")
        serve("audit off", f"sqlite:///{tmp}/bench-off.db", "--config", f"{tmp}/audit-off.toml")
    if args.also_store:
        serve("also-store", args.also_store)
    if args.baseline:
        src = Path(args.baseline).resolve()
        src = src / "src" if (src / "src" / "spendgate").is_dir() else src
        if not (src / "spendgate").is_dir():
            ap.error(f"--baseline {args.baseline}: no spendgate package there (give a checkout's root or its src/)")
        serve("baseline", f"sqlite:///{tmp}/bench-baseline.db", src=str(src))
    for case in ("loaded", "applying") if args.runtime_rules else ():
        rules_store = f"sqlite:///{tmp}/bench-rules-{case}.db"
        add_runtime_rules(rules_store, args.runtime_rules, applying=case == "applying")
        serve(f"{args.runtime_rules} rules {case}", rules_store)
    others = [label for label in servers if label != "spendgate"]
    if args.workers:  # throughput only: not in the latency blocks
        serve(f"--workers {args.workers}", args.store or f"sqlite:///{tmp}/bench-workers.db", "--workers",
              str(args.workers))
    try:
        wait_listening(up_port)
        wait_listening(bare_port)
        for _, url in servers.values():
            wait_listening(int(url.rsplit(":", 1)[1]))
        paths = {"direct": upstream, "bare passthrough": f"http://127.0.0.1:{bare_port}",
                 **{label: servers[label][1] for label in ("spendgate", *others)}}
        print(f"{'case':34} {'c':>2} {'direct p50/p99 µs':>18} {'bare p50/p99':>16} {'spendgate p50/p99':>18} "
              f"{'added vs direct p50/p99':>24} {'vs bare p50':>12}"
              + "".join(f" {label + ' p50/p99':>{max(16, len(label) + 8)}} {'adds':>6}" for label in others))
        for name, (path, body) in CASES.items():
            for stream in (False, True):
                for c in (1, 8):
                    p, b = (STREAMED[name], body) if stream and name in STREAMED else \
                        (path, {**body, "stream": True} if stream else body)
                    res = asyncio.run(drive(paths, p, b, args.n, c))
                    d50, d99 = pct(res["direct"], .5), pct(res["direct"], .99)
                    b50, b99 = pct(res["bare passthrough"], .5), pct(res["bare passthrough"], .99)
                    s50, s99 = pct(res["spendgate"], .5), pct(res["spendgate"], .99)
                    label = f"{name}{' stream' if stream else ''}"
                    row = "".join(f" {f'{pct(res[o], .5):.0f}/{pct(res[o], .99):.0f}':>{max(16, len(o) + 8)}} "
                                  f"{pct(res[o], .5) - s50:6.0f}" for o in others)
                    print(f"{label:34} {c:2d} {d50:8.0f}/{d99:<9.0f} {b50:7.0f}/{b99:<8.0f} {s50:8.0f}/{s99:<9.0f} "
                          f"{s50 - d50:11.0f}/{s99 - d99:<12.0f} {s50 - b50:12.0f}{row}")
        path, body = CASES["openai chat"]
        n = args.n * 2
        gen = "wrk" if args.load == "wrk" else "this process's aiohttp client"
        print(f"\nthroughput at c=16, in rotating blocks (load: {gen}, on the same {os.cpu_count()} "
              "cores; CPU: each server's processes and their audit writers):")
        tput = throughputs({"bare passthrough (the floor)": (paths["bare passthrough"], procs[1]),
                            **{label: (servers[label][1], servers[label][0]) for label in ("spendgate", *others)}},
                           path, body, n, load=args.load)
        for label, (rps, cpu) in tput.items():
            print(f"  {label:32} {rps:7,.0f} requests/s, CPU {cpu:6,.0f} µs per request")
        if args.workers:
            proc, url = servers[f"--workers {args.workers}"]
            asyncio.run(drive({"warm": url}, path, body, 400, 32))  # every worker's connections and caches
            at32 = throughputs({"one": (paths["spendgate"], servers["spendgate"][0]), "many": (url, proc)},
                               path, body, n, 32, load=args.load)
            (one, one_cpu), (many, many_cpu) = at32["one"], at32["many"]
            print(f"at c=32: one worker {one:,.0f} requests/s ({one_cpu:,.0f} µs CPU per request); --workers "
                  f"{args.workers} {many:,.0f} requests/s ({many_cpu:,.0f} µs), {many / one:.2f}×")
        if args.sustain:  # a store's costs that grow with its size (WAL, indexes) show only over time
            for name, proc in (("bare passthrough", procs[1]), ("spendgate", servers["spendgate"][0])):
                rps, cpu = throughput(paths[name], proc, path, body, args.sustain)
                print(f"sustained, {args.sustain:,} requests at c=16 through {name}: {rps:,.0f} "
                      f"requests/s, CPU {cpu:,.0f} µs per request")
    finally:
        stop_all(procs)


def add_runtime_rules(store_url: str, n: int, *, applying: bool) -> None:
    """``n`` run-time budgets as an operator adds them, kept in the store serve reads them from:
    per user, per team and global, day and rolling windows, roomy enough never to refuse. Not
    ``applying``: each matches a model this benchmark never calls (a team's budget on its own
    models), so every request weighs and passes over them; ``applying``: every one counts every
    request, a bucket each."""
    from spendgate import ledger
    from spendgate.policy.runtime import put_rule

    store = ledger.open(store_url)
    pers, windows = ("user", "team", "global", "key"), ("day", "1h", "month", "24h", "week")
    for i in range(n):
        table: dict[str, Any] = {"name": f"runtime-{i}", "usd": 10_000, "window": windows[i % len(windows)],
                                 "per": pers[i % len(pers)]}
        if not applying:
            table["match"] = {"model": f"team-{i}-model*"}
        put_rule(store, table, file_rules=(), by="bench")
    store.close()


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Ask every helper process to stop (SIGINT: aiohttp shuts down cleanly), then make sure."""
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


if __name__ == "__main__":
    main()
