"""rule_buckets answers from a memo (asked for every windowed rule of every request): it must
answer exactly what working it out afresh would, whatever changed in between."""

from __future__ import annotations

import gc
from decimal import Decimal

from spendgate import buckets
from spendgate.buckets import Limit, rule_buckets
from spendgate.money import usd_to_nanos
from spendgate.policy.model import Rule
from spendgate.policy.parse import parse_window

NOON = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def fresh(rule: Rule, scope: str, now: float, override: Limit | None = None) -> list[buckets.RuleBucket]:
    buckets._MEMO.clear()
    return list(rule_buckets(rule, scope, now, override))


def test_the_memo_answers_as_a_fresh_computation_across_periods_scopes_and_overrides() -> None:
    day = Rule("day", parse_window("day", "t"), usd=Decimal("5"), tokens=1000, per="user")
    roll = Rule("hour", parse_window("1h", "t"), usd=Decimal("2"), per="session")
    total = Rule("all", parse_window("total", "t"), requests=10)
    cases = [(r, s, t, o) for r in (day, roll, total) for s in ("user=a", "user=b")
             for t in (NOON, NOON + 1, NOON + 3600, NOON + 86400) for o in (None, Limit(usd=7))]
    warm = [list(rule_buckets(*c)) for c in cases]  # (rules hold dicts: not dict keys themselves)
    for c, got in zip(cases, warm, strict=True):
        assert list(rule_buckets(*c)) == got == fresh(*c), c

    def of(*c: object) -> list[buckets.RuleBucket]:
        return warm[cases.index(c)]  # type: ignore[arg-type]

    assert [rb.key for rb in of(day, "user=a", NOON, None)] == ["day|user=a|2027-01-15",
                                                               "day|user=a|2027-01-15#tokens"]
    assert of(day, "user=a", NOON + 86400, None)[0].key == "day|user=a|2027-01-16", "the next day's bucket"
    assert of(roll, "user=a", NOON + 3600, None)[0].period != of(roll, "user=a", NOON, None)[0].period
    assert of(day, "user=b", NOON, Limit(usd=7))[0].limit == 7, "a scope's own limit"
    assert of(day, "user=b", NOON, None)[0].limit == usd_to_nanos(Decimal("5"))


def test_a_new_rule_of_the_same_name_is_never_answered_from_the_old_ones_entry() -> None:
    """A reloaded policy builds new rules of the same names: each is answered for itself."""
    for usd in range(1, 30):
        rule = Rule("day", parse_window("day", "t"), usd=Decimal(usd))
        [rb] = rule_buckets(rule, "global=x", NOON)
        assert rb.limit == usd_to_nanos(Decimal(usd))
        del rule
        gc.collect()


def test_a_buckets_ledger_form_is_built_once_and_counts_without_a_limit_when_not_enforced() -> None:
    [rb] = rule_buckets(Rule("d", parse_window("day", "t"), usd=Decimal("1")), "global=x", NOON)
    assert rb.bucket() is rb.bucket(True) and rb.bucket().limit == usd_to_nanos(Decimal("1"))
    assert rb.bucket(False).limit is None and rb.bucket(False).key == rb.key
