"""Reconcile: the ledger's captured spend against what the provider says it billed, per UTC day and model.

Three export formats are read, told apart by their content:

* **OpenAI** — the organization Costs API (``GET /v1/organization/costs``, ``bucket_width=1d``): a page
  ``{"object": "page", "data": [{"object": "bucket", "start_time", "end_time", "results": [{"amount":
  {"value", "currency"}, "line_item", "project_id"}]}], "has_more", "next_page"}``, or a JSON list of such
  pages. ``amount.value`` is dollars. With ``group_by=line_item`` a line item reads ``"gpt-4o-2024-08-06,
  input"``: the model is the part before the first comma.
* **Anthropic** — the Admin API cost report (``GET /v1/organizations/cost_report``): ``{"data":
  [{"starting_at", "ending_at", "results": [{"amount", "currency", "model", "cost_type", …}]}], "has_more",
  "next_page"}``, or a list of pages. ``amount`` is a decimal string in the currency's **lowest unit —
  cents** ("123.45" is $1.2345). ``model`` is set only with ``group_by[]=description``; a cost with no model
  (web search, code execution) is compared under ``(web_search)``, ``(code_execution)``.
* **CSV** — ``date,model,usd`` with that header (any column order, other columns ignored): ``date`` a UTC
  day ``YYYY-MM-DD``, ``usd`` dollars (a leading ``$`` is allowed). It covers every day from its first date
  to its last; a day in between with no row is a $0 day.

An export with no model at all (fetched without a group-by) is compared per day only, against the ledger's
total of that day, under the model ``(all models)``.

Money stays exact: provider amounts are ``Decimal`` from the file's own digits (JSON numbers are never
floats), the ledger's are integer nano-dollars. A file that cannot be read exactly raises
:class:`~spendgate.errors.ConfigError` naming the file and the line or field; nothing is skipped or read as 0.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from spendgate.errors import ConfigError
from spendgate.ledger import Event
from spendgate.money import nanos_to_usd
from spendgate.pricing.table import PriceTable

#: A row is flagged when the ledger and the provider differ by more than this share of the provider's total.
THRESHOLD = Decimal("0.02")
ALL_MODELS = "(all models)"
UNATTRIBUTED = "(unattributed)"
DAY = dt.timedelta(days=1)
#: Amounts beyond these bounds are refused rather than summed inexactly.
_MAX_USD = Decimal(10) ** 12
_MIN_EXPONENT = -30
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class CostLine:
    """One amount the provider billed: a UTC day, the model as the export names it (None: not said), dollars."""

    day: dt.date
    model: str | None
    usd: Decimal


@dataclass(slots=True)
class Export:
    """A provider's cost export, read."""

    format: str  # openai | anthropic | csv
    provider: str | None  # the ledger provider it bills (None: every provider)
    lines: list[CostLine]
    days: set[dt.date]  # the days it covers: a covered day with no line is a $0 day
    notes: list[str] = field(default_factory=list)


# -- reading ------------------------------------------------------------------------------------------

def read_export(path: Path | str) -> Export:
    """Read and check the export at ``path`` (format detected from its content)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from exc
    return parse_export(text, str(p))


def parse_export(text: str, name: str = "export") -> Export:
    """Parse an export's text; ``name`` prefixes every error."""
    head = text.lstrip()
    if head.startswith(("{", "[")):
        return _parse_json(text, name)
    if not head:
        raise ConfigError(f"{name}: empty file; expected an OpenAI or Anthropic cost export (JSON) "
                          "or a CSV with the header date,model,usd")
    return _parse_csv(text, name)


class _Bad(Exception):
    """A problem at a JSON path; turned into a ConfigError naming the file and the path."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")


def _amount(value: Any, unit: str) -> Decimal:
    """A non-negative, finite, exactly summable amount from a JSON number (already Decimal) or a decimal string."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise ValueError(f"expected a number of {unit}, got {json.dumps(value, default=str)}")
    try:
        d = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"expected a number of {unit}, got {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"expected a number of {unit}, got {value!r}")
    if d < 0:
        raise ValueError(f"expected a non-negative number of {unit}, got {value!r} "
                         "(credits and refunds are not spend; leave them out)")
    exponent = d.as_tuple().exponent
    if d >= _MAX_USD or (isinstance(exponent, int) and exponent < _MIN_EXPONENT):
        raise ValueError(f"{value!r} is out of range (at most 10^12, at most 30 decimal places)")
    return d


