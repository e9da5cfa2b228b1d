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
import spendgate.sdk._runtime
from spendgate.policy import default_policy

RESPONSE = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}
BODY = json.dumps(RESPONSE).encode()
MESSAGES: Any = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def handler(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=BODY, headers={"content-type": "application/json"})


def call(client: openai.OpenAI) -> float:
    t = time.perf_counter_ns()
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    return (time.perf_counter_ns() - t) / 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    plain = openai.OpenAI(api_key="sk-bench", max_retries=0,
                          http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with tempfile.TemporaryDirectory() as tmp:
        clients: dict[str, Any] = {"unwrapped client": (plain, None)}
        for name, url in (("wrapped, memory://", "memory://"), ("wrapped, sqlite:///", f"sqlite:///{tmp}/b.db")):
            clients[name] = (spendgate.wrap(plain), spendgate.configure(store=url, policy=default_policy()))
        samples: dict[str, list[float]] = {name: [] for name in clients}
        # interleaved, so that drift in the machine's speed affects every column alike
        for i in range(args.n + 200):
            for name, (client, engine) in clients.items():
                if engine is not None:
                    spendgate.sdk._runtime._engine = engine  # the store this column measures
                took = call(client)
                if i >= 200:
                    samples[name].append(took)
        spendgate.configure(store="memory://")
    base = statistics.median(samples["unwrapped client"])
    print(f"{'client':24} {'p50 µs':>9} {'p99 µs':>9} {'added p50 µs':>13}")
    for name, s in samples.items():
        p50 = statistics.median(s)
        print(f"{name:24} {p50:9.1f} {sorted(s)[int(0.99 * len(s))]:9.1f} {p50 - base:13.1f}")


if __name__ == "__main__":
    main()
