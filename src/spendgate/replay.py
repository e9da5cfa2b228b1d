"""What would this policy have saved? A recorded trace through the real engine, on a simulated clock.

Each record is decided at its own timestamp by :class:`~spendgate.engine.Engine` over a fresh
``memory://`` ledger, then captured with the usage it recorded. A hold is answered *no* by default,
and that session stops for the rest of the trace, as it would when a person says no; ``persist``
models an agent that keeps sending, each request judged again; ``approve`` answers yes (once).

The worst case of a recorded request is its ``max_tokens`` when the trace has it, else the
output it actually produced: a replay judges what was sent, not what the model could have sent.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spendgate import ledger, providers
from spendgate.engine import Approval, Engine
from spendgate.errors import ConfigError
from spendgate.estimate.shape import TokenShape
from spendgate.money import nanos_to_usd
from spendgate.policy.model import Policy
from spendgate.pricing.cost import Usage, usage_nanos
from spendgate.pricing.table import PriceTable
from spendgate.request import Identity, Request


@dataclass(frozen=True, slots=True)
class TraceRecord:
    ts: float
    model: str
    provider: str
    usage: Usage
    max_tokens: int | None
    identity: Identity
    line: int


@dataclass
class Firing:
    ts: float
    rule: str
    action: str
    session: str
    model: str
    estimate_usd: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"timestamp": dt.datetime.fromtimestamp(self.ts, dt.UTC).isoformat(), "rule": self.rule,
                "action": self.action, "session": self.session, "model": self.model,
                "estimate_usd": self.estimate_usd, "detail": self.detail}


@dataclass
class ReplayResult:
    requests: int = 0
    forwarded: int = 0
    refused: int = 0
    total_nanos: int = 0
    forwarded_nanos: int = 0
    firings: list[Firing] = field(default_factory=list)
    stopped_sessions: list[str] = field(default_factory=list)
    #: (timestamp, cumulative without guard, cumulative with guard), for charts
    series: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def refused_nanos(self) -> int:
        return self.total_nanos - self.forwarded_nanos

    @property
    def reduction(self) -> float:
        return self.refused_nanos / self.total_nanos if self.total_nanos else 0.0

    def as_dict(self) -> dict[str, Any]:
        by_rule = Counter((f.rule, f.action) for f in self.firings)
        return {
            "requests": self.requests,
            "forwarded": self.forwarded,
            "refused": self.refused,
            "total_usd": str(nanos_to_usd(self.total_nanos)),
            "forwarded_usd": str(nanos_to_usd(self.forwarded_nanos)),
            "refused_usd": str(nanos_to_usd(self.refused_nanos)),
            "reduction": round(self.reduction, 4),
            "stopped_sessions": self.stopped_sessions,
            "rules": [{"rule": r, "action": a, "count": n} for (r, a), n in sorted(by_rule.items())],
            "firings": [f.as_dict() for f in self.firings],
        }


def _ts(value: Any, line: int) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
    raise ConfigError(f"trace line {line}: `timestamp` must be epoch seconds or ISO 8601, got {value!r}")


def _count(rec: Mapping[str, Any], key: str, line: int, required: bool = False) -> int:
    v = rec.get(key)
    if v is None and not required:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"trace line {line}: `{key}` must be a non-negative integer, got {v!r}")
    return v


def parse_record(rec: Mapping[str, Any], line: int, prices: PriceTable) -> TraceRecord:
    """One trace line: spendgate's own event log, or the generic JSONL of SPEC §10."""
    if "decision_id" in rec and "ts" in rec:  # a spendgate event
        dims = rec.get("dims") or {}
        usage = Usage(input=_count(rec, "input_tokens", line), output=_count(rec, "output_tokens", line))
        ident = Identity(session=dims.get("session"), user=dims.get("user"), team=dims.get("team"),
                         key=dims.get("key"), agent=dims.get("agent"), feature=dims.get("feature"))
        return TraceRecord(_ts(rec["ts"], line), str(rec["model"]),
                           str(rec.get("provider") or providers.for_model(str(rec["model"]), prices).name),
                           usage, None, ident, line)
    model = rec.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"trace line {line}: `model` is missing")
    usage = Usage(input=_count(rec, "input_tokens", line, True),
                  cache_read=_count(rec, "cache_read_tokens", line),
                  cache_write_5m=_count(rec, "cache_creation_tokens", line),
                  output=_count(rec, "output_tokens", line, True),
                  reasoning=_count(rec, "reasoning_tokens", line))
    provider = rec.get("provider")
    if not isinstance(provider, str):
        provider = providers.for_model(model, prices).name
    tags = {k: str(v) for k, v in (rec.get("tags") or {}).items()}
    ident = Identity(session=_opt(rec.get("session_id")), user=_opt(rec.get("user")),
                     team=_opt(rec.get("team")), agent=_opt(rec.get("agent")),
                     feature=_opt(rec.get("feature")), key=_opt(rec.get("key")), tags=tags)
    max_tokens = _count(rec, "max_tokens", line) if rec.get("max_tokens") is not None else None
    return TraceRecord(_ts(rec.get("timestamp"), line), model, provider, usage, max_tokens, ident, line)


