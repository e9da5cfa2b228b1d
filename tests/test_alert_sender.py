"""Alert delivery from the store's outbox to webhooks, over every backend: each alert reaches each
webhook once (with its idempotency key), failures retry with backoff, a restart or a second sender
neither loses nor duplicates an alert, and ``spendgate alerts`` shows the outbox.

A real aiohttp receiver on loopback takes the POSTs; time is driven through ``deliver_due(now=…)``,
never slept."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from spendgate import ledger
from spendgate.cli.main import main
from spendgate.engine import Engine
from spendgate.events import alerts as A
from spendgate.events.sender import MAX_BACKOFF_S, AlertSender, backoff
from spendgate.ledger import AlertMark, Event, Ledger, OutboxAlert
from spendgate.policy import parse
from spendgate.request import Identity, Request

T0 = 1_800_000_000.0
T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def go() -> T:
        return await coro_fn()

    return asyncio.run(go())


# -- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture
def url(backend_url: str) -> str:
    """The store's URL (conftest's ``store`` is opened on it: memory, SQLite, a real Redis)."""
    return backend_url


def threshold_body(rule: str = "team-month", scope: str = "team=ml", threshold: str = "0.8",
                   limit_usd: str = "500") -> str:
    return json.dumps({"type": "threshold", "ts": T0, "rule": rule, "bucket": f"{rule}|{scope}|2026-12",
                       "scope": scope, "window": "month", "decision_id": "d-1", "model": "gpt-4o",
                       "threshold": threshold, "limit_usd": limit_usd, "period": "2026-12"})


def hold_body(decision_id: str = "dec-42") -> str:
    return json.dumps({"type": "hold", "ts": T0, "rule": "session-hourly", "bucket": "session-hourly|session=s1",
                       "scope": "session=s1", "window": "1h", "decision_id": decision_id, "model": "gpt-4o",
                       "estimate_usd": "0.42", "session": "s1", "message": "held: over $5/h",
                       "expires_at": T0 + 600})


def add(store: Ledger, key: str, body: str | None = None, ts: float = T0) -> None:
    store.record(Event(ts, "refused", f"d-{key}", "gpt-4o", "openai", 0), alerts=[AlertMark(key, body or
                                                                                             threshold_body())])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook on loopback: records every POST (headers and JSON body) and answers with the next
    status from ``answers`` (200 once they run out)."""

    def __init__(self, answers: list[int] | None = None, port: int = 0, path: str = "/hook/T0K3N") -> None:
        self.answers = list(answers or [])
        self.got: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.port, self.path = port, path
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.json()))
        status = self.answers.pop(0) if self.answers else 200
        return web.Response(status=status, text="ok" if status < 300 else "upstream broke")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def keys(self) -> list[str]:
        return [body["spendgate"]["alert_key"] for _, body in self.got]


def sender(store: Ledger, hooks: list[str], url: str = "memory://", **kw: Any) -> AlertSender:
    kw.setdefault("rng", random.Random(7))
    return AlertSender(store, hooks, store_url=url, admin_base=kw.pop("admin_base", None), **kw)


def row(store: Ledger, key: str) -> OutboxAlert:
    return next(a for a in store.alerts() if a.key == key)


# -- the pure parts -----------------------------------------------------------------------------

def test_text_of_a_threshold_names_budget_scope_period_percent_and_dollars() -> None:
    r = OutboxAlert("team-month|team=ml|2026-12|0.8", T0, threshold_body())
    assert A.text_of(r, store_url="memory://", admin_base=None) == (
        "spendgate: budget team-month (team=ml, month 2026-12) reached 80% of $500.00")
    tokens = json.dumps({"type": "threshold", "rule": "tok", "scope": "user=ann", "window": "1h",
                         "period": "493827", "threshold": "0.125", "limit_tokens": "1000000"})
    assert A.text_of(OutboxAlert("k", T0, tokens), store_url="memory://", admin_base=None) == (
        "spendgate: budget tok (user=ann, 1h) reached 12.5% of 1,000,000 tokens")


