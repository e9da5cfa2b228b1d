"""``/ui``: the dashboard's pages, behind the admin token (see :mod:`.auth`).

Every page is HTML rendered on the server from Jinja2 templates with autoescaping, charts are
pygal SVG inlined in the page, and the only script (``ui.js``, served from the package) refreshes
the approvals list and feeds the decision list from server-sent events. Nothing is fetched from
another origin, and the Content-Security-Policy says so to the browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from spendgate import approvals, keys
from spendgate.errors import ConfigError, SpendgateError, StoreError
from spendgate.ledger import Event
from spendgate.money import fmt_usd
from spendgate.proxy.ui import auth, charts, data
from spendgate.report import status

if TYPE_CHECKING:
    from spendgate.proxy.app import Proxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}
#: how often the live feed looks for new events, and how often it sends a keep-alive comment
FEED_POLL_S = 0.5
FEED_PING_S = 15.0
#: the most rows a decisions page or CSV lists (newest first)
FEED_ROWS = 500
DEFAULT_SECONDS = 3600.0
#: what a CSV cell must not start with, or a spreadsheet would run it as a formula
_FORMULA = ("=", "+", "-", "@", "\t", "\r")

_STOPPING: web.AppKey[asyncio.Event] = web.AppKey("spendgate_ui_stopping", asyncio.Event)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("spendgate.proxy.ui", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["usd"] = fmt_usd
    env.filters["when"] = data.when
    return env


def add_routes(app: web.Application, proxy: Proxy) -> None:
    """Register the dashboard under ``/ui`` (before the proxy's catch-all route)."""
    ui = Dashboard(proxy)
    app[_STOPPING] = ui.stopping
    r = app.router
    r.add_get("/ui", ui.root)
    r.add_get("/ui/login", ui.login_form)
    r.add_post("/ui/login", ui.login)
    r.add_post("/ui/logout", ui.logout)
    r.add_get("/ui/static/{name}", ui.static)
    r.add_get("/ui/", ui.signed_in(ui.overview))
    r.add_get("/ui/budgets", ui.signed_in(ui.budgets))
    r.add_get("/ui/approvals", ui.signed_in(ui.approvals))
    r.add_get("/ui/approvals/rows", ui.signed_in(ui.approval_rows))
    r.add_post("/ui/approvals/{id}", ui.signed_in(ui.answer))
    r.add_get("/ui/decisions", ui.signed_in(ui.decisions))
    r.add_get("/ui/decisions.csv", ui.signed_in(ui.decisions_csv))
    r.add_get("/ui/decisions/stream", ui.signed_in(ui.stream))
    r.add_get("/ui/keys", ui.signed_in(ui.keys))
    r.add_post("/ui/keys", ui.signed_in(ui.create_key))
    r.add_post("/ui/keys/{id}/revoke", ui.signed_in(ui.revoke_key))
    app.on_shutdown.append(ui.stop)


def _headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # same-origin, not no-referrer: under no-referrer a browser sends ``Origin: null`` with a form
    # POST, and the CSRF check could not tell this dashboard's forms from anyone's
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _filters(request: web.Request) -> dict[str, str]:
    return {name: request.query.get(name, "").strip() for name in data.FILTERS}


def _seconds(request: web.Request) -> float:
    raw = request.query.get("seconds", "")
    if not raw:
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 400 * 86400:
        raise ConfigError(f"seconds: expected a number of seconds between 0 and 400 days, got {raw!r}")
    return seconds


def _csv_cell(value: Any) -> str:
    text = str(value)
    return "'" + text if text.startswith(_FORMULA) else text


class Dashboard:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.env = _env()
        #: set when the server stops, so open event streams end instead of holding the shutdown
        self.stopping = asyncio.Event()

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        return self.proxy.config.admin_token

    def render(self, name: str, status_code: int = 200, **ctx: Any) -> web.Response:
        token = self.token
        html = self.env.get_template(name).render(csrf=auth.csrf_token(token) if token else "", **ctx)
        response = web.Response(text=html, content_type="text/html", status=status_code)
        _headers(response)
        return response

    def signed_in(self, handler: Handler) -> Handler:
        """The guard of every page and call but the login form: a session cookie (or the admin
        API's bearer header). A page asked for without one redirects to the login form; a script's
        call gets 401. Bad input (a filter, a field) is a 400 naming it."""
        async def checked(request: web.Request) -> web.StreamResponse:
            if not self.token:
                return self.render("off.html", 403, page="")
            if not auth.signed_in(request, self.token):
                if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                    return see_other("/ui/login")
                return _headers(web.json_response({"error": {"message": "sign in at /ui/login first"}},
                                                  status=401))
            if request.method == "POST" and not auth.csrf_ok(request, self.token, await self._form_csrf(request)):
                return _headers(web.json_response(
                    {"error": {"message": "refused: not sent from this dashboard's own page (CSRF check)"}},
                    status=403))
            try:
                return await handler(request)
            except ConfigError as exc:
                return self.render("error.html", 400, page="", message=str(exc))
            except StoreError as exc:
                return self.render("error.html", 503, page="", message=f"the spend store failed: {exc}")

        return checked

    async def _form_csrf(self, request: web.Request) -> str | None:
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            value = form.get(auth.CSRF_FIELD)
            return value if isinstance(value, str) else None
        return None

    async def io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.proxy._store_io(fn, *args)

    async def stop(self, _: web.Application) -> None:
        self.stopping.set()

    # -- sign in --------------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        return see_other("/ui/")

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if not self.token:
            return self.render("off.html", 403, page="")
        return self.render("login.html", page="login", error="")

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self.token:
            return self.render("off.html", 403, page="")
        form = await request.post()
        sent = form.get("token")
        if not auth.same_origin(request) or not isinstance(sent, str) or not auth.token_matches(sent.strip(),
                                                                                               self.token):
            return self.render("login.html", 401, page="login", error="That is not the admin token.")
        response = see_other("/ui/")
        auth.set_session(response, self.token, secure=request.secure)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        response = see_other("/ui/login")
        auth.clear_session(response)
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        body = resources.files("spendgate.proxy.ui").joinpath("static", name).read_bytes()
        response = web.Response(body=body, content_type=STATIC[name])
        response.headers["Cache-Control"] = "max-age=300"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # -- pages ----------------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        stack, step, since = q.get("stack", "model"), q.get("step", "hour"), q.get("since", "24h")
        if stack not in data.STACKS:
            raise ConfigError(f"stack: expected one of {', '.join(data.STACKS)}, got {stack!r}")
        if step not in data.STEPS:
            raise ConfigError(f"step: expected one of {', '.join(data.STEPS)}, got {step!r}")
        if since not in data.WINDOWS:
            raise ConfigError(f"since: expected one of {', '.join(data.WINDOWS)}, got {since!r}")
        now = time.time()
        window = data.WINDOWS[since]
        events: list[Event] = await self.io(self.proxy.store.events, now - window)
        o = data.overview(events, now, window, data.STEPS[step], stack)
        return self.render("overview.html", page="overview", o=o, stack=stack, step=step, since=since,
                           stacks=data.STACKS, steps=list(data.STEPS), windows=list(data.WINDOWS),
                           spend_chart=charts.spend_svg(o, stack), traffic_chart=charts.traffic_svg(o),
                           spend_narrow=charts.spend_svg(o, stack, narrow=True),
                           traffic_narrow=charts.traffic_svg(o, narrow=True))

    async def budgets(self, request: web.Request) -> web.StreamResponse:
        rows = await self.io(lambda: status(self.proxy.store, on_expired=self.proxy.engine.emit))
        return self.render("budgets.html", page="budgets", rows=data.budget_rows(rows))

    async def _pending(self) -> list[dict[str, Any]]:
        pending: list[approvals.Pending] = await self.io(approvals.pending, self.proxy.store)
        return [data.pending_row(p) for p in pending if p.status == "pending"]

    async def approvals(self, request: web.Request) -> web.StreamResponse:
        answered = {k: request.query.get(k, "") for k in ("answered", "status", "error")}
        return self.render("approvals.html", page="approvals", pending=await self._pending(), answered=answered)

    async def approval_rows(self, request: web.Request) -> web.StreamResponse:
        return self.render("_pending.html", pending=await self._pending())

    async def answer(self, request: web.Request) -> web.StreamResponse:
        """Approve once, approve with a max (headroom for the held bucket), or deny — what
        ``POST /spendgate/approvals/{id}`` does, recorded as answered from the dashboard."""
        hold_id = request.match_info["id"]
        form = await request.post()
        action, raw_max = str(form.get("action", "")), str(form.get("max_usd", "")).strip()
        store, emit = self.proxy.store, self.proxy.engine.emit
        try:
            if action == "deny":
                p = await asyncio.to_thread(approvals.deny, store, hold_id, None, "dashboard", emit)
            elif action in ("once", "max"):
                max_usd: Decimal | None = None
                if action == "max":
                    try:
                        max_usd = approvals.parse_max(raw_max)
                    except ValueError as exc:
                        raise ConfigError(f"max_usd: {exc}") from exc
                p = await asyncio.to_thread(approvals.approve, store, hold_id, max_usd, None, "dashboard", emit)
            else:
                raise ConfigError(f"action: expected once, max or deny, got {action!r}")
        except (KeyError, ValueError) as exc:
            return see_other(f"/ui/approvals?{_query(answered=hold_id, error=str(exc.args[0]))}")
        return see_other(f"/ui/approvals?{_query(answered=p.id, status=p.status)}")

    async def _feed(self, request: web.Request) -> tuple[dict[str, str], float, list[dict[str, Any]]]:
        filters, seconds = _filters(request), _seconds(request)
        events: list[Event] = await self.io(self.proxy.store.events, time.time() - seconds)
        rows = [data.feed_row(e) for e in data.feed(events, filters)][-FEED_ROWS:]
        rows.reverse()
        return filters, seconds, rows

    async def decisions(self, request: web.Request) -> web.StreamResponse:
        filters, seconds, rows = await self._feed(request)
        query = _query(**filters, seconds=f"{seconds:g}")
        return self.render("decisions.html", page="decisions", rows=rows, filters=filters, seconds=seconds,
                           query=query, after=rows[0]["ts"] if rows else time.time() - seconds)

    async def decisions_csv(self, request: web.Request) -> web.StreamResponse:
        """The current view (its filters and window) as CSV, newest first; no cell starts as a formula."""
        _, _, rows = await self._feed(request)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(data.CSV_COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(row[c]) for c in data.CSV_COLUMNS])
        response = web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8",
                                headers={"Content-Disposition": 'attachment; filename="spendgate-decisions.csv"'})
        return _headers(response)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: each new feed line matching the filters, as a rendered table row.

        The store is polled (it has no notifications on SQLite); events already sent at the same
        timestamp are remembered so none is sent twice and none is skipped."""
        filters = _filters(request)
        try:
            after = float(request.query.get("after", "")) if request.query.get("after") else time.time()
        except ValueError as exc:
            raise ConfigError(f"after: expected epoch seconds, got {request.query.get('after')!r}") from exc
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        _headers(response)
        await response.prepare(request)
        # the page listed every line up to ``after``: only later ones are sent; the store is then
        # asked from the newest timestamp seen, and what was sent at that instant is remembered
        shown, cursor = after, after
        sent: set[tuple[str, str, float]] = set()
        template = self.env.get_template("_feed_row.html")
        last_ping = time.monotonic()
        try:
            await response.write(b"retry: 2000\n\n")
            while not self.stopping.is_set():
                try:
                    events: list[Event] = await self.io(self.proxy.store.events, cursor)
                except StoreError:
                    events = []
                for e in data.feed(events, filters):
                    mark = (e.decision_id, e.kind, e.ts)
                    if e.ts <= shown or mark in sent:
                        continue
                    sent.add(mark)
                    html = " ".join(template.render(row=data.feed_row(e)).split())
                    await response.write(f"event: row\ndata: {html}\n\n".encode())
                if events:
                    cursor = max(cursor, max(e.ts for e in events))
                    sent = {m for m in sent if m[2] >= cursor}
                if time.monotonic() - last_ping > FEED_PING_S:
                    await response.write(b": ping\n\n")
                    last_ping = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), FEED_POLL_S)
        except ConnectionResetError:  # the browser closed the page
            pass
        return response

    async def keys(self, request: web.Request, created: dict[str, Any] | None = None,
                   status_code: int = 200, error: str = "") -> web.StreamResponse:
        listed: list[keys.VirtualKey] = await self.io(keys.list_keys, self.proxy.store)
        return self.render("keys.html", status_code, page="keys", keys=[k.as_dict() for k in listed],
                           created=created, error=error)

    async def create_key(self, request: web.Request) -> web.StreamResponse:
        """A new virtual key bound to a user, team and tags; its secret is shown on this page once."""
        form = await request.post()
        user, team = (str(form.get(f, "")).strip() or None for f in ("user", "team"))
        tags: dict[str, str] = {}
        for part in str(form.get("tags", "")).split(","):
            if not part.strip():
                continue
            name, eq, value = part.partition("=")
            if not eq or not name.strip() or not value.strip():
                return await self.keys(request, status_code=400,
                                       error=f"tags: expected name=value pairs separated by commas, got {part!r}")
            tags[name.strip()] = value.strip()
        try:
            secret, key = await self.io(lambda: keys.create(self.proxy.store, user=user, team=team, tags=tags))
        except SpendgateError as exc:
            return await self.keys(request, status_code=400, error=str(exc))
        return await self.keys(request, created={"secret": secret, **key.as_dict()})

    async def revoke_key(self, request: web.Request) -> web.StreamResponse:
        key_id = request.match_info["id"]
        done: bool = await self.io(keys.revoke, self.proxy.store, key_id)
        if not done:
            return await self.keys(request, status_code=404, error=f"no key {key_id!r} to revoke")
        refresh = getattr(self.proxy.live, "refresh_now", None)  # a key's own budget leaves the policy
        if refresh is not None:
            result = refresh()
            if asyncio.iscoroutine(result):
                await result
        return see_other("/ui/keys")


def _query(**params: str) -> str:
    return urlencode({k: v for k, v in params.items() if v})


def see_other(location: str) -> web.Response:
    """A 303 to ``location`` (after a form's POST, the browser GETs the page again)."""
    return _headers(web.Response(status=303, headers={"Location": location}))  # type: ignore[return-value]
