"""Reading ``spendgate.toml`` strictly.

Every key is known or refused, every value parses or is refused, and each error names the key
path (``budget[2] "team-month".usd``) and the value. A budget of ``"$10"`` must never become a
disabled budget.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from spendgate.errors import ConfigError
from spendgate.policy.defaults import DEFAULT_RULES
from spendgate.policy.model import (
    ACTIONS,
    CALENDAR,
    CAPABILITIES,
    MODES,
    SCOPES,
    Action,
    AlertSettings,
    ApprovalLimits,
    AuditSettings,
    Match,
    MetricsSettings,
    Policy,
    Rule,
    Tiers,
    UpstreamSpec,
    Window,
)

TOP_KEYS = {"store", "unpriced", "on_store_error", "upstream", "tiers", "budget", "timezone", "hold_ttl",
            "anthropic_token_factor", "approvals", "retention_days", "upstream_timeout_s", "defaults",
            "audit", "audit_key", "alerts", "mode", "version", "effective_from", "trust_client_capability",
            "metrics", "upstreams", "flat_holds"}
UPSTREAM_KEYS = {"base_url", "api", "kind", "prices", "key_env", "free", "deployments"}
#: an upstream's name is its route prefix (``/mistral/v1/…``): one path segment
_UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: first path segments spendgate serves itself or Azure's API takes
RESERVED_PREFIXES = {"spendgate", "metrics", "openai", "ui", "v1", "v1beta", "v1alpha", "model", "azure-openai"}
APPROVAL_KEYS = {"header_max_usd", "inband_max_usd"}
AUDIT_KEYS = {"enabled", "checkpoint_entries", "checkpoint_seconds"}
ALERT_KEYS = {"webhooks", "admin_url"}
METRICS_KEYS = {"enabled", "public", "top_scopes"}
#: alert_at fractions above this are surely a typo (50 for 0.5): a threshold is a share of the limit
MAX_ALERT_AT = Decimal(10)
BUDGET_KEYS = {"name", "usd", "tokens", "requests", "window", "timezone", "per", "match", "action", "downgrade",
               "alert_at", "immutable", "min_output", "mode", "requires_capability"}
MATCH_KEYS = {"model", "provider", "tier", "tags"}
#: what a flat-hold path may not contain: a route template, a query, a fragment, whitespace
_FLAT_PATH_BAD = re.compile(r"[{}?#\s]")
_DURATION = re.compile(r"^(\d+)(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _fail(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        prefix = f"{where}." if where else ""
        raise _fail(f"{prefix}{extra[0]}", f"unknown key; expected one of {', '.join(sorted(allowed))}")


def parse_usd(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _fail(where, f"expected a number of dollars, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, f"expected a finite number of dollars, got {value!r}")
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise _fail(where, f"expected a number of dollars such as 10 or 0.50, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise _fail(where, f"expected a non-negative number of dollars, got {value!r}")
    return d


def parse_int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"expected a whole number ≥ {minimum}, got {value!r}")
    return value


def parse_duration(value: Any, where: str) -> int:
    m = _DURATION.match(value) if isinstance(value, str) else None
    if not m or int(m.group(1)) == 0:
        raise _fail(where, f"expected a duration such as 30s, 15m, 1h or 7d, got {value!r}")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def parse_window(value: Any, where: str) -> Window:
    if value == "request":
        return Window("request", text=value)
    if value == "total":
        return Window("total", text=value)
    if value in CALENDAR:
        return Window("calendar", period=value, text=value)
    try:
        return Window("rolling", seconds=parse_duration(value, where), text=value)
    except ConfigError:
        raise _fail(where, "expected request, total, day, week, month or a duration such as "
                           f"30s, 15m, 1h, 24h, 7d; got {value!r}") from None


def _timezone(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"expected a time zone name such as Europe/Berlin, got {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise _fail(where, f"unknown time zone {value!r}") from None
    return value


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(where, f"expected a string or a non-empty list of strings, got {value!r}")


def _choice(value: Any, where: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise _fail(where, f"expected one of {', '.join(options)}; got {value!r}")
    return cast(str, value)


def _match(raw: Any, where: str) -> Match:
    if not isinstance(raw, Mapping):
        raise _fail(where, f"expected a table such as {{ tier = \"frontier\" }}, got {raw!r}")
    _unknown(raw, MATCH_KEYS, where)
    tags: dict[str, tuple[str, ...]] = {}
    if "tags" in raw:
        if not isinstance(raw["tags"], Mapping):
            raise _fail(f"{where}.tags", f"expected a table of tag = value(s), got {raw['tags']!r}")
        tags = {k: _strs(v, f"{where}.tags.{k}") for k, v in raw["tags"].items()}
    return Match(
        models=_strs(raw["model"], f"{where}.model") if "model" in raw else (),
        providers=_strs(raw["provider"], f"{where}.provider") if "provider" in raw else (),
        tiers=_strs(raw["tier"], f"{where}.tier") if "tier" in raw else (),
        tags=tags,
    )


def _downgrade(raw: Any, where: str) -> dict[str, str]:
    if isinstance(raw, Mapping) and raw and all(isinstance(v, str) for v in raw.values()):
        return dict(raw)
    if isinstance(raw, list) and len(raw) >= 2 and all(isinstance(v, str) for v in raw):
        return {a: b for a, b in itertools.pairwise(raw)}
    raise _fail(where, "expected a map { \"from\" = \"to\" } or a chain [\"dearest\", \"…\", \"cheapest\"]; "
                       f"got {raw!r}")


def _rule(raw: Any, index: int, default_tz: str) -> Rule:
    return parse_rule(raw, f"budget[{index}]", default_tz)


def parse_rule(raw: Any, where: str = "budget", default_tz: str = "UTC") -> Rule:
    """One ``[[budget]]`` table as a rule, every error naming ``where`` and the field: the one
    validation for a rule from the file, the command line or the admin API."""
    if not isinstance(raw, Mapping):
        raise _fail(where, "expected a [[budget]] table")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(f"{where}.name", f"every budget needs a name, got {name!r}")
    if any(c in name for c in "|#=\0") or name != name.strip():
        raise _fail(f"{where}.name", f"a budget name cannot contain | # = or surrounding spaces, got {name!r}")
    where = f'{where} "{name}"'
    _unknown(raw, BUDGET_KEYS, where)
    if "usd" not in raw and "tokens" not in raw and "requests" not in raw:
        raise _fail(where, "a budget needs `usd`, `tokens` and/or `requests`")
    if "window" not in raw:
        raise _fail(f"{where}.window", "missing; expected request, total, day, week, month or a duration")
    action = cast(Action, _choice(raw.get("action", "block"), f"{where}.action", ACTIONS))
    per = raw.get("per", "global")
    if not isinstance(per, str) or not (per in SCOPES or (per.startswith("tag:") and len(per) > 4)):
        raise _fail(f"{where}.per", f"expected one of {', '.join(SCOPES)} or tag:<name>; got {per!r}")
    window = parse_window(raw["window"], f"{where}.window")
    if window.kind == "request" and per != "global":
        raise _fail(f"{where}.per", "a window = \"request\" budget is per call; `per` does not apply")
    if window.kind == "request" and "requests" in raw:
        raise _fail(f"{where}.requests", "counts requests in a window such as 1m or day; a window = \"request\" "
                                         "budget is one call")
    mode = _choice(raw["mode"], f"{where}.mode", MODES) if "mode" in raw else None
    capability = _choice(raw["requires_capability"], f"{where}.requires_capability", CAPABILITIES) \
        if "requires_capability" in raw else None
    downgrade = _downgrade(raw["downgrade"], f"{where}.downgrade") if "downgrade" in raw else {}
    if action == "downgrade" and not downgrade:
        raise _fail(f"{where}.downgrade", "action = \"downgrade\" needs a downgrade map or chain")
    if "downgrade" in raw and action != "downgrade":
        raise _fail(f"{where}.downgrade", f"only used with action = \"downgrade\", not {action!r}")
    if "min_output" in raw and action != "clamp":
        raise _fail(f"{where}.min_output", f"only used with action = \"clamp\", not {action!r}")
    alert_at: tuple[Decimal, ...] = ()
    if "alert_at" in raw:
        vals = raw["alert_at"]
        if not isinstance(vals, list) or not vals:
            raise _fail(f"{where}.alert_at", f"expected a list of fractions such as [0.5, 0.8, 1.0], got {vals!r}")
        alert_at = tuple(sorted(parse_usd(v, f"{where}.alert_at[{i}]") for i, v in enumerate(vals)))
        if any(a <= 0 or a > MAX_ALERT_AT for a in alert_at):
            raise _fail(f"{where}.alert_at", f"fractions must be above 0 and at most {MAX_ALERT_AT} "
                                             f"(0.8 is 80 % of the limit), got {vals!r}")
    immutable = raw.get("immutable", False)
    if not isinstance(immutable, bool):
        raise _fail(f"{where}.immutable", f"expected true or false, got {immutable!r}")
    return Rule(
        name=name,
        window=window,
        usd=parse_usd(raw["usd"], f"{where}.usd") if "usd" in raw else None,
        tokens=parse_int(raw["tokens"], f"{where}.tokens") if "tokens" in raw else None,
        requests=parse_int(raw["requests"], f"{where}.requests") if "requests" in raw else None,
        mode=cast(Any, mode),
        requires_capability=capability,
        per=per,
        match=_match(raw["match"], f"{where}.match") if "match" in raw else Match(),
        action=action,
        alert_at=alert_at,
        immutable=immutable,
        downgrade=downgrade,
        min_output=parse_int(raw["min_output"], f"{where}.min_output", 1) if "min_output" in raw else 1,
        timezone=_timezone(raw["timezone"], f"{where}.timezone") if "timezone" in raw else default_tz,
    )


def _tiers(raw: Any) -> Tiers:
    if not isinstance(raw, Mapping):
        raise _fail("tiers", f"expected a table of tier = [model globs], got {raw!r}")
    globs = {k: _strs(v, f"tiers.{k}") for k, v in raw.items() if k != "strict"}
    if not globs:
        raise _fail("tiers", "declares no tier")
    strict = raw.get("strict", list(globs)[-1])
    if strict not in globs:
        raise _fail("tiers.strict", f"names no declared tier ({', '.join(globs)}); got {strict!r}")
    return Tiers(globs, strict)


def _declared_tiers(rules: tuple[Rule, ...], tiers: Tiers) -> None:
    """A rule matching a tier the file does not declare would never match (every model falls into a
    declared tier): a typo, refused like any other. Only the file's own rules are checked."""
    for i, rule in enumerate(rules):
        for tier in rule.match.tiers:
            if tier not in tiers.globs:
                raise _fail(f'budget[{i}] "{rule.name}".match.tier',
                            f"names no declared tier ({', '.join(tiers.globs)}); got {tier!r}")