def _parse_json(text: str, name: str) -> Export:
    try:
        doc = json.loads(text, parse_float=Decimal, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be a cost export") from None
    pages: list[tuple[str, Any]] = [(f"[{i}]", p) for i, p in enumerate(doc)] if isinstance(doc, list) else [("", doc)]
    try:
        if not pages:
            raise _Bad("(top level)", "an empty list; expected a cost export page or a list of pages")
        fmt = _json_format(pages)
        export = Export(fmt, fmt, [], set())
        seen: dict[dt.date, str] = {}
        for prefix, page in pages:
            buckets = page["data"]
            for i, bucket in enumerate(buckets):
                where = f"{prefix}data[{i}]" if prefix else f"data[{i}]"
                if not isinstance(bucket, dict):
                    raise _Bad(where, f"expected a time bucket (an object), got {_kind(bucket)}")
                day = _openai_day(bucket, where) if fmt == "openai" else _anthropic_day(bucket, where)
                if day in seen:
                    raise _Bad(where, f"a second bucket for {day} (first at {seen[day]}); do the pages overlap?")
                seen[day] = where
                export.days.add(day)
                results = bucket.get("results")
                if not isinstance(results, list):
                    raise _Bad(f"{where}.results", f"expected a list of costs, got {_kind(results)}")
                for j, res in enumerate(results):
                    rwhere = f"{where}.results[{j}]"
                    if not isinstance(res, dict):
                        raise _Bad(rwhere, f"expected a cost (an object), got {_kind(res)}")
                    reader = _openai_result if fmt == "openai" else _anthropic_result
                    model, usd = reader(res, rwhere)
                    export.lines.append(CostLine(day, model, usd))
        last = pages[-1][1]
        if last.get("has_more") is True:
            export.notes.append(f"{name} says has_more: true — the provider has more pages (next_page "
                                f"{last.get('next_page')!r}); days on them are not in this comparison")
    except _Bad as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if not export.days:
        raise ConfigError(f"{name}: no cost buckets in data; nothing to reconcile")
    return export


def _no_constant(value: str) -> Any:
    raise ValueError(f"{value} is not a number of dollars")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, Decimal)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    return "a list" if isinstance(value, list) else "an object"


def _json_format(pages: Sequence[tuple[str, Any]]) -> str:
    """openai or anthropic, from the pages' shape; raises _Bad naming what is missing."""
    found: set[str] = set()
    for prefix, page in pages:
        where = prefix or "(top level)"
        if not isinstance(page, dict):
            raise _Bad(where, f"expected a cost export page (an object with data), got {_kind(page)}")
        data = page.get("data")
        if not isinstance(data, list):
            raise _Bad(f"{prefix}data", f"expected a list of time buckets, got {_kind(data)} — not an OpenAI "
                                        "costs page nor an Anthropic cost report")
        if page.get("object") == "page":
            found.add("openai")
        for b in data:
            if isinstance(b, dict) and "start_time" in b:
                found.add("openai")
            elif isinstance(b, dict) and "starting_at" in b:
                found.add("anthropic")
    if not found and not any(page["data"] for _, page in pages):
        raise _Bad("data", "no cost buckets; nothing to reconcile")
    if len(found) != 1:
        what = "both OpenAI and Anthropic buckets" if found else "neither OpenAI nor Anthropic buckets"
        raise _Bad("data", f"{what}: expected OpenAI costs buckets (start_time, results[].amount.value) or "
                           "Anthropic cost report buckets (starting_at, results[].amount)")
    return found.pop()


def _whole_day(start: dt.datetime, end: dt.datetime | None, where: str) -> dt.date:
    if start.time() != dt.time(0) or (end is not None and end - start != DAY):
        raise _Bad(where, f"a bucket from {start:%Y-%m-%dT%H:%M:%SZ} to "
                          f"{end:%Y-%m-%dT%H:%M:%SZ}; expected whole UTC days (bucket_width=1d)"
                   if end is not None else f"a bucket starting {start.isoformat()}; expected 00:00 UTC")
    return start.date()