def test_text_of_refused_over_and_a_bad_body() -> None:
    refused = json.dumps({"type": "refused", "rule": "daily", "scope": "user=bo", "window": "day",
                          "period": "2026-12-03", "threshold": "1", "limit_usd": "20", "decision_id": "d9"})
    assert A.text_of(OutboxAlert("k", T0, refused), store_url="memory://", admin_base=None) == (
        "spendgate: budget daily (user=bo, day 2026-12-03) is full at 100% of $20.00: refused a request (decision d9)")
    over = json.dumps({"type": "over", "rule": "watch", "scope": "", "window": "total", "period": "",
                       "limit_usd": "0.5"})
    assert A.text_of(OutboxAlert("k", T0, over), store_url="memory://", admin_base=None) == (
        "spendgate: budget watch (total) went over its limit of $0.5000 (alert-only budget: requests still pass)")
    assert A.text_of(OutboxAlert("k2", T0, "not json"), store_url="memory://", admin_base=None) == (
        "spendgate: alert unknown k2")


def test_a_hold_says_what_is_held_its_id_and_how_to_approve() -> None:
    r = OutboxAlert("hold|dec-42", T0, hold_body())
    store = "redis://:s3cret@10.0.0.5:6379/2?prefix=prod"
    text = A.text_of(r, store_url=store, admin_base="https://guard.example:8443/")
    assert text == (
        "spendgate: request dec-42 held for approval by budget session-hourly (session=s1, 1h) — model gpt-4o, "
        "estimate $0.42, session s1. Approve: spendgate approve dec-42 --store 'redis://:***@10.0.0.5:6379/2?prefix=prod'"
        ' or POST https://guard.example:8443/spendgate/approvals/dec-42 {"approve": true} (admin token)')
    assert "s3cret" not in text
    body = A.webhook_body(r, store_url=store, admin_base=None)
    assert body["spendgate"]["approve_command"] == (
        "spendgate approve dec-42 --store 'redis://:***@10.0.0.5:6379/2?prefix=prod'")
    assert body["spendgate"]["approve_url"] is None
    assert body["spendgate"]["decision_id"] == "dec-42" and body["spendgate"]["expires_at"] == T0 + 600


def test_approve_command_leaves_out_the_default_store_and_redacts_secrets() -> None:
    assert A.approve_command("d1", ledger.default_url()) == "spendgate approve d1"
    assert A.approve_command("d1", "sqlite:///srv/spend.db") == "spendgate approve d1 --store sqlite:///srv/spend.db"
    assert A.approve_command("d1", "redis://app:pw@h:6379/0") == "spendgate approve d1 --store 'redis://app:***@h:6379/0'"
    assert A.approve_command("d1", "redis://h/0?password=pw&prefix=a") == (
        "spendgate approve d1 --store 'redis://h/0?password=***&prefix=a'")


def test_redact_url_dest_id_and_idempotency_key() -> None:
    hook = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
    assert A.redact_url(hook) == "https://hooks.slack.com"
    assert A.redact_url("http://user:pw@[::1]:8080/x?t=1") == "http://[::1]:8080"
    assert A.dest_id(hook) == hashlib.sha256(hook.encode()).hexdigest()[:12]
    r = OutboxAlert("team-month|team=ml|2026-12|0.8", T0, "{}")
    assert A.idempotency_key(r) == hashlib.sha256(r.key.encode()).hexdigest()[:32]


def test_webhook_body_is_slack_text_plus_the_facts_and_keys() -> None:
    r = OutboxAlert("team-month|team=ml|2026-12|0.8", T0, threshold_body())
    body = A.webhook_body(r, store_url="memory://", admin_base=None)
    assert body == {"text": "spendgate: budget team-month (team=ml, month 2026-12) reached 80% of $500.00",
                    "spendgate": {**json.loads(threshold_body()), "alert_key": r.key,
                                  "idempotency_key": A.idempotency_key(r)}}


def test_backoff_doubles_from_one_second_to_five_minutes_within_ten_percent() -> None:
    rng = random.Random(1)
    for attempts, base in [(1, 1), (2, 2), (3, 4), (5, 16), (9, 256), (10, 300), (60, 300)]:
        for _ in range(20):
            assert base * 0.9 <= backoff(attempts, rng) <= base * 1.1
    assert MAX_BACKOFF_S == 300


