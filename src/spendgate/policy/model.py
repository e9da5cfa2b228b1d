"""The policy as data: rules, windows, scopes, tiers. Parsing lives in :mod:`.parse`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

Action = Literal["block", "hold", "downgrade", "clamp", "truncate", "alert"]
ACTIONS: tuple[Action, ...] = ("block", "hold", "downgrade", "clamp", "truncate", "alert")
#: How restrictive each outcome is; the most restrictive of all tripped rules wins.
SEVERITY: dict[str, int] = {"block": 4, "hold": 3, "clamp": 2, "downgrade": 2, "truncate": 2, "alert": 1, "allow": 0}
SCOPES = ("global", "key", "user", "team", "session", "agent", "feature", "model", "provider", "tier")
CALENDAR = ("day", "week", "month")
#: How a rule is applied: ``enforce`` refuses; ``shadow`` refuses nothing and records each request it
#: would have refused as a ``would_refuse`` event (SPEC §12: roll a rule out by watching it first).
MODES = ("enforce", "shadow")
Mode = Literal["enforce", "shadow"]
#: What a caller may be trusted with, lowest first (agentguard-spend's tiers): a rule's
#: ``requires_capability`` refuses, before pricing, a request whose capability ranks lower.
CAPABILITIES = ("read_only", "data_write", "payment_initiate", "payment_execute")


def capability_rank(capability: str | None) -> int:
    """The rank of ``capability`` in :data:`CAPABILITIES`; a caller with none ranks below all."""
    return CAPABILITIES.index(capability) if capability in CAPABILITIES else -1


#: the last calendar period worked out per (period, zone): (its first instant, the next one's, its label)
_PERIODS: dict[tuple[str, ZoneInfo], tuple[float, float, str]] = {}


@dataclass(frozen=True, slots=True)
class Window:
    """``request`` (one call), ``rolling`` (seconds), a ``calendar`` period, or ``total``."""

    kind: Literal["request", "rolling", "calendar", "total"]
    seconds: int = 0
    period: str = ""  # day | week | month
    text: str = ""

    def period_of(self, now: float, tz: ZoneInfo) -> tuple[str, float]:
        """The calendar period containing ``now``: its label and when the next one starts.

        Asked for every calendar rule of every request: the last answer per (period, zone) is kept
        with the instants it holds for, so the time-zone arithmetic runs once a period."""
        memo = _PERIODS.get((self.period, tz))
        if memo is not None and memo[0] <= now < memo[1]:
            return memo[2], memo[1]
        label, start, reset = self._period(now, tz)
        _PERIODS[(self.period, tz)] = (start, reset, label)
        return label, reset

    def _period(self, now: float, tz: ZoneInfo) -> tuple[str, float, float]:
        local = dt.datetime.fromtimestamp(now, tz)
        day = local.date()
        if self.period == "day":
            first, nxt = day, day + dt.timedelta(days=1)
            label = day.isoformat()
        elif self.period == "week":
            first, nxt = day - dt.timedelta(days=day.weekday()), day + dt.timedelta(days=7 - day.weekday())
            iso = day.isocalendar()
            label = f"{iso.year}-W{iso.week:02d}"
        else:
            first = day.replace(day=1)
            nxt = (first + dt.timedelta(days=32)).replace(day=1)
            label = f"{day.year}-{day.month:02d}"
        # where a midnight falls in a clock change the start may land after ``now``: then the memo's
        # range holds nothing and the period is worked out afresh each time
        start = dt.datetime.combine(first, dt.time(), tz).timestamp()
        reset = dt.datetime.combine(nxt, dt.time(), tz).timestamp()
        return label, start, reset


@dataclass(frozen=True, slots=True)
class Match:
    """Which requests a rule applies to; every given field must match (fields are OR-lists)."""

    models: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def matches(self, model: str, provider: str, tier: str, tags: Mapping[str, str]) -> bool:
        if self.models and not any(fnmatch.fnmatchcase(model.lower(), g.lower()) for g in self.models):
            return False
        if self.providers and provider not in self.providers:
            return False
        if self.tiers and tier not in self.tiers:
            return False
        return all(tags.get(k) in vals for k, vals in self.tags.items())


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    window: Window
    usd: Decimal | None = None
    tokens: int | None = None
    per: str = "global"
    match: Match = field(default_factory=Match)
    action: Action = "block"
    alert_at: tuple[Decimal, ...] = ()
    immutable: bool = False
    #: downgrade: model -> cheaper model (a chain is stored as consecutive pairs)
    downgrade: Mapping[str, str] = field(default_factory=dict)
    min_output: int = 1
    timezone: str = "UTC"
    #: requests counted in the window (``requests = 60`` with ``window = "1m"`` is 60 RPM)
    requests: int | None = None
    #: None: the policy's mode
    mode: Mode | None = None
    #: the lowest capability (:data:`CAPABILITIES`) a request this rule matches must carry
    requires_capability: str | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class Tiers:
    """Model tiers from globs; a model no glob matches falls into ``strict``."""

    globs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    strict: str = "unknown"

    def tier_of(self, model: str) -> str:
        m = model.lower().rsplit("/", 1)[-1]
        for tier, globs in self.globs.items():
            if any(fnmatch.fnmatchcase(m, g.lower()) for g in globs):
                return tier
        return self.strict


@dataclass(frozen=True, slots=True)
class ApprovalLimits:
    """How far an answer that did not come from an operator may lift a hold (``[approvals]``).

    ``X-Spendgate-Allow`` is a client's header, so by default it grants nothing (0); a virtual key
    created with ``--preapprove-max`` carries its own ceiling. In-band answers ("yes max=$5") come
    from the text of the latest user turn and are capped too. Each ceiling bounds what its channel
    may grant to one bucket in one window, however many requests ask."""

    header_max_usd: Decimal = Decimal(0)
    inband_max_usd: Decimal = Decimal(50)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The signed decision log (``[audit]``, ``audit_key``): on unless ``enabled = false``.

    ``key`` is where the Ed25519 signing key is read (``file:/path``); None means spendgate's home,
    where it is created on first use. Checkpoints of the chain's head are signed every
    ``checkpoint_entries`` entries and every ``checkpoint_seconds`` (when there is something new)."""

    enabled: bool = True
    key: str | None = None
    checkpoint_entries: int = 256
    checkpoint_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Where alerts go (``[alerts]``): Slack-compatible webhooks, and the base URL a notification
    names for the admin API (None: the address the server listens on)."""

    webhooks: tuple[str, ...] = ()
    admin_url: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``GET /metrics`` (``[metrics]``): on unless ``enabled = false``. Served without the admin
    token only over loopback, unless ``public = true``; a rule's ``top_scopes`` dearest scopes get
    series of their own and the rest are summed under ``scope="(other)"``. None of it decides a
    request, so none of it is in the policy hash."""

    enabled: bool = True
    public: bool = False
    top_scopes: int = 20


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One ``[upstreams.NAME]`` table: an OpenAI-compatible server (Mistral, DeepSeek, a local vLLM)
    or an Azure OpenAI resource, guarded by configuration rather than code. Its requests are read
    in the wire format ``api`` names and priced only from the price table's ``prices`` rows."""

    name: str
    base_url: str
    #: the registered wire format it speaks (``openai``), or ``azure`` for Azure OpenAI
    api: str = "openai"
    #: the price table's provider its models are priced from (never another provider's rows)
    prices: str = ""
    #: the environment variable holding the key a virtual key is swapped for
    key_env: str = ""
    #: model globs that cost nothing; empty unless the config says so
    free: tuple[str, ...] = ()
    #: Azure: deployment name -> the model it serves, for pricing
    deployments: Mapping[str, str] = field(default_factory=dict)

    def is_free(self, model: str) -> bool:
        name = model.strip().lower()
        return any(fnmatch.fnmatchcase(name, glob.lower()) for glob in self.free)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    store: str | None = None
    unpriced: Literal["dearest", "block"] = "dearest"
    on_store_error: Literal["block", "allow"] = "block"
    upstream: Mapping[str, str] = field(default_factory=dict)
    #: ``[upstreams.NAME]``: configured OpenAI-compatible and Azure upstreams, by name
    upstreams: Mapping[str, UpstreamSpec] = field(default_factory=dict)
    tiers: Tiers = field(default_factory=Tiers)
    timezone: str = "UTC"
    hold_ttl_s: int = 600
    anthropic_token_factor: float | None = None
    approvals: ApprovalLimits = field(default_factory=ApprovalLimits)
    #: spend events older than this are deleted by the store's periodic upkeep (None: kept forever)
    retention_days: int | None = 90
    #: how long the proxy waits for an upstream's next bytes before charging the worst case
    upstream_timeout_s: float = 600.0
    audit: AuditSettings = field(default_factory=AuditSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    #: ``shadow``: no rule refuses; each would-be refusal is recorded (a rule's own ``mode`` wins)
    mode: Mode = "enforce"
    #: the operator's name for this revision of the policy, recorded with every decision
    version: str | None = None
    #: when this policy takes over from the one in force (epoch seconds; None: at once)
    effective_from: float | None = None
    #: take ``X-Spendgate-Capability`` from clients (off: only a virtual key's capability counts)
    trust_client_capability: bool = False
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    #: ``flat_holds``: exact paths spendgate cannot price, passed through under a fixed hold of
    #: this many dollars each and charged exactly that on success (opt-in; empty: refused)
    flat_holds: Mapping[str, Decimal] = field(default_factory=dict)
    source: str = "built-in defaults"

    def mode_of(self, rule: Rule) -> Mode:
        return rule.mode or self.mode


def policy_hash(policy: Policy) -> str:
    """Hex SHA-256 of the policy's canonical JSON (RFC 8785): what every audit entry names, so a
    decision can be matched to the exact rules in force. Where the policy was read from is left
    out — the same rules from another path are the same policy."""
    import hashlib

    import rfc8785

    doc = _plain(dataclasses.asdict(policy))
    doc.pop("source", None)
    doc.pop("metrics", None)  # what is exported, not what is decided
    if not doc.get("upstreams"):  # a policy without configured upstreams hashes as it did before them
        doc.pop("upstreams", None)
    if not doc.get("flat_holds"):  # likewise a policy without flat holds
        doc.pop("flat_holds", None)
    return hashlib.sha256(rfc8785.dumps(doc)).hexdigest()


def _plain(value: object) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)  # Decimal, float: their exact text