def _opt(v: Any) -> str | None:
    return str(v) if v is not None else None


def read_trace(path: Path, prices: PriceTable) -> Iterator[TraceRecord]:
    try:
        fh = path.open()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the trace ({exc.strerror})") from exc
    with fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {n}: not JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise ConfigError(f"{path} line {n}: expected a JSON object")
            yield parse_record(rec, n, prices)


def replay(records: Iterable[TraceRecord], policy: Policy, prices: PriceTable | None = None, *,
           approve: bool = False, persist: bool = False,
           progress: Callable[[int], None] | None = None) -> ReplayResult:
    prices = prices or PriceTable.bundled()
    store = ledger.open("memory://")
    engine = Engine(replace(policy, store="memory://"), store, prices)
    out = ReplayResult()
    stopped: set[str] = set()
    cum_all = cum_fwd = 0
    for rec in records:
        out.requests += 1
        actual = _actual_cost(engine, rec)
        out.total_nanos += actual
        cum_all += actual
        session = rec.identity.value("session")
        if session in stopped:
            out.refused += 1
        else:
            forwarded = _decide(engine, rec, approve, persist, stopped, session, out)
            out.forwarded_nanos += forwarded
            cum_fwd += forwarded
        out.series.append((rec.ts, cum_all, cum_fwd))
        if progress is not None:
            progress(out.requests)
    out.stopped_sessions = sorted(stopped)
    return out


def _shape(rec: TraceRecord, model: str | None = None) -> TokenShape:
    u = rec.usage
    return TokenShape(model=model or rec.model, input_tokens=u.total_input,
                      requested_output=rec.max_tokens if rec.max_tokens is not None else u.output,
                      cache_write="5m" if u.cache_write_5m else None, exact=True)


def _actual_cost(engine: Engine, rec: TraceRecord) -> int:
    res = engine.estimator.resolve(rec.model, rec.provider)
    return usage_nanos(res.price, rec.usage)


def _decide(engine: Engine, rec: TraceRecord, approve: bool, persist: bool, stopped: set[str],
            session: str, out: ReplayResult) -> int:
    """Decide and settle one record; returns what it cost as forwarded (0 if refused)."""
    req = Request(rec.provider, (providers.find(rec.provider) or providers.default()).chat_route, {"model": rec.model},
                  rec.identity, _shape(rec))
    d = engine.decide(req, now=rec.ts)
    approved: set[str] = set()
    if d.action == "hold" and approve and d.trip is not None:
        held = d.trip.rule.name
        d = engine.decide(req, now=rec.ts, approval=Approval(by="replay --approve"))
        if d.allowed:
            approved.add(held)
            _fire(out, rec, held, "hold", session, d, "approved")
    if not d.allowed:
        out.refused += 1
        rule = d.trip.rule.name if d.trip else "?"
        stop = d.action == "hold" and not persist
        _fire(out, rec, rule, d.action, session, d, "session stopped" if stop else "refused")
        if stop:
            stopped.add(session)
        return 0
    out.forwarded += 1
    usage = rec.usage
    caps = [v for k, v in d.edits.items() if k.startswith("max_")]
    if caps:
        usage = replace(usage, output=min(usage.output, caps[0]), reasoning=min(usage.reasoning, caps[0]))
    for rule in (r for r in d.applied if r not in approved):
        _fire(out, rec, rule, d.action, session, d, ", ".join(f"{k}={v}" for k, v in d.edits.items()))
    for alert in d.alerts:
        _fire(out, rec, alert.split(":", 1)[0], "alert", session, d, alert)
    charge = engine.capture(d, usage, now=rec.ts)
    return charge.cost_nanos


def _fire(out: ReplayResult, rec: TraceRecord, rule: str, action: str, session: str, d: Any,
          detail: str) -> None:
    est = d.estimate
    out.firings.append(Firing(rec.ts, rule, action, session, rec.model,
                              str(nanos_to_usd(est.cost_nanos)) if est else "", detail))
