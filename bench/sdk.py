"""The SDK wrapper's added time per call: a wrapped client against the same client unwrapped.

    .venv/bin/python bench/sdk.py [--n 3000]

Both clients call an httpx ``MockTransport`` that answers at once, so the difference is the guard:
estimate, authorize, forward, capture. Prints p50/p99 µs per call and the added p50 for the
memory and SQLite stores. Target (issue "The SDK"): ≤ 100 µs added with memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import httpx2
import openai

import spendgate
from spendgate.policy import default_policy

RESPONSE = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}
BODY = json.dumps(RESPONSE).encode()
MESSAGES: Any = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def handler(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=BODY, headers={"content-type": "application/json"})


def timed(client: openai.OpenAI, n: int) -> list[float]:
    for _ in range(200):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    plain = openai.OpenAI(api_key="sk-bench", max_retries=0,
                          http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    base = timed(plain, args.n)
    rows = [("unwrapped client", statistics.median(base), sorted(base)[int(0.99 * len(base))], 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in (("wrapped, memory://", "memory://"), ("wrapped, sqlite:///", f"sqlite:///{tmp}/b.db")):
            spendgate.configure(store=url, policy=default_policy())
            s = timed(spendgate.wrap(plain), args.n)
            p50 = statistics.median(s)
            rows.append((name, p50, sorted(s)[int(0.99 * len(s))], p50 - rows[0][1]))
        spendgate.configure(store="memory://")
    print(f"{'client':24} {'p50 µs':>9} {'p99 µs':>9} {'added p50 µs':>13}")
    for name, p50, p99, added in rows:
        print(f"{name:24} {p50:9.1f} {p99:9.1f} {added:13.1f}")


if __name__ == "__main__":
    main()