def _openai_day(bucket: Mapping[str, Any], where: str) -> dt.date:
    if bucket.get("object", "bucket") != "bucket":
        raise _Bad(f"{where}.object", f"expected \"bucket\", got {_kind(bucket.get('object'))}")
    times = []
    for key in ("start_time", "end_time"):
        v = bucket.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"{where}.{key}", f"expected Unix seconds, got {_kind(v)}")
        try:
            times.append(dt.datetime.fromtimestamp(v, dt.UTC))
        except (OverflowError, OSError, ValueError):
            raise _Bad(f"{where}.{key}", f"{v} is not a time spendgate can read (Unix seconds)") from None
    return _whole_day(times[0], times[1], where)


def _anthropic_day(bucket: Mapping[str, Any], where: str) -> dt.date:
    times: list[dt.datetime] = []
    for key in ("starting_at", "ending_at"):
        v = bucket.get(key)
        try:
            if not isinstance(v, str):
                raise ValueError
            t = dt.datetime.fromisoformat(v)
            if t.tzinfo is None:
                raise ValueError
        except ValueError:
            raise _Bad(f"{where}.{key}", f"expected an RFC 3339 time such as 2025-08-01T00:00:00Z, "
                                         f"got {_kind(v)}") from None
        times.append(t.astimezone(dt.UTC))
    return _whole_day(times[0], times[1], where)


def _openai_result(res: Mapping[str, Any], where: str) -> tuple[str | None, Decimal]:
    obj = res.get("object", "organization.costs.result")
    if obj != "organization.costs.result":
        raise _Bad(f"{where}.object", f"expected \"organization.costs.result\", got {_kind(obj)} "
                                      "(a usage export? reconcile reads the Costs API, /v1/organization/costs)")
    amount = res.get("amount")
    if not isinstance(amount, dict):
        raise _Bad(f"{where}.amount", f"expected {{\"value\": …, \"currency\": \"usd\"}}, got {_kind(amount)}")
    currency = amount.get("currency", "usd")
    if not isinstance(currency, str) or currency.lower() != "usd":
        raise _Bad(f"{where}.amount.currency", f"expected \"usd\", got {_kind(currency)}")
    try:
        usd = _amount(amount.get("value"), "dollars")
    except ValueError as exc:
        raise _Bad(f"{where}.amount.value", str(exc)) from None
    item = res.get("line_item")
    if item is not None and not isinstance(item, str):
        raise _Bad(f"{where}.line_item", f"expected a string or null, got {_kind(item)}")
    model = item.split(",", 1)[0].strip() if item else None
    return model or None, usd


def _anthropic_result(res: Mapping[str, Any], where: str) -> tuple[str | None, Decimal]:
    currency = res.get("currency", "USD")
    if not isinstance(currency, str) or currency.upper() != "USD":
        raise _Bad(f"{where}.currency", f"expected \"USD\", got {_kind(currency)}")
    try:
        cents = _amount(res.get("amount"), "cents (a decimal string such as \"123.45\")")
    except ValueError as exc:
        raise _Bad(f"{where}.amount", str(exc)) from None
    model = res.get("model")
    if model is not None and not isinstance(model, str):
        raise _Bad(f"{where}.model", f"expected a string or null, got {_kind(model)}")
    cost_type = res.get("cost_type")
    if not model and isinstance(cost_type, str) and cost_type and cost_type != "tokens":
        model = f"({cost_type})"
    return model or None, _X.divide(cents, 100)


