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

With ``spendgate serve --workers N`` a scrape reaches one worker of N, so the counters are kept
where every worker can read them: each worker writes its own into a file of a directory the parent
made (:func:`share_counters`, :class:`CounterFile`: in-place writes of 64-bit integers into a
memory map, a few hundred nanoseconds each), and the worker answering a scrape sums every file,
those of workers that died included, so a counter never goes back. Money stays integer
nano-dollars; latency sums are kept in integer nanoseconds.

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
import json
import logging
import mmap
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
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


class CounterFile:
    """One process's counters in a file other processes read: ``key -> int64``.

    The layout is prometheus_client's multiprocess file with integers instead of doubles (exact
    nano-dollars): 8 bytes holding the bytes used, then records of a 4-byte key length, the key
    (UTF-8 JSON) padded to 8 bytes and the 8-byte value. A key's record is written before the used
    length grows to include it, and a value is one aligned 8-byte store, so a reader sees each
    counter at some value it had. Only the owning process writes (under :class:`Metrics`' lock)."""

    INITIAL = 64 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "w+b")  # noqa: SIM115 - open for the life of the process
        self._f.truncate(self.INITIAL)
        self._map = mmap.mmap(self._f.fileno(), self.INITIAL)
        self._used = 8
        struct.pack_into("<Q", self._map, 0, self._used)
        self._offsets: dict[tuple[str, ...], int] = {}

    def set(self, key: tuple[str, ...], value: int) -> None:
        """``key`` (a counter's name and label values) is ``value`` now: a dict lookup and one
        8-byte store once the key has its record."""
        at = self._offsets.get(key)
        if at is None:
            at = self._add(key)
        _PACK_INTO(self._map, at, value)

    def _add(self, key: tuple[str, ...]) -> int:
        raw = _key(*key).encode()
        padded = raw + b" " * (-(4 + len(raw)) % 8)
        size = 4 + len(padded) + 8
        if self._used + size > len(self._map):
            grown = max(len(self._map) * 2, self._used + size)
            self._f.truncate(grown)
            self._map.close()
            self._map = mmap.mmap(self._f.fileno(), grown)
        struct.pack_into(f"<I{len(padded)}sq", self._map, self._used, len(raw), padded, 0)
        at = self._used + 4 + len(padded)
        self._used += size
        struct.pack_into("<Q", self._map, 0, self._used)
        self._offsets[key] = at
        return at

    @staticmethod
    def read(path: Path) -> dict[str, int]:
        data = path.read_bytes()
        if len(data) < 8:
            return {}
        (used,) = struct.unpack_from("<Q", data, 0)
        out: dict[str, int] = {}
        pos = 8
        while pos + 4 <= min(used, len(data)):
            (n,) = struct.unpack_from("<I", data, pos)
            padded = n + (-(4 + n) % 8)
            key = data[pos + 4:pos + 4 + n].decode()
            (out[key],) = struct.unpack_from("<q", data, pos + 4 + padded)
            pos += 4 + padded + 8
        return out


_PACK_INTO = struct.Struct("<q").pack_into

#: where the counters are shared (``serve --workers``): (directory, this process's file name)
_SHARED: tuple[Path, str] | None = None


def share_counters(directory: Path, name: str) -> None:
    """Count into ``directory/name.counts`` and serve the sum of every file in ``directory``:
    a worker of ``serve --workers`` calls this before its app is built."""
    global _SHARED
    _SHARED = (directory, name)


def _key(*parts: str) -> str:
    return json.dumps(parts, separators=(",", ":"))


_INDEX = tuple(str(i) for i in range(len(LATENCY_BOUNDS) + 1))


