"""Many instances, one Redis: budget leases against per-request authorization.

    .venv/bin/python bench/scale.py [--instances 8] [--users 16] [--rate 100] [--seconds 8] [--redis URL]

M processes (``--instances``), each running the real engine (``spendgate.engine.Engine``, its
asyncio path as the proxy drives it) on one Redis, send requests at ``--rate`` per second each, 8 at a
time, each after a simulated 2 ms upstream call, under two budget rules: ``user-day`` (per user,
``--users`` buckets, the first half of the users sending three times as much as the rest, so their
buckets run into their limits during the run) and ``global-day`` (one bucket, far from its limit).
The same workload runs twice on a fresh key prefix: with budget leases (``LeasedLedger``) and with
per-request authorization (``AsyncRedisLedger``, today's path). While each runs, the main process
reads every bucket from Redis in one script call, as often as it can, and keeps the worst
``captured + held - limit`` seen (must be <= 0).

Prints, per mode: Redis round trips per request (every EVALSHA and command the instances send),
decisions per second per instance and the p50/p99 of a decision, the worst ``captured + held -
limit``, the refusals, and the refusals "that would have fitted": refused on a bucket that ended the
run with room for the refused request's hold (the room the per-request mode leaves is the holds'
worst case settling lower; what leases add beyond it is the cost of slices near the limit). Without
``--redis`` a redis-server (the Debian package) is started on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import queue
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BODY = {"model": "gpt-4o-mini", "max_tokens": 400,
        "messages": [{"role": "user", "content": "Summarise the attached notes in three bullet points."}]}
CONCURRENCY = 8
UPSTREAM_S = 0.002


def _policy_doc(user_usd: str, global_usd: str) -> dict[str, Any]:
    return {"defaults": False, "budget": [
        {"name": "user-day", "usd": user_usd, "window": "day", "per": "user", "action": "block"},
        {"name": "global-day", "usd": global_usd, "window": "day", "action": "block", "alert_at": [0.9]},
    ]}


@dataclass
class Report:
    """One instance's run."""

    decisions: int = 0
    refused: int = 0
    trips: int = 0
    wall: float = 0.0
    lat_ms: list[float] = field(default_factory=list)
    #: (user, worst case held) of each refusal
    refusals: list[tuple[str, int]] = field(default_factory=list)
    local: int = 0
    exact: int = 0


def _count_trips() -> list[int]:
    """Count every command an instance sends to Redis (asyncio and sync clients)."""
    import redis.asyncio.connection
    import redis.connection

    n = [0]
    areal = redis.asyncio.connection.Connection.send_packed_command
    real = redis.connection.Connection.send_packed_command

    async def acounting(self: Any, command: Any, check_health: bool = True) -> None:
        n[0] += 1
        await areal(self, command, check_health)

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        n[0] += 1
        real(self, command, check_health)  # type: ignore[no-untyped-call]

    redis.asyncio.connection.Connection.send_packed_command = acounting  # type: ignore[method-assign]
    redis.connection.Connection.send_packed_command = counting  # type: ignore[method-assign]
    return n


