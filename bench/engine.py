"""Engine speed: µs per decision (estimate + authorize + capture) and next-turn estimate time.

    .venv/bin/python bench/engine.py [--n 5000]

Prints one table. Targets (SPEC §11): memory p50 ≤ 50 µs, SQLite p50 ≤ 500 µs per decision;
Redis one round trip each for authorize and capture; estimating the next turn of a 100K-token
conversation ≤ 1 ms. With ``--redis URL`` a Redis column is measured too.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

from spendgate import ledger
from spendgate.engine import Engine
from spendgate.estimate import Estimator
from spendgate.policy import default_policy
from spendgate.pricing import PriceTable
from spendgate.request import Identity, Request

PRICES = PriceTable.bundled()


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def timed(fn: Callable[[int], object], n: int, warmup: int = 200) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def decision_bench(url: str, n: int) -> list[float]:
    store = ledger.open(url)
    engine = Engine(default_policy(), store, PRICES)
    body = {"model": "gpt-4o-mini", "max_tokens": 200,
            "messages": [{"role": "system", "content": "You are a careful assistant. " * 20},
                         {"role": "user", "content": "Summarise the attached notes in three bullet points."}]}
    usage = {"usage": {"prompt_tokens": 160, "completion_tokens": 120}}
    now = time.time()

    def one(i: int) -> None:
        req = Request("openai", "/v1/chat/completions", body, Identity(session=f"s{i % 50}", key="k"))
        d = engine.decide(req, now=now + i * 0.001)
        engine.capture(d, usage, now=now + i * 0.001)

    try:
        return timed(one, n)
    finally:
        store.close()


def conversation_bench(turns: int = 10) -> tuple[int, list[float]]:
    """A ~100K-token conversation gaining one message a turn; time each next-turn estimate."""
    est = Estimator(PRICES)
    para = ("The migration plan moves the billing service to the new cluster in three phases, "
            "each gated on error budgets and a rollback rehearsal. ") * 40
    messages = [{"role": "user" if i % 2 else "assistant", "content": f"[{i}] {para}"} for i in range(100)]
    body = {"model": "gpt-4o", "max_tokens": 1000, "messages": messages}
    size = est.estimate("openai", "/v1/chat/completions", body).input_tokens  # warms the cache
    samples = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"turn {t}: and what about the rollback rehearsal?"})
        start = time.perf_counter_ns()
        est.estimate("openai", "/v1/chat/completions", body)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return size, samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--redis", metavar="URL", help="also measure a Redis store, e.g. redis://127.0.0.1:6379/0 "
                                                   "(keys go under a fresh prefix)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("memory", "memory://"), ("sqlite", f"sqlite:///{tmp}/bench.db")]
        if args.redis:
            sep = "&" if "?" in args.redis else "?"
            stores.append(("redis", f"{args.redis}{sep}prefix=bench-{uuid.uuid4().hex[:8]}"))
        for name, url in stores:
            s = decision_bench(url, args.n)
            rows.append((f"decision, {name}", statistics.median(s), pct(s, 0.99), len(s)))
    size, conv = conversation_bench()
    rows.append((f"next turn of a {size // 1000}K-token conversation", statistics.median(conv), pct(conv, 0.99),
                 len(conv)))
    print(f"{'measurement':45} {'p50 µs':>9} {'p99 µs':>9} {'n':>6}")
    for name, p50, p99, n in rows:
        print(f"{name:45} {p50:9.1f} {p99:9.1f} {n:6d}")


if __name__ == "__main__":
    main()
