"""The demo: a built-in fake upstream, the real proxy, a simulated runaway agent, the guard holding it.

Everything runs on loopback with the official ``openai`` client; no API key, no network, nothing
left behind (a ``memory://`` store). The agent's conversation grows each turn, as a coding agent's
does, until the default ``session-hour`` budget ($10 per session per rolling hour) holds it.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import TextIO

from spendgate import ledger
from spendgate.cli.output import bar
from spendgate.demo.background import BackgroundLoop
from spendgate.demo.upstream import FakeUpstream
from spendgate.engine import Engine
from spendgate.money import fmt_usd, usd_to_nanos
from spendgate.policy import default_policy
from spendgate.pricing.cost import Usage, usage_nanos
from spendgate.proxy.app import Proxy, ProxyConfig

MODEL = "gpt-5"
SESSION = "demo-agent-7f3a"
PLANNED_TURNS = 400
RETRIES = 3  # what an agent does on an error before giving up


@dataclass
class DemoResult:
    turns_sent: int
    spent_nanos: int
    refused: int
    would_have_cost_nanos: int
    held_message: str
    decision_ids: set[str]


def run(out: TextIO | None = None, seed: int = 7) -> DemoResult:
    out = out or sys.stdout
    try:
        import openai
    except ImportError:  # pragma: no cover - the clients extra is part of the README install
        raise SystemExit("spendgate demo drives the official openai client: pip install 'spendgate[clients]'") \
            from None
    rng = random.Random(seed)
    bg = BackgroundLoop()
    upstream = FakeUpstream()
    store = ledger.open("memory://")
    engine = Engine(default_policy(), store)
    try:
        up_url = f"http://127.0.0.1:{bg.serve(upstream.app())}"
        proxy = Proxy(engine, ProxyConfig(upstreams={"openai": up_url, "anthropic": up_url}))
        url = f"http://127.0.0.1:{bg.serve(proxy.app())}"
        out.write(f"fake upstream on {up_url}; spendgate proxy on {url} (default policy, memory store)\n")
        out.write(f"a coding agent starts looping on {MODEL}, {PLANNED_TURNS} turns planned, "
                  f"session {SESSION}\n\n")
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-demo-no-real-key", max_retries=0)
        price = engine.estimator.resolve(MODEL, "openai").price
        # the fake provider bills the request's real input, counted exactly, like the real one
        upstream.bill_input = lambda body: engine.estimator.shape("openai", "/v1/chat/completions", body).input_tokens
        words = ["assert", "failed", "expected", "got", "traceback", "line",
                 "module", "import", "error", "retry", "patch", "diff"]
        messages: list[dict[str, str]] = [{"role": "system", "content": "You are a coding agent. " * 50}]
        spent = sent = refused = would_cost = 0
        held_message = ""
        decision_ids: set[str] = set()
        stopped = False
        tty = out.isatty()
        for turn in range(PLANNED_TURNS):
            tool_output = " ".join(rng.choice(words) for _ in range(rng.randint(900, 2_800)))
            messages.append({"role": "user", "content": f"step {turn} tool output: {tool_output}"})
            if len(messages) > 120:  # the agent compacts its history, as real ones do
                del messages[1:60]
            completion = rng.randint(1_500, 6_000)
            upstream.completion_tokens = completion
            context = upstream.bill_input({"model": MODEL, "messages": messages})
            cost = usage_nanos(price, Usage(input=context, output=completion))
            would_cost += cost
            if stopped:
                continue  # the agent gave up; count what the loop would have gone on to spend
            for attempt in range(RETRIES + 1):
                try:
                    client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                   max_tokens=8_000, extra_headers={"X-Spendgate-Session": SESSION})
                except openai.APIStatusError as exc:
                    refused += 1
                    body = exc.response.json()
                    decision_ids.add(body["spendgate"]["decision_id"])
                    if attempt == 0:
                        held_message = body["error"]["message"]
                        out.write(f"\n\nspendgate answered turn {turn + 1} with HTTP {exc.status_code}:\n"
                                  f"  {held_message}\n")
                    continue
                spent += cost
                sent += 1
                messages.append({"role": "assistant", "content": "trying another fix"})
                line = (f"  turn {turn + 1:3d}  spent {fmt_usd(spent):>7}  session-hour "
                        f"{bar(spent / usd_to_nanos(10), 30)} of $10")
                if tty:
                    out.write("\r" + line)
                elif turn % 10 == 0:
                    out.write(line + "\n")
                out.flush()
                break
            else:
                out.write(f"the agent retried {RETRIES} times, got the same answer each time, and stopped\n")
                stopped = True
        out.write("\nsummary\n")
        out.write(f"  requests sent to the provider  {sent}\n")
        out.write(f"  spent                          {fmt_usd(spent)}\n")
        out.write(f"  refused answers                {refused} (one hold: {len(decision_ids)} decision id)\n")
        out.write(f"  the whole loop would have cost {fmt_usd(would_cost)}\n")
        return DemoResult(sent, spent, refused, would_cost, held_message, decision_ids)
    finally:
        bg.close()
        store.close()
