"""``spendgate.capability``: in-process code says what its calls may be trusted with."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal

import pytest

import spendgate
from spendgate.errors import BudgetExceeded, ConfigError
from spendgate.policy import default_policy
from spendgate.policy.parse import parse


@pytest.fixture
def gated() -> Iterator[None]:
    spendgate.configure(store="memory://", policy=parse({"budget": [
        {"name": "payments", "usd": 100, "window": "day", "match": {"model": "stripe*"},
         "requires_capability": "payment_initiate"}]}))
    yield
    spendgate.configure(store="memory://", policy=default_policy())


def pay(usd: str = "0.25", name: str = "stripe-charge") -> None:
    with spendgate.reserve(usd=usd, name=name) as r:
        r.capture(usd)


def test_a_call_below_the_capability_is_refused_and_one_at_it_passes(gated: None) -> None:
    with pytest.raises(BudgetExceeded, match="requires capability payment_initiate; this request carries none"):
        pay()
    with spendgate.capability("data_write"), pytest.raises(BudgetExceeded, match="carries data_write"):
        pay()
    with spendgate.capability("payment_initiate"):
        pay()
        with spendgate.capability("read_only"), pytest.raises(BudgetExceeded):  # an inner block lowers it
            pay()
        pay("0.50")
    assert spendgate.report(("model",), since="1h").usd(model="stripe-charge") == Decimal("0.75")
    pay("0.01", "search")  # the rule does not match it: no capability needed


def test_spend_that_already_happened_is_recorded_whatever_the_capability(gated: None) -> None:
    """A charge is money already spent: refusing it would only leave it out of the ledger."""
    spent = spendgate.charge(usd="0.25", name="stripe-charge")
    assert spent.usd == Decimal("0.25")
    assert spendgate.report(("model",), since="1h").usd(model="stripe-charge") == Decimal("0.25")


def test_tasks_inherit_the_capability(gated: None) -> None:
    async def main() -> list[bool]:
        async def attempt() -> bool:
            try:
                await asyncio.to_thread(pay, "0.01", "stripe")  # to_thread carries the context
            except BudgetExceeded:
                return False
            return True

        with spendgate.capability("payment_execute"):
            inside = await asyncio.create_task(attempt())
        return [inside, await asyncio.create_task(attempt())]

    assert asyncio.run(main()) == [True, False]


def test_an_unknown_capability_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"spendgate\.capability: expected one of read_only, data_write"), \
            spendgate.capability("root"):
        pass
