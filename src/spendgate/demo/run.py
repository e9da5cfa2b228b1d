"""The demo: a built-in fake upstream, the real proxy, a simulated runaway agent, the guard holding it.

Everything runs on loopback; no API key, no network, nothing left behind (a ``memory://`` store).
The agent speaks the OpenAI chat API to the proxy over plain HTTP (the standard library's client),
as any agent would, so the demo runs on an install without the ``clients`` extra. Its conversation
grows each turn, as a coding agent's does, until the default ``session-hour`` budget ($10 per
session per rolling hour) holds it.

The hold's refusal names how to approve it; the demo's store lives in memory and ends with the demo,
so that sentence is replaced by one saying so (a hint that cannot work is not printed).
"""

from __future__ import annotations

import io
import json as jsonlib
import random
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

from spendgate import ledger
from spendgate.demo.background import BackgroundLoop
from spendgate.demo.upstream import FakeUpstream
from spendgate.engine import Engine
from spendgate.money import fmt_usd, nanos_to_usd, usd_to_nanos
from spendgate.policy import default_policy
from spendgate.pricing.cost import Usage, usage_nanos
from spendgate.progress import text_bar
from spendgate.proxy.app import Proxy, ProxyConfig

MODEL = "gpt-5"
SESSION = "demo-agent-7f3a"
PLANNED_TURNS = 400
RETRIES = 3  # what an agent does on an error before giving up
API_KEY = "sk-demo-no-real-key"
IN_MEMORY_NOTE = ("(the demo's store lives in memory and ends with it, so this hold cannot be approved; "
                  "served with --store, the refusal names the `spendgate approve` command that reaches it)")
_SENTENCE = re.compile(r"(?<=\.)\s+(?=[A-Z])")


@dataclass
class DemoResult:
    turns_sent: int
    spent_nanos: int
    refused: int
    would_have_cost_nanos: int
    held_message: str
    decision_ids: set[str]
    held_at_turn: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The summary as ``spendgate demo --json`` prints it (amounts as exact decimal strings)."""
        return {"model": MODEL, "session": SESSION, "budget": "session-hour", "budget_usd": "10",
                "planned_turns": PLANNED_TURNS, "requests_sent": self.turns_sent,
                "spent_usd": str(nanos_to_usd(self.spent_nanos)), "refused": self.refused,
                "decision_ids": sorted(self.decision_ids), "held_at_turn": self.held_at_turn,
                "held_message": self.held_message,
                "would_have_cost_usd": str(nanos_to_usd(self.would_have_cost_nanos))}


class _Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def _chat(opener: urllib.request.OpenerDirector, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One chat completion through the proxy, as an agent's HTTP client sends it; an error status
    raises :class:`_Refused` with the JSON body the proxy answered."""
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=jsonlib.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                                          "X-Spendgate-Session": SESSION})
    try:
        with opener.open(req, timeout=60) as r:
            doc: dict[str, Any] = jsonlib.loads(r.read())
            return doc
    except urllib.error.HTTPError as exc:
        with exc:
            raise _Refused(exc.code, jsonlib.loads(exc.read())) from None


def without_approve_hint(message: str) -> str:
    """The refusal without its sentence on approving the hold, which the demo's in-memory store
    cannot honour once the demo ends."""
    return " ".join(s for s in _SENTENCE.split(message) if "approve" not in s.lower())


def run(out: TextIO | None = None, seed: int = 7, *, json: bool = False) -> DemoResult:
    """Run the demo, writing its progress and summary to ``out`` (stdout by default); with ``json``,
    only one JSON document with the summary (:meth:`DemoResult.as_dict`) is written."""
    out = out or sys.stdout
    text: TextIO = io.StringIO() if json else out  # under --json stdout holds one JSON document
    # loopback only: no proxy from the environment between the agent and the guard
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    rng = random.Random(seed)
    bg = BackgroundLoop()
    upstream = FakeUpstream()
    store = ledger.open("memory://")
    engine = Engine(default_policy(), store)
    try:
        up_url = f"http://127.0.0.1:{bg.serve(upstream.app())}"
        proxy = Proxy(engine, ProxyConfig(upstreams={"openai": up_url, "anthropic": up_url}))
        url = f"http://127.0.0.1:{bg.serve(proxy.app())}"
        text.write(f"fake upstream on {up_url}; spendgate proxy on {url} (default policy, memory store)\n")
        text.write(f"a coding agent starts looping on {MODEL}, {PLANNED_TURNS} turns planned, "
                  f"session {SESSION}\n\n")
        price = engine.estimator.resolve(MODEL, "openai").price
        # the fake provider bills the request's real input, counted exactly, like the real one
        upstream.bill_input = lambda body: engine.estimator.shape("openai", "/v1/chat/completions", body).input_tokens
        words = ["assert", "failed", "expected", "got", "traceback", "line",
                 "module", "import", "error", "retry", "patch", "diff"]
        messages: list[dict[str, str]] = [{"role": "system", "content": "You are a coding agent. " * 50}]
        spent = sent = refused = would_cost = 0
        held_message = ""
        held_at: int | None = None
        decision_ids: set[str] = set()
        stopped = False
        tty = text.isatty()
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
                    _chat(opener, url, {"model": MODEL, "messages": messages, "max_tokens": 8_000})
                except _Refused as exc:
                    refused += 1
                    decision_ids.add(exc.body["spendgate"]["decision_id"])
                    if attempt == 0:
                        held_message, held_at = without_approve_hint(exc.body["error"]["message"]), turn + 1
                        text.write(f"\n\nspendgate answered turn {turn + 1} with HTTP {exc.status}:\n"
                                   f"  {held_message}\n  {IN_MEMORY_NOTE}\n")
                    continue
                spent += cost
                sent += 1
                messages.append({"role": "assistant", "content": "trying another fix"})
                line = (f"  turn {turn + 1:3d}  spent {fmt_usd(spent):>7}  session-hour "
                        f"{text_bar(spent / usd_to_nanos(10), 30)} of $10")
                if tty:
                    text.write("\r" + line)
                elif turn % 10 == 0:
                    text.write(line + "\n")
                text.flush()
                break
            else:
                text.write(f"the agent retried {RETRIES} times, got the same answer each time, and stopped\n")
                stopped = True
        result = DemoResult(sent, spent, refused, would_cost, held_message, decision_ids, held_at)
        if json:
            out.write(jsonlib.dumps(result.as_dict(), indent=2) + "\n")
            return result
        out.write("\nsummary\n")
        out.write(f"  requests sent to the provider  {sent}\n")
        out.write(f"  spent                          {fmt_usd(spent)}\n")
        out.write(f"  refused answers                {refused} (one hold: {len(decision_ids)} decision id)\n")
        out.write(f"  the whole loop would have cost {fmt_usd(would_cost)}\n")
        return result
    finally:
        bg.close()
        store.close()