# -- delivery over every backend ----------------------------------------------------------------

def test_each_alert_is_delivered_once_with_its_body_and_key(store: Ledger, url: str) -> None:
    add(store, "team-month|team=ml|2026-12|0.8")
    add(store, "hold|dec-42", hold_body(), ts=T0 + 1)

    async def go() -> Receiver:
        async with Receiver() as rx:
            s = sender(store, [rx.url], url)
            assert await s.deliver_due(now=T0 + 2) == 2
            assert await s.deliver_due(now=T0 + 10_000) == 0  # sent: never again
        return rx

    rx = run(go)
    assert rx.keys() == ["team-month|team=ml|2026-12|0.8", "hold|dec-42"]  # oldest first
    for headers, body in rx.got:
        key = body["spendgate"]["alert_key"]
        idem = hashlib.sha256(key.encode()).hexdigest()[:32]
        assert headers["Idempotency-Key"] == idem == body["spendgate"]["idempotency_key"]
        assert headers["Content-Type"] == "application/json"
    assert rx.got[0][1]["text"] == "spendgate: budget team-month (team=ml, month 2026-12) reached 80% of $500.00"
    hold = rx.got[1][1]
    assert "dec-42" in hold["text"] and hold["spendgate"]["approve_command"] in hold["text"]
    expected_cmd = "spendgate approve dec-42" + ("" if url == "memory://" else " --store ")
    assert hold["spendgate"]["approve_command"].startswith(expected_cmd)
    for key in ("team-month|team=ml|2026-12|0.8", "hold|dec-42"):
        a = row(store, key)
        assert (a.status, a.attempts, a.sent_at, a.error) == ("sent", 1, T0 + 2, "")
        assert a.done == (A.dest_id(rx.url),)


def test_a_500_is_retried_after_its_backoff_and_delivered_once_more(store: Ledger, url: str) -> None:
    add(store, "k1")

    async def go() -> Receiver:
        async with Receiver(answers=[500, 503]) as rx:
            s = sender(store, [rx.url], url)
            assert await s.deliver_due(now=T0) == 1
            a = row(store, "k1")
            assert (a.status, a.attempts) == ("pending", 1)
            assert a.error == f"http://127.0.0.1:{rx.port}: HTTP 500 upstream broke"
            assert T0 + 0.9 <= a.next_at <= T0 + 1.1  # 1 s ± 10 %
            assert await s.deliver_due(now=T0 + 0.85) == 0  # not yet due
            assert await s.deliver_due(now=T0 + 1.1) == 1
            a = row(store, "k1")
            assert (a.status, a.attempts) == ("pending", 2) and "HTTP 503" in a.error
            assert T0 + 1.1 + 1.8 <= a.next_at <= T0 + 1.1 + 2.2  # 2 s ± 10 %
            assert await s.deliver_due(now=T0 + 1.1 + 1.75) == 0
            assert await s.deliver_due(now=T0 + 3.4) == 1
        return rx

    rx = run(go)
    assert rx.keys() == ["k1", "k1", "k1"]
    assert len({h["Idempotency-Key"] for h, _ in rx.got}) == 1  # every try carries the same key
    a = row(store, "k1")
    assert (a.status, a.attempts, a.sent_at, a.error) == ("sent", 3, T0 + 3.4, "")


