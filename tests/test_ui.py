"""The dashboard at ``/ui`` in a real browser: Playwright driving Debian's chromium against a real
``spendgate serve`` process over the fake upstream, with the official ``openai`` client making the
requests. Screenshots of every page go to ``$SPENDGATE_ARTIFACTS`` (else the test's tmp dir)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from spendgate.policy import default_policy
from tests.harness import Servers, start_serve
from tests.test_audit_alerts_serve import BILLED, O1, POLICY

CHROMIUM = os.environ.get("SPENDGATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "ui-admin-token"

PAGES = ("/ui/", "/ui/budgets", "/ui/approvals", "/ui/decisions", "/ui/keys")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: install Debian's chromium (scripts/test.sh does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def artifacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    base = os.environ.get("SPENDGATE_ARTIFACTS")
    out = Path(base) / request.node.name if base else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


class Serve:
    """``spendgate serve`` with the admin token, over SQLite, and an openai client through it."""

    def __init__(self, tmp: Path, upstream: Servers, policy: str = POLICY) -> None:
        self.home = tmp
        (tmp / "spendgate.toml").write_text(policy)
        self.args = ["--store", f"sqlite:///{tmp / 'spend.db'}", "--config", str(tmp / "spendgate.toml")]
        self.proc, self.port = start_serve(tmp, upstream.upstream_port, *self.args, "--admin-token", TOKEN)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="sk-client", max_retries=0,
                                    default_headers={"x-mock-usage": BILLED})

    def ask(self, user: str = "alice", **over: Any) -> tuple[int, str]:
        """(status, decision id) of one chat completion through the official client."""
        try:
            r = self.client.chat.completions.with_raw_response.create(
                **{**O1, **over}, extra_headers={"X-Spendgate-User": user})
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("x-spendgate-decision", "")
        return r.http_response.status_code, r.headers.get("x-spendgate-decision", "")

    def cli(self, *args: str) -> Any:
        env = {**os.environ, "HOME": str(self.home), "SPENDGATE_HOME": str(self.home / ".spendgate")}
        done = subprocess.run([sys.executable, "-m", "spendgate.cli.main", *args, *self.args], capture_output=True,
                              text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def served(tmp_path: Path, upstream: Servers) -> Iterator[Serve]:
    s = Serve(tmp_path, upstream)
    yield s
    s.stop()


def sign_in(context: BrowserContext, s: Serve) -> Page:
    page = context.new_page()
    page.goto(f"{s.url}/ui/login")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{s.url}/ui/")
    return page


def shoot(page: Page, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def test_login_refuses_a_wrong_token_and_the_cookie_is_not_the_token(
        browser: Browser, served: Serve, artifacts: Path) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{served.url}/ui/budgets")
    expect(page).to_have_url(f"{served.url}/ui/login")  # not signed in: to the form
    page.fill("#token", "not-the-token")
    with page.expect_response(f"{served.url}/ui/login") as answer:
        page.click("button[type=submit]")
    assert answer.value.status == 401
    expect(page.get_by_role("alert")).to_have_text("That is not the admin token.")
    assert context.cookies() == []
    shoot(page, artifacts, "login-refused")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{served.url}/ui/")
    [cookie] = context.cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"] and len(cookie["value"]) == 64
    for path in PAGES:  # every page opens with the cookie, and none carries the token in its URL
        r = page.goto(f"{served.url}{path}")
        assert r is not None and r.status == 200, path
        assert TOKEN not in page.url and TOKEN not in page.content()
    # a state-changing call without the page's CSRF token, or from another origin, is refused
    assert page.request.post(f"{served.url}/ui/keys", form={"user": "mallory"}).status == 403
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    other = page.request.post(f"{served.url}/ui/keys", form={"user": "mallory", "csrf": csrf},
                              headers={"Origin": "https://evil.example"})
    assert other.status == 403
    page.goto(f"{served.url}/ui/keys")
    expect(page.locator("tbody tr")).to_have_count(0)
    # signing out ends the session
    page.click(".logout button")
    expect(page).to_have_url(f"{served.url}/ui/login")
    assert page.request.get(f"{served.url}/ui/approvals/rows").status == 401
    context.close()


def test_budgets_approvals_live_feed_and_csv(browser: Browser, served: Serve, artifacts: Path) -> None:
    s = served
    assert s.ask()[0] == 200
    assert s.ask()[0] == 200  # alice: $2.403 of her $3 day
    assert s.ask(max_tokens=10_000)[0] == 402  # a $6.00135 worst case: per-call blocks
    context = browser.new_context(accept_downloads=True)
    page = sign_in(context, s)

    # the overview's numbers: two requests charged, one refused, all billed (none estimated)
    expect(page.get_by_test_id("total")).to_have_text("$2.40")
    expect(page.get_by_test_id("forwarded")).to_have_text("2")
    expect(page.get_by_test_id("refused")).to_have_text("1")
    expect(page.get_by_test_id("estimated-share")).to_have_text("0.0%")
    assert page.locator(".chart .wide svg").count() == 2 and page.locator(".chart .narrow svg").count() == 2
    assert page.locator(".chart .narrow").first.is_hidden()
    shoot(page, artifacts, "overview")

    # the budget bar's numbers are status --json's
    st = s.cli("status", "--json")
    [bucket] = [b for b in st["buckets"] if b["bucket"].startswith("user-day")]
    assert (bucket["spent"], bucket["held"], bucket["limit"]) == ("2.403", "0", "3")
    page.goto(f"{s.url}/ui/budgets")
    card = page.locator(f"li.budget[data-bucket='{bucket['bucket']}']")
    for field in ("spent", "held", "limit", "granted"):
        expect(card.locator(f"dd[data-field={field}]")).to_have_text(f"${bucket[field]}")
    assert card.locator(".bar .spent").get_attribute("style") == "width: 80.1%"
    shoot(page, artifacts, "budgets")

    # the decision feed, open while a refusal happens elsewhere
    feed = context.new_page()
    feed.goto(f"{s.url}/ui/decisions")
    expect(feed.get_by_test_id("live")).to_have_text("live")
    expect(feed.locator("#feed tr")).to_have_count(1)
    assert s.ask("bob", max_tokens=10_000)[0] == 402
    bob = feed.locator("#feed tr", has_text="bob")
    expect(bob).to_have_count(1)
    expect(bob).to_contain_text("blocked by per-call: estimate $6.00135 with $0 already used of $5")

    # a held request, approved from the Approvals page; the client's retry goes through
    status, held = s.ask()  # $2.403 + $1.21 > $3: held
    assert status == 402 and held
    page.goto(f"{s.url}/ui/approvals")
    hold = page.locator(f"article[data-hold='{held}']")
    expect(hold).to_contain_text("o1-pro")
    expect(hold).to_contain_text("user-day")
    shoot(page, artifacts, "approvals")
    hold.get_by_role("button", name="Approve once").click()
    expect(page.get_by_role("status")).to_contain_text(f"Hold {held}: approved-once")
    expect(page.locator("article.hold")).to_have_count(0)
    assert s.ask()[0] == 200
    expect(feed.locator("#feed tr", has_text="held for approval by user-day")).to_have_count(1)
    expect(feed.locator("#feed tr", has_text="approved by dashboard")).to_have_count(1)
    shoot(feed, artifacts, "decisions")

    # the CSV of the current view: a reload lists what the feed showed live, and the file has those rows
    feed.goto(f"{s.url}/ui/decisions")
    shown = feed.locator("#feed tr").count()
    with feed.expect_download() as dl:
        feed.get_by_test_id("csv").click()
    rows = list(csv.DictReader(Path(dl.value.path()).read_text().splitlines()))
    assert len(rows) == shown == 4
    assert Counter((r["kind"], r["rule"], r["user"]) for r in rows) == Counter({
        ("block", "per-call", "alice"): 1, ("block", "per-call", "bob"): 1, ("hold", "user-day", "alice"): 1,
        ("approval", "user-day", ""): 1})
    # filtered to bob, the export has bob's refusal only
    feed.goto(f"{s.url}/ui/decisions?user=bob")
    with feed.expect_download() as dl:
        feed.get_by_test_id("csv").click()
    [only] = list(csv.DictReader(Path(dl.value.path()).read_text().splitlines()))
    assert (only["kind"], only["rule"], only["user"], only["model"]) == ("block", "per-call", "bob", "o1-pro")
    assert only["message"] == "blocked by per-call: estimate $6.00135 with $0 already used of $5"

    # keys: create (the secret shown once), listed, revoked
    page.goto(f"{s.url}/ui/keys")
    page.fill("input[name=user]", "carol")
    page.fill("input[name=team]", "search")
    page.fill("input[name=tags]", "feature=summaries")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_test_id("secret").inner_text()
    assert secret.startswith("sg-")
    listed = s.cli("keys", "list", "--json")
    [key] = listed["keys"] if isinstance(listed, dict) else listed
    row = page.locator(f"tr[data-key='{key['id']}']")
    expect(row).to_contain_text("carol")
    expect(row).to_contain_text("feature=summaries")
    shoot(page, artifacts, "keys")
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator(f"tr[data-key='{key['id']}']")).to_have_count(0)

    # a phone-width look at the overview and the approvals page
    phone = browser.new_context(viewport={"width": 390, "height": 844}, storage_state=context.storage_state())
    small = phone.new_page()
    small.goto(f"{s.url}/ui/")
    assert small.evaluate("document.documentElement.scrollWidth") <= 390
    assert small.locator(".chart .wide").first.is_hidden()  # the chart drawn for a phone's width instead
    shoot(small, artifacts, "overview-phone")
    small.goto(f"{s.url}/ui/budgets")
    assert small.evaluate("document.documentElement.scrollWidth") <= 390
    shoot(small, artifacts, "budgets-phone")
    phone.close()
    context.close()


def _seed_day(db: Path, now: float) -> int:
    """A day of history written straight to the store before serve starts, as a team's traffic
    leaves it: three teams, five users, four models, a feature tag, a few estimated charges and
    refusals. Returns the dollars charged, in nanos."""
    from spendgate import ledger
    from spendgate.ledger import Event

    people = [("alice", "search", "summaries"), ("bob", "search", "rerank"), ("chen", "support", "replies"),
              ("dana", "support", "replies"), ("eve", "research", "agents")]
    models = [("gpt-4o-mini", "openai", 1_350_000), ("gpt-4o", "openai", 42_500_000),
              ("claude-sonnet-4-5", "anthropic", 61_500_000), ("o1-pro", "openai", 1_201_500_000)]
    store = ledger.open(f"sqlite:///{db}")
    total = 0
    try:
        for hour in range(23, 0, -1):
            ts = now - hour * 3600
            for i, (user, team, feature) in enumerate(people):
                busy = 2 + (hour * 7 + i * 3) % 6  # an uneven day: quiet nights, busy afternoons
                for j in range(busy):
                    agent_run = user == "eve" and j == 0 and hour % 4 == 1  # now and then, an o1-pro agent step
                    model, provider, cost = models[3 if agent_run else (i + j + hour) % 3]
                    dims = {"key": f"key-{user}", "user": user, "team": team, "feature": feature,
                            "env": "staging" if j % 5 == 4 else "prod"}
                    estimated = (i + j + hour) % 17 == 0
                    store.record(Event(ts + i * 60 + j, "capture", f"d{hour}-{i}-{j}", model, provider, cost,
                                       1200, 300, estimated, dims))
                    total += cost
            if hour % 5 == 0:
                store.record(Event(ts + 900, "block", f"b{hour}", "o1-pro", "openai", 0, dims={
                    "key": "key-eve", "user": "eve", "team": "research", "feature": "agents"}, rule="per-call",
                    amounts={"estimate_usd": 6_001_350_000, "limit_usd": 5_000_000_000, "used_usd": 0,
                             "request_usd": 6_001_350_000}))
    finally:
        store.close()
    return total


def test_overview_of_a_day_matches_report(browser: Browser, tmp_path: Path, upstream: Servers,
                                          artifacts: Path) -> None:
    """The overview's totals are ``report --json``'s to the cent; its screenshot is the README's
    (written to ``$SPENDGATE_DOCS_SCREENSHOT`` when set)."""
    import time

    _seed_day(tmp_path / "spend.db", time.time())
    s = Serve(tmp_path, upstream, POLICY.replace("usd = 3\n", "usd = 30\n"))
    try:
        for user in ("alice", "bob"):
            assert s.ask(user)[0] == 200
        assert s.ask("eve", max_tokens=10_000)[0] == 402
        rep = s.cli("report", "--json", "--since", "24h", "--by", "model")
        total = sum(Decimal(r["usd"]) for r in rep["rows"])
        charged = sum(r["requests"] for r in rep["rows"])
        refused = sum(r["refused"] for r in rep["rows"])
        context = browser.new_context(viewport={"width": 1180, "height": 900})
        page = sign_in(context, s)
        expect(page.get_by_test_id("total")).to_have_text(f"${total:,.2f}")
        expect(page.get_by_test_id("forwarded")).to_have_text(str(charged))
        expect(page.get_by_test_id("refused")).to_have_text(str(refused))
        by_team = page.locator("table", has=page.locator("caption", has_text="by team"))
        expect(by_team.locator("tbody tr")).to_have_count(4)  # three teams and the live requests' "(none)"
        expect(page.locator("table", has=page.locator("caption", has_text="by feature"))).to_have_count(1)
        env = page.locator("table", has=page.locator("caption", has_text="by tag env"))
        expect(env.locator("tbody td:first-child")).to_have_text(["prod", "staging"])
        shoot(page, artifacts, "overview-day")
        docs = os.environ.get("SPENDGATE_DOCS_SCREENSHOT")
        if docs:
            page.screenshot(path=docs, full_page=True)
        page.goto(f"{s.url}/ui/?step=hour&stack=provider")
        shoot(page, artifacts, "overview-day-by-provider")
        page.goto(f"{s.url}/ui/budgets")
        shoot(page, artifacts, "budgets-day")
        context.close()
    finally:
        s.stop()


def test_approvals_list_updates_live_and_max_and_deny_answer_holds(
        browser: Browser, served: Serve, artifacts: Path) -> None:
    s = served
    context = browser.new_context()
    page = sign_in(context, s)
    page.goto(f"{s.url}/ui/approvals")
    expect(page.locator(".empty")).to_have_text("Nothing is waiting for approval.")
    for user in ("bob", "chen"):
        assert s.ask(user)[0] == 200
        assert s.ask(user)[0] == 200
    status, bobs = s.ask("bob")  # $2.403 + $1.21 > $3: held
    assert status == 402
    status, chens = s.ask("chen")
    assert status == 402
    # the open page lists both without a reload
    expect(page.locator("article.hold")).to_have_count(2)
    shoot(page, artifacts, "approvals-two")
    bob = page.locator(f"article[data-hold='{bobs}']")
    bob.locator("input[name=max_usd]").fill("5")
    bob.get_by_role("button", name="Approve with max").click()
    expect(page.get_by_role("status")).to_contain_text(f"Hold {bobs}: approved")
    page.locator(f"article[data-hold='{chens}']").get_by_role("button", name="Deny").click()
    expect(page.get_by_role("status")).to_contain_text(f"Hold {chens}: denied")
    expect(page.locator("article.hold")).to_have_count(0)
    assert s.ask("bob")[0] == 200  # $5 more headroom for bob's day
    assert s.ask("chen")[0] == 402  # a denied request stays refused
    # the $5 granted shows on bob's budget as status --json has it
    st = s.cli("status", "--json")
    [bucket] = [b for b in st["buckets"] if b["bucket"].startswith("user-day|user=bob")]
    assert (bucket["granted"], bucket["limit"]) == ("5", "8")
    page.goto(f"{s.url}/ui/budgets")
    card = page.locator(f"li.budget[data-bucket='{bucket['bucket']}']")
    expect(card.locator("dd[data-field=granted]")).to_have_text("$5")
    expect(card.locator("dd[data-field=limit]")).to_have_text("$8")
    expect(card.locator("dd[data-field=spent]")).to_have_text(f"${bucket['spent']}")
    shoot(page, artifacts, "budgets-granted")
    context.close()


# -- without a browser: the numbers behind the pages, and the guard over HTTP ----------------------

def _ev(ts: float, kind: str, model: str = "gpt-4o", cost: int = 0, **dims: str) -> Any:
    from spendgate.ledger import Event

    return Event(ts, kind, f"d{ts}", model, "openai", cost, dims=dims)


def test_overview_buckets_stacks_and_tops() -> None:
    from spendgate.proxy.ui.data import overview

    now = 10 * 86400 + 5 * 3600 + 30  # 05:00:30 on day 10
    models = [f"m{i}" for i in range(8)]  # eight models: six named, the two cheapest as "other"
    events = [_ev(now - 3600 * 2, "capture", m, (i + 1) * 1_000_000, user="u1", env="prod")
              for i, m in enumerate(models)]
    events += [_ev(now - 10, "capture", "m7", 5_000_000, user="u2"), _ev(now - 5, "block", "m7", user="u2"),
               _ev(now - 2, "approval"), _ev(now - 90000, "capture", "m0", 10**9)]  # the last: out of the window
    o = overview(events, now, 86400, 3600, "model")
    assert len(o.labels) == 25 and o.labels[-1] == "01-11 05:00"
    assert list(o.spend) == ["m7", "m6", "m5", "m4", "m3", "m2", "other"]  # dearest first
    assert o.spend["m7"][-1] == 5_000_000 and o.spend["m7"][-3] == 8_000_000
    assert o.spend["other"][-3] == 3_000_000  # m0 ($0.001) + m1 ($0.002)
    assert (o.requests, o.refusals, o.total_nanos) == (9, 1, 41_000_000)
    assert o.forwarded[-1] == 1 and o.refused[-1] == 1 and o.forwarded[-3] == 8
    assert o.top["user"] == [("u1", 8, 36_000_000), ("u2", 1, 5_000_000)]
    assert o.top["tag env"] == [("prod", 8, 36_000_000)]
    assert "team" not in o.top  # nobody set a team: no table of "(none)"


def test_budget_rows_feed_messages_and_filters() -> None:
    from spendgate.ledger import Bucket, BucketState, Event
    from spendgate.proxy.ui.data import budget_rows, feed, message

    b = Bucket("user-day|user=alice|2026-12-03", 3 * 10**9, None, "usd", ends_at=1_796_342_400.0)
    [row] = budget_rows([(b, BucketState(b.key, "usd", 3 * 10**9, 2_403_000_000, 500_000_000, 10**9))])
    assert (row.spent, row.held, row.limit, row.granted) == ("2.403", "0.5", "4", "1")
    assert (row.spent_pct, row.held_pct, row.window, row.resets) == (60.08, 12.5, "calendar period",
                                                                     "2026-12-04 00:00 UTC")
    block = Event(1.0, "block", "d1", "o1-pro", "openai", 0, dims={"user": "bob", "key": "k1"}, rule="per-call",
                  amounts={"estimate_usd": 6_001_350_000, "limit_usd": 5 * 10**9, "used_usd": 0})
    clamp = Event(2.0, "clamp", "d2", "gpt-4o", "openai", 0, dims={"user": "ann", "edits": "max_tokens 4096→512"},
                  rule="tight")
    assert message(block) == "blocked by per-call: estimate $6.00135 with $0 already used of $5"
    assert message(clamp) == "clamp by tight: max_tokens 4096→512"
    events = [block, clamp, _ev(3.0, "capture", user="bob")]
    assert feed(events, {}) == [block, clamp]
    assert feed(events, {"user": "bob"}) == [block]
    assert feed(events, {"rule": "tight", "model": "gpt-4o"}) == [clamp]
    assert feed(events, {"key": "k2"}) == []


def test_the_guard_over_http_without_a_browser() -> None:
    import httpx

    from spendgate.proxy.ui import auth
    from spendgate.proxy.ui.routes import _csv_cell

    assert [_csv_cell(v) for v in ("=HYPERLINK(1)", "+1", "-x", "@a", "plain")] == \
        ["'=HYPERLINK(1)", "'+1", "'-x", "'@a", "plain"]
    off = Servers(default_policy(), "memory://", admin_token=None)
    on = Servers(default_policy(), "memory://", admin_token=TOKEN)
    try:
        r = httpx.get(f"{off.url}/ui/login")
        assert r.status_code == 403 and "The dashboard is off" in r.text
        r = httpx.get(f"{on.url}/ui/budgets", headers={"accept": "text/html"})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login")
        assert httpx.get(f"{on.url}/ui/decisions.csv").status_code == 401
        bearer = {"authorization": f"Bearer {TOKEN}"}
        r = httpx.get(f"{on.url}/ui/decisions.csv", headers=bearer)  # a script may use the admin header
        assert r.status_code == 200 and r.text == ",".join(
            ("time", "kind", "rule", "user", "key", "model", "provider", "bucket", "decision_id", "message")) + "\n"
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert httpx.get(f"{on.url}/ui/decisions?seconds=-1", headers=bearer).status_code == 400
        r = httpx.get(f"{on.url}/ui/?stack=colour", headers=bearer)
        assert r.status_code == 400 and "stack: expected one of model, provider, got &#39;colour&#39;" in r.text
        # a POST with the CSRF token in the header (no form) passes; without it, 403
        ok = httpx.post(f"{on.url}/ui/approvals/nope", headers={**bearer, auth.CSRF_HEADER: auth.csrf_token(TOKEN)},
                        data={"action": "once"})
        assert ok.status_code == 303 and "error=" in ok.headers["location"]
        assert httpx.post(f"{on.url}/ui/approvals/nope", headers=bearer, data={"action": "once"}).status_code == 403
        assert httpx.get(f"{on.url}/ui/static/../routes.py").status_code == 404
        assert httpx.get(f"{on.url}/ui/static/ui.css").headers["content-type"].startswith("text/css")
    finally:
        off.close()
        on.close()
