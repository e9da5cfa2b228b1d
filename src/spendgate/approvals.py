"""Holds waiting for a person, and the ways a person answers them.

A held request is kept in the store (credentials stripped, 10-minute TTL) under its decision id.
It is answered by id — ``spendgate approve ID [--max USD]``, ``POST /spendgate/approvals/ID`` —
or in-band in the **latest** user turn only: a bare yes/no, ``yes max=$5``, or a directive prefix
``[spendgate: allow=once max=$5]`` (TokenPak's ``[TIP: …]`` too), stripped before forwarding.
Text from older turns, tool results and tool messages never approves anything: only what a person
typed. Approving with a max grants that much headroom to the tripped bucket at once, so the session
is not asked again at every request. Every approval is logged as an ``approval`` event.

What a held request needs to be answered by id lives in the store (not in one proxy's memory), so
the retry may land on any instance, or on the same one after a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlencode

from spendgate.engine import Decision, approval_event
from spendgate.ledger import AlertMark, Bucket, Event, Ledger
from spendgate.money import usd_to_nanos

HOLD_TTL_S = 600
REPEAT_WINDOW_S = 30.0
KIND = "hold"
ONCE = "approved-once"
LATEST = "hold-latest"
#: query parameters that carry a credential (Gemini's ``key``, OAuth tokens): never kept with a held request
CREDENTIAL_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "token", "x-goog-api-key",
                               "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token"})

_ANSWER = re.compile(r"^\s*(?P<word>yes|y|ok|approve|approved|no|n|deny|denied)"
                     r"(?:[\s,]+max\s*[=:]?\s*\$?(?P<max>\d+(?:\.\d+)?))?\s*[.!]?\s*$", re.IGNORECASE)
_DIRECTIVE = re.compile(r"^\s*\[(?:spendgate|TIP)\s*:\s*allow\s*=\s*once(?:\s+max\s*=\s*\$?(?P<max>\d+(?:\.\d+)?))?"
                        r"\s*\]\s*", re.IGNORECASE)


@dataclass
class Pending:
    id: str
    session: str
    provider: str
    route: str
    query: str
    body_b64: str
    headers: dict[str, str]
    created: float
    expires_at: float
    rule: str
    estimate_usd: str
    message: str
    bucket: list[Any] | None = None  # [key, limit, window_s, unit]
    resets_at: float | None = None
    status: str = "pending"
    #: the identity the decision counted (:meth:`Identity.fingerprint`), which a retry must share
    ident: str = ""

    @property
    def body(self) -> bytes:
        return base64.b64decode(self.body_b64)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> Pending:
        return cls(**json.loads(raw))


def parse_max(raw: object) -> Decimal:
    """An approval's headroom in dollars: a finite number above 0 (``5``, ``"2.50"``)."""
    try:
        value = Decimal(str(raw).strip().lstrip("$")) if isinstance(raw, int | float | str) \
            and not isinstance(raw, bool) else Decimal("NaN")
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value <= 0:
        raise ValueError(f"expected a number of dollars above 0 such as 5 or 2.50, got {raw!r}")
    return value


def strip_query(query: str) -> str:
    """``query`` without credential parameters, to keep with a held request."""
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k.lower() not in CREDENTIAL_PARAMS])


def keep(store: Ledger, decision: Decision, session: str, ident: str, provider: str, route: str, query: str,
         body: bytes, headers: Mapping[str, str], now: float) -> Pending:
    """Keep a held request (headers already stripped of credentials) for approval."""
    t = decision.trip
    bucket = None
    if t is not None and t.bucket is not None:
        b = t.bucket
        bucket = [b.key, b.limit, b.window_s, b.unit]
    est = decision.to_dict()["estimate_usd"] or "0"
    p = Pending(decision.id, session, provider, route, strip_query(query), base64.b64encode(body).decode(),
                dict(headers), now, now + HOLD_TTL_S, t.rule.name if t else "", est, decision.message, bucket,
                t.resets_at if t else None, ident=ident)
    store.put_record(KIND, p.id, p.to_json(), expires_at=p.expires_at, alerts=(_notice(p, decision),))
    store.put_record(LATEST, ident, p.id, expires_at=p.expires_at)
    return p


