"""Budgets as data: rules, per-scope limits and pauses kept in the store while ``serve`` runs.

The policy file is read at start (and on reload); what an operator changes at run time — a rule
added with ``spendgate budgets add``, one user's limit, a paused key — is kept in the store beside
the ledger, so every instance and process sharing that store applies it (each re-reads the store
at least once a second: :data:`REFRESH_S`). A run-time rule is validated exactly like a
``[[budget]]`` table (:func:`spendgate.policy.parse.parse_rule`) and may never take a file rule's
name: the file stays the operator's word.

Changing a limit never touches what a bucket counted: the ledger keeps spend by bucket key, and a
limit is only what the next authorize compares it with.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from spendgate.buckets import Limit, RuleBucket, rule_buckets
from spendgate.errors import ConfigError
from spendgate.ledger import Event, Ledger
from spendgate.money import usd_to_nanos
from spendgate.policy.model import SCOPES, Rule
from spendgate.policy.parse import parse_rule, parse_usd
from spendgate.request import NONE, Identity

RULE_KIND = "budget-rule"
LIMIT_KIND = "budget-limit"
PAUSE_KIND = "pause"
#: how often a server re-reads the store for run-time rules, limits and pauses (seconds)
REFRESH_S = 0.5
#: scopes a pause may name besides ``per`` scopes: everything, or one model (a glob) or provider
PAUSE_SCOPES = (*SCOPES, "model", "provider")
#: a key is named by the id ``spendgate keys list`` shows (8 hex) or more of its hash
MIN_KEY_PREFIX = 8


@dataclass(frozen=True, slots=True)
class Pause:
    """Everything, or one key, user, team, model … refused until resumed: who paused it and when."""

    scope: str  # "global" or "name=value"
    by: str
    at: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "by": self.by, "at": self.at, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Overlay:
    """What the store adds to the file's policy, as read at one instant."""

    rules: tuple[Rule, ...] = ()
    #: each run-time rule's table as given (``budgets list`` shows it; ``set`` starts from it)
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    limits: Mapping[tuple[str, str], Limit] = field(default_factory=dict)
    pauses: tuple[Pause, ...] = ()
    #: changes whenever anything above does: a server swaps its policy only then
    fingerprint: str = ""


def parse_scope(text: str, where: str = "SCOPE") -> str:
    """``user=alice``, ``team=ml``, ``key=1a2b3c4d``, ``tag:env=prod`` or ``global``: one bucket scope
    as a rule's ``per`` names it, refused with the forms it takes when it is none of them."""
    text = text.strip()
    if text in ("global", "all", "*"):
        return "global"
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    known = name in PAUSE_SCOPES or (name.startswith("tag:") and len(name) > 4)
    if not sep or not value or not known or name == "global":
        raise ConfigError(f"{where}: expected global or name=value with name one of "
                          f"{', '.join(s for s in PAUSE_SCOPES if s != 'global')} or tag:<name>; got {text!r}")
    if name == "key" and len(value) < MIN_KEY_PREFIX:
        raise ConfigError(f"{where}: name a key by its id ({MIN_KEY_PREFIX} characters, as spendgate keys list "
                          f"shows it) or more of its hash; got {value!r}")
    return f"{name}={value}"