def _parse_csv(text: str, name: str) -> Export:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    cols: dict[str, int] = {}
    lines: list[CostLine] = []
    try:
        for row in reader:
            n = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip().lower() for c in row]
                missing = [c for c in ("date", "model", "usd") if c not in header]
                if missing:
                    raise ConfigError(f"{name} line {n}: the header lacks {', '.join(missing)}; expected a "
                                      f"header date,model,usd (got {','.join(row)!r}) — or an OpenAI or "
                                      "Anthropic cost export (JSON)")
                dup = sorted({c for c in header if c and header.count(c) > 1})
                if dup:
                    raise ConfigError(f"{name} line {n}: column {dup[0]!r} appears twice in the header")
                cols = {c: header.index(c) for c in ("date", "model", "usd")}
                continue
            if len(row) != len(header):
                raise ConfigError(f"{name} line {n}: expected {len(header)} fields ({','.join(header)}), "
                                  f"got {len(row)}")
            raw_day, model, raw_usd = (row[cols[c]].strip() for c in ("date", "model", "usd"))
            try:
                if not _DATE.fullmatch(raw_day):
                    raise ValueError
                day = dt.date.fromisoformat(raw_day)
            except ValueError:
                raise ConfigError(f"{name} line {n}: date: expected a UTC day YYYY-MM-DD, got {raw_day!r}") from None
            if not model:
                raise ConfigError(f"{name} line {n}: model: empty")
            try:
                usd = _amount(raw_usd.removeprefix("$"), "dollars")
            except ValueError as exc:
                raise ConfigError(f"{name} line {n}: usd: {exc}") from None
            lines.append(CostLine(day, model, usd))
    except csv.Error as exc:
        raise ConfigError(f"{name} line {reader.line_num}: not valid CSV ({exc})") from None
    if header is None or not lines:
        raise ConfigError(f"{name}: no cost rows under the header date,model,usd; nothing to reconcile")
    first, last = min(line.day for line in lines), max(line.day for line in lines)
    days = {first + DAY * i for i in range((last - first).days + 1)}
    return Export("csv", None, lines, days)


# -- comparing ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Row:
    """One day and model: what the ledger captured, what the provider billed."""

    day: dt.date
    model: str
    ledger_nanos: int
    provider_usd: Decimal
    requests: int = 0  # ledger events behind ledger_nanos

    @property
    def ledger_usd(self) -> Decimal:
        return nanos_to_usd(self.ledger_nanos)

    @property
    def diff_usd(self) -> Decimal:
        """Ledger minus provider: negative when the ledger saw less than was billed."""
        return _X.subtract(self.ledger_usd, self.provider_usd)

    @property
    def ratio(self) -> Decimal | None:
        """Ledger ÷ provider to 4 places; None when the provider billed nothing."""
        return _ratio(self.ledger_usd, self.provider_usd)

    @property
    def flagged(self) -> bool:
        return _off(self.ledger_usd, self.provider_usd)

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        return {"day": self.day.isoformat(), "model": self.model, "ledger_usd": usd_str(self.ledger_usd),
                "provider_usd": usd_str(self.provider_usd), "diff_usd": usd_str(self.diff_usd),
                "ratio": f"{ratio:f}" if ratio is not None else None, "flagged": self.flagged,
                "ledger_requests": self.requests}


@dataclass(slots=True)
class Reconciliation:
    """Every (day, model) row of the compared days, and what was left out of the comparison."""

    format: str
    provider: str | None
    first_day: dt.date | None
    last_day: dt.date | None
    rows: list[Row]
    notes: list[str]

    @property
    def flagged(self) -> int:
        return sum(r.flagged for r in self.rows)

    @property
    def ledger_total_usd(self) -> Decimal:
        return nanos_to_usd(sum(r.ledger_nanos for r in self.rows))

    @property
    def provider_total_usd(self) -> Decimal:
        return _sum(r.provider_usd for r in self.rows)

    def days(self) -> list[Row]:
        """One row per compared day (model ``(day total)``), flagged by the same 2 % rule."""
        totals: dict[dt.date, list[Any]] = {}
        for r in self.rows:
            t = totals.setdefault(r.day, [0, Decimal(0), 0])
            t[0] += r.ledger_nanos
            t[1] = _X.add(t[1], r.provider_usd)
            t[2] += r.requests
        return [Row(d, "(day total)", t[0], t[1], t[2]) for d, t in sorted(totals.items())]

    def as_dict(self, since: str) -> dict[str, Any]:
        days = self.days()
        total_ratio = _ratio(self.ledger_total_usd, self.provider_total_usd)
        return {"since": since, "format": self.format, "provider": self.provider,
                "first_day": self.first_day.isoformat() if self.first_day else None,
                "last_day": self.last_day.isoformat() if self.last_day else None,
                "threshold": f"{THRESHOLD:f}",
                "rows": [r.as_dict() for r in self.rows],
                "days": [{k: v for k, v in d.as_dict().items() if k != "model"} for d in days],
                "flagged": self.flagged, "flagged_days": sum(d.flagged for d in days),
                "ledger_total_usd": usd_str(self.ledger_total_usd),
                "provider_total_usd": usd_str(self.provider_total_usd),
                "diff_total_usd": usd_str(_X.subtract(self.ledger_total_usd, self.provider_total_usd)),
                "ratio_total": f"{total_ratio:f}" if total_ratio is not None else None,
                "notes": self.notes}


