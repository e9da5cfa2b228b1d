"""Generate ``examples/runaway-agent.jsonl``: a coding agent left alone, looping.

A simulated session, not a recording: 384 requests over 88 minutes, each a little larger than the
last as the conversation grows, cached prefixes read back, no single request above $1.25 — the
pattern that cost one user about $100 before anyone looked. Deterministic (fixed seed).

    .venv/bin/python scripts/make_runaway_trace.py
"""

from __future__ import annotations

import datetime as dt
import json
import random
from decimal import Decimal
from pathlib import Path

from spendgate.pricing.cost import Usage, usage_nanos
from spendgate.pricing.table import PriceTable

OUT = Path(__file__).resolve().parent.parent / "examples/runaway-agent.jsonl"
MODEL = "claude-sonnet-4-5"
START = dt.datetime(2026, 10, 3, 22, 14, tzinfo=dt.UTC)
REQUESTS, MINUTES = 384, 88


def main() -> None:
    rng = random.Random(20261003)
    price = PriceTable.bundled().resolve(MODEL, "anthropic")
    assert price is not None
    context = 9_000
    total = 0
    rows = []
    gaps = [rng.uniform(0.5, 1.5) for _ in range(REQUESTS)]
    scale = MINUTES * 60 / sum(gaps)
    t = START.timestamp()
    for i in range(REQUESTS):
        t += gaps[i] * scale
        new = rng.randint(3_000, 12_000)  # tool output appended this turn
        if context > 170_000:  # the agent compacts its history and starts growing again
            context = 20_000
        if i % 11 == 5:  # the prompt cache expired: the whole prefix is written again
            cached, written = 0, context + new
        else:
            cached, written = context, new
        context += new
        max_tokens = 32_000 if i % 4 else 16_384
        output = rng.randint(4_000, min(18_000, max_tokens))  # a model never writes past max_tokens
        u = Usage(input=rng.randint(3, 40), cache_read=cached, cache_write_5m=written, output=output)
        cost = usage_nanos(price.price, u)
        total += cost
        rows.append({
            "timestamp": dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z"),
            "model": MODEL, "provider": "anthropic", "session_id": "agent-7f3a", "user": "dev@laptop",
            "input_tokens": u.input, "cache_read_tokens": u.cache_read, "cache_creation_tokens": u.cache_write_5m,
            "output_tokens": u.output, "max_tokens": max_tokens,
            "cost_usd": str(Decimal(cost) / Decimal(10**9)),
        })
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    top = max(Decimal(r["cost_usd"]) for r in rows)
    print(f"wrote {len(rows)} requests to {OUT}: ${Decimal(total) / Decimal(10**9):.2f}, dearest ${top:.4f}")


if __name__ == "__main__":
    main()
