"""``GET /metrics``: what the guard decided and charged, in Prometheus's text format.

Two kinds of numbers, read two ways:

- **Counters** are kept in memory by an engine observer (:meth:`Metrics.observe`): a few dict
  updates under a lock on the request path, never a store call. They count what *this process*
  decided and charged since it started (``rate()`` and ``increase()`` handle restarts). Money is
  summed in integer nano-dollars and exposed twice: ``spendgate_spend_usd_total`` (dollars as a
  float, the nano-dollar sum / 1e9, for dashboards) and ``spendgate_spend_nanodollars_total`` (the
  exact integer, to check against the ledger).
- **Gauges** of every budget bucket (limit, spent, held, remaining) and of what waits (held
  requests, unsent alerts) are read from the store when scraped — on a worker thread, never on the
  event loop — in batches of :data:`STATES_BATCH` buckets, so requests interleave with a large
  read, and kept for :data:`CACHE_S` seconds, so several scrapers cost one store read. A hold
  past its TTL still counts as held until the next upkeep (at most a minute) charges it.

Label cardinality is bounded whatever clients send:

- budget gauges: per rule, the ``[metrics] top_scopes`` scopes (default 20) with the most spent +
  held keep series of their own; all the other scopes of that rule are summed into one series,
  ``scope="(other)"`` (its limit is the sum of their limits, and so on), and
  ``spendgate_budget_scopes{rule}`` says how many scopes there are. A ``per = "session"`` rule over
  10,000 sessions exports at most ``top_scopes + 1`` series per gauge. Buckets of calendar periods
  already over are left out (``spendgate status`` lists them).
- counter labels (provider, model, rule, channel): the first :data:`MAX_LABEL_VALUES` distinct
  values of each get series; any later value counts under ``"(other)"``. Identity (key, user,
  session) is never a label: ``spendgate report --by user`` groups by it from the store.

Latency histograms, in seconds:

- ``spendgate_decision_seconds``: from the moment the proxy took the request up (the decision's
  timestamp) to the engine's answer, the store round trip included;
- ``spendgate_added_latency_seconds``: from the request's arrival, before its body is read, to its
  decision — what the guard adds before the request leaves for the provider. The charge after the
  answer is not in it: with a local store it runs after the reply has gone.

Access: without the admin token only over loopback (the request reached a loopback address: the
server listens on 127.0.0.1 or ::1, or the scraper runs on the same host), unless ``[metrics]
public = true``; otherwise with ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from spendgate import approvals
from spendgate.errors import StoreError
from spendgate.ledger import BucketState, Event, Ledger
from spendgate.report import SPEND_KINDS

if TYPE_CHECKING:
    from spendgate.proxy.app import Proxy

log = logging.getLogger("spendgate.metrics")

#: how long a scrape's store read is reused
CACHE_S = 5.0
#: distinct values one counter label may take before later ones count as "(other)"
MAX_LABEL_VALUES = 500
OTHER = "(other)"
#: buckets read per store transaction at scrape time: a store of 10,000 sessions is read in ~40
#: transactions of a few milliseconds, never one that holds the store for a tenth of a second
STATES_BATCH = 256
#: outbox alerts looked at for ``spendgate_alerts_pending`` (the newest ones)
ALERT_SCAN = 1000
#: the outcomes of a decision (an allowed request's, a refused one's, a shadow rule's, a denial)
DECISION_KINDS = frozenset({"allow", "downgrade", "clamp", "truncate", "alert", "block", "hold", "deny",
                            "would_refuse"})
#: decisions made on the request path (a denial is an operator's; a shadow rule's precedes its request's)
TIMED_KINDS = DECISION_KINDS - {"deny", "would_refuse"}
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0)
#: the parts of a charge's tokens counted apart: (the capture event's amount, the ``type`` label).
#: ``input`` and ``output`` are the whole counts (OpenTelemetry GenAI's meaning: cached input is
#: input); ``cache_read`` and ``cache_write`` are parts of ``input``, ``reasoning`` of ``output``.
_TOKEN_PARTS = (("cache_read_tokens", "cache_read"), ("cache_write_tokens", "cache_write"),
                ("reasoning_tokens", "reasoning"))
#: when the request being handled arrived (perf_counter), set by the middleware for its task
_ARRIVED: ContextVar[float | None] = ContextVar("spendgate_arrived", default=None)


class _Labels:
    """The values one label has taken: the first ``cap`` distinct ones, then ``"(other)"``."""

    def __init__(self, cap: int = MAX_LABEL_VALUES) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.cap:
            self.seen.add(value)
            return value
        return OTHER


class _Histogram:
    """Counts per bucket and a sum: what one ``observe`` costs is a bisect and two additions."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, n in zip(self.bounds, self.counts, strict=False):
            cumulative += n
            buckets.append((repr(float(bound)), float(cumulative)))
        buckets.append(("+Inf", float(cumulative + self.counts[-1])))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