class _Histogram:
    """Counts per bucket and a sum: what one ``observe`` costs is a bisect and two additions."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS, name: str = "",
                 shared: CounterFile | None = None) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.name = name
        self.shared = shared

    def observe(self, value: float) -> None:
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        if self.shared is not None:
            self.shared.set((self.name, _INDEX[i]), self.counts[i])
            self.shared.set((self.name, "sum_ns"), round(self.sum * 1e9))

    def family(self, name: str, doc: str, totals: Mapping[str, int] | None = None) -> HistogramMetricFamily:
        counts, total = self.counts, self.sum
        if totals is not None:  # every worker's, from their files
            counts = [totals.get(_key(self.name, str(i)), 0) for i in range(len(self.counts))]
            total = totals.get(_key(self.name, "sum_ns"), 0) / 1e9
        cumulative, buckets = 0, []
        for bound, n in zip(self.bounds, counts, strict=False):
            cumulative += n
            buckets.append((repr(float(bound)), float(cumulative)))
        buckets.append(("+Inf", float(cumulative + counts[-1])))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def _tables(totals: Mapping[str, int]) -> dict[str, dict[Any, int]]:
    """Summed shared files by counter: name -> labels -> value (a single label alone, not a tuple)."""
    out: dict[str, dict[Any, int]] = {}
    for raw, n in totals.items():
        name, *labels = json.loads(raw)
        out.setdefault(name, {})[labels[0] if len(labels) == 1 else tuple(labels)] = n
    return out


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
        #: the directory every worker's counters are in, and this one's file (``serve --workers``)
        self._dir: Path | None = None
        self._file: CounterFile | None = None
        if _SHARED is not None:
            self._dir = _SHARED[0]
            self._file = CounterFile(_SHARED[0] / f"{_SHARED[1]}.counts")
        self._decision_s = _Histogram(name="decision_s", shared=self._file)
        self._added_s = _Histogram(name="added_s", shared=self._file)
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
        inc = self._inc
        if kind in SPEND_KINDS:
            with self._lock:
                provider, model = self._providers(event.provider), self._models(event.model)
                inc(self._spend, "spend", (provider, model), event.cost)
                inc(self._tokens, "tokens", ("input", provider, model), event.input_tokens)
                inc(self._tokens, "tokens", ("output", provider, model), event.output_tokens)
                for part, label in _TOKEN_PARTS:  # parts of input and output (a capture's usage)
                    n = event.amounts.get(part)
                    if n:
                        inc(self._tokens, "tokens", (label, provider, model), n)
                inc(self._charges, "charges", kind, 1)
                if event.estimated:
                    inc(self._estimated, "estimated", kind, 1)
        elif kind in DECISION_KINDS:
            arrived = _ARRIVED.get() if kind in TIMED_KINDS else None
            took = time.time() - event.ts if kind in TIMED_KINDS else -1.0
            with self._lock:
                inc(self._decisions, "decisions", (kind, self._rules(event.rule)), 1)
                if 0 <= took < 3600:  # a replayed or simulated clock is no latency
                    self._decision_s.observe(took)
                if arrived is not None:
                    self._added_s.observe(time.perf_counter() - arrived)
            if arrived is not None:  # a request decided twice (approved on retry) is timed once
                _ARRIVED.set(None)
        elif kind == "approval":
            with self._lock:
                inc(self._approvals, "approvals", self._channels(event.dims.get("channel", "")), 1)
        elif kind == "released":
            with self._lock:
                self._released += 1
                if self._file is not None:
                    self._file.set(("released",), self._released)

    def _inc(self, table: dict[Any, int], name: str, key: Any, n: int) -> None:
        """``table[key] += n``, and the same in this worker's shared file (under the lock)."""
        value = table.get(key, 0) + n
        table[key] = value
        if self._file is not None:
            self._file.set((name, *key) if isinstance(key, tuple) else (name, key), value)

    def store_error(self, where: str) -> None:
        with self._lock:
            self._inc(self._store_errors, "store_errors", where, 1)

    def _totals(self) -> dict[str, int] | None:
        """Every worker's counters summed (None: this process alone counts). Blocking."""
        if self._dir is None:
            return None
        totals: dict[str, int] = {}
        for path in sorted(self._dir.glob("*.counts")):
            try:
                values = CounterFile.read(path)
            except (OSError, ValueError, struct.error) as exc:  # a file half made by a starting worker
                log.warning("metrics: %s could not be read: %s", path, exc)
                continue
            for key, n in values.items():
                totals[key] = totals.get(key, 0) + n
        return totals

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
        """The ``prometheus_client`` collector: the counters as they are now (every worker's, when
        shared), the gauges as last read."""
        totals = self._totals()
        with self._lock:
            spend, tokens, decisions = dict(self._spend), dict(self._tokens), dict(self._decisions)
            charges, estimated, approved = dict(self._charges), dict(self._estimated), dict(self._approvals)
            released, errors, up = self._released, dict(self._store_errors), self._store_up
            decision_s = self._decision_s.family("spendgate_decision_seconds",
                                                 "Time from taking a request up to its decision, store included.",
                                                 totals)
            added_s = self._added_s.family("spendgate_added_latency_seconds",
                                           "Time the guard adds before a request leaves: arrival to decision.",
                                           totals)
        if totals is not None:
            t = _tables(totals)
            spend, tokens, decisions = t.get("spend", {}), t.get("tokens", {}), t.get("decisions", {})
            charges, estimated, approved = t.get("charges", {}), t.get("estimated", {}), t.get("approvals", {})
            released = totals.get(_key("released"), 0)
            errors = {"request": 0, "scrape": 0, **t.get("store_errors", {})}
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