def _store_scheme(url: str) -> None:
    """Refused here, not by the first command that opens it: a policy that passes ``config check``
    must be one every command can run."""
    from spendgate.ledger import BACKENDS

    scheme = url.split("://", 1)[0]
    if scheme not in BACKENDS:
        raise _fail("store", f"spendgate serves {', '.join(f'{s}://' for s in sorted(BACKENDS))}; got {url!r}")


def _approvals(raw: Any) -> ApprovalLimits:
    if not isinstance(raw, Mapping):
        raise _fail("approvals", f"expected a table such as {{ header_max_usd = 0, inband_max_usd = 50 }}, got {raw!r}")
    _unknown(raw, APPROVAL_KEYS, "approvals")
    base = ApprovalLimits()
    return ApprovalLimits(
        header_max_usd=parse_usd(raw["header_max_usd"], "approvals.header_max_usd")
        if "header_max_usd" in raw else base.header_max_usd,
        inband_max_usd=parse_usd(raw["inband_max_usd"], "approvals.inband_max_usd")
        if "inband_max_usd" in raw else base.inband_max_usd)


def _http_url(value: Any, where: str) -> str:
    """An absolute http(s) URL with a host: a webhook that cannot be reached is a config error now,
    not an alert lost later."""
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise _fail(where, f"expected an http(s) URL such as https://hooks.slack.com/services/…, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise _fail(where, f"expected an http(s) URL with a numeric port, got {value!r}") from None
    return cast(str, value)


def _metrics(raw: Any) -> MetricsSettings:
    if not isinstance(raw, Mapping):
        raise _fail("metrics", f"expected a table such as {{ enabled = true, public = false }}, got {raw!r}")
    _unknown(raw, METRICS_KEYS, "metrics")
    top = parse_int(raw["top_scopes"], "metrics.top_scopes", 1) if "top_scopes" in raw else 20
    return MetricsSettings(enabled=_bool(raw.get("enabled", True), "metrics.enabled"),
                           public=_bool(raw.get("public", False), "metrics.public"), top_scopes=top)


def _alerts(raw: Any) -> AlertSettings:
    if not isinstance(raw, Mapping):
        raise _fail("alerts", f"expected a table such as {{ webhooks = [\"https://…\"] }}, got {raw!r}")
    _unknown(raw, ALERT_KEYS, "alerts")
    hooks = raw.get("webhooks", [])
    if isinstance(hooks, str) or not isinstance(hooks, list):
        raise _fail("alerts.webhooks", f"expected a list of http(s) URLs, got {hooks!r}")
    webhooks = tuple(_http_url(h, f"alerts.webhooks[{i}]") for i, h in enumerate(hooks))
    admin_url = _http_url(raw["admin_url"], "alerts.admin_url").rstrip("/") if "admin_url" in raw else None
    return AlertSettings(webhooks, admin_url)


def _audit(raw: Any, key: Any) -> AuditSettings:
    if not isinstance(raw, Mapping):
        raise _fail("audit", f"expected a table such as {{ enabled = true }}, got {raw!r}")
    _unknown(raw, AUDIT_KEYS, "audit")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("audit.enabled", f"expected true or false, got {enabled!r}")
    if key is not None and (not isinstance(key, str) or not key.startswith("file:") or len(key) <= len("file:")):
        raise _fail("audit_key", f"expected file:/path/to/audit.key, got {key!r}")
    base = AuditSettings()
    return AuditSettings(
        enabled=enabled, key=key,
        checkpoint_entries=parse_int(raw["checkpoint_entries"], "audit.checkpoint_entries", 1)
        if "checkpoint_entries" in raw else base.checkpoint_entries,
        checkpoint_seconds=_positive_seconds(raw["checkpoint_seconds"], "audit.checkpoint_seconds")
        if "checkpoint_seconds" in raw else base.checkpoint_seconds)


def _retention(value: Any) -> int | None:
    """Days of spend events to keep; 0 keeps them forever."""
    days = parse_int(value, "retention_days")
    return days or None


def _positive_seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise _fail(where, f"expected a number of seconds above 0, got {value!r}")
    return float(value)


def parse(doc: Mapping[str, Any], source: str = "<policy>", *, keep_defaults: bool = False) -> Policy:
    """A policy from a parsed TOML document: exactly its rules, or with ``keep_defaults`` (how a
    policy file is read) the built-in rules too, unless the document says ``defaults = false``."""
    _unknown(doc, TOP_KEYS, "")
    tz = _timezone(doc["timezone"], "timezone") if "timezone" in doc else "UTC"
    budgets = doc.get("budget", [])
    if not isinstance(budgets, list):
        raise _fail("budget", "expected [[budget]] tables")
    rules = tuple(_rule(b, i, tz) for i, b in enumerate(budgets))
    if "tiers" in doc:
        _declared_tiers(rules, _tiers(doc["tiers"]))
    defaults = doc.get("defaults", True)
    if not isinstance(defaults, bool):
        raise _fail("defaults", f"expected true or false, got {defaults!r}")
    if defaults and keep_defaults:  # the guard stays on under a policy file: a default yields only to its name
        own = {r.name for r in rules}
        rules = (*rules, *(r for r in DEFAULT_RULES if r.name not in own))
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(f'budget "{dupes[0]}"', "two budgets share this name; names identify buckets")
    upstream = doc.get("upstream", {})
    if not isinstance(upstream, Mapping):
        raise _fail("upstream", f"expected a table, got {upstream!r}")
    from spendgate import providers

    _unknown(upstream, {p.name for p in providers.all_providers()}, "upstream")
    for k, v in upstream.items():
        if not isinstance(v, str) or not v.startswith(("http://", "https://")):
            raise _fail(f"upstream.{k}", f"expected an http(s) URL, got {v!r}")
    upstreams = _upstreams(doc.get("upstreams", {}))
    store = doc.get("store")
    if store is not None and (not isinstance(store, str) or "://" not in store):
        raise _fail("store", f"expected a store URL such as sqlite:///spend.db, got {store!r}")
    if store is not None:
        _store_scheme(store)
    factor = doc.get("anthropic_token_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1):
        raise _fail("anthropic_token_factor", f"expected a number ≥ 1 (an upward bias), got {factor!r}")
    return Policy(
        rules=rules,
        store=store,
        unpriced=cast(Any, _choice(doc.get("unpriced", "dearest"), "unpriced", ("dearest", "block"))),
        on_store_error=cast(Any, _choice(doc.get("on_store_error", "block"), "on_store_error",
                                         ("block", "allow"))),
        upstream=dict(upstream),
        upstreams=upstreams,
        tiers=_tiers(doc["tiers"]) if "tiers" in doc else Tiers(),
        timezone=tz,
        hold_ttl_s=parse_duration(doc["hold_ttl"], "hold_ttl") if "hold_ttl" in doc else 600,
        anthropic_token_factor=float(factor) if factor is not None else None,
        approvals=_approvals(doc["approvals"]) if "approvals" in doc else ApprovalLimits(),
        retention_days=_retention(doc.get("retention_days", 90)),
        upstream_timeout_s=_positive_seconds(doc["upstream_timeout_s"], "upstream_timeout_s")
        if "upstream_timeout_s" in doc else 600.0,
        audit=_audit(doc.get("audit", {}), doc.get("audit_key")),
        alerts=_alerts(doc["alerts"]) if "alerts" in doc else AlertSettings(),
        mode=cast(Any, _choice(doc.get("mode", "enforce"), "mode", MODES)),
        version=_version(doc["version"]) if "version" in doc else None,
        effective_from=_instant(doc["effective_from"], "effective_from") if "effective_from" in doc else None,
        trust_client_capability=_bool(doc.get("trust_client_capability", False), "trust_client_capability"),
        metrics=_metrics(doc["metrics"]) if "metrics" in doc else MetricsSettings(),
        flat_holds=_flat_holds(doc["flat_holds"]) if "flat_holds" in doc else {},
        source=source,
    )


def _flat_holds(raw: Any) -> dict[str, Decimal]:
    """``flat_holds = { "/v1/audio/transcriptions" = 0.50 }``: routes spendgate cannot price that the
    operator lets through under a fixed hold each. A path is exact (no template, no query), so a
    listed route opens that one path and nothing near it."""
    if not isinstance(raw, Mapping):
        raise _fail("flat_holds", f'expected a table of path = dollars such as {{ "/v1/audio/speech" = 0.05 }}, '
                                  f"got {raw!r}")
    out: dict[str, Decimal] = {}
    for path, usd in raw.items():
        where = f'flat_holds."{path}"'
        if not path.startswith("/") or path == "/" or _FLAT_PATH_BAD.search(path):
            raise _fail(where, "expected an exact path starting with \"/\" (no {template}, query or spaces), "
                               f"got {path!r}")
        out[path] = parse_usd(usd, where)
    return out


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {value!r}")
    return value


def _version(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise _fail("version", f"expected a version name such as \"2026-12-03.1\" or 7, got {value!r}")
    return str(value)


def _instant(value: Any, where: str) -> float:
    """A TOML date-time with an offset (``2026-12-04T09:00:00Z``): an instant, never a local time
    whose meaning depends on the server's zone."""
    import datetime as dt

    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise _fail(where, f"expected a date-time with an offset such as 2026-12-04T09:00:00Z, got {value!r}") \
                from None
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise _fail(where, f"expected a date-time with an offset such as 2026-12-04T09:00:00Z, got {value!r}")
    return value.timestamp()


def load(path: str | Path) -> Policy:
    """Read and validate a policy file; every problem is a :class:`ConfigError` naming its key."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the policy file ({exc.strerror})") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    try:
        return parse(doc, str(p), keep_defaults=True)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def _upstreams(doc: Any) -> dict[str, UpstreamSpec]:
    """``[upstreams.NAME]`` tables: OpenAI-compatible servers and Azure OpenAI, by configuration."""
    if not isinstance(doc, Mapping):
        raise _fail("upstreams", f"expected [upstreams.NAME] tables, got {doc!r}")
    out = {name: _upstream(name, table) for name, table in doc.items()}
    azure = [n for n, u in out.items() if u.api == "azure"]
    if len(azure) > 1:
        raise _fail(f"upstreams.{azure[1]}", f"a second Azure upstream; /openai/deployments/… is served by "
                                             f"one, upstreams.{azure[0]}")
    return out


def _upstream(name: str, table: Any) -> UpstreamSpec:
    from spendgate import providers

    where = f"upstreams.{name}"
    if not isinstance(table, Mapping):
        raise _fail(where, f"expected a table, got {table!r}")
    _unknown(table, UPSTREAM_KEYS, where)
    if not _UPSTREAM_NAME.match(name):
        raise _fail(where, "the name is the route prefix clients use (/NAME/v1/…): lowercase letters, digits, "
                           f"- and _; got {name!r}")
    builtin = {p.name for p in providers.all_providers()}
    prefixes = {r.split("/")[1] for p in providers.all_providers() for r in (*p.routes, *p.free_routes)}
    if name in builtin:
        raise _fail(where, f"{name!r} is a built-in provider; set its URL with [upstream] {name} = \"…\"")
    if name in prefixes | RESERVED_PREFIXES:
        raise _fail(where, f"{name!r} is a route prefix spendgate already serves (/{name}/…); choose another name")
    if "api" in table and "kind" in table:
        raise _fail(f"{where}.kind", "give api or kind, not both")
    api_key = "kind" if "kind" in table else "api"
    api = table.get(api_key, "openai")
    if not isinstance(api, str) or (api != "azure" and api not in builtin):
        raise _fail(f"{where}.{api_key}", f"expected a wire format spendgate knows ({', '.join(sorted(builtin))}) "
                                          f"or azure, got {api!r}")
    base = table.get("base_url")
    if base is None:
        raise _fail(f"{where}.base_url", "missing; the upstream's http(s) URL is required")
    parts = urlsplit(base) if isinstance(base, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(f"{where}.base_url", f"expected an http(s) URL, got {base!r}")
    azure = api == "azure"
    prices = table.get("prices", "openai" if azure else name)
    if not isinstance(prices, str) or not prices.strip():
        raise _fail(f"{where}.prices", f"expected the price table's provider (mistral, deepseek…), got {prices!r}")
    key_env = table.get("key_env", "AZURE_OPENAI_API_KEY" if azure else f"{name.upper().replace('-', '_')}_API_KEY")
    if not isinstance(key_env, str) or not _ENV_NAME.match(key_env):
        raise _fail(f"{where}.key_env", f"expected an environment variable's name, got {key_env!r}")
    free = table.get("free", [])
    if isinstance(free, bool):
        free = ["*"] if free else []
    if not isinstance(free, list) or not all(isinstance(g, str) and g.strip() for g in free):
        raise _fail(f"{where}.free", f"expected model globs (free = [\"my-local-*\"]) or true, got {free!r}")
    deployments = table.get("deployments", {})
    if "deployments" in table and not azure:
        raise _fail(f"{where}.deployments", "only an Azure upstream (api = \"azure\") has deployments")
    if not isinstance(deployments, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v.strip() for k, v in deployments.items()):
        raise _fail(f"{where}.deployments", f"expected {{ deployment = \"model\" }}, got {deployments!r}")
    if azure and not deployments:
        raise _fail(f"{where}.deployments", "an Azure upstream needs { deployment = \"model\" } to price its calls")
    return UpstreamSpec(name=name, base_url=base.rstrip("/"), api=api, prices=prices.strip(), key_env=key_env,
                        free=tuple(g.strip() for g in free), deployments=dict(deployments))