def split_key(key: str) -> tuple[str, str]:
    """(rule, scope) of a bucket key ``rule|per=value[|period]``; a key of another shape is its own rule."""
    parts = key.split("|")
    return parts[0], parts[1] if len(parts) > 1 else ""


def _usd(nanos: int) -> float:
    return nanos / 1e9


class Metrics:
    """The counters one server keeps and the gauges it reads from ``store`` when scraped.

    :meth:`observe` is the engine observer; :meth:`exposition` is blocking (it may read the store)
    and :meth:`ascrape` runs it on a worker thread."""

    def __init__(self, store: Ledger, *, top_scopes: int = 20, cache_s: float = CACHE_S) -> None:
        self.store = store
        self.top_scopes = top_scopes
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._spend: dict[tuple[str, str], int] = {}
        self._tokens: dict[tuple[str, str, str], int] = {}
        self._decisions: dict[tuple[str, str], int] = {}
        self._charges: dict[str, int] = {}
        self._estimated: dict[str, int] = {}
        self._approvals: dict[str, int] = {}
        self._released = 0
        self._store_errors: dict[str, int] = {"request": 0, "scrape": 0}
        self._decision_s = _Histogram()
        self._added_s = _Histogram()
        self._providers, self._models, self._rules, self._channels = _Labels(), _Labels(), _Labels(), _Labels()
        self._gauges: list[Metric] = []
        self._gauges_at = -1e18
        self._store_up = 1
        self._refresh = threading.Lock()
        self._scraping = asyncio.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a Collector by its collect()

    # -- the request path ----------------------------------------------------------------------

    def observe(self, event: Event, policy_hash: str, raw: bytes | None) -> None:
        """The engine observer: count one event. O(1), no I/O."""
        kind = event.kind
        if kind in SPEND_KINDS:
            with self._lock:
                provider, model = self._providers(event.provider), self._models(event.model)
                key = (provider, model)
                self._spend[key] = self._spend.get(key, 0) + event.cost
                tin, tout = ("input", provider, model), ("output", provider, model)
                self._tokens[tin] = self._tokens.get(tin, 0) + event.input_tokens
                self._tokens[tout] = self._tokens.get(tout, 0) + event.output_tokens
                for part, label in _TOKEN_PARTS:  # parts of input and output (a capture's usage)
                    n = event.amounts.get(part)
                    if n:
                        tkey = (label, provider, model)
                        self._tokens[tkey] = self._tokens.get(tkey, 0) + n
                self._charges[kind] = self._charges.get(kind, 0) + 1
                if event.estimated:
                    self._estimated[kind] = self._estimated.get(kind, 0) + 1
        elif kind in DECISION_KINDS:
            arrived = _ARRIVED.get() if kind in TIMED_KINDS else None
            took = time.time() - event.ts if kind in TIMED_KINDS else -1.0
            with self._lock:
                dkey = (kind, self._rules(event.rule))
                self._decisions[dkey] = self._decisions.get(dkey, 0) + 1
                if 0 <= took < 3600:  # a replayed or simulated clock is no latency
                    self._decision_s.observe(took)
                if arrived is not None:
                    self._added_s.observe(time.perf_counter() - arrived)
            if arrived is not None:  # a request decided twice (approved on retry) is timed once
                _ARRIVED.set(None)
        elif kind == "approval":
            with self._lock:
                channel = self._channels(event.dims.get("channel", ""))
                self._approvals[channel] = self._approvals.get(channel, 0) + 1
        elif kind == "released":
            with self._lock:
                self._released += 1

    def store_error(self, where: str) -> None:
        with self._lock:
            self._store_errors[where] = self._store_errors.get(where, 0) + 1

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Stamp the request's arrival for the added-latency histogram, and count the requests the
        store failed (the proxy's 503 ``spendgate_store_error`` answer)."""
        token = _ARRIVED.set(time.perf_counter())
        try:
            response = await handler(request)
        finally:
            _ARRIVED.reset(token)
        if response.status == 503 and isinstance(response, web.Response) and isinstance(response.body, bytes) \
                and b"spendgate_store_error" in response.body:
            self.store_error("request")
        return response

    # -- scraping ------------------------------------------------------------------------------

    async def ascrape(self) -> bytes:
        """:meth:`exposition` on a worker thread, one at a time (a burst of scrapes reads the store once)."""
        async with self._scraping:
            return await asyncio.to_thread(self.exposition)

    def exposition(self, now: float | None = None) -> bytes:
        """The text format, gauges re-read from the store when older than :attr:`cache_s`. Blocking."""
        now = time.time() if now is None else now
        with self._refresh:
            if now - self._gauges_at >= self.cache_s:
                try:
                    self._gauges = self.read_store(now)
                    self._store_up = 1
                except StoreError as exc:  # the counters are still worth serving; the gauges keep their last values
                    log.warning("metrics: the store could not be read: %s", exc)
                    self.store_error("scrape")
                    self._store_up = 0
                self._gauges_at = now
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """The ``prometheus_client`` collector: the counters as they are now, the gauges as last read."""
        with self._lock:
            spend, tokens, decisions = dict(self._spend), dict(self._tokens), dict(self._decisions)
            charges, estimated, approved = dict(self._charges), dict(self._estimated), dict(self._approvals)
            released, errors, up = self._released, dict(self._store_errors), self._store_up
            decision_s = self._decision_s.family("spendgate_decision_seconds",
                                                 "Time from taking a request up to its decision, store included.")
            added_s = self._added_s.family("spendgate_added_latency_seconds",
                                           "Time the guard adds before a request leaves: arrival to decision.")
        usd = CounterMetricFamily("spendgate_spend_usd", "Dollars charged (captured, unknown outcome, expired "
                                  "holds), by provider and model.", labels=["provider", "model"])
        nanos = CounterMetricFamily("spendgate_spend_nanodollars", "The same charges in integer nano-dollars "
                                    "(exact).", labels=["provider", "model"])
        for (provider, model), n in sorted(spend.items()):
            usd.add_metric([provider, model], _usd(n))
            nanos.add_metric([provider, model], n)
        yield usd
        yield nanos
        tok = CounterMetricFamily("spendgate_tokens", "Tokens charged, by type (OpenTelemetry GenAI "
                                  "gen_ai.token.type: input, output; cache_read and cache_write are parts of "
                                  "input, reasoning of output).", labels=["type", "provider", "model"])
        for tkey, n in sorted(tokens.items()):
            tok.add_metric(list(tkey), n)
        yield tok
        dec = CounterMetricFamily("spendgate_decisions", "Decisions by outcome and the rule that shaped them "
                                  "(empty: no rule did).", labels=["action", "rule"])
        for dkey, n in sorted(decisions.items()):
            dec.add_metric(list(dkey), n)
        yield dec
        yield _by_kind("spendgate_charges", "Charges recorded, by kind (capture, unknown, expired).", charges)
        yield _by_kind("spendgate_estimated_charges", "Charges whose amount is an estimate (no usage from the "
                       "provider, or a price spendgate had to guess).", estimated)
        appr = CounterMetricFamily("spendgate_approvals", "Approvals given, by channel.", labels=["channel"])
        for channel, n in sorted(approved.items()):
            appr.add_metric([channel], n)
        yield appr
        yield CounterMetricFamily("spendgate_releases", "Holds given back uncharged (the request was not billed).",
                                  value=released)
        err = CounterMetricFamily("spendgate_store_errors", "Store failures: requests refused because the store "
                                  "failed, scrapes that could not read it.", labels=["where"])
        for where, n in sorted(errors.items()):
            err.add_metric([where], n)
        yield err
        yield GaugeMetricFamily("spendgate_store_up", "1 when the last scrape read the store, else 0.", value=up)
        yield decision_s
        yield added_s
        yield from self._gauges

    def read_store(self, now: float) -> list[Metric]:
        """The gauges, from the store (blocking; see the module docstring for the aggregation)."""
        buckets = [b for b in self.store.known_buckets()
                   if b.unit == "usd" and (b.ends_at is None or b.ends_at > now)]
        states: list[BucketState] = []
        for i in range(0, len(buckets), STATES_BATCH):  # short transactions: requests go between them
            states += self.store.states(buckets[i:i + STATES_BATCH], now=now)
        by_rule: dict[str, list[tuple[str, BucketState]]] = {}
        for b, st in zip(buckets, states, strict=True):
            rule, scope = split_key(b.key)
            by_rule.setdefault(rule, []).append((scope, st))
        names = ("limit", "spent", "held", "remaining", "granted")
        docs = {"limit": "The budget's limit with granted headroom, in dollars.",
                "spent": "Dollars charged in the budget's current window.",
                "held": "Dollars held for requests in flight.",
                "remaining": "Limit + granted - spent - held, in dollars (what the next request may hold).",
                "granted": "Headroom granted by approvals, in dollars."}
        fams = {n: GaugeMetricFamily(f"spendgate_budget_{n}_usd", docs[n], labels=["rule", "scope"]) for n in names}
        counts = GaugeMetricFamily("spendgate_budget_scopes", "Scopes a rule counts now (beyond the top ones, "
                                   "summed under scope=\"(other)\").", labels=["rule"])
        for rule, rows in sorted(by_rule.items()):
            counts.add_metric([rule], len(rows))
            rows.sort(key=lambda r: (-r[1].used, r[0]))
            for scope, st in rows[:self.top_scopes]:
                _add_bucket(fams, [rule, scope], st.limit, st.spent, st.held, st.granted)
            rest = rows[self.top_scopes:]
            if rest:
                limited = [st for _, st in rest if st.limit is not None]
                _add_bucket(fams, [rule, OTHER], sum(st.limit or 0 for st in limited) if limited else None,
                            sum(st.spent for _, st in rest), sum(st.held for _, st in rest),
                            sum(st.granted for _, st in rest),
                            remaining=sum(st.remaining or 0 for st in limited) if limited else None)
        holds = GaugeMetricFamily("spendgate_holds_pending", "Requests held for approval, not yet answered.",
                                  value=len(approvals.pending(self.store, now)))
        alerts = GaugeMetricFamily("spendgate_alerts_pending", f"Alerts waiting to be sent (among the newest "
                                   f"{ALERT_SCAN}).",
                                   value=sum(1 for a in self.store.alerts(ALERT_SCAN) if a.status == "pending"))
        return [*fams.values(), counts, holds, alerts]


#: the server's :class:`Metrics` (``app[METRICS_KEY]``), for in-process readers
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("spendgate_metrics", Metrics)


def _add_bucket(fams: Mapping[str, GaugeMetricFamily], labels: list[str], limit: int | None, spent: int,
                held: int, granted: int, remaining: int | None = None) -> None:
    fams["spent"].add_metric(labels, _usd(spent))
    fams["held"].add_metric(labels, _usd(held))
    fams["granted"].add_metric(labels, _usd(granted))
    if limit is not None:
        fams["limit"].add_metric(labels, _usd(limit + granted))
        left = remaining if remaining is not None else limit + granted - spent - held
        fams["remaining"].add_metric(labels, _usd(left))


def _by_kind(name: str, doc: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=["kind"])
    for kind, n in sorted(counts.items()):
        fam.add_metric([kind], n)
    return fam


def reached_over_loopback(request: web.Request) -> bool:
    """Whether the request arrived at a loopback address of this host (only a local process can send
    one: the kernel drops loopback-addressed packets from the network)."""
    transport = request.transport
    sock: Any = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sock, tuple) or not sock:
        return False
    try:
        ip = ipaddress.ip_address(str(sock[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def metrics_routes(app: web.Application, proxy: Proxy) -> None:
    """Serve ``GET /metrics`` and count into it (an engine observer and a middleware), unless
    ``[metrics] enabled = false``. Register it before the proxy's catch-all route."""
    settings = proxy.engine.policy.metrics
    if not settings.enabled:
        return
    # an app built twice over one engine counts into the one Metrics, never twice
    owners = (getattr(o, "__self__", None) for o in proxy.engine.observers)
    metrics = next((m for m in owners if isinstance(m, Metrics)), None)
    if metrics is None:
        metrics = Metrics(proxy.store, top_scopes=settings.top_scopes)
        proxy.engine.observers.append(metrics.observe)
    app.middlewares.append(metrics.middleware)
    app[METRICS_KEY] = metrics

    async def serve_metrics(request: web.Request) -> web.Response:
        if not (proxy.engine.policy.metrics.public or reached_over_loopback(request)):
            token = proxy.config.admin_token
            if not token:
                return _error(403, "/metrics is served over loopback only: set [metrics] public = true, or start "
                                   "spendgate serve with --admin-token and send it (Authorization: Bearer <token>)")
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(sent.encode(), token.encode()):
                return _error(401, "/metrics beyond loopback needs the admin token (Authorization: Bearer <token>) "
                                   "or [metrics] public = true")
        body = await metrics.ascrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", serve_metrics)