def instance(mode: str, url: str, doc: dict[str, Any], users: int, rate: float, seconds: float, seed: int,
             go: Any, progress: Any) -> Report:
    """One simulated proxy instance: the engine on one event loop, ``rate`` requests per second."""
    from spendgate import ledger
    from spendgate.engine import Engine
    from spendgate.ledger.lease import LeasedLedger
    from spendgate.ledger.redis import AsyncRedisLedger
    from spendgate.policy import parse
    from spendgate.request import Identity, Request

    trips = _count_trips()
    store = ledger.open(url)
    engine = Engine(parse(doc), store)
    rng = random.Random(seed)
    weights = [3 if u < users // 2 else 1 for u in range(users)]
    rep = Report()

    async def run() -> None:
        aled: Any = LeasedLedger(url) if mode == "leases" else AsyncRedisLedger(url)
        engine.aledger = aled
        # one request first, off the clock: scripts loaded, pools connected
        warm = Request("openai", "/v1/chat/completions", BODY, Identity(user="warmup", key="k"))
        d = await engine.adecide(warm)
        await engine.arelease(d)
        progress.put((seed, -1, 0))  # ready: every instance starts at once
        await asyncio.to_thread(go.wait)
        trips[0] = 0
        t0 = time.time()
        stop = t0 + seconds
        sent = 0
        last_note = t0

        async def worker() -> None:
            nonlocal sent, last_note
            while True:
                slot = t0 + sent / rate
                if slot >= stop:
                    return
                sent += 1
                if slot > time.time():
                    await asyncio.sleep(slot - time.time())  # pacing to the target rate
                user = f"u{rng.choices(range(users), weights)[0]}"
                req = Request("openai", "/v1/chat/completions", BODY, Identity(user=user, key="k"))
                a = time.perf_counter()
                d = await engine.adecide(req)
                rep.lat_ms.append((time.perf_counter() - a) * 1000)
                rep.decisions += 1
                if not d.allowed:
                    rep.refused += 1
                    held = d.estimate.cost_nanos if d.estimate is not None else 0
                    rep.refusals.append((user, held))
                else:
                    await asyncio.sleep(UPSTREAM_S)  # the provider's call
                    await engine.acapture(d, {"prompt_tokens": 20, "completion_tokens": rng.randint(60, 400)})
                if time.time() - last_note >= 1.0:
                    last_note = time.time()
                    progress.put((seed, rep.decisions, rep.refused))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        rep.wall = time.time() - t0
        if isinstance(aled, LeasedLedger):
            rep.local, rep.exact = aled.stats.local, aled.stats.exact
        await aled.close()
        rep.trips = trips[0]

    asyncio.run(run())
    store.close()
    return rep


class Sampler:
    """Reads every bucket from Redis in one script call, as often as it can, on a thread."""

    def __init__(self, url: str, keys: list[tuple[str, int]]) -> None:
        from spendgate import ledger
        from spendgate.ledger import Bucket

        self.store = ledger.open(url)
        self.buckets = [Bucket(k, limit) for k, limit in keys]
        self.worst = -(10**18)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for s in self.store.states(self.buckets, now=time.time()):
                self.worst = max(self.worst, s.spent + s.held - (s.limit or 0) - s.granted)
            self.samples += 1
            time.sleep(0.002)  # leave the two cores to the instances

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_redis(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian package redis-server), or pass --redis URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--appendonly", "yes", "--save", "", "--daemonize", "no"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            return proc, f"redis://127.0.0.1:{port}/0"
    sys.exit(f"redis-server exited with {proc.wait()}")


def run_mode(pool: Any, manager: Any, mode: str, base_url: str, args: argparse.Namespace, doc: dict[str, Any],
             keys: list[tuple[str, int]]) -> dict[str, Any]:
    """One mode's run: ``leases`` or ``exact`` (the ledger the instances use), ``-far`` for limits
    no bucket comes near."""
    from spendgate import ledger
    from spendgate.ledger import Bucket

    url = f"{base_url}?prefix=scale-{uuid.uuid4().hex[:8]}"
    progress, go = manager.Queue(), manager.Event()
    sampler = Sampler(url, keys)
    jobs = [(mode.removesuffix("-far"), url, doc, args.users, args.rate, args.seconds, i, go, progress)
            for i in range(args.instances)]
    pending = pool.starmap_async(instance, jobs)
    for _ in range(args.instances):
        progress.get(timeout=120)
    sampler.start()
    start_at = time.time()
    go.set()
    counts: dict[int, tuple[int, int]] = {}
    next_note = 0.0
    while not pending.ready():
        try:
            seed, n, refused = progress.get(timeout=1.0)
            counts[seed] = (n, refused)
        except queue.Empty:
            pass
        done = sum(n for n, _ in counts.values())
        if done and time.time() >= next_note:
            next_note = time.time() + 2.0
            print(f"  {mode}: {time.time() - start_at:4.1f} s, {done} decisions, "
                  f"{sum(r for _, r in counts.values())} refused, worst captured + held - limit so far "
                  f"{sampler.worst} n$", flush=True)
    reports: list[Report] = pending.get()
    sampler.stop()
    store = ledger.open(url)
    final = {s.key: s for s in store.states([Bucket(k, lim) for k, lim in keys], now=time.time())}
    store.close()
    sampler.store.close()
    decisions = sum(r.decisions for r in reports)
    fitted = 0
    for r in reports:
        for user, held in r.refusals:
            key = next(k for k, _ in keys if f"user={user}|" in k + "|")
            s = final[key]
            if s.remaining is not None and s.remaining >= held:
                fitted += 1
    lat = sorted(x for r in reports for x in r.lat_ms)
    return {
        "mode": mode.replace("-far", ", far from limits"),
        "trips_per_request": sum(r.trips for r in reports) / max(1, decisions),
        "decisions_per_s": statistics.mean(r.decisions / r.wall for r in reports),
        "p50_ms": lat[len(lat) // 2] if lat else 0.0,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0,
        "worst": sampler.worst,
        "samples": sampler.samples,
        "decisions": decisions,
        "refused": sum(r.refused for r in reports),
        "fitted": fitted,
        "local": sum(r.local for r in reports),
        "exact": sum(r.exact for r in reports),
        "held_after": sum(s.held for s in final.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=8, help="simulated proxy instances (processes)")
    ap.add_argument("--users", type=int, default=16, help="user-day buckets (plus one global-day bucket)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second per instance")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each mode's run")
    ap.add_argument("--redis", help="a Redis URL (default: start a redis-server on a free port)")
    ap.add_argument("--modes", default="leases-far,leases,exact",
                    help="which runs, in order: leases or exact, with -far for limits 1,000x larger")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from spendgate.engine import Engine
    from spendgate.policy import parse

    tmp = tempfile.TemporaryDirectory(prefix="spendgate-scale-")
    proc = None
    base = args.redis
    if base is None:
        proc, base = start_redis(Path(tmp.name))
    try:
        from spendgate import ledger

        probe = Engine(parse(_policy_doc("1000", "100000")), ledger.open("memory://"))
        worst = probe.estimator.estimate("openai", "/v1/chat/completions", BODY).cost_nanos
        mean_charge = probe.estimator.estimate(
            "openai", "/v1/chat/completions", {**BODY, "max_tokens": 230}).cost_nanos
        total = args.instances * args.rate * args.seconds
        weights = [3 if u < args.users // 2 else 1 for u in range(args.users)]
        hot_share = weights[0] / sum(weights)
        # the hot users' demand over the run is 1.5x their limit; the others' about half of it
        user_nanos = int(total * hot_share * mean_charge / 1.5)
        global_nanos = int(total * mean_charge * 10)
        doc = _policy_doc(str(user_nanos / 10**9), str(global_nanos / 10**9))
        far = _policy_doc(str(user_nanos * 1000 / 10**9), str(global_nanos * 1000 / 10**9))
        keys = _keys(doc, args.users)
        print(f"{args.instances} instances x {args.rate:g} req/s for {args.seconds:g} s each mode, {args.users} "
              f"user buckets of ${user_nanos / 1e9:.4f} (hold ${worst / 1e9:.6f}, mean charge "
              f"${mean_charge / 1e9:.6f}) + 1 global of ${global_nanos / 1e9:.2f}; Redis {base}", flush=True)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ctx.Pool(args.instances) as pool:  # one pool: imports paid once
            rows = [run_mode(pool, manager, mode, base, args, far if mode.endswith("-far") else doc,
                             _keys(far, args.users) if mode.endswith("-far") else keys)
                    for mode in args.modes.split(",")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        tmp.cleanup()
    print()
    print("| mode | Redis round trips / request | decisions/s per instance | decision p50 / p99 ms | "
          "worst captured + held - limit | refused | refused that would have fitted | local / per-request |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['trips_per_request']:.3f} | {r['decisions_per_s']:.0f} | "
              f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['worst']} n$ ({r['samples']} samples) | "
              f"{r['refused']} of {r['decisions']} | {r['fitted']} | "
              + (f"{r['local']} / {r['exact']}" if r["mode"].startswith("leases") else "- / all") + " |")
    bad = [r for r in rows if r["worst"] > 0 or r["held_after"] != 0]
    if bad:
        sys.exit(f"FAILED: over a limit or holds left after the run: {bad}")


def _keys(doc: dict[str, Any], users: int) -> list[tuple[str, int]]:
    """Every bucket the workload counts in: (key, limit)."""
    from spendgate.policy import parse

    policy, now = parse(doc), time.time()
    keys = [_rule_buckets(policy, "user-day", f"user=u{u}", now)[0] for u in range(users)]
    return [*keys, _rule_buckets(policy, "global-day", "global=(none)", now)[0]]


def _rule_buckets(policy: Any, name: str, scope: str, now: float) -> list[tuple[str, int]]:
    from spendgate.buckets import rule_buckets

    rule = next(r for r in policy.rules if r.name == name)
    return [(rb.key, rb.limit) for rb in rule_buckets(rule, scope, now, None) if rb.unit == "usd"]


if __name__ == "__main__":
    main()