def test_receiver_down_then_a_restarted_sender_delivers_everything(store: Ledger, url: str) -> None:
    port = free_port()  # nothing listens: connection refused
    hook = f"http://127.0.0.1:{port}/hook/T0K3N"
    for i in range(3):
        add(store, f"k{i}", ts=T0 + i)

    async def down() -> None:
        s = sender(store, [hook], url)
        assert await s.deliver_due(now=T0 + 5) == 3

    run(down)
    for i in range(3):
        a = row(store, f"k{i}")
        assert (a.status, a.attempts, a.done) == ("pending", 1, ())
        assert f"127.0.0.1:{port}" in a.error and "T0K3N" not in a.error
    assert row(store, "k0").error.startswith(f"http://127.0.0.1:{port}: ClientConnectorError")
    assert "not tried, unreachable" in row(store, "k1").error  # one refusal is enough for this pass

    async def back() -> Receiver:
        async with Receiver(port=port) as rx:
            fresh = sender(store, [hook], url)  # a new process: new owner, nothing in memory
            assert await fresh.deliver_due(now=T0 + 60) == 3
            assert await fresh.deliver_due(now=T0 + 600) == 0
        return rx

    rx = run(back)
    assert rx.keys() == ["k0", "k1", "k2"]
    assert [row(store, f"k{i}").status for i in range(3)] == ["sent"] * 3


def test_two_senders_racing_deliver_each_alert_exactly_once(store: Ledger, url: str) -> None:
    n = 30
    for i in range(n):
        add(store, f"race{i:02d}", ts=T0 + i / 100)
    other = store if url == "memory://" else ledger.open(url)  # memory:// is one process's store

    async def go() -> tuple[Receiver, int, int]:
        async with Receiver() as rx:
            a = sender(store, [rx.url], url, batch=4, owner="a")
            b = sender(other, [rx.url], url, batch=4, owner="b")
            async with aiohttp.ClientSession() as http:
                ha = hb = 0
                while True:
                    ra, rb = await asyncio.gather(a.deliver_due(now=T0 + 10, session=http),
                                                  b.deliver_due(now=T0 + 10, session=http))
                    ha, hb = ha + ra, hb + rb
                    if ra == rb == 0:
                        break
        return rx, ha, hb

    try:
        rx, ha, hb = run(go)
    finally:
        if other is not store:
            other.close()
    assert sorted(rx.keys()) == [f"race{i:02d}" for i in range(n)]  # each once, none twice
    assert ha + hb == n and ha > 0 and hb > 0, (ha, hb)  # both took part, neither took a row twice
    assert all(a.status == "sent" and a.attempts == 1 for a in store.alerts())


def test_one_failing_webhook_does_not_resend_to_the_good_one(store: Ledger, url: str) -> None:
    add(store, "k1")

    async def go() -> tuple[Receiver, Receiver]:
        async with Receiver() as good, Receiver(answers=[500, 500], path="/bad") as bad:
            s = sender(store, [good.url, bad.url], url)
            await s.deliver_due(now=T0)
            a = row(store, "k1")
            assert (a.status, a.attempts, a.done) == ("pending", 1, (A.dest_id(good.url),))
            assert a.error == f"http://127.0.0.1:{bad.port}: HTTP 500 upstream broke"
            await s.deliver_due(now=T0 + 2)
            await s.deliver_due(now=T0 + 10)
        return good, bad

    good, bad = run(go)
    assert good.keys() == ["k1"]
    assert bad.keys() == ["k1", "k1", "k1"]
    a = row(store, "k1")
    assert (a.status, a.attempts, set(a.done)) == ("sent", 3, {A.dest_id(good.url), A.dest_id(bad.url)})


def test_an_alert_undelivered_for_24_hours_fails_with_its_last_error(store: Ledger, url: str) -> None:
    add(store, "old")

    async def go() -> Receiver:
        async with Receiver(answers=[500] * 100) as rx:
            s = sender(store, [rx.url], url)
            await s.deliver_due(now=T0)
            a = row(store, "old")
            assert a.status == "pending" and a.next_at < T0 + 2
            await s.deliver_due(now=T0 + 86_400 - 100)  # still within the day: retried, pending
            a = row(store, "old")
            assert (a.status, a.attempts) == ("pending", 2)
            assert a.next_at <= T0 + 86_400  # the last try is due no later than the deadline
            await s.deliver_due(now=T0 + 86_400)
        return rx

    rx = run(go)
    a = row(store, "old")
    assert (a.status, a.attempts, a.sent_at) == ("failed", 3, None)
    assert a.error == f"http://127.0.0.1:{rx.port}: HTTP 500 upstream broke"
    assert len(rx.got) == 3


