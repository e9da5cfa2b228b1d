"""What an outbox alert says: one line for people, a Slack-compatible webhook body, and its keys.

The engine writes an alert's facts (JSON text, see :class:`~spendgate.ledger.AlertMark`) inside the
same store transaction as its cause; everything a reader needs to *act* on it — the dollar figures,
the exact ``spendgate approve`` command, the admin URL — is built here at send time, so the outbox
never has to store a password-bearing store URL or an admin address that may change.

Webhook URLs are secrets (a Slack incoming-webhook URL carries its token), so a destination is
named by :func:`dest_id` (a hash) in the store and by :func:`redact_url` (scheme and host) in
errors and output; the full URL is only ever handed to the HTTP client.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from spendgate.ledger import OutboxAlert, default_url
from spendgate.money import fmt_usd, usd_to_nanos

#: Query parameters of a store URL that may carry a secret (redacted in a printed command).
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "token", "secret", "key", "auth"})
_REDACTED = "***"


def dest_id(url: str) -> str:
    """A destination's id in an alert's ``done`` list: sha256 of the URL, first 12 hex digits —
    stable across restarts and instances, and no secret in the store."""
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def idempotency_key(row: OutboxAlert) -> str:
    """The ``Idempotency-Key`` a receiver dedupes retries by: sha256 of the row key, 32 hex digits.
    The same alert always gets the same value, from any sender, on any attempt."""
    return hashlib.sha256(row.key.encode()).hexdigest()[:32]


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` only: paths, queries and user info of a webhook URL hold tokens."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid url>"
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    scheme = parts.scheme or "?"
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def _redact_store_url(url: str) -> str:
    """A store URL with its password (and any secret-looking query parameter) replaced by ``***``,
    keeping everything else a command needs to find the store (host, db, path, key prefix)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" not in netloc and not parts.query:
        return url  # nothing secret (sqlite:///path, memory://); urlunsplit would drop an empty netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        if sep:  # user:password@ or :password@ (a lone name before @ is a user name, not a secret)
            netloc = f"{user}:{_REDACTED}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, _REDACTED if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _is_default_store(url: str) -> bool:
    if url == default_url():
        return True
    if url.startswith("sqlite:///"):
        default_path = Path(default_url().removeprefix("sqlite:///"))
        return Path(url.removeprefix("sqlite:///")).expanduser() == default_path.expanduser()
    return False


def approve_command(decision_id: str, store_url: str) -> str:
    """The exact command that approves ``decision_id``: ``spendgate approve ID``, plus
    ``--store URL`` (password redacted, shell-quoted) unless the store is the default one — a
    person pastes it on any machine that reaches the store."""
    cmd = f"spendgate approve {shlex.quote(decision_id)}"
    if store_url and not _is_default_store(store_url):
        cmd += f" --store {shlex.quote(_redact_store_url(store_url))}"
    return cmd


def approve_url(decision_id: str, admin_base: str | None) -> str | None:
    """The admin API endpoint that approves ``decision_id`` (POST ``{"approve": true}``)."""
    if not admin_base:
        return None
    return f"{admin_base.rstrip('/')}/spendgate/approvals/{decision_id}"


def parse_body(row: OutboxAlert) -> dict[str, Any]:
    """The row's body as a dict; a body that is not a JSON object (never written by the engine,
    but the store is shared) becomes ``{"type": "unknown", "raw": …}`` rather than an error, so one
    bad row cannot stop the sender."""
    try:
        doc = json.loads(row.body)
    except (ValueError, TypeError):
        return {"type": "unknown", "raw": row.body[:500]}
    return doc if isinstance(doc, dict) else {"type": "unknown", "raw": doc}


