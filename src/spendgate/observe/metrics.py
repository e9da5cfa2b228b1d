"""``GET /metrics``: what the guard decided and charged, in Prometheus's text format.

Two kinds of numbers, read two ways:

- **Counters** are kept in memory by an engine observer (:meth:`Metrics.observe`): on the request
  path a few dictionary lookups that find each series' slot (remembered from the first time its
  label values were seen) and ``v[slot] += n`` on plain integers — no label formatting, no lock on
  the event loop's thread, never a store call; the ``prometheus_client`` families are built from
  those integers only when ``/metrics`` is scraped (:meth:`Metrics.collect`). They count what
  *this process* decided and charged since it started (``rate()`` and ``increase()`` handle
  restarts). Money is summed in integer nano-dollars and exposed twice:
  ``spendgate_spend_usd_total`` (dollars as a float, the nano-dollar sum / 1e9, for dashboards)
  and ``spendgate_spend_nanodollars_total`` (the exact integer, to check against the ledger).
- **Gauges** of every budget bucket (limit, spent, held, remaining) and of what waits (held
  requests, unsent alerts) are read from the store when scraped — on a worker thread, never on the
  event loop — in batches of :data:`STATES_BATCH` buckets, so requests interleave with a large
  read, and kept for :data:`CACHE_S` seconds, so several scrapers cost one store read. A hold
  past its TTL still counts as held until the next upkeep (at most a minute) charges it.

With ``spendgate serve --workers N`` a scrape reaches one worker of N, so the counters are kept
where every worker can read them: each worker writes its own into a file of a directory the parent
made (:func:`share_counters`, :class:`CounterFile`: the slots are 64-bit integers of a memory map,
so counting is the same ``v[slot] += n`` straight into the file), and the worker answering a scrape
sums every file, those of workers that died included, so a counter never goes back. Money stays
integer nano-dollars; latency sums are kept in integer nanoseconds.

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
from threading import get_ident
from time import perf_counter_ns
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
#: when the request being handled arrived (``[perf_counter_ns]``, ``[0]`` once its decision is timed),
#: set by the middleware for its task
_ARRIVED: ContextVar[list[int] | None] = ContextVar("spendgate_arrived", default=None)


class _Labels:
    """The values one label has taken: the first ``cap`` distinct ones, then ``"(other)"``. A value
    once mapped keeps its mapping (the set only grows, up to ``cap``), which is what lets a counter
    table remember a raw value's slot. Safe from any thread: a new value is weighed under a lock."""

    def __init__(self, cap: int = MAX_LABEL_VALUES) -> None:
        self.cap = cap
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        with self._lock:
            if value in self.seen or len(self.seen) < self.cap:
                self.seen.add(value)
                return value
        return OTHER


