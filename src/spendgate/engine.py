"""The decision: may this request be sent, and what is held against which budgets.

``Engine.decide`` prices the request's worst case, finds every rule it falls under, and asks the
ledger to hold that amount on every bucket at once. When a bucket would overflow, the tripped
rules' actions are weighed — immutable rules first, then the most restrictive outcome (block >
hold > clamp/downgrade/truncate > alert) — and a remedy (a cheaper model, a smaller ``max_tokens``,
a conversation without its oldest turns) is re-estimated and re-checked from the start.
``Engine.capture`` then charges what the provider billed and releases the rest of the hold.

The engine knows nothing of HTTP; the proxy and the SDK turn a :class:`Decision` into a response.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Protocol, TypeVar, cast

from spendgate import randomid
from spendgate.buckets import Limit, RuleBucket, rule_buckets, rule_limit
from spendgate.buckets import bucket_key as bucket_key
from spendgate.buckets import tokens_key as tokens_key
from spendgate.errors import StoreError
from spendgate.estimate import Estimate, Estimator
from spendgate.estimate.shape import TokenShape
from spendgate.ledger import AlertMark, Authorization, Bucket, BucketState, Event, Ledger, Line
from spendgate.ledger.spool import Spool
from spendgate.money import fmt_usd, nanos_to_usd, usd_to_nanos
from spendgate.policy.model import SEVERITY, Policy, Rule, capability_rank, policy_hash
from spendgate.policy.runtime import Pause, pause_applies
from spendgate.pricing.cost import Usage, output_rate, usage_nanos, worst_case_nanos
from spendgate.pricing.table import ModelPrice, PriceTable, Rate, Resolution
from spendgate.request import NONE, TOOL, Identity, Request
from spendgate.usage import UnreadableUsage, read_usage, warn_unknown
from spendgate.wire import truncate

log = logging.getLogger("spendgate.engine")
T = TypeVar("T")
#: A ledger call a decision step needs: (method name, keyword arguments).
LedgerCall = tuple[str, dict[str, Any]]
#: Hears every decision, approval and settlement as it happens: (the event, the hash of the policy
#: that decided it, the raw request body for decisions). Called on the request path: must be O(1).
Observer = Callable[[Event, str, "bytes | None"], None]
#: The outcomes a decision event can have (an allowed request's, then a refused one's).
ALLOWED_KINDS = ("allow", "downgrade", "clamp", "truncate", "alert")


class AsyncLedger(Protocol):
    """The ledger calls the engine makes, as coroutines (a networked store's asyncio client)."""

    async def authorize(self, lines: Sequence[Line], *, now: float, ttl: float, event: Event | None = None,
                        hold_id: str | None = None) -> Authorization: ...

    async def capture(self, hold_id: str, actual: Mapping[str, int], *, now: float,
                      event: Event | None = None) -> bool: ...

    async def release(self, hold_id: str, *, now: float, event: Event | None = None) -> bool: ...

    async def grant(self, bucket: Bucket, amount: int, *, now: float, until: float) -> None: ...

MAX_REMEDIES = 8
SLOWEST_TOKENS_PER_S = 20


@dataclass(frozen=True, slots=True)
class Approval:
    """A person's explicit yes to a held request: once, or with ``max_usd`` of headroom.

    ``channel`` says where it came from. An operator's approval (``spendgate approve``, the admin
    API, in-process code) is not capped. One that arrived with the request itself — the
    ``X-Spendgate-Allow`` header or an answer typed in the latest user turn — carries a
    ``ceiling_usd``: all that channel may grant one bucket in one window, however many requests
    ask, kept in the ledger as a bucket of its own so the cap holds across instances."""

    max_usd: Decimal | None = None
    by: str = "unknown"
    channel: str = "operator"
    ceiling_usd: Decimal | None = None
    #: already logged by whoever gave it (an approval by id), so the engine logs no second event
    recorded: bool = False
    #: the rules it answers (an approval by id answers the holds it was shown), None: any hold
    rules: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Trip:
    """One rule a request would break, with the numbers that show it."""

    rule: Rule
    unit: str
    limit: int
    used: int  # spent + held before this request
    amount: int  # what this request would add
    bucket: Bucket | None = None
    scope: str = "request"
    resets_at: float | None = None

    @property
    def headroom(self) -> int:
        return max(self.limit - self.used, 0)


@dataclass(slots=True)
class Decision:
    """The engine's answer for one request."""

    id: str
    action: str  # allow | block | hold | downgrade | clamp | truncate | alert
    allowed: bool
    estimate: Estimate | None
    body: Mapping[str, Any]
    edits: Mapping[str, Any] = field(default_factory=dict)
    hold_id: str | None = None
    trip: Trip | None = None
    tightest: BucketState | None = None
    alerts: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    #: for a refusal, the text for the person and the agent; empty when allowed (see ``describe``)
    message: str = ""
    original: Estimate | None = None
    #: reporting dimensions (identity, route, tier) logged with the charge
    dims: Mapping[str, str] = field(default_factory=dict)
    #: the clock the decision was made on (simulated in replays)
    at: float = 0.0
    #: rules whose remedy (downgrade, clamp, truncate) or approval shaped this decision, in order
    applied: tuple[str, ...] = ()
    #: decided for a dry run: its hold is released unlogged
    dry: bool = False
    #: rules a forced request (spend that already happened) was recorded past: each is now over
    over: tuple[str, ...] = ()
    #: what refused a request before it was priced (a pause, a capability, a key's models)
    refused_by: str = ""
    #: shadow rules that would have refused this request (recorded as ``would_refuse`` events)
    would_refuse: tuple[str, ...] = ()

    @property
    def retryable(self) -> bool:
        return self.trip is not None and self.trip.resets_at is not None

    @property
    def remaining_nanos(self) -> int | None:
        if self.trip is not None:
            return self.trip.headroom
        return self.tightest.remaining if self.tightest is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The ``spendgate`` object of a refusal body and of ``BudgetExceeded``."""
        t = self.trip
        est = self.estimate
        money = t is None or t.unit == "usd"

        def usd(n: int | None) -> str | None:
            return str(nanos_to_usd(n)) if n is not None and money else None

        out: dict[str, Any] = {
            "decision_id": self.id,
            "action": self.action,
            "rule": t.rule.name if t else (self.refused_by or None),
            "scope": t.scope if t else None,
            "window": t.rule.window.text if t else None,
            "limit_usd": usd(t.limit) if t else None,
            "spent_usd": usd(t.used) if t else None,
            "held_usd": None,
            "estimate_usd": str(nanos_to_usd(est.cost_nanos)) if est else None,
            "remaining_usd": usd(self.remaining_nanos),
            "resets_at": t.resets_at if t else None,
            "retryable": self.retryable,
            "recovery": self._recovery(),
            "model": est.model if est else None,
            "priced_as": f"{est.price.price.provider}/{est.price.price.model} ({est.price.how})" if est else None,
            "notes": list(self.notes),
        }
        if t is not None and t.unit == "tokens":
            out.update(limit_tokens=t.limit, used_tokens=t.used, estimate_tokens=t.amount)
        if t is not None and t.unit == "requests":
            out.update(limit_requests=t.limit, used_requests=t.used)
        if t is not None and t.bucket is not None and self.tightest is not None:
            out["spent_usd"] = usd(self.tightest.spent)
            out["held_usd"] = usd(self.tightest.held)
        return out

    def _recovery(self) -> str:
        if self.allowed:
            return ""
        t = self.trip
        if t is None:
            return "ask an operator" if self.refused_by else "fix the request"
        if t.rule.immutable:
            return "this limit is immutable: lower max_tokens or use a cheaper model"
        if self.action == "hold":
            return "approve this request (spendgate approve ID, optionally --max USD) or wait for the window"
        if t.resets_at is not None or t.unit == "requests":
            return "wait for the window to reset, or raise the budget"
        return "lower max_tokens, use a cheaper model, or raise the budget"


@dataclass(slots=True)
class Charge:
    """What :meth:`Engine.capture` charged."""

    cost_nanos: int
    usage: Usage | None
    estimated: bool
    captured: bool  # False when the hold had already expired (and was charged its worst case)
    #: the store failed: the charge waits in the engine's spool until :meth:`Engine.drain_spool`
    spooled: bool = False


#: (model, provider, tier) answers remembered by the rule matcher before it starts over
MATCH_MEMO_MAX = 4096


class Engine:
    """Policy + prices + ledger. Thread-safe; one per process is enough."""

    def __init__(self, policy: Policy, ledger: Ledger, prices: PriceTable | None = None,
                 estimator: Estimator | None = None, aledger: AsyncLedger | None = None,
                 spool: Spool | None = None) -> None:
        self.policy = policy
        self.ledger = ledger
        #: charges the store failed to take; the default (``spool.db`` in spendgate's home) makes
        #: no file until one must be kept
        self.spool = spool if spool is not None else Spool()
        #: the same store through an asyncio client, used by the ``a…`` methods when set
        self.aledger = aledger
        self.estimator = estimator or _estimator(prices or PriceTable.bundled(), policy)
        #: one scope's own limits (``spendgate budgets limit``), by (rule name, ``per=value``)
        self.limits: Mapping[tuple[str, str], Limit] = {}
        #: what is paused (``spendgate pause``): refused before pricing, whatever else allows
        self.pauses: tuple[Pause, ...] = ()
        self.set_policy(policy)
        #: told of every decision, approval and settlement (the audit log, metrics)
        self.observers: list[Observer] = []

    def set_policy(self, policy: Policy) -> None:
        """Decide from now on under ``policy`` (a reload, a run-time rule): nothing counted changes —
        the ledger keeps spend by bucket, and a limit is only what the next request is weighed
        against. A decision already running finishes under the policy it started with."""
        # immutable rules are weighed first (SPEC §3)
        rules = tuple(sorted(policy.rules, key=lambda r: not r.immutable))
        usd_limit = {r.name: usd_to_nanos(r.usd) for r in policy.rules if r.usd is not None}
        digest = policy_hash(policy)
        old = getattr(self, "policy", None)
        if old is not None and (old.unpriced, old.anthropic_token_factor) != (
                policy.unpriced, policy.anthropic_token_factor):
            # how unpriced models and offline counts are priced is the estimator's: a reload that
            # changes either must reach it, not only the log line naming the new policy
            self.estimator = _estimator(self.estimator.prices, policy)
        #: the rules that require a capability (checked before pricing; none in most policies)
        self._gated = tuple(r for r in rules if r.requires_capability is not None)
        # which rules a (model, provider, tier) falls under, remembered while no rule matches on tags
        # (then the answer depends on nothing else); a new dict per policy
        self._matched: dict[tuple[str, str, str], tuple[Rule, ...]] | None = \
            None if any(r.match.tags for r in rules) else {}
        self._rules, self._usd_limit, self.policy_hash, self.policy = rules, usd_limit, digest, policy

    def set_overrides(self, limits: Mapping[tuple[str, str], Limit], pauses: Sequence[Pause]) -> None:
        """Per-scope limits and pauses as the store holds them now (see :mod:`spendgate.policy.runtime`)."""
        self.limits, self.pauses = dict(limits), tuple(pauses)

    def buckets_for(self, rule: Rule, scope: str, now: float) -> list[RuleBucket]:
        """The buckets ``rule`` keeps for ``scope`` now, with that scope's own limits: what a request
        in that scope is weighed against (``/spendgate/me``, a top-up, a limit shown)."""
        return list(rule_buckets(rule, scope, now, self.limits.get((rule.name, scope))))

    def emit(self, event: Event, request: bytes | None = None) -> None:
        """Tell every observer of ``event`` (cheap when there are none)."""
        for observer in self.observers:
            observer(event, self.policy_hash, request)

    # -- deciding -----------------------------------------------------------------------------

    # -- drivers: the decision logic is written once, as steps that name the ledger calls they need,
    # -- and run by a sync driver (threads, the SDK) or an async one (the proxy on a networked store)

    def _run(self, steps: Generator[LedgerCall, Any, T]) -> T:
        try:
            call = next(steps)
            while True:
                name, kwargs = call
                try:
                    result = getattr(self.ledger, name)(**kwargs)
                except Exception as exc:  # handed to the step that asked, which may handle it
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            return cast(T, done.value)

    async def _arun(self, steps: Generator[LedgerCall, Any, T]) -> T:
        ledger = self.aledger
        try:
            call = next(steps)
            while True:
                name, kwargs = call
                try:
                    fn = getattr(ledger, name, None) if ledger is not None else None
                    if fn is not None:
                        result = await fn(**kwargs)
                    elif ledger is not None and self.ledger.networked:
                        # a call the asyncio client lacks (rare: approvals) runs on a thread
                        result = await asyncio.to_thread(getattr(self.ledger, name), **kwargs)
                    else:
                        result = getattr(self.ledger, name)(**kwargs)
                except Exception as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as done:
            return cast(T, done.value)

    def decide(self, request: Request, *, now: float | None = None, approval: Approval | None = None,
               extra_rules: Sequence[Rule] = ()) -> Decision:
        """Decide ``request`` under the policy plus ``extra_rules`` (the SDK's active budgets)."""
        d = self._run(self._decide(request, now, approval, extra_rules))
        d.dry = request.dry
        return d

    async def adecide(self, request: Request, *, now: float | None = None, approval: Approval | None = None,
                      extra_rules: Sequence[Rule] = ()) -> Decision:
        """:meth:`decide` for an event loop: ledger calls go through :attr:`aledger` when one is set."""
        d = await self._arun(self._decide(request, now, approval, extra_rules))
        d.dry = request.dry
        return d

    def _decide(self, request: Request, now: float | None, approval: Approval | None,
                extra_rules: Sequence[Rule]) -> Generator[LedgerCall, Any, Decision]:
        now = time.time() if now is None else now
        did = randomid.token_hex(8)
        if self.estimator.is_free(request.provider, request.route):
            return Decision(did, "allow", True, None, request.body, message="free route")
        policy, extra = self.policy, (*request.identity.rules, *extra_rules)
        own, matched = self._rules, self._matched
        all_rules = (*own, *extra) if extra else own
        # spend that already happened is recorded whatever is paused or required: it cannot be refused
        early = None if request.force else self._before_pricing(request, policy, extra, did, now)
        if early is not None:
            if not request.dry:
                yield from self._log_refusal(early, request)
            return early
        est = self._estimate(request, request.body)
        original = est
        body: dict[str, Any] = dict(request.body)
        edits: dict[str, Any] = {}
        notes = [est.price.warning] if est.price.warning else []
        bypass: set[str] = set()  # rule names an approval lets through once
        granted: set[str] = set()  # buckets an approval gave headroom to
        dims = request.identity.dims()
        dims["route"] = request.route
        applied: list[str] = []
        over: list[str] = []  # rules a forced request goes past (it is recorded all the same)
        truncated = False  # a truncate rule dropped older turns (the edit is the whole conversation)
        if policy.version is not None:
            dims["policy_version"] = policy.version
        for _ in range(MAX_REMEDIES):
            # a tool is no model: it is not put in the strict tier meant for unknown models
            tier = TOOL if request.fixed_nanos is not None else policy.tiers.tier_of(est.model)
            rules = self._matching(all_rules, None if extra else matched, est.model, request.provider, tier,
                                   request.identity.tags)
            request_trips, alerts = self._request_trips(rules, est, bypass)
            lines, owners = self._lines(rules, request, est, tier, now, bypass, did, marks=not request.dry)
            shadow = [t for t in request_trips if policy.mode_of(t.rule) == "shadow" and t.rule.action != "alert"]
            trips = [t for t in request_trips if t.rule.action != "alert" and t not in shadow]
            if request.force:  # already spent: a per-call limit it breaks is reported, not enforced
                over += [t.rule.name for t in trips]
                trips = []
            hold_id = None
            states: tuple[BucketState, ...] = ()
            dims["tier"] = tier
            if not trips:
                try:
                    auth = yield ("authorize", {"lines": lines, "now": now, "ttl": self._hold_ttl(est),
                                                "event": self._event(did, request.provider, est, dims, now)})
                except StoreError as exc:
                    if self.policy.on_store_error == "block":
                        raise StoreError(f"{exc}; refusing because on_store_error = \"block\"") from exc
                    log.warning("store unavailable, request allowed unmetered (on_store_error = allow): %s", exc)
                    notes.append(f"store unavailable ({exc}); allowed unmetered because on_store_error = \"allow\"")
                    unmetered = Decision(did, "allow", True, est, body, edits, None, None, None, (), tuple(notes),
                                         "store unavailable: allowed unmetered", original, dims, now, tuple(applied))
                    if not request.dry:
                        self.emit(self.decision_event(unmetered, request.provider), request.raw)
                    return unmetered
                states = auth.states
                self._emit_expired(auth)
                if auth.ok:
                    hold_id = auth.hold_id
                    if bypass:
                        yield from self._keep_limits(lines, owners, bypass, now)
                elif request.force:
                    over += [owners[k][0].name for k in auth.refused if owners[k][0].name not in over]
                    auth = yield from self._force(lines, now, self._hold_ttl(est),
                                                  self._event(did, request.provider, est, dims, now))
                    states, hold_id = auth.states, auth.hold_id
                else:
                    trips = [self._bucket_trip(owners[k], auth.state(k), lines, k, now) for k in auth.refused]
            if hold_id is not None:
                shadow += self._shadow_trips(lines, owners, states, policy)
                if shadow and not request.dry:
                    yield from self._log_would_refuse(shadow, did, request, est, dims, now)
                    notes += [f"shadow: budget \"{t.rule.name}\" would have refused this request" for t in shadow]
                alerts += self._alerts(rules, lines, owners, states)
                alerts += [f"{name}: recorded past its limit (spend that already happened)" for name in over]
                action = "alert" if alerts else ("downgrade" if "model" in edits else
                                                 "truncate" if truncated else "clamp" if edits else "allow")
                allowed = Decision(did, action, True, est, body, edits, hold_id, None,
                                   _tightest(states), tuple(alerts), tuple(notes), "", original, dims, now,
                                   tuple(applied), over=tuple(over),
                                   would_refuse=tuple(dict.fromkeys(t.rule.name for t in shadow)))
                if action != "allow" and not request.dry:
                    # a remedy or an alert is kept in the store like a refusal (spendgate tail, report,
                    # the decision list show it from any process); a plain allow is kept as its charge
                    yield from self._log_refusal(allowed, request)
                elif self.observers and not request.dry:
                    self.emit(self.decision_event(allowed, request.provider), request.raw)
                return allowed
            trip = self._worst(trips)
            # an immutable hold could never be approved: it is a block; no remedy lowers a count of requests
            act = "block" if trip.rule.immutable and trip.rule.action == "hold" else trip.rule.action
            if trip.unit == "requests" and act in ("downgrade", "clamp", "truncate"):
                act = "block"
            ok: bool | None = False
            if act == "hold" and approval is not None:
                ok = yield from self._approve(approval, trip, est, now, bypass, granted, did, dims)
            if ok is None:
                continue  # nothing left to grant, but a racing request's grant may have made room: re-check
            if ok:
                assert approval is not None
                notes.append(f"{trip.rule.name} approved by {approval.by}" + (
                    f" with ${approval.max_usd} headroom" if approval.max_usd is not None else " once"))
                applied.append(trip.rule.name)
                continue
            if act == "downgrade":
                cheaper = self._downgrade_target(trip.rule, est, request.identity)
                if cheaper is not None and self._before_pricing(
                        replace(request, body={**body, "model": cheaper}), policy, extra, did, now) is not None:
                    # a cheaper model that is paused, or that this caller's capability may not use, is
                    # no remedy: the request would reach what it may not reach directly
                    notes.append(f"{trip.rule.name}: {cheaper} is paused or not allowed for this caller")
                    cheaper = None
                if cheaper is not None:
                    body["model"] = cheaper
                    edits["model"] = cheaper
                    est = self._estimate(request, body)
                    applied.append(trip.rule.name)
                    continue
                notes.append(f"{trip.rule.name}: no cheaper model for {est.model}; refused")
                act = "block"
            if act == "clamp":
                fitted = self._clamp(trip, est)
                if fitted is not None:
                    field_name = self._output_field(request.provider, request.route, body)
                    body[field_name] = fitted
                    edits[field_name] = fitted
                    est = self.estimator.with_output(est, fitted)
                    applied.append(trip.rule.name)
                    continue
                notes.append(f"{trip.rule.name}: fewer than {trip.rule.min_output} output tokens fit; refused")
                act = "block"
            if act == "truncate":
                cut = self._truncate(request, body, trip)
                if cut is not None:
                    field_name, kept, dropped, est = cut
                    body[field_name] = edits[field_name] = kept
                    truncated = True
                    what = "messages" if field_name == "messages" else "input items"
                    notes.append(f"{trip.rule.name}: dropped the {dropped} oldest {what} to fit")
                    applied.append(trip.rule.name)
                    continue
                notes.append(f"{trip.rule.name}: no older turns can be dropped to fit "
                             "(the system prompt and the latest user turn are kept); refused")
                act = "block"
            refused = self._refusal(did, act, est, body, trip, states, notes, original, dims, now)
            if not request.dry:
                yield from self._log_refusal(refused, request)
            return refused
        raise RuntimeError("policy remedies did not converge")  # pragma: no cover - bounded chains

    def _log_refusal(self, d: Decision, request: Request) -> Generator[LedgerCall, Any, None]:
        """A refusal (or a remedy) is an event in the store (``/spendgate/decisions``, ``report``,
        ``tail``) and for the observers. A store that fails here only loses the row: the decision
        itself stands."""
        event = self.decision_event(d, request.provider)
        try:
            yield ("record", {"event": event})
        except StoreError as exc:
            log.warning("refusal %s not logged in the store: %s", d.id, exc)
        self.emit(event, request.raw)

    def _emit_expired(self, auth: Authorization) -> None:
        for gone in auth.expired:
            if gone.event is not None:
                self.emit(gone.event)

    def decision_event(self, d: Decision, provider: str) -> Event:
        """The event of one decision: its outcome, the rule and bucket that decided it, and the
        amounts weighed (what the request may cost; for a refusal, the limit and what was used)."""
        est = d.estimate
        t = d.trip
        amounts: dict[str, int] = {}
        rule = bucket = ""
        if est is not None:
            amounts["estimate_usd"] = est.cost_nanos
            if d.original is not None and d.original is not est:
                amounts["original_estimate_usd"] = d.original.cost_nanos
        if t is not None:
            rule, bucket = t.rule.name, t.bucket.key if t.bucket is not None else ""
            unit = "_usd" if t.unit == "usd" else "_tokens"
            amounts.update({f"limit{unit}": t.limit, f"used{unit}": t.used, f"request{unit}": t.amount})
        elif d.refused_by:
            rule = d.refused_by
        elif d.applied:
            rule = ",".join(d.applied)
        dims = dict(d.dims)
        if d.edits:
            dims["edits"] = ",".join(_edit_text(k, v) for k, v in d.edits.items())
        return Event(d.at, d.action, d.id, est.model if est else "", provider, 0,
                     est.input_tokens if est else 0, est.output_tokens if est else 0,
                     est.price.estimated_price if est else False, dims, rule, bucket, amounts)

    def _hold_ttl(self, est: Estimate) -> float:
        """How long a hold may live: the policy's TTL, or long enough to generate the request's whole
        output bound at a slow :data:`SLOWEST_TOKENS_PER_S` — a 64K-token answer can take most of
        an hour, and its hold must not expire (and be charged its worst case) while it streams."""
        return max(float(self.policy.hold_ttl_s), est.output_tokens / SLOWEST_TOKENS_PER_S)

    def _usd(self, rule: Rule) -> int | None:
        """A rule's dollar limit in nanos (precomputed for the policy's own rules)."""
        cached = self._usd_limit.get(rule.name)
        if cached is None and rule.usd is not None:
            return usd_to_nanos(rule.usd)
        return cached

    def _force(self, lines: Sequence[Line], now: float, ttl: float,
               event: Event) -> Generator[LedgerCall, Any, Authorization]:
        """Hold a forced request on every bucket whatever its limit (a line without a limit is never
        refused). The store keeps each bucket's limit as its latest hold gave it, so each real
        limit is put back at once (a grant of nothing) — ``spendgate status`` must keep showing the
        limit the bucket is now over, not none."""
        open_lines = [Line(replace(ln.bucket, limit=None), ln.amount, ln.alerts) for ln in lines]
        auth: Authorization = yield ("authorize", {"lines": open_lines, "now": now, "ttl": ttl, "event": event})
        self._emit_expired(auth)
        for ln in lines:
            if ln.bucket.limit is not None:
                yield ("grant", {"bucket": ln.bucket, "amount": 0, "now": now, "until": now})
        states = tuple(replace(st, limit=ln.bucket.limit) for st, ln in zip(auth.states, lines, strict=True))
        return replace(auth, states=states)

    @staticmethod
    def _matching(rules: Sequence[Rule], memo: dict[tuple[str, str, str], tuple[Rule, ...]] | None, model: str,
                  provider: str, tier: str, tags: Mapping[str, str]) -> Sequence[Rule]:
        """The rules a request falls under; from ``memo`` when given (no rule there matches on tags)."""
        if memo is None:
            return [r for r in rules if r.match.matches(model, provider, tier, tags)]
        key = (model, provider, tier)
        hit = memo.get(key)
        if hit is None:
            if len(memo) >= MATCH_MEMO_MAX:  # (models are the client's to name: the memo stays bounded)
                memo.clear()
            hit = memo[key] = tuple(r for r in rules if r.match.matches(model, provider, tier, tags))
        return hit

    def _estimate(self, request: Request, body: Mapping[str, Any]) -> Estimate:
        if request.fixed_nanos is not None:
            return fixed_estimate(request.provider, request.route, str(body.get("model") or TOOL),
                                  request.fixed_nanos)
        if request.shape is None:
            return self.estimator.estimate(request.provider, request.route, body)
        shape = replace(request.shape, model=str(body.get("model", request.shape.model)))
        return self.estimator.price(request.provider, request.route, shape)

    def _request_trips(self, rules: Sequence[Rule], est: Estimate,
                       bypass: set[str]) -> tuple[list[Trip], list[str]]:
        trips, alerts = [], []
        for r in rules:
            if r.window.kind != "request" or r.name in bypass:
                continue
            found = []
            usd = self._usd(r)
            if usd is not None and est.cost_nanos > usd:
                found.append(Trip(r, "usd", usd, 0, est.cost_nanos))
            if r.tokens is not None and est.tokens > r.tokens:
                found.append(Trip(r, "tokens", r.tokens, 0, est.tokens))
            if found and r.action == "alert":
                alerts.append(r.name)
            trips.extend(found)
        return trips, alerts

    def _lines(self, rules: Sequence[Rule], request: Request, est: Estimate, tier: str, now: float,
               bypass: set[str], did: str, marks: bool = True
               ) -> tuple[list[Line], dict[str, tuple[Rule, str, float | None]]]:
        """One ledger line per (rule, unit) of every windowed rule, with who owns each bucket. A
        shadow or alert rule's lines count without a limit: they never refuse."""
        lines: list[Line] = []
        owners: dict[str, tuple[Rule, str, float | None]] = {}
        amounts = {"usd": est.cost_nanos, "tokens": est.tokens, "requests": 1}
        of_request = {"model": est.model, "provider": request.provider, "tier": tier}
        for r in rules:
            if r.window.kind == "request":
                continue
            value = of_request.get(r.per) or request.identity.value(r.per)
            scope = f"{r.per}={value}"
            enforce = r.action != "alert" and r.name not in bypass and self.policy.mode_of(r) == "enforce"
            for rb in rule_buckets(r, scope, now, self.limits.get((r.name, scope))):
                fire = _marks(r, rb.key, rb.unit, rb.limit, scope, rb.period, now, did, est.model) \
                    if marks and (r.alert_at or r.action == "alert") else ()
                lines.append(Line(rb.bucket(enforce), amounts[rb.unit], fire))
                owners[rb.key] = (r, scope, rb.resets_at)
        return lines, owners

    def _keep_limits(self, lines: Sequence[Line], owners: Mapping[str, tuple[Rule, str, float | None]],
                     bypass: set[str], now: float) -> Generator[LedgerCall, Any, None]:
        """An approved request's hold went past its rule without that rule's limit, and the store
        keeps each bucket's limit as its latest hold gave it: put the rule's back (a grant of
        nothing), so status shows the limit the bucket is weighed against, not none."""
        for ln in lines:
            rule, scope, _ = owners[ln.bucket.key]
            if rule.name not in bypass or rule.action == "alert" or self.policy.mode_of(rule) != "enforce":
                continue
            limit = self._limit(rule, ln.bucket.unit, scope)
            if limit is not None:
                yield ("grant", {"bucket": replace(ln.bucket, limit=limit), "amount": 0, "now": now, "until": now})

    def _limit(self, rule: Rule, unit: str, scope: str) -> int | None:
        """``rule``'s limit in ``unit`` for ``scope``, with the scope's own limit if it has one."""
        return rule_limit(rule, unit, self.limits.get((rule.name, scope)))

    def _shadow_trips(self, lines: Sequence[Line], owners: Mapping[str, tuple[Rule, str, float | None]],
                      states: Sequence[BucketState], policy: Policy) -> list[Trip]:
        """The buckets of shadow rules this request took past their limit: the refusals they would
        have made (the hold is placed either way, so ``states`` already include this request)."""
        out = []
        for line, st in zip(lines, states, strict=True):
            rule, scope, resets = owners[line.bucket.key]
            if policy.mode_of(rule) != "shadow" or rule.action == "alert":
                continue
            limit = self._limit(rule, line.bucket.unit, scope)
            if limit is not None and st.used > limit + st.granted:
                out.append(Trip(rule, line.bucket.unit, limit + st.granted, st.used - line.amount, line.amount,
                                line.bucket, scope, resets))
        return out

    def _log_would_refuse(self, trips: Sequence[Trip], did: str, request: Request, est: Estimate,
                          dims: Mapping[str, str], now: float) -> Generator[LedgerCall, Any, None]:
        """One ``would_refuse`` event per shadow rule the request went past, kept in the store (so
        ``report`` and the decision list show it) and told to the observers (the audit log)."""
        for t in trips:
            unit = f"_{t.unit}"
            event = Event(now, "would_refuse", did, est.model, request.provider, 0, est.input_tokens,
                          est.output_tokens, est.price.estimated_price, dict(dims), t.rule.name,
                          t.bucket.key if t.bucket is not None else "",
                          {"estimate_usd": est.cost_nanos, f"limit{unit}": t.limit, f"used{unit}": t.used,
                           f"request{unit}": t.amount})
            try:
                yield ("record", {"event": event})
            except StoreError as exc:
                log.warning("would_refuse of %s not logged in the store: %s", did, exc)
            self.emit(event, request.raw)

    def _before_pricing(self, request: Request, policy: Policy, extra: Sequence[Rule], did: str,
                        now: float) -> Decision | None:
        """Refusals that need no price: a pause, a model the caller's key does not allow, a rule (of
        the policy, or ``extra``: the key's and the SDK's) whose capability the caller lacks. Each is
        a block no approval lifts."""
        ident = request.identity
        # the rules with a capability are few and known per policy: most requests check nothing here
        gated = [*self._gated, *(r for r in extra if r.requires_capability is not None)]
        if not self.pauses and not ident.models and not gated:
            return None
        model = str(request.body.get("model") or "")
        why = by = ""
        # a tool is no model: it is in the tool tier, as the rules see it after pricing
        tier = TOOL if request.fixed_nanos is not None else policy.tiers.tier_of(model) if model else ""
        for p in self.pauses:
            if pause_applies(p, ident, model, request.provider, tier):
                what = "all requests" if p.scope == "global" else p.scope
                why = (f"spendgate: {what} paused by {p.by or 'an operator'} at {clock_text(p.at, now)}"
                       + (f" ({p.reason})" if p.reason else "") + "; nothing is sent until it is resumed "
                       "(spendgate resume). No approval lifts a pause.")
                by = "pause"
                break
        if not why and model and not _model_allowed(ident, model):
            why = (f"spendgate: this key may call only {', '.join(ident.models)}; {model!r} is not one of them. "
                   "Use an allowed model, or ask an operator for a key that allows it.")
            by = "key-models"
        if not why:
            have = capability_rank(ident.capability)
            for r in gated:
                need = r.requires_capability
                if need is None or capability_rank(need) <= have:
                    continue
                if not r.match.matches(model, request.provider, tier, ident.tags):
                    continue
                if policy.mode_of(r) == "shadow":
                    continue  # a capability rule being rolled out refuses nothing
                why = (f"spendgate: budget \"{r.name}\" requires capability {need}; this request carries "
                       f"{ident.capability or 'none'}. A virtual key made with --capability {need} (or higher) "
                       "may send it.")
                by = r.name
                break
        if not why:
            return None
        dims = ident.dims()
        dims["route"] = request.route
        return Decision(did, "block", False, None, request.body, message=why, dims=dims, at=now, refused_by=by)

    def _bucket_trip(self, owner: tuple[Rule, str, float | None], state: BucketState,
                     lines: Sequence[Line], key: str, now: float) -> Trip:
        rule, scope, resets = owner
        line = next(ln for ln in lines if ln.bucket.key == key)
        limit = (state.limit or 0) + state.granted
        return Trip(rule, line.bucket.unit, limit, state.used, line.amount, line.bucket, scope,
                    resets if resets is not None else state.frees_at)

    @staticmethod
    def _worst(trips: Sequence[Trip]) -> Trip:
        return max(trips, key=lambda t: (t.rule.immutable, SEVERITY[t.rule.action]))

    def _approve(self, approval: Approval, trip: Trip, est: Estimate, now: float, bypass: set[str],
                 granted: set[str], did: str, dims: Mapping[str, str]
                 ) -> Generator[LedgerCall, Any, bool | None]:
        """Apply a yes to a hold: once (this request passes the rule), or as ``max_usd`` of headroom
        on the bucket (so the next requests are not held again). Whether it covers the hold — None
        when its channel's ceiling is used up: the bucket is then checked once more as it stands
        (a request racing this one may just have been granted the headroom). Every approval applied
        is logged as an ``approval`` event."""
        if approval.rules is not None and trip.rule.name not in approval.rules:
            return False
        ceiling = usd_to_nanos(approval.ceiling_usd) if approval.ceiling_usd is not None else None
        cap = usd_to_nanos(approval.max_usd) if approval.max_usd is not None else None
        if trip.bucket is None:  # a per-call rule: the call itself must fit what was approved
            bounds = [x for x in (cap, ceiling) if x is not None]
            if trip.unit == "usd" and bounds and trip.amount > min(bounds):
                return False
            bypass.add(trip.rule.name)
            yield from self._log_approval(approval, trip, est, None, now, did, dims)
            return True
        if cap is None or trip.unit != "usd":  # once: this request passes the bucket's rule
            if ceiling is None:
                yield from self._log_approval(approval, trip, est, None, now, did, dims)
            elif not (yield from self._within_ceiling(approval, trip, est.cost_nanos, ceiling, now, did, dims,
                                                      once=True)):
                # passing a bucket spends past it: that counts against the ceiling
                return _recheck_once(trip.bucket.key, granted)
            bypass.add(trip.rule.name)
            return True
        if trip.bucket.key in granted:
            return False  # headroom already granted for this request and still not enough
        granted.add(trip.bucket.key)
        amount = cap
        if ceiling is not None:
            given = yield from self._within_ceiling(approval, trip, amount, ceiling, now, did, dims, once=False)
            if not given:
                return None  # the bucket key is in ``granted``: a second trip on it is refused
            amount = given
        else:
            yield from self._log_approval(approval, trip, est, amount, now, did, dims)
        w = trip.rule.window
        until = (now + w.seconds if w.kind == "rolling"
                 else trip.resets_at if trip.resets_at is not None else math.inf)
        yield ("grant", {"bucket": trip.bucket, "amount": amount, "now": now, "until": until})
        return True

    def _within_ceiling(self, approval: Approval, trip: Trip, want: int, ceiling: int, now: float, did: str,
                        dims: Mapping[str, str], *, once: bool) -> Generator[LedgerCall, Any, int]:
        """Take up to ``want`` of what ``approval``'s channel may still grant ``trip``'s bucket in
        its window (all of it for a ``once`` pass); 0 when the ceiling is used up. The ledger's own
        authorize-then-capture on a ceiling bucket makes this atomic across instances, and the
        capture logs the approval event with it."""
        assert trip.bucket is not None
        b = trip.bucket
        cap_bucket = Bucket(f"approval:{approval.channel}|{b.key}", ceiling, b.window_s, "usd", b.ends_at)
        amount = min(want, ceiling)
        for _ in range(2):  # what is asked, then what is left
            if amount <= 0 or (once and amount < want):
                return 0
            auth = yield ("authorize", {"lines": [Line(cap_bucket, amount)], "now": now, "ttl": 60.0})
            self._emit_expired(auth)
            if auth.ok:
                event = self._approval_event(approval, trip, None if once else amount, now, did, dims)
                yield ("capture", {"hold_id": auth.hold_id, "actual": {"usd": amount}, "now": now, "event": event})
                self.emit(event)
                return amount
            amount = auth.states[0].remaining or 0
        return 0

    def _log_approval(self, approval: Approval, trip: Trip, est: Estimate, amount: int | None, now: float,
                      did: str, dims: Mapping[str, str]) -> Generator[LedgerCall, Any, None]:
        if not approval.recorded:
            event = self._approval_event(approval, trip, amount, now, did, dims, est)
            yield ("record", {"event": event})
            self.emit(event)

    @staticmethod
    def _approval_event(approval: Approval, trip: Trip, amount: int | None, now: float, did: str,
                        dims: Mapping[str, str], est: Estimate | None = None) -> Event:
        """An ``approval`` event: who lifted which rule on which bucket, and by how much (no spend)."""
        return approval_event(now, did, approval.channel, approval.by, trip.rule.name,
                              trip.bucket.key if trip.bucket is not None else None, amount, dims,
                              est.model if est is not None else "", est.provider if est is not None else "")

    def _downgrade_target(self, rule: Rule, est: Estimate, identity: Identity) -> str | None:
        """The cheaper model ``rule`` names for this one — never one the caller's key does not allow."""
        names = [est.model, est.model.lower(), est.price.price.model]
        for n in names:
            if n in rule.downgrade:
                cheaper = rule.downgrade[n]
                return cheaper if _model_allowed(identity, cheaper) else None
        return None

    def _clamp(self, trip: Trip, est: Estimate) -> int | None:
        """The largest per-choice output bound that fits ``trip``'s headroom, if ≥ min_output
        (None for an output no field bounds, such as a generated image: a clamp cannot lower it)."""
        if est.shape.fixed_output:
            return None
        choices = max(est.shape.choices, 1)
        if trip.unit == "tokens":
            fit = (trip.headroom - est.input_tokens) // choices
        else:
            price = est.price.price
            input_cost = worst_case_nanos(price, est.input_tokens, 0, est.shape.cache_write)
            per_token = output_rate(price, est.input_tokens) * Decimal(1000)  # nanos per token
            if per_token <= 0:
                return None
            fit = math.floor(Decimal(trip.headroom - input_cost) / per_token) // choices
        current = est.output_tokens // choices
        if fit < trip.rule.min_output or fit >= current:
            return None
        return int(fit)

    def _truncate(self, request: Request, body: Mapping[str, Any],
                  trip: Trip) -> tuple[str, list[Any], int, Estimate] | None:
        """The conversation with the fewest oldest turns dropped whose worst case fits ``trip``'s
        headroom: (its field, the kept items, how many were dropped, its estimate); None when no
        cut fits. Every cut is priced, fewest dropped first — a shorter prompt is not always a
        cheaper worst case (without ``max_tokens`` the output bound grows as the input shrinks),
        so the first that fits is the least taken away. A request priced from given token counts
        (a replayed trace) has no conversation to shorten."""
        if request.shape is not None or request.fixed_nanos is not None:
            return None
        for dropped, shorter in truncate.shorter(request.provider, request.route, body):
            est = self._estimate(request, shorter)
            amount = est.cost_nanos if trip.unit == "usd" else est.tokens
            if amount <= trip.headroom:
                name = truncate.conversation_field(request.provider, request.route, shorter)
                assert name is not None
                return name, shorter[name], dropped, est
        return None

    def _output_field(self, provider: str, route: str, body: Mapping[str, Any]) -> str:
        fields = self.estimator.output_fields(provider, route)
        return next((f for f in fields if f in body), fields[0])

    def _alerts(self, rules: Sequence[Rule], lines: Sequence[Line],
                owners: Mapping[str, tuple[Rule, str, float | None]],
                states: Sequence[BucketState]) -> list[str]:
        """Alert-mode rules that this request takes past their limit, and ``alert_at`` crossings."""
        out = []
        for line, st in zip(lines, states, strict=True):
            rule, scope, _ = owners[line.bucket.key]
            limit = line.bucket.limit if line.bucket.limit is not None else \
                self._limit(rule, line.bucket.unit, scope)
            if not limit:
                continue
            before, after = st.used - line.amount, st.used
            if rule.action == "alert" and after > limit:
                out.append(f"{rule.name}: {line.bucket.key} over its limit")
            for frac in rule.alert_at:
                mark = limit * frac
                if before < mark <= after:
                    out.append(f"{rule.name}: {line.bucket.key} reached {frac:.0%}")
        return out

    @staticmethod
    def _event(did: str, provider: str, est: Estimate, dims: Mapping[str, str], now: float) -> Event:
        """The spend-log row kept with a hold, so an expired hold is logged with its origin."""
        return Event(now, "capture", did, est.model, provider, est.cost_nanos,
                     est.input_tokens, est.output_tokens, est.price.estimated_price, dict(dims))

    def _refusal(self, did: str, act: str, est: Estimate, body: Mapping[str, Any], trip: Trip,
                 states: Sequence[BucketState], notes: list[str], original: Estimate,
                 dims: Mapping[str, str], now: float) -> Decision:
        tight = next((s for s in states if trip.bucket is not None and s.key == trip.bucket.key), None)
        d = Decision(did, act, False, est, body, {}, None, trip, tight, (), tuple(notes), "", original,
                     dims, now)
        return replace(d, message=refusal_message(d, self.ledger.url))

    # -- settling -----------------------------------------------------------------------------

    def capture(self, decision: Decision, usage: Usage | Mapping[str, Any] | None, *,
                output_seen: int | None = None, now: float | None = None) -> Charge:
        """Charge what the provider billed (a response body or its ``usage``).

        Usage that is missing or not a set of non-negative integer counts is charged like an
        unknown outcome — the input plus ``output_seen`` when the caller counted the output (a
        stream), else the worst case — flagged estimated, with a warning naming the bad field.
        It is never read as zero: the provider bills that response all the same."""
        return self._run(self._capture(decision, usage, output_seen, now))

    async def acapture(self, decision: Decision, usage: Usage | Mapping[str, Any] | None, *,
                       output_seen: int | None = None, now: float | None = None) -> Charge:
        return await self._arun(self._capture(decision, usage, output_seen, now))

    def charge_unknown(self, decision: Decision, output_seen: int | None = None, *,
                       now: float | None = None) -> Charge:
        """The outcome is unknown (timeout after send, disconnect): charge the input plus the
        output seen so far, or the whole worst case when nothing was seen; flagged estimated."""
        return self._run(self._unknown(decision, output_seen, now))

    async def acharge_unknown(self, decision: Decision, output_seen: int | None = None, *,
                              now: float | None = None) -> Charge:
        return await self._arun(self._unknown(decision, output_seen, now))

    def release(self, decision: Decision, *, now: float | None = None) -> bool:
        """The request was never sent: drop its hold without charge."""
        return self._run(self._release(decision, now))

    async def arelease(self, decision: Decision, *, now: float | None = None) -> bool:
        return await self._arun(self._release(decision, now))

    # -- fixed amounts: spend that is not an LLM call ------------------------------------------

    def capture_amount(self, decision: Decision, nanos: int, *, estimated: bool = False,
                       now: float | None = None) -> Charge:
        """Charge a fixed-amount request's hold ``nanos`` (at most what it holds: the caller checks)
        and release the rest. ``estimated``: the caller never said, and the hold is charged whole."""
        return self._run(self._capture_amount(decision, nanos, estimated, now))

    async def acapture_amount(self, decision: Decision, nanos: int, *, estimated: bool = False,
                              now: float | None = None) -> Charge:
        return await self._arun(self._capture_amount(decision, nanos, estimated, now))

    def record_spend(self, request: Request, *, now: float | None = None,
                     extra_rules: Sequence[Rule] = ()) -> tuple[Decision, Charge]:
        """Record a fixed amount already spent (``request.force``): held on every bucket, past any
        limit, then captured — so concurrent charges and LLM calls count exactly. The decision's
        ``over`` names the rules it went past."""
        return self._run(self._record_spend(request, now, extra_rules))

    async def arecord_spend(self, request: Request, *, now: float | None = None,
                            extra_rules: Sequence[Rule] = ()) -> tuple[Decision, Charge]:
        return await self._arun(self._record_spend(request, now, extra_rules))

    def _capture_amount(self, decision: Decision, nanos: int, estimated: bool,
                        now: float | None) -> Generator[LedgerCall, Any, Charge]:
        if decision.hold_id is None or decision.estimate is None:
            return Charge(0, None, estimated, False)
        return (yield from self._settle(decision, nanos, 0, None, now, estimated, fixed=True))

    def _record_spend(self, request: Request, now: float | None,
                      extra_rules: Sequence[Rule]) -> Generator[LedgerCall, Any, tuple[Decision, Charge]]:
        if request.fixed_nanos is None or not request.force:
            raise ValueError("record_spend takes a fixed-amount request with force=True")
        now = time.time() if now is None else now
        d = yield from self._decide(request, now, None, extra_rules)
        charge = yield from self._capture_amount(d, request.fixed_nanos, False, now)
        return d, charge

    def drain_spool(self, now: float | None = None) -> int:
        """Apply the charges spooled while the store was failing; how many left the spool.

        Synchronous (the spool's file and the store's sync client): call it from a thread, now and
        then; with nothing ever spooled it only checks that the spool file does not exist."""
        return self.spool.drain(self.ledger, time.time() if now is None else now)

    def _capture(self, decision: Decision, usage: Usage | Mapping[str, Any] | None, output_seen: int | None,
                 now: float | None) -> Generator[LedgerCall, Any, Charge]:
        est = decision.estimate
        if decision.hold_id is None or est is None:
            return Charge(0, None, False, False)
        if isinstance(usage, Usage):
            parsed = usage
        else:
            try:
                parsed = read_usage(usage)
            except UnreadableUsage as why:
                log.warning("%s; charged %s (decision %s, %s)", why,
                            "the input and the output seen so far" if output_seen is not None else "the worst case",
                            decision.id, est.model)
                return (yield from self._unknown(decision, output_seen, now))
        cost = usage_nanos(self._served_price(est, parsed), parsed)
        return (yield from self._settle(decision, cost, parsed.total_tokens, parsed, now,
                                        estimated=est.price.estimated_price))

    def _served_price(self, est: Estimate, usage: Usage) -> ModelPrice:
        """The rates of the tier the provider says it served (the response's ``service_tier`` /
        ``speed``), over what the request asked; the held variant's when the response is silent."""
        warn_unknown(usage, est.model, est.provider)
        served = usage.served()
        if not served:
            return est.price.price
        base = est.price.standard or est.price.price
        return base.at_variant({**est.variant, **served})

    def _unknown(self, decision: Decision, output_seen: int | None,
                 now: float | None) -> Generator[LedgerCall, Any, Charge]:
        est = decision.estimate
        if decision.hold_id is None or est is None:
            return Charge(0, None, True, False)
        if output_seen is None:
            return (yield from self._settle(decision, est.cost_nanos, est.tokens, None, now))
        cost = worst_case_nanos(est.price.price, est.input_tokens, output_seen, est.shape.cache_write)
        if est.searches:  # searches it may have run before the cut are billed: at the most it allowed
            cost += usage_nanos(est.price.price, Usage(web_searches=est.searches))
        return (yield from self._settle(decision, cost, est.input_tokens + output_seen, None, now))

    def _release(self, decision: Decision, now: float | None) -> Generator[LedgerCall, Any, bool]:
        """A release the store fails is only logged: the hold expires and is charged its worst
        case, which over-counts and never under-counts — no reason to fail the caller's reply."""
        if decision.hold_id is None:
            return False
        now = time.time() if now is None else now
        est = decision.estimate
        event = None if decision.dry else Event(
            now, "released", decision.id, est.model if est else "", est.provider if est else "", 0,
            dims=dict(decision.dims), amounts={"held_usd": est.cost_nanos} if est else {})
        try:
            released: bool = yield ("release", {"hold_id": decision.hold_id, "now": now, "event": event})
        except StoreError as exc:
            log.warning("the store failed to release the hold of decision %s (%s); it will expire and be "
                        "charged its worst case", decision.id, exc)
            return False
        if released and event is not None:
            self.emit(event)
        return released

    def _settle(self, decision: Decision, cost: int, tokens: int, usage: Usage | None, now: float | None,
                estimated: bool = True, *, fixed: bool = False) -> Generator[LedgerCall, Any, Charge]:
        """Charge ``cost``. ``fixed``: an amount the caller states (non-LLM spend) — a capture with
        no usage, estimated only when the caller said nothing (``estimated``)."""
        now = time.time() if now is None else now
        est = decision.estimate
        assert est is not None and decision.hold_id is not None
        flagged = estimated if fixed else (estimated or usage is None)
        event = Event(now, "capture" if usage is not None or fixed else "unknown", decision.id, est.model,
                      est.provider, cost,
                      usage.total_input if usage else est.input_tokens,
                      usage.output if usage else tokens - est.input_tokens,
                      flagged, dict(decision.dims), amounts=_token_parts(usage))
        actual = {"usd": cost, "tokens": tokens}
        try:
            captured: bool = yield ("capture", {"hold_id": decision.hold_id, "actual": actual, "now": now,
                                                "event": event})
        except StoreError as exc:
            # the provider answered and bills it: the answer must still reach the client, and the
            # charge waits on local disk for drain_spool rather than be lost
            spooled = self._spool(decision, actual, event, exc)
            if spooled:
                self.emit(event)
            return Charge(cost, usage, flagged, False, spooled=spooled)
        if captured:  # else the hold had expired: its expiry was the charge, and was logged then
            self.emit(event)
        return Charge(cost, usage, flagged, captured)

    def _spool(self, decision: Decision, actual: Mapping[str, int], event: Event, exc: StoreError) -> bool:
        assert decision.hold_id is not None
        try:
            self.spool.add(decision.hold_id, actual, event)
        except StoreError as err:
            log.error("the store failed to charge decision %s (%s) and the spool could not keep the charge "
                      "(%s); its hold will expire and be charged its worst case", decision.id, exc, err)
            return False
        log.warning("the store failed to charge decision %s (%s); %s kept in %s until the store is back",
                    decision.id, exc, fmt_usd(actual["usd"]), self.spool.path)
        return True


_FREE = Rate(Decimal(0))


def fixed_estimate(provider: str, route: str, name: str, nanos: int) -> Estimate:
    """The estimate of a fixed-amount request: exactly ``nanos``, no tokens, named ``name``."""
    price = ModelPrice(provider, name, _FREE, _FREE, source="a fixed amount named by the caller")
    return Estimate(provider, route, TokenShape(name, 0, 0), Resolution(name, price, "exact"), 0,
                    "fixed amount", nanos)


def _edit_text(name: str, value: Any) -> str:
    """One edit as the decision log shows it: a truncated conversation by its length (the log
    keeps no prompt text), any other edit by its value."""
    if isinstance(value, list):
        return f"{name}=[{len(value)} kept]"
    return f"{name}={value}"


def _recheck_once(key: str, seen: set[str]) -> bool | None:
    if key in seen:
        return False
    seen.add(key)
    return None


def approval_event(now: float, decision_id: str, channel: str, by: str, rule: str, bucket: str | None,
                   granted: int | None, dims: Mapping[str, str] | None = None, model: str = "",
                   provider: str = "") -> Event:
    """The log entry of one approval: its channel, who gave it, the rule and bucket it lifted, the
    headroom granted (None: once) and when. It charges nothing (cost 0)."""
    extra = {"channel": channel, "by": by, "rule": rule, "bucket": bucket or "(request)",
             "granted_usd": str(nanos_to_usd(granted)) if granted is not None else "once"}
    return Event(now, "approval", decision_id, model, provider, 0, dims={**(dims or {}), **extra})


def _marks(rule: Rule, key: str, unit: str, limit: int, scope: str, period: str, now: float, did: str,
           model: str) -> tuple[AlertMark, ...]:
    """The alerts a bucket of ``rule`` may fire, each once per bucket, period and threshold (the key
    says which): every ``alert_at`` fraction when spent + held reaches it — the 1.0 one also when the
    bucket refuses a request, as a budget rarely lands on exactly 100 % — and, for an
    ``action = "alert"`` rule, going over the limit."""
    if limit <= 0:
        return ()
    base = {"rule": rule.name, "bucket": key, "scope": scope, "window": rule.window.text, "period": period,
            "decision_id": did, "model": model, "ts": now}
    if unit == "usd":
        base["limit_usd"] = str(nanos_to_usd(limit))
    else:
        base[f"limit_{unit}"] = str(limit)
    marks = []
    for frac in rule.alert_at:
        text = format(frac.normalize(), "f")
        fkey = f"{key}|{period}|{text}"
        at = max(1, math.ceil(Decimal(limit) * frac))
        marks.append(AlertMark(fkey, json.dumps({"type": "threshold", "threshold": text, **base}), at))
        if frac == 1:
            marks.append(AlertMark(fkey, json.dumps({"type": "refused", "threshold": "1", **base}),
                                   on_refusal=True))
    if rule.action == "alert":
        marks.append(AlertMark(f"{key}|{period}|over", json.dumps({"type": "over", **base}), limit + 1))
    return tuple(marks)


def _estimator(prices: PriceTable, policy: Policy) -> Estimator:
    kwargs: dict[str, Any] = {}
    if policy.anthropic_token_factor is not None:
        kwargs["anthropic_factor"] = policy.anthropic_token_factor
    return Estimator(prices, policy.unpriced, **kwargs)


def _token_parts(usage: Usage | None) -> dict[str, int]:
    """The parts of a charge's token counts a reader may want apart (metrics by token type, the
    audit log): cached input read and written, and reasoning within the output. Zeros are left out."""
    if usage is None:
        return {}
    parts = {"cache_read_tokens": usage.cache_read + usage.cache_audio_read + usage.cache_image_read,
             "cache_write_tokens": usage.cache_write_5m + usage.cache_write_1h,
             "reasoning_tokens": usage.reasoning}
    return {k: v for k, v in parts.items() if v}


def _model_allowed(identity: Identity, model: str) -> bool:
    """Whether the caller's key allows ``model`` (a key without a model list allows any)."""
    if not identity.models:
        return True
    m = model.lower()
    return any(fnmatch.fnmatchcase(m, g.lower()) or fnmatch.fnmatchcase(m.rsplit("/", 1)[-1], g.lower())
               for g in identity.models)


def global_keys(rule: Rule) -> list[str]:
    """Both bucket keys of a ``per = "global"`` rule without calendar periods."""
    key = bucket_key(rule.name, f"global={NONE}")
    return [key, tokens_key(key)]


def _tightest(states: Sequence[BucketState]) -> BucketState | None:
    money = [s for s in states if s.unit == "usd" and s.remaining is not None]
    return min(money, key=lambda s: s.remaining or 0) if money else None


def scope_text(scope: str) -> str:
    """A bucket's scope as a person says it: ``global=(none)`` is every request, ``user=(none)``
    the requests that name no user; ``session=s1`` stays as it is (it names the one it counts)."""
    name, _, value = scope.partition("=")
    if name == "global":
        return "all requests"
    if value == NONE:
        return f"requests with no {name}"
    return scope


def wait_text(seconds: float) -> str:
    """``15 h 57 min``, ``12 min``, ``40 s``: rounded up, so waiting that long is always enough."""
    wait = max(0, math.ceil(seconds))
    if wait < 60:
        return f"{wait} s"
    minutes = math.ceil(wait / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"


def clock_text(at: float, now: float) -> str:
    """When, in UTC (the server's clock zone is nobody's in particular), with the date once it is
    not today."""
    when, today = time.gmtime(math.ceil(at / 60) * 60), time.gmtime(now)  # rounded up, like wait_text
    same_day = when[:3] == today[:3]
    return time.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC", when)


def approve_command(hold_id: str, store_url: str | None) -> str | None:
    """The ``spendgate approve`` command that reaches this hold from any shell, or ``None`` when no
    command can (an in-memory store lives only in the process that holds it).

    A hold lives in the store that refused it, so a command run without that store would look in
    the default one and report the hold missing: the hint names ``--store`` whenever the store is
    not the default (as the alerts do), password redacted, with a SQLite path made absolute since
    the other shell has another working directory."""
    import os

    from spendgate.events.alerts import approve_command as command

    if not store_url:
        return f"spendgate approve {hold_id}"
    if store_url.startswith("memory://"):
        return None
    if store_url.startswith("sqlite:///"):
        path = os.path.expanduser(store_url.removeprefix("sqlite:///"))
        store_url = f"sqlite:///{os.path.abspath(path)}" if path else store_url
    return command(hold_id, store_url)


def refusal_message(d: Decision, store_url: str | None = None) -> str:
    """Written for the person and for the agent reading it: what tripped, how much, what to do.

    ``store_url`` is the store holding the request, so the approve command it prints works as
    printed (see :func:`approve_command`)."""
    t = d.trip
    est = d.estimate
    assert t is not None and est is not None
    if t.unit == "usd":
        amount = (f"this request's worst case is {fmt_usd(t.amount)}; {fmt_usd(t.used)} of the "
                  f"{fmt_usd(t.limit)} budget is already spent or held")
        if t.bucket is None:
            amount = f"this request's worst case is {fmt_usd(t.amount)}, over the {fmt_usd(t.limit)} per-call limit"
    elif t.unit == "requests":
        amount = f"{t.used:,} of the {t.limit:,} requests it allows are already made or in flight"
    else:
        amount = f"this request could use {t.amount:,} tokens; {t.used:,} of {t.limit:,} are used"
    verb = {"hold": "is held for approval", "block": "was refused"}.get(d.action, "was refused")
    where = f" ({scope_text(t.scope)}, window {t.rule.window.text})" if t.bucket is not None else ""
    parts = [f"spendgate: this {est.model} request {verb} by budget \"{t.rule.name}\"{where}: {amount}."]
    if d.action == "hold":
        cmd = approve_command(d.id, store_url)
        if cmd is None:
            parts.append(f"This hold is kept in memory, so `spendgate approve {d.id}` in another shell cannot "
                         f"reach it: approve it through the admin API (POST /spendgate/approvals/{d.id}) or answer "
                         "yes in your next message.")
        else:
            parts.append(f"To approve it, run `{cmd}` (add --max 5 to allow $5 more "
                         "without asking again), or answer yes in your next message.")
    elif t.rule.immutable:
        parts.append("This limit is immutable; no approval can lift it. Lower max_tokens or pick a "
                     "cheaper model.")
    if t.resets_at is not None:
        parts.append(f"Room frees up in {wait_text(t.resets_at - d.at)} (at {clock_text(t.resets_at, d.at)}).")
    parts.append("Do not retry this request unchanged.")
    parts.extend(d.notes)
    return " ".join(parts)