def test_without_webhooks_alerts_are_logged(store: Ledger, url: str, caplog: pytest.LogCaptureFixture) -> None:
    add(store, "k1")
    add(store, "hold|dec-42", hold_body(), ts=T0 + 1)
    with caplog.at_level("WARNING", logger="spendgate.alerts"):
        assert run(lambda: sender(store, [], url).deliver_due(now=T0 + 5)) == 2
    assert [(a.key, a.status, a.attempts) for a in store.alerts()] == [("hold|dec-42", "logged", 0),
                                                                       ("k1", "logged", 0)]
    assert "reached 80% of $500.00" in caplog.text and "spendgate approve dec-42" in caplog.text
    assert run(lambda: sender(store, [], url).deliver_due(now=T0 + 50)) == 0


def test_the_hold_body_carries_the_decision_id_and_the_store(store: Ledger, url: str) -> None:
    add(store, "hold|dec-42", hold_body())

    async def go() -> Receiver:
        async with Receiver() as rx:
            s = sender(store, [rx.url], url, admin_base="http://127.0.0.1:8787")
            await s.deliver_due(now=T0)
        return rx

    [(_, body)] = run(go).got
    cmd = A.approve_command("dec-42", url)
    assert cmd.startswith("spendgate approve dec-42" + ("" if url == "memory://" else " --store "))
    assert body["spendgate"]["approve_command"] == cmd and cmd in body["text"]
    assert body["spendgate"]["approve_url"] == "http://127.0.0.1:8787/spendgate/approvals/dec-42"
    assert "dec-42" in body["text"] and "POST http://127.0.0.1:8787/spendgate/approvals/dec-42" in body["text"]


def test_a_claim_another_sender_holds_is_left_alone(store: Ledger, url: str) -> None:
    add(store, "k1")
    [claimed] = store.claim_alerts(T0, "someone-else", 60, 10)

    async def go() -> Receiver:
        async with Receiver() as rx:
            s = sender(store, [rx.url], url)
            assert await s.deliver_due(now=T0 + 30) == 0  # the other's lease is live
            assert await s.deliver_due(now=T0 + 61) == 1  # it lapsed (the other crashed): taken over
        return rx

    assert run(go).keys() == ["k1"]
    assert row(store, "k1").status == "sent"
    assert claimed.key == "k1"