class _Table:
    """One writer's counters as slots: :attr:`v` holds at ``index[key]`` the value of ``key`` (a
    counter's name and label values), so counting into a known counter is ``v[i] += n``. This one
    is a list (this process counts alone); :class:`CounterFile` is the same over a shared file.

    Only its writer changes it; :meth:`items` reads it from any thread."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, ...], int] = {}
        self.v: list[int] = []

    def slot(self, key: tuple[str, ...]) -> int:
        at = self.index.get(key)
        if at is None:
            self.v.append(0)  # the value before the key: a reader that sees the key sees its value
            at = self.index[key] = len(self.v) - 1
        return at

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        index = dict(self.index)  # the index before the values (see slot)
        v = list(self.v)
        return [(key, v[at]) for key, at in index.items()]


class CounterFile:
    """One writer's counters in a file other processes read: ``key -> int64``, a :class:`_Table`
    whose values are the file's.

    The layout is prometheus_client's multiprocess file with integers instead of doubles (exact
    nano-dollars), in the host's byte order (only processes of this host read it): 8 bytes holding
    the bytes used, then records of a 4-byte key length, the key (UTF-8 JSON) padded to 8 bytes and
    the 8-byte value. A key's record is written before the used length grows to include it, and a
    value is one aligned 8-byte store, so a reader sees each counter at some value it had. :attr:`v`
    is the memory map seen as 64-bit integers: ``v[slot(key)] += n`` counts straight into the file
    (a map that grows is a new ``v``: take it after :meth:`slot`). Only its writer writes."""

    INITIAL = 64 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "w+b")  # noqa: SIM115 - open for the life of the process
        self._f.truncate(self.INITIAL)
        self._map = mmap.mmap(self._f.fileno(), self.INITIAL)
        self.v = memoryview(self._map).cast("q")
        self.v[0] = 8
        self.index: dict[tuple[str, ...], int] = {}

    def slot(self, key: tuple[str, ...]) -> int:
        """Where ``key``'s value is in :attr:`v` (its record is added the first time)."""
        at = self.index.get(key)
        if at is None:
            at = self._add(key)
        return at

    def set(self, key: tuple[str, ...], value: int) -> None:
        """``key`` (a counter's name and label values) is ``value`` now."""
        at = self.slot(key)
        self.v[at] = value

    def _add(self, key: tuple[str, ...]) -> int:
        raw = _key(*key).encode()
        padded = raw + b" " * (-(4 + len(raw)) % 8)
        size = 4 + len(padded) + 8
        used = self.v[0]
        if used + size > len(self._map):
            grown = max(len(self._map) * 2, used + size)
            self.v.release()  # a map with a view on it cannot close
            self._map.close()
            self._f.truncate(grown)
            self._map = mmap.mmap(self._f.fileno(), grown)
            self.v = memoryview(self._map).cast("q")
        struct.pack_into(f"=I{len(padded)}s", self._map, used, len(raw), padded)
        at = (used + 4 + len(padded)) // 8
        self.v[at] = 0
        self.v[0] = used + size  # the record is whole before a reader may look at it
        self.index[key] = at
        return at

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        """Every counter now, read from the file (any thread may)."""
        return [(tuple(json.loads(key)), n) for key, n in self.read(self.path).items()]

    @staticmethod
    def read(path: Path) -> dict[str, int]:
        data = path.read_bytes()
        if len(data) < 8:
            return {}
        (used,) = struct.unpack_from("=Q", data, 0)
        out: dict[str, int] = {}
        pos = 8
        while pos + 4 <= min(used, len(data)):
            (n,) = struct.unpack_from("=I", data, pos)
            padded = n + (-(4 + n) % 8)
            key = data[pos + 4:pos + 4 + n].decode()
            (out[key],) = struct.unpack_from("=q", data, pos + 4 + padded)
            pos += 4 + padded + 8
        return out


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
#: the latency buckets' bounds in integer nanoseconds, what the request path measures in
_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BOUNDS)
#: a token part's place in :attr:`_Series.parts` (and in :data:`_TOKEN_PARTS`), by the capture event's amount
_PART_INDEX = {part: j for j, (part, _) in enumerate(_TOKEN_PARTS)}
#: raw label values a table remembers the slots of; beyond, a lookup takes the slow way (and counts all the same)
_CACHE_MAX = 4 * MAX_LABEL_VALUES

#: where one writer's counters are: in this process alone, or in a file every worker reads
Slots = _Table | CounterFile


class _Series:
    """The slots a charge of one kind to one (provider, model) counts into; a token part's slot is
    made the first time that part is counted, so a part never charged has no series."""

    __slots__ = ("charges", "input", "model", "output", "parts", "provider", "spend")

    def __init__(self, table: Slots, kind: str, provider: str, model: str) -> None:
        self.provider, self.model = provider, model
        self.spend = table.slot(("spend", provider, model))
        self.input = table.slot(("tokens", "input", provider, model))
        self.output = table.slot(("tokens", "output", provider, model))
        self.charges = table.slot(("charges", kind))
        self.parts: list[int | None] = [None] * len(_TOKEN_PARTS)