def _s(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    return "" if value is None else str(value)


def percent(threshold: str) -> str:
    """``"0.8"`` → ``"80%"``, ``"0.125"`` → ``"12.5%"``; anything unparseable is shown as given."""
    try:
        pct = Decimal(threshold) * 100
    except (InvalidOperation, ValueError):
        return threshold
    pct = pct.quantize(Decimal(1)) if pct == pct.to_integral_value() else pct.normalize()
    return f"{pct:f}%"


def limit_text(doc: dict[str, Any]) -> str:
    """The bucket's limit as a person reads it: ``$500.00`` or ``1,000,000 tokens`` ("" if none)."""
    usd, tokens = _s(doc, "limit_usd"), _s(doc, "limit_tokens")
    if usd:
        try:
            return fmt_usd(usd_to_nanos(usd))
        except (InvalidOperation, ValueError):
            return f"${usd}"
    if tokens:
        try:
            return f"{int(tokens):,} tokens"
        except ValueError:
            return f"{tokens} tokens"
    return ""


def _where(doc: dict[str, Any]) -> str:
    """``budget team-month (team=ml, month 2026-12)``: the rule, its scope and window/period."""
    rule = _s(doc, "rule") or _s(doc, "bucket") or "?"
    window, period = _s(doc, "window"), _s(doc, "period")
    if period.isdigit():  # a rolling window's slot number: meaningless to a person
        period = ""
    when = " ".join(x for x in (window, period if period != window else "") if x)
    detail = ", ".join(x for x in (_s(doc, "scope"), when) if x)
    return f"budget {rule}" + (f" ({detail})" if detail else "")


def text_of(row: OutboxAlert, *, store_url: str, admin_base: str | None) -> str:
    """One line a person reads in a chat channel: what happened to which budget, the threshold as a
    percent and the limit in dollars; for a held request what is held, its id, and how to approve it."""
    doc = parse_body(row)
    kind = _s(doc, "type")
    where = _where(doc)
    limit = limit_text(doc)
    of_limit = f" of {limit}" if limit else ""
    if kind == "threshold":
        return f"spendgate: {where} reached {percent(_s(doc, 'threshold'))}{of_limit}"
    if kind == "refused":
        by = f" (decision {_s(doc, 'decision_id')})" if _s(doc, "decision_id") else ""
        return f"spendgate: {where} is full at {percent(_s(doc, 'threshold') or '1')}{of_limit}: refused a request{by}"
    if kind == "over":
        return f"spendgate: {where} went over its limit{of_limit} (alert-only budget: requests still pass)"
    if kind == "hold":
        did = _s(doc, "decision_id")
        what = ", ".join(x for x in (
            f"model {_s(doc, 'model')}" if _s(doc, "model") else "",
            f"estimate ${_s(doc, 'estimate_usd')}" if _s(doc, "estimate_usd") else "",
            f"session {_s(doc, 'session')}" if _s(doc, "session") else "") if x)
        text = f"spendgate: request {did} held for approval by {where}" + (f" — {what}" if what else "")
        text += f". Approve: {approve_command(did, store_url)}"
        url = approve_url(did, admin_base)
        if url:
            text += f' or POST {url} {{"approve": true}} (admin token)'
        return text
    return f"spendgate: alert {kind or 'unknown'} {row.key}"


def webhook_body(row: OutboxAlert, *, store_url: str, admin_base: str | None) -> dict[str, Any]:
    """The JSON a webhook receives: Slack's ``text`` for people, and ``spendgate`` — the row's facts
    plus its keys (and for a hold the approve command and URL) — for programs."""
    doc = parse_body(row)
    facts: dict[str, Any] = {**doc, "alert_key": row.key, "idempotency_key": idempotency_key(row)}
    if doc.get("type") == "hold":
        did = _s(doc, "decision_id")
        facts["approve_command"] = approve_command(did, store_url)
        facts["approve_url"] = approve_url(did, admin_base)
    return {"text": slack_escape(text_of(row, store_url=store_url, admin_base=admin_base)), "spendgate": facts}


def slack_escape(text: str) -> str:
    """``&``, ``<`` and ``>`` as Slack's entities: the text carries values a client chose (a session,
    a tag), and unescaped ``<!channel>`` or ``<https://…|Approve>`` would page a channel or show a
    link spendgate never wrote."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