def model_key(name: str, prices: PriceTable, provider: str | None = None) -> str:
    """The model a name is compared under: the price table's model when the name resolves to one
    (``gpt-4o-2024-08-06`` → ``gpt-4o``), otherwise the name as written."""
    res = prices.resolve(name, provider) if name.strip() else None
    return res.price.model if res is not None else name.strip()


def reconcile(export: Export, events: Iterable[Event], prices: PriceTable,
              first_day: dt.date, last_day: dt.date) -> Reconciliation:
    """Compare ``export`` with the ledger's ``events`` on the days the export covers within
    ``first_day`` … ``last_day`` (UTC). Approval events (no spend) are ignored; events of another
    provider than the export's are too (a CSV compares every provider)."""
    days = {d for d in export.days if first_day <= d <= last_day}
    notes = list(export.notes)
    before = sorted(d for d in export.days if d < first_day)
    after = sorted(d for d in export.days if d > last_day)
    if before:
        notes.append(f"{len(before)} day(s) of the export before {first_day} ({before[0]} … {before[-1]}) "
                     "left out: widen --since to compare them")
    if after:
        notes.append(f"{len(after)} day(s) of the export after {last_day} left out")
    by_day = not any(line.model for line in export.lines)
    provider: dict[tuple[dt.date, str], Decimal] = {}
    for line in export.lines:
        if line.day not in days:
            continue
        model = ALL_MODELS if by_day else model_key(line.model, prices, export.provider) if line.model \
            else UNATTRIBUTED
        key = (line.day, model)
        provider[key] = _X.add(provider.get(key, Decimal(0)), line.usd)
    ledger: dict[tuple[dt.date, str], list[int]] = {}
    outside: dict[dt.date, int] = {}
    for e in events:
        if e.kind == "approval" or (export.provider is not None and e.provider != export.provider):
            continue
        day = dt.datetime.fromtimestamp(e.ts, dt.UTC).date()
        if not first_day <= day <= last_day:
            continue
        if day not in days:
            outside[day] = outside.get(day, 0) + e.cost
            continue
        acc = ledger.setdefault((day, ALL_MODELS if by_day else model_key(e.model, prices, e.provider)), [0, 0])
        acc[0] += e.cost
        acc[1] += 1
    if outside:
        notes.append(f"the ledger has {usd_str(nanos_to_usd(sum(outside.values())))} USD on {len(outside)} "
                     f"day(s) the export does not cover ({min(outside)} … {max(outside)}); left out")
    if by_day:
        notes.append("the export names no models (fetched without group_by): compared per day only")
    rows = [Row(d, m, ledger.get((d, m), [0, 0])[0], provider.get((d, m), Decimal(0)),
                ledger.get((d, m), [0, 0])[1])
            for d, m in sorted(set(provider) | set(ledger))]
    return Reconciliation(export.format, export.provider, min(days) if days else None,
                          max(days) if days else None, rows, notes)


# -- exact decimal arithmetic -------------------------------------------------------------------------

#: Enough digits that sums, differences and the cents-to-dollars division are exact: amounts are
#: bounded to 10^12 and 30 decimal places on the way in.
_X = Context(prec=100)


def _sum(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for v in values:
        total = _X.add(total, v)
    return total


def _ratio(ledger: Decimal, provider: Decimal) -> Decimal | None:
    if provider == 0:
        return None
    return _X.divide(ledger, provider).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN, context=_X)


def _off(ledger: Decimal, provider: Decimal) -> bool:
    """More than 2 % apart, as a share of the provider's amount; anything against a $0 bill is off."""
    if provider == 0:
        return ledger != 0
    return _X.abs(_X.subtract(ledger, provider)) > _X.multiply(provider, THRESHOLD)


def usd_str(d: Decimal) -> str:
    """Exact dollars as plain digits (never ``1E-9``), without trailing zeros."""
    if d == 0:
        return "0"
    d = _X.normalize(d)
    return f"{d.quantize(Decimal(1), context=_X) if d == d.to_integral_value() else d:f}"