def _notice(p: Pending, decision: Decision) -> AlertMark:
    """"An agent is waiting for your approval", written with the hold it announces. One per
    identity and rule every :data:`HOLD_TTL_S`: an agent that keeps sending while held is not one
    page per request (``spendgate approvals`` lists every hold)."""
    t = decision.trip
    scope = t.scope if t is not None else ""
    key = f"hold|{hashlib.sha256(p.ident.encode()).hexdigest()[:16]}|{p.rule}|{int(p.created // HOLD_TTL_S)}"
    body = {"type": "hold", "decision_id": p.id, "rule": p.rule, "bucket": p.bucket[0] if p.bucket else "",
            "scope": scope, "window": t.rule.window.text if t is not None else "", "estimate_usd": p.estimate_usd,
            "model": decision.estimate.model if decision.estimate is not None else "", "session": p.session,
            "message": p.message, "expires_at": p.expires_at, "ts": p.created}
    return AlertMark(key, json.dumps(body))


def pending(store: Ledger, now: float | None = None) -> list[Pending]:
    now = time.time() if now is None else now
    return sorted((Pending.from_json(v) for _, v in store.records(KIND, now=now)), key=lambda p: p.created)


def find(store: Ledger, hold_id: str, now: float | None = None) -> Pending | None:
    raw = store.get_record(KIND, hold_id, now=time.time() if now is None else now)
    return Pending.from_json(raw) if raw else None


def latest_for(store: Ledger, ident: str, now: float) -> Pending | None:
    """The pending hold an in-band "yes" answers: the latest one of the very same identity."""
    hid = store.get_record(LATEST, ident, now=now)
    if hid is None:
        return None
    p = find(store, hid, now)
    return p if p is not None and p.status == "pending" else None


def approve(store: Ledger, hold_id: str, max_usd: Decimal | None, now: float | None = None,
            by: str = "spendgate approve", on_event: Callable[[Event], None] | None = None) -> Pending:
    """An operator's approval of a held request (not capped): with a max, grant that headroom to
    its bucket now; without, let the held request through once (its retry, or a "yes" replaying
    it). Logged as an ``approval`` event."""
    now = time.time() if now is None else now
    p = find(store, hold_id, now)
    if p is None:
        raise KeyError(f"no pending hold {hold_id!r} (it may have expired after {HOLD_TTL_S // 60} min)")
    if p.status != "pending":
        raise ValueError(f"hold {hold_id} was already {p.status}")
    if max_usd is not None and p.bucket is not None:
        key, limit, window_s, unit = p.bucket
        until = now + window_s if window_s else (p.resets_at or now + 366 * 86400)
        store.grant(Bucket(key, limit, window_s, unit), usd_to_nanos(max_usd), now=now, until=until)
    p.status = "approved" if max_usd is not None and p.bucket is not None else "approved-once"
    store.put_record(KIND, p.id, p.to_json(), expires_at=p.expires_at)
    # the held request's next retry goes through at once (not the 30-second repeat of its refusal)
    key = once_key(p.ident, p.body)
    rules = approved_rules(store.get_record(ONCE, key, now=now)) | {p.rule}
    store.put_record(ONCE, key, json.dumps(sorted(rules)), expires_at=p.expires_at)
    granted = usd_to_nanos(max_usd) if p.status == "approved" and max_usd is not None else None
    event = approval_event(now, p.id, "operator", by, p.rule, p.bucket[0] if p.bucket else None, granted,
                           {"session": p.session})
    store.record(event)
    if on_event is not None:
        on_event(event)
    return p


def deny(store: Ledger, hold_id: str, now: float | None = None, by: str = "spendgate deny",
         on_event: Callable[[Event], None] | None = None) -> Pending:
    """An operator's no: the held request's retries are refused until the hold expires. Logged as
    a ``deny`` event."""
    now = time.time() if now is None else now
    p = find(store, hold_id, now)
    if p is None:
        raise KeyError(f"no pending hold {hold_id!r}")
    p.status = "denied"
    store.put_record(KIND, p.id, p.to_json(), expires_at=p.expires_at)
    event = Event(now, "deny", p.id, "", p.provider, 0, dims={"session": p.session, "by": by}, rule=p.rule,
                  bucket=p.bucket[0] if p.bucket else "")
    store.record(event)
    if on_event is not None:
        on_event(event)
    return p


def approved_rules(record: str | None) -> frozenset[str]:
    """The rules an approval-by-id record lets this request pass (a JSON list of rule names)."""
    if not record:
        return frozenset()
    try:
        names = json.loads(record)
    except ValueError:
        return frozenset()
    return frozenset(n for n in names if isinstance(n, str)) if isinstance(names, list) else frozenset()