def test_run_delivers_until_cancelled(store: Ledger, url: str) -> None:
    add(store, "k1", ts=0.0)  # due long ago, so the clock's now finds it

    async def go2() -> list[str]:
        delivered = asyncio.Event()

        class Signalling(AlertSender):
            async def deliver_due(self, now: float | None = None,
                                  session: aiohttp.ClientSession | None = None) -> int:
                n = await super().deliver_due(now, session)
                if n:
                    delivered.set()
                return n

        async with Receiver() as rx:
            s = Signalling(store, [rx.url], store_url=url, admin_base=None, max_age_s=1e12)
            task = asyncio.create_task(s.run(poll_s=0.01))
            await asyncio.wait_for(delivered.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return rx.keys()

    assert run(go2) == ["k1"]
    assert row(store, "k1").status == "sent"


def test_an_alert_the_engine_writes_is_delivered_as_a_readable_line(store: Ledger, url: str) -> None:
    engine = Engine(parse({"budget": [{"name": "team-day", "usd": "0.002", "window": "day", "per": "team",
                                       "alert_at": [0.5]}]}), store)
    d = engine.decide(Request("openai", "/v1/chat/completions",
                              {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
                              Identity(user="alice", team="ml")))
    engine.capture(d, {"usage": {"prompt_tokens": 10, "completion_tokens": 100}})
    [written] = store.alerts()
    fact = json.loads(written.body)
    assert (fact["type"], fact["threshold"], fact["limit_usd"], fact["scope"]) == ("threshold", "0.5", "0.002",
                                                                                   "team=ml")

    async def go() -> Receiver:
        async with Receiver() as rx:
            assert await sender(store, [rx.url], url).deliver_due(now=written.created + 1) == 1
        return rx

    [(headers, body)] = run(go).got
    assert body["text"] == f"spendgate: budget team-day (team=ml, day {fact['period']}) reached 50% of $0.0020"
    assert body["spendgate"] == {**fact, "alert_key": written.key, "idempotency_key": headers["Idempotency-Key"]}
    assert row(store, written.key).status == "sent"


# -- spendgate alerts ---------------------------------------------------------------------------

def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture
def outbox(tmp_path: Path) -> str:
    """A SQLite store with a sent, a pending (retrying) and a failed alert."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = ledger.open(url)
    try:
        add(store, "team-month|team=ml|2026-12|0.8", ts=T0)
        add(store, "hold|dec-42", hold_body(), ts=T0 + 1)
        add(store, "team-month|team=ml|2026-12|1", threshold_body(threshold="1"), ts=T0 + 2)
        [a, b, c] = store.claim_alerts(T0 + 3, "t", 60, 10)
        assert store.update_alert(a.key, "t", status="sent", attempts=1, next_at=T0 + 3, done=("abc",),
                                  sent_at=T0 + 3)
        assert store.update_alert(b.key, "t", status="pending", attempts=2, next_at=4_000_000_000.0,
                                  error="https://hooks.slack.com: HTTP 500 upstream broke")
        assert store.update_alert(c.key, "t", status="failed", attempts=9, next_at=T0 + 3,
                                  error="https://hooks.slack.com: timed out")
    finally:
        store.close()
    return url


def test_alerts_cli_json(outbox: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "alerts", "--store", outbox, "--json")
    assert code == 0
    doc = json.loads(out)
    assert [(a["key"], a["status"], a["attempts"]) for a in doc["alerts"]] == [
        ("team-month|team=ml|2026-12|1", "failed", 9), ("hold|dec-42", "pending", 2),
        ("team-month|team=ml|2026-12|0.8", "sent", 1)]
    failed, pending, sent = doc["alerts"]
    assert sent == {"key": "team-month|team=ml|2026-12|0.8", "created": T0, "status": "sent", "attempts": 1,
                    "next_at": None, "error": "", "sent_at": T0 + 3, "done": ["abc"],
                    "body": json.loads(threshold_body())}
    assert pending["next_at"] == 4_000_000_000.0 and pending["body"]["decision_id"] == "dec-42"
    assert failed["error"] == "https://hooks.slack.com: timed out" and failed["body"]["threshold"] == "1"
    code, out = _cli(capsys, "alerts", "--store", outbox, "--json", "--status", "pending")
    assert [a["key"] for a in json.loads(out)["alerts"]] == ["hold|dec-42"]


def test_alerts_cli_table(outbox: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, "alerts", "--store", outbox)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["created", "status", "attempts", "type", "about", "threshold", "last", "error",
                                "next", "try"]
    failed, pending, sent = lines[2:]
    assert failed.split()[2:] == ["failed", "9", "threshold", "team-month", "team=ml", "100%",
                                  "https://hooks.slack.com:", "timed", "out", "-"]
    assert pending.split()[2:8] == ["pending", "2", "hold", "decision", "dec-42", "-"]
    assert "HTTP 500 upstream broke" in pending
    assert pending.endswith(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(4_000_000_000.0)))
    assert sent.split()[2:] == ["sent", "1", "threshold", "team-month", "team=ml", "80%", "-", "-"]
    code, out = _cli(capsys, "alerts", "--store", outbox, "--status", "logged")
    assert (code, out) == (0, "no logged alerts\n")


def test_client_chosen_text_cannot_page_a_channel_or_forge_a_link() -> None:
    body = json.loads(threshold_body())
    body["scope"] = "session=<!channel> <https://evil.example|Approve> & more"
    out = A.webhook_body(OutboxAlert("k", T0, json.dumps(body)), store_url="memory://", admin_base=None)
    assert "<" not in out["text"] and ">" not in out["text"]
    assert "&lt;!channel&gt; &lt;https://evil.example|Approve&gt; &amp; more" in out["text"]
    assert out["spendgate"]["scope"] == body["scope"], "the structured facts stay as they are"