class _Counts:
    """What one writer counts — the thread that made the :class:`Metrics` (the event loop's), or any
    other under its lock — with the slots of every label value it has met: a request's counting is
    a few dictionary lookups and ``v[i] += n``, no label formatting, no lock on the loop's thread."""

    def __init__(self, table: Slots, providers: _Labels, models: _Labels) -> None:
        self.table = table
        self._providers, self._models = providers, models
        #: slots by raw label values (what the event carries), filled on first sight
        self.series: dict[tuple[str, str, str], _Series] = {}
        self.decisions: dict[tuple[str, str], int] = {}
        self.estimated: dict[str, int] = {}
        self.approvals: dict[str, int] = {}
        #: the histograms' bucket slots (by bucket index) and their sums' (integer nanoseconds)
        self.decision_s = tuple(table.slot(("decision_s", i)) for i in _INDEX)
        self.decision_ns = table.slot(("decision_s", "sum_ns"))
        self.added_s = tuple(table.slot(("added_s", i)) for i in _INDEX)
        self.added_ns = table.slot(("added_s", "sum_ns"))
        self.released = table.slot(("released",))
        for where in ("request", "scrape"):
            table.slot(("store_errors", where))

    def add(self, key: tuple[str, ...], n: int) -> None:
        """``key``'s counter += ``n`` (a rare counter: no slot remembered)."""
        at = self.table.slot(key)
        self.table.v[at] += n

    def new_series(self, kind: str, provider: str, model: str) -> _Series:
        """The slots of a (kind, provider, model) met for the first time (or past :data:`_CACHE_MAX`)."""
        capped = (kind, self._providers(provider), self._models(model))
        s = self.series.get(capped) or _Series(self.table, *capped)
        for key in {capped, (kind, provider, model)}:
            if len(self.series) < _CACHE_MAX:
                self.series[key] = s
        return s

    def remember(self, cache: dict[Any, int], raw: Any, key: tuple[str, ...]) -> int:
        """``key``'s slot, remembered as ``cache[raw]`` (while the cache is under :data:`_CACHE_MAX`)."""
        at = self.table.slot(key)
        if len(cache) < _CACHE_MAX:
            cache[raw] = at
        return at