def _doc(raw: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def load(store: Ledger, *, now: float | None = None, default_tz: str = "UTC") -> Overlay:
    """Everything the store holds for the policy now. A stored rule that no longer validates (written
    by a newer version, say) is skipped and named in the log rather than stopping every server."""
    import logging

    now = time.time() if now is None else now
    raw_rules = sorted(store.records(RULE_KIND, now=now))
    raw_limits = sorted(store.records(LIMIT_KIND, now=now))
    raw_pauses = sorted(store.records(PAUSE_KIND, now=now))
    rules: list[Rule] = []
    tables: dict[str, Mapping[str, Any]] = {}
    for name, raw in raw_rules:
        table = _doc(raw).get("table")
        try:
            rules.append(parse_rule(table, "budget", default_tz))
        except ConfigError as exc:
            logging.getLogger("spendgate.policy").warning("run-time budget %r skipped: %s", name, exc)
            continue
        tables[name] = dict(table) if isinstance(table, Mapping) else {}
    limits: dict[tuple[str, str], Limit] = {}
    for key, raw in raw_limits:
        rule, _, scope = key.partition("|")
        d = _doc(raw)
        limits[(rule, scope)] = Limit(
            usd=int(d["usd"]) if isinstance(d.get("usd"), int) else None,
            tokens=int(d["tokens"]) if isinstance(d.get("tokens"), int) else None,
            requests=int(d["requests"]) if isinstance(d.get("requests"), int) else None)
    pauses = tuple(Pause(scope, str(_doc(raw).get("by", "")), float(_doc(raw).get("at", 0.0)),
                         str(_doc(raw).get("reason", ""))) for scope, raw in raw_pauses)
    digest = hashlib.sha256(json.dumps([raw_rules, raw_limits, raw_pauses]).encode()).hexdigest()
    return Overlay(tuple(rules), tables, limits, pauses, digest)


# -- rules ------------------------------------------------------------------------------------------


def put_rule(store: Ledger, table: Mapping[str, Any], *, file_rules: Sequence[Rule], by: str,
             create: bool | None = None, default_tz: str = "UTC", now: float | None = None) -> Rule:
    """Validate ``table`` as a ``[[budget]]`` and keep it. ``create`` True refuses a name already
    kept (``budgets add``), False one not kept yet (``budgets set``), None takes either (``PUT``).
    A file rule's name is refused: the file and the store would disagree on one bucket's limit."""
    rule = parse_rule(table, "budget", default_tz)
    if any(r.name == rule.name for r in file_rules):
        raise ConfigError(f'budget "{rule.name}".name: a budget of this name is in the policy file; a run-time '
                          "budget needs a name of its own")
    now = time.time() if now is None else now
    exists = store.get_record(RULE_KIND, rule.name, now=now) is not None
    if create is True and exists:
        raise ConfigError(f'budget "{rule.name}": already exists; change it with spendgate budgets set')
    if create is False and not exists:
        raise ConfigError(f'budget "{rule.name}": no run-time budget of this name; add it with spendgate budgets add')
    store.put_record(RULE_KIND, rule.name, json.dumps({"table": _plain(table), "by": by, "at": now}))
    return rule


def get_table(store: Ledger, name: str, *, now: float | None = None) -> dict[str, Any] | None:
    raw = store.get_record(RULE_KIND, name, now=time.time() if now is None else now)
    table = _doc(raw).get("table") if raw is not None else None
    return dict(table) if isinstance(table, Mapping) else None


def remove_rule(store: Ledger, name: str, *, file_rules: Sequence[Rule]) -> bool:
    """Drop a run-time rule and the per-scope limits set under it — a rule added again later under
    the same name starts from its own limits, not from ones ``budgets list`` no longer showed. Its
    buckets keep what they counted, as a file rule's do when removed."""
    if any(r.name == name for r in file_rules):
        raise ConfigError(f'budget "{name}": it is in the policy file; remove it there')
    now = time.time()
    if store.get_record(RULE_KIND, name, now=now) is None:
        return False
    store.delete_record(RULE_KIND, name)
    for key, _ in store.records(LIMIT_KIND, now=now):
        if key.partition("|")[0] == name:
            store.delete_record(LIMIT_KIND, key)
    return True


def _plain(table: Mapping[str, Any]) -> dict[str, Any]:
    """A table as JSON keeps it: Decimals as their exact text (a rule's usd must not pass through a
    float)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Decimal):
            return str(v)
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        return v

    return conv(table)  # type: ignore[no-any-return]


# -- per-scope limits -----------------------------------------------------------------------------


def set_limit(store: Ledger, rule: Rule, scope: str, *, usd: Any = None, tokens: int | None = None,
              requests: int | None = None, by: str, now: float | None = None) -> Limit:
    """Give one scope of a ``per`` rule its own limit; the rest keep the rule's. Spend is untouched."""
    if rule.window.kind == "request":
        raise ConfigError(f'budget "{rule.name}": a window = "request" budget weighs one call; it has no per-scope '
                          "limits")
    name = scope.partition("=")[0]
    if rule.per == "global":
        raise ConfigError(f'SCOPE: budget "{rule.name}" is one budget for everyone (per = "global"); it has no '
                          "per-scope limits: change its own limit (spendgate budgets set, or the policy file)")
    if name != rule.per:
        raise ConfigError(f'SCOPE: budget "{rule.name}" counts per {rule.per}; name one {rule.per} '
                          f"({rule.per}=…), got {scope!r}")
    if usd is None and tokens is None and requests is None:
        raise ConfigError("give --usd, --tokens and/or --requests")
    limit = Limit(usd_to_nanos(parse_usd(usd, "--usd")) if usd is not None else None,
                  _count(tokens, "--tokens"), _count(requests, "--requests"))
    for unit in ("usd", "tokens", "requests"):
        if limit.of(unit) is not None and {"usd": rule.usd, "tokens": rule.tokens, "requests": rule.requests}[unit] \
                is None:
            raise ConfigError(f'--{unit}: budget "{rule.name}" does not count {unit}; its limits are on '
                              + ", ".join(u for u, v in (("usd", rule.usd), ("tokens", rule.tokens),
                                                         ("requests", rule.requests)) if v is not None))
    now = time.time() if now is None else now
    store.put_record(LIMIT_KIND, f"{rule.name}|{scope}",
                     json.dumps({"usd": limit.usd, "tokens": limit.tokens, "requests": limit.requests,
                                 "by": by, "at": now}))
    return limit


def clear_limit(store: Ledger, rule_name: str, scope: str) -> bool:
    key = f"{rule_name}|{scope}"
    if store.get_record(LIMIT_KIND, key, now=time.time()) is None:
        return False
    store.delete_record(LIMIT_KIND, key)
    return True


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected a whole number ≥ 0, got {value!r}")
    return value


# -- pauses -----------------------------------------------------------------------------------------


def pause(store: Ledger, scope: str, *, by: str, reason: str = "", now: float | None = None) -> Pause:
    """Refuse everything in ``scope`` on every instance until :func:`resume`. No approval lifts it."""
    now = time.time() if now is None else now
    p = Pause(scope, by, now, reason)
    store.put_record(PAUSE_KIND, scope, json.dumps({"by": by, "at": now, "reason": reason}))
    return p


def resume(store: Ledger, scope: str) -> bool:
    if store.get_record(PAUSE_KIND, scope, now=time.time()) is None:
        return False
    store.delete_record(PAUSE_KIND, scope)
    return True


def pause_applies(p: Pause, identity: Identity, model: str, provider: str, tier: str = "") -> bool:
    """Whether ``p`` covers a request by ``identity`` for ``model`` (in ``tier``) at ``provider``:
    a key by the start of its hash (the id ``keys list`` shows), a model by glob, a tier as the
    policy's ``[tiers]`` place the model (never a client's tag), anything else by the value the
    identity is counted under."""
    if p.scope == "global":
        return True
    name, _, value = p.scope.partition("=")
    if name == "key":
        return bool(identity.key) and str(identity.key).startswith(value)
    if name == "model":
        return fnmatch.fnmatchcase(model.lower(), value.lower())
    if name == "provider":
        return provider == value
    if name == "tier":
        return tier == value
    return identity.value(name) == value


# -- finding a rule, top-ups, the record of a change ------------------------------------------------

#: a top-up's headroom lasts as long as the ``total`` bucket it is granted to: for good
TOPUP_LASTS_S = 100 * 365 * 86400


def find_rule(store: Ledger, name: str, file_rules: Sequence[Rule], *, default_tz: str = "UTC",
              now: float | None = None) -> tuple[Rule, str] | None:
    """The rule ``name`` in force, from the file or the store, with where it came from (``file`` or
    ``store``): a per-scope limit or a top-up applies to either."""
    for r in file_rules:
        if r.name == name:
            return r, "file"
    table = get_table(store, name, now=now)
    if table is None:
        return None
    return parse_rule(table, "budget", default_tz), "store"


def rule_scope(rule: Rule, scope: str) -> str:
    """``scope`` as ``rule``'s buckets name it: ``global`` is ``global=(none)`` for a per-global rule;
    any other scope must name one value of the rule's ``per``."""
    if rule.per == "global":
        if scope not in ("global", f"global={NONE}"):
            raise ConfigError(f'SCOPE: budget "{rule.name}" is one budget for everyone (per = "global"); '
                              f"name it global, got {scope!r}")
        return f"global={NONE}"
    if scope.partition("=")[0] != rule.per:
        raise ConfigError(f'SCOPE: budget "{rule.name}" counts per {rule.per}; name one {rule.per} '
                          f"({rule.per}=…), got {scope!r}")
    return scope


def topup(store: Ledger, rule: Rule, scope: str, nanos: int, *, by: str, now: float | None = None,
          override: Limit | None = None) -> RuleBucket:
    """Add ``nanos`` of headroom to ``rule``'s dollar bucket for ``scope`` — a prepaid budget topped
    up, not reset: what was spent stays counted. Only a ``window = "total"`` rule takes one; a
    windowed rule frees room on its own, and its limit is changed with :func:`set_limit`.
    ``override`` is the scope's own limit (the bucket must be exactly the one the engine charges)."""
    if rule.window.kind != "total":
        raise ConfigError(f'budget "{rule.name}": window = "{rule.window.text}"; a top-up is headroom on a '
                          'window = "total" (prepaid) budget. Change this budget\'s limit with spendgate budgets '
                          "limit (or budgets set)")
    if isinstance(nanos, bool) or not isinstance(nanos, int) or nanos <= 0:
        raise ConfigError(f"--usd: a top-up must be above $0, got {nanos!r} nano-dollars")
    scope = rule_scope(rule, scope)
    now = time.time() if now is None else now
    usd = next((b for b in rule_buckets(rule, scope, now, override) if b.unit == "usd"), None)
    if usd is None:
        raise ConfigError(f'--usd: budget "{rule.name}" does not count dollars; a top-up adds dollars')
    store.grant(usd.bucket(), nanos, now=now, until=now + TOPUP_LASTS_S)
    return usd


def change_event(change: str, *, by: str, rule: str = "", scope: str = "", bucket: str = "",
                 amounts: Mapping[str, int] | None = None, now: float | None = None,
                 **dims: str) -> Event:
    """An operator's change (``add``, ``set``, ``remove``, ``limit``, ``topup``, ``pause``, ``resume``)
    as the event the store and the audit log keep: who changed what, when, by how much."""
    import secrets

    return Event(time.time() if now is None else now, "budget", secrets.token_hex(8), "", "", 0,
                 dims={"change": change, "by": by, "scope": scope, **dims}, rule=rule, bucket=bucket,
                 amounts=dict(amounts or {}))


def limit_records(store: Ledger, *, now: float | None = None) -> list[dict[str, Any]]:
    """Every per-scope limit kept, with who set it and when (``budgets list``, the admin API)."""
    out = []
    for key, raw in sorted(store.records(LIMIT_KIND, now=time.time() if now is None else now)):
        rule, _, scope = key.partition("|")
        d = _doc(raw)
        out.append({"rule": rule, "scope": scope, **{u: d.get(u) for u in ("usd", "tokens", "requests")},
                    "by": str(d.get("by", "")), "at": float(d.get("at", 0.0))})
    return out


def rule_records(store: Ledger, *, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Each run-time rule's stored record (``table``, ``by``, ``at``), by name."""
    return {name: _doc(raw) for name, raw in store.records(RULE_KIND, now=time.time() if now is None else now)}


def _amount(value: Any, unit: str) -> Any:
    from spendgate.money import nanos_to_usd

    return str(nanos_to_usd(value)) if unit == "usd" and isinstance(value, int) else value


def rule_doc(rule: Rule, source: str, *, mode: str, record: Mapping[str, Any] | None = None,
             limits: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One rule in force as ``budgets list`` and ``GET /spendgate/budgets`` show it: its limits,
    window, scope and action, where it came from (``default``, ``file``, ``store``), who kept it
    when (store rules), and the per-scope limits set under it. Dollars as exact decimal text."""
    record = record or {}
    table = record.get("table")
    return {
        "name": rule.name, "source": source,
        "usd": str(rule.usd) if rule.usd is not None else None, "tokens": rule.tokens, "requests": rule.requests,
        "window": rule.window.text, "per": rule.per, "action": rule.action, "mode": mode,
        "immutable": rule.immutable,
        "by": str(record["by"]) if "by" in record else None, "at": record.get("at"),
        "table": dict(table) if isinstance(table, Mapping) else None,
        "limits": [{"scope": lim["scope"], **{u: _amount(lim[u], u) for u in ("usd", "tokens", "requests")},
                    "by": lim["by"], "at": lim["at"]} for lim in limits],
    }


def listing(store: Ledger, file_policy: Any, *, now: float | None = None) -> list[dict[str, Any]]:
    """Every rule in force: the file's (built-in defaults named ``default``) then the store's, each
    with its per-scope limits. ``file_policy`` is the :class:`~spendgate.policy.model.Policy` read
    from the file (its mode is a rule's unless the rule sets its own)."""
    from spendgate.policy.defaults import DEFAULT_RULES

    now = time.time() if now is None else now
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for lim in limit_records(store, now=now):
        by_rule.setdefault(lim["rule"], []).append(lim)
    docs = [rule_doc(r, "default" if r in DEFAULT_RULES else "file", mode=file_policy.mode_of(r),
                     limits=by_rule.get(r.name, ())) for r in file_policy.rules]
    records = rule_records(store, now=now)
    overlay = load(store, now=now, default_tz=file_policy.timezone)
    docs += [rule_doc(r, "store", mode=file_policy.mode_of(r), record=records.get(r.name),
                      limits=by_rule.get(r.name, ())) for r in overlay.rules]
    return docs


def get_limit(store: Ledger, rule_name: str, scope: str, *, now: float | None = None) -> Limit | None:
    """One scope's own limit under ``rule_name`` as the store holds it (None: the rule's applies)."""
    raw = store.get_record(LIMIT_KIND, f"{rule_name}|{scope}", now=time.time() if now is None else now)
    if raw is None:
        return None
    d = _doc(raw)
    return Limit(*(int(d[u]) if isinstance(d.get(u), int) else None for u in ("usd", "tokens", "requests")))


def bucket_rows(store: Ledger, rule: Rule, scope: str, now: float) -> list[dict[str, Any]]:
    """The buckets ``rule`` keeps for ``scope`` now, with the scope's own limit as the store holds
    it — exactly those the engine charges: limit (grants included), spent, held, granted, remaining,
    and ``refuses`` when what is used already reaches the limit (the next request there is refused
    until the window frees room, a top-up or a higher limit). Dollars as exact decimal text."""
    rbs = list(rule_buckets(rule, scope, now, get_limit(store, rule.name, scope, now=now)))
    states = store.states([rb.bucket() for rb in rbs], now=now)
    rows = []
    for rb, st in zip(rbs, states, strict=True):
        limit = rb.limit + st.granted
        rows.append({"bucket": rb.key, "unit": rb.unit, "limit": _amount(limit, rb.unit),
                     "spent": _amount(st.spent, rb.unit), "held": _amount(st.held, rb.unit),
                     "granted": _amount(st.granted, rb.unit),
                     "remaining": _amount(max(0, limit - st.used), rb.unit),
                     "refuses": st.used >= limit, "resets_at": rb.resets_at})
    return rows


def bucket_scope(store: Ledger, rule: Rule, scope: str) -> str:
    """``scope`` as ``rule``'s buckets are keyed (:func:`rule_scope`), with a virtual key named by
    the id ``keys list`` shows (or a prefix of its hash) written as what its requests count under —
    the hash of its first secret — so a per-key limit or top-up lands on the bucket the engine
    charges. A provider key is named by its full hash (nothing in the store maps a prefix to it)."""
    scope = rule_scope(rule, scope)
    name, _, value = scope.partition("=")
    if name != "key":
        return scope
    from spendgate import keys

    for k in keys.list_keys(store):
        counted = k.counted_as or ""
        if k.id == value or (counted and counted.startswith(value)):
            return f"key={counted}"
    return scope


def limit_scope(store: Ledger, rule: Rule, scope: str) -> str:
    """``scope`` for a per-scope limit of ``rule``: refused on a per-global rule (see
    :func:`set_limit`), a virtual key resolved as :func:`bucket_scope` does."""
    if rule.per == "global":
        set_limit(store, rule, scope, by="")  # raises, naming the rule
    return bucket_scope(store, rule, scope)