def once_key(ident: str, body: bytes) -> str:
    """What a remembered answer is keyed by: the whole identity the decision used, and the body."""
    return hashlib.sha256(ident.encode() + b"\0" + body).hexdigest()


# -- in-band answers --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Answer:
    yes: bool
    max_usd: Decimal | None
    directive: bool  # a prefix to strip (the rest of the turn is the real prompt)


def _max(raw: str | None) -> Decimal | None:
    if raw is None:
        return None
    try:
        return Decimal(raw)
    except InvalidOperation:
        return None


#: content parts that a tool wrote, not a person: a turn carrying one is no person's answer
TOOL_PARTS = frozenset({"tool_result", "function_call_output", "tool_use", "function_call", "computer_call_output",
                        "web_search_tool_result", "server_tool_use", "mcp_tool_result"})


def latest_user_text(provider: str, route: str, body: Mapping[str, Any]) -> tuple[str | None, Any]:
    """The text a person typed in the latest turn, and a handle to rewrite it (message, part index).

    Only the first part of the latest message, when that message is a user's and carries no tool
    output: a tool result (or a ``tool`` message, or a Responses ``function_call_output`` item)
    saying "yes" must never approve spending."""
    if route == "/v1/responses":
        items = body.get("input")
        if isinstance(items, str):
            return items, ("input",)
        msgs = items
    else:
        msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None, None
    last = msgs[-1]
    if not isinstance(last, Mapping) or last.get("role") != "user" or last.get("type", "message") != "message":
        return None, None
    content = last.get("content")
    if isinstance(content, str):
        return content, (len(msgs) - 1, None)
    if isinstance(content, list) and content:
        if any(isinstance(p, Mapping) and p.get("type") in TOOL_PARTS for p in content):
            return None, None
        first = content[0]
        if isinstance(first, Mapping) and first.get("type") in ("text", "input_text") and \
                isinstance(first.get("text"), str):
            return first["text"], (len(msgs) - 1, 0)
    return None, None


def read_answer(text: str | None) -> Answer | None:
    if text is None:
        return None
    m = _DIRECTIVE.match(text)
    if m:
        return Answer(True, _max(m.group("max")), True)
    m = _ANSWER.match(text)
    if m:
        return Answer(m.group("word").lower() in ("yes", "y", "ok", "approve", "approved"), _max(m.group("max")), False)
    return None


def strip_directive(route: str, body: dict[str, Any], handle: Any) -> dict[str, Any]:
    """``body`` with the directive prefix removed from the latest user turn (a shallow copy)."""
    if handle == ("input",):
        return {**body, "input": _DIRECTIVE.sub("", body["input"], count=1)}
    key = "input" if route == "/v1/responses" else "messages"
    msgs = list(body[key])
    idx, part = handle
    msg = dict(msgs[idx])
    if part is None:
        msg["content"] = _DIRECTIVE.sub("", msg["content"], count=1)
    else:
        parts = list(msg["content"])
        parts[part] = {**parts[part], "text": _DIRECTIVE.sub("", parts[part]["text"], count=1)}
        msg["content"] = parts
    msgs[idx] = msg
    return {**body, key: msgs}


def parse_allow_header(value: str) -> Decimal:
    """``X-Spendgate-Allow: max=20`` -> 20; anything else is an error naming the header."""
    m = re.fullmatch(r"\s*max\s*=\s*\$?(\d+(?:\.\d+)?)\s*", value)
    if not m:
        raise ValueError(f"X-Spendgate-Allow: expected max=<dollars>, got {value!r}")
    return Decimal(m.group(1))


class RecentRefusals:
    """The answer given to a refused body, repeated for 30 s without a new hold: agents retry
    (Codex 5 times, aider 8), and each retry must be cheap and must not nag again."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        self.window_s = window_s
        self._seen: dict[str, tuple[float, Any]] = {}

    def get(self, ident: str, body: bytes, now: float) -> Any:
        if not self._seen:  # the usual request: nothing refused lately, no body to hash
            return None
        key = once_key(ident, body)
        hit = self._seen.get(key)
        if hit is None or hit[0] <= now:
            return None
        return hit[1]

    def put(self, ident: str, body: bytes, answer: Any, now: float) -> None:
        if len(self._seen) > 10_000:
            self._seen = {k: v for k, v in self._seen.items() if v[0] > now}
        self._seen[once_key(ident, body)] = (now + self.window_s, answer)