class _Histogram:
    """A latency histogram's counts per bucket and sum, kept by every writer in the slots
    ``(name, bucket index)`` and ``(name, "sum_ns")`` (integer nanoseconds)."""

    def __init__(self, name: str, metrics: Metrics, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        self.name = name
        self.bounds = tuple(bounds)
        self._metrics = metrics

    @property
    def sum(self) -> float:
        """This process's sum, in seconds."""
        key = (self.name, "sum_ns")  # every writer's table has its slot from the start
        return sum(c.table.v[c.table.index[key]] for c in self._metrics.writers()) / 1e9

    def family(self, name: str, doc: str, counts: Mapping[tuple[str, ...], int]) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, i in zip(self.bounds, _INDEX, strict=False):
            cumulative += counts.get((self.name, i), 0)
            buckets.append((repr(float(bound)), float(cumulative)))
        cumulative += counts.get((self.name, _INDEX[-1]), 0)
        buckets.append(("+Inf", float(cumulative)))
        return HistogramMetricFamily(name, doc, buckets=buckets,
                                     sum_value=counts.get((self.name, "sum_ns"), 0) / 1e9)


def split_key(key: str) -> tuple[str, str]:
    """(rule, scope) of a bucket key ``rule|per=value[|period]``; a key of another shape is its own rule."""
    parts = key.split("|")
    return parts[0], parts[1] if len(parts) > 1 else ""


def _usd(nanos: int) -> float:
    return nanos / 1e9


class Metrics:
    """The counters one server keeps and the gauges it reads from ``store`` when scraped.

    :meth:`observe` is the engine observer; :meth:`exposition` is blocking (it may read the store)
    and :meth:`ascrape` runs it on a worker thread.

    Counting is split by thread so the request path takes no lock: the thread that made this object
    (the server's event loop) counts into its own table unlocked; any other thread (a networked
    store's refusal on a worker thread, a scrape's store error) counts into a second table under
    :attr:`_lock`. A scrape sums the tables (or, shared, every file)."""

    def __init__(self, store: Ledger, *, top_scopes: int = 20, cache_s: float = CACHE_S) -> None:
        self.store = store
        self.top_scopes = top_scopes
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._owner = threading.get_ident()
        #: the directory every worker's counters are in, and this one's file name (``serve --workers``)
        self._dir: Path | None = None
        self._name = ""
        table: Slots = _Table()
        if _SHARED is not None:
            self._dir, self._name = _SHARED
            table = CounterFile(self._dir / f"{self._name}.counts")
        self._labels = (_Labels(), _Labels(), _Labels(), _Labels())  # provider, model, rule, channel
        self._rules, self._channels = self._labels[2], self._labels[3]
        self._own = _Counts(table, *self._labels[:2])
        self._other: _Counts | None = None
        self._decision_s = _Histogram("decision_s", self)
        self._added_s = _Histogram("added_s", self)
        self._gauges: list[Metric] = []
        self._gauges_at = -1e18
        self._store_up = 1
        self._refresh = threading.Lock()
        self._scraping = asyncio.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a Collector by its collect()

    # -- the request path ----------------------------------------------------------------------

    def observe(self, event: Event, policy_hash: str, raw: bytes | None, _into: _Counts | None = None) -> None:
        """The engine observer: count one event. O(1), no I/O, no lock on the owning thread; written
        out in one function, as it runs for every event (another thread's event comes back in with
        ``_into``, its table, under the lock)."""
        if _into is None:
            if get_ident() != self._owner:
                with self._lock:
                    self.observe(event, policy_hash, raw, self._others())
                return
            c = self._own
        else:
            c = _into
        kind = event.kind
        if kind in SPEND_KINDS:
            s = c.series.get((kind, event.provider, event.model)) or \
                c.new_series(kind, event.provider, event.model)
            v = c.table.v  # taken after any new slot: a shared map that grows is a new view
            v[s.spend] += event.cost
            v[s.input] += event.input_tokens
            v[s.output] += event.output_tokens
            v[s.charges] += 1
            amounts = event.amounts
            if amounts:  # parts of input and output (a capture's usage; zeros are left out)
                for part, n in amounts.items():
                    if part in _PART_INDEX and n:
                        j = _PART_INDEX[part]
                        at = s.parts[j]
                        if at is None:
                            at = s.parts[j] = c.table.slot(("tokens", _TOKEN_PARTS[j][1], s.provider, s.model))
                            v = c.table.v
                        v[at] += n
            if event.estimated:
                at = c.estimated.get(kind)
                if at is None:
                    at = c.remember(c.estimated, kind, ("estimated", kind))
                    v = c.table.v
                v[at] += 1
        elif kind in DECISION_KINDS:
            at = c.decisions.get((kind, event.rule))
            if at is None:
                at = c.remember(c.decisions, (kind, event.rule), ("decisions", kind, self._rules(event.rule)))
            v = c.table.v
            v[at] += 1
            if kind in TIMED_KINDS:
                took = int((time.time() - event.ts) * 1e9)
                if 0 <= took < 3600 * 10**9:  # a replayed or simulated clock is no latency
                    v[c.decision_s[bisect_left(_BOUNDS_NS, took)]] += 1
                    v[c.decision_ns] += took
                arrived = _ARRIVED.get()
                if arrived and arrived[0]:  # a request decided twice (approved on retry) is timed once
                    added = perf_counter_ns() - arrived[0]
                    arrived[0] = 0
                    v[c.added_s[bisect_left(_BOUNDS_NS, added)]] += 1
                    v[c.added_ns] += added
        elif kind == "approval":
            channel = event.dims.get("channel", "")
            at = c.approvals.get(channel)
            if at is None:
                at = c.remember(c.approvals, channel, ("approvals", self._channels(channel)))
            c.table.v[at] += 1
        elif kind == "released":
            c.table.v[c.released] += 1

    def _others(self) -> _Counts:
        """The table of threads other than the owner's (under :attr:`_lock`), made when first needed."""
        if self._other is None:
            table: Slots = _Table()
            if self._dir is not None:
                table = CounterFile(self._dir / f"{self._name}.threads.counts")
            self._other = _Counts(table, *self._labels[:2])
        return self._other

    def writers(self) -> list[_Counts]:
        """Every table this process counts into."""
        other = self._other
        return [self._own] if other is None else [self._own, other]

    def store_error(self, where: str) -> None:
        if get_ident() == self._owner:
            self._own.add(("store_errors", where), 1)
        else:
            with self._lock:
                self._others().add(("store_errors", where), 1)

    def _counts(self) -> dict[tuple[str, ...], int]:
        """Every counter, summed over this process's tables or, shared, every worker's file. Blocking."""
        totals: dict[tuple[str, ...], int] = {}
        if self._dir is None:
            for c in self.writers():
                for key, n in c.table.items():
                    totals[key] = totals.get(key, 0) + n
            return totals
        for path in sorted(self._dir.glob("*.counts")):
            try:
                values = CounterFile.read(path)
            except (OSError, ValueError, struct.error) as exc:  # a file half made by a starting worker
                log.warning("metrics: %s could not be read: %s", path, exc)
                continue
            for raw, n in values.items():
                key = tuple(json.loads(raw))
                totals[key] = totals.get(key, 0) + n
        return totals

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Stamp the request's arrival for the added-latency histogram, and count the requests the
        store failed (the proxy's 503 ``spendgate_store_error`` answer).

        Awaiting the handler makes this frame one every await of the request resumes through, about
        25 ns each; a middleware that only stamps plus an ``on_response_prepare`` receiver for the
        failures costs about 1.2 µs a request whatever it awaits, which only a reply resumed some
        60 times would repay."""
        token = _ARRIVED.set([perf_counter_ns()])
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
        counts = self._counts()
        by_name: dict[str, dict[tuple[str, ...], int]] = {}
        for (name, *rest), n in counts.items():
            by_name.setdefault(name, {})[tuple(rest)] = n
        spend, tokens, decisions = by_name.get("spend", {}), by_name.get("tokens", {}), by_name.get("decisions", {})
        usd = CounterMetricFamily("spendgate_spend_usd", "Dollars charged (captured, unknown outcome, expired "
                                  "holds), by provider and model.", labels=["provider", "model"])
        nanos = CounterMetricFamily("spendgate_spend_nanodollars", "The same charges in integer nano-dollars "
                                    "(exact).", labels=["provider", "model"])
        for labels, n in sorted(spend.items()):
            usd.add_metric(list(labels), _usd(n))
            nanos.add_metric(list(labels), n)
        yield usd
        yield nanos
        tok = CounterMetricFamily("spendgate_tokens", "Tokens charged, by type (OpenTelemetry GenAI "
                                  "gen_ai.token.type: input, output; cache_read and cache_write are parts of "
                                  "input, reasoning of output).", labels=["type", "provider", "model"])
        for labels, n in sorted(tokens.items()):
            tok.add_metric(list(labels), n)
        yield tok
        dec = CounterMetricFamily("spendgate_decisions", "Decisions by outcome and the rule that shaped them "
                                  "(empty: no rule did).", labels=["action", "rule"])
        for labels, n in sorted(decisions.items()):
            dec.add_metric(list(labels), n)
        yield dec
        yield _by_label("spendgate_charges", "Charges recorded, by kind (capture, unknown, expired).", "kind",
                        by_name.get("charges", {}))
        yield _by_label("spendgate_estimated_charges", "Charges whose amount is an estimate (no usage from the "
                        "provider, or a price spendgate had to guess).", "kind", by_name.get("estimated", {}))
        yield _by_label("spendgate_approvals", "Approvals given, by channel.", "channel",
                        by_name.get("approvals", {}))
        yield CounterMetricFamily("spendgate_releases", "Holds given back uncharged (the request was not billed).",
                                  value=counts.get(("released",), 0))
        yield _by_label("spendgate_store_errors", "Store failures: requests refused because the store failed, "
                        "scrapes that could not read it.", "where",
                        {("request",): 0, ("scrape",): 0, **by_name.get("store_errors", {})})
        yield GaugeMetricFamily("spendgate_store_up", "1 when the last scrape read the store, else 0.",
                                value=self._store_up)
        yield self._decision_s.family("spendgate_decision_seconds",
                                      "Time from taking a request up to its decision, store included.", counts)
        yield self._added_s.family("spendgate_added_latency_seconds",
                                   "Time the guard adds before a request leaves: arrival to decision.", counts)
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


def _by_label(name: str, doc: str, label: str, counts: Mapping[tuple[str, ...], int]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for labels, n in sorted(counts.items()):
        fam.add_metric(list(labels), n)
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
