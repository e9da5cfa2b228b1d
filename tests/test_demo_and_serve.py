"""`spendgate demo` end to end, and `spendgate serve` as a real process."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

from spendgate.demo.run import RETRIES, run
from spendgate.money import usd_to_nanos
from tests.harness import Servers, start_serve


def test_demo_holds_the_runaway_agent_at_the_session_budget() -> None:
    out = io.StringIO()
    result = run(out)
    assert result.turns_sent > 20
    assert 0 < result.spent_nanos <= usd_to_nanos(10)
    assert result.refused == RETRIES + 1 and len(result.decision_ids) == 1, "retries got the same cheap answer"
    assert result.would_have_cost_nanos > 5 * result.spent_nanos
    text = out.getvalue()
    assert "session-hour" in text and "spendgate approve" in text and "summary" in text


def test_serve_runs_on_the_embedded_defaults_and_guards(tmp_path: Path) -> None:
    from spendgate.policy import default_policy

    upstream = Servers(default_policy(), "memory://")  # only its fake upstream is used
    proc, port = start_serve(tmp_path, upstream.upstream_port)
    try:
        body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and "x-spendgate-estimate-usd" in {k.lower() for k in r.headers}
        assert (tmp_path / ".spendgate" / "spendgate.db").exists(), "the embedded default store is SQLite"
        assert upstream.mock.reached() == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        upstream.close()


def test_serve_with_two_workers_on_the_embedded_defaults_answers_from_both(tmp_path: Path) -> None:
    from spendgate.policy import default_policy

    upstream = Servers(default_policy(), "memory://")  # only its fake upstream is used
    proc, port = start_serve(tmp_path, upstream.upstream_port, "--workers", "2")
    try:
        body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        served: set[str] = set()
        for _ in range(40):  # each call on a new connection, which the kernel gives to either worker
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x"})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200
                served.add(r.headers["X-Spendgate-Worker"])
            if served == {"1", "2"}:
                break
        assert served == {"1", "2"}
        assert (tmp_path / ".spendgate" / "spendgate.db").exists(), "both share the embedded default store"
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        upstream.close()
