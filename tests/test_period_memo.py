"""A calendar window's period is remembered between requests; the memo must answer exactly what
working it out afresh answers, at every instant, in every zone, across clock changes."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.policy.model import _PERIODS, Window

ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "America/Santiago",
         "Pacific/Apia")


@settings(max_examples=300, deadline=None)
@given(period=st.sampled_from(("day", "week", "month")), zone=st.sampled_from(ZONES),
       times=st.lists(st.floats(1.5e9, 2.2e9), min_size=1, max_size=30), jitter=st.integers(-7200, 7200))
def test_the_remembered_period_is_the_period(period: str, zone: str, times: list[float], jitter: int) -> None:
    w, tz = Window("calendar", period=period, text=period), ZoneInfo(zone)
    _PERIODS.clear()
    # instants close together (the memo's use) and far apart, around midnights and clock changes
    instants = [t for base in times for t in (base, base + jitter, base + 1, base + 86_400)]
    for now in instants:
        label, _, reset = w._period(now, tz)
        assert w.period_of(now, tz) == (label, reset)


def test_the_price_tables_date_is_remembered_until_the_next_local_midnight_and_no_longer() -> None:
    import datetime as dt
    import time

    from spendgate.pricing import table

    table._DAY[:] = [(dt.date(2001, 1, 1), time.time() + 3600)]  # "midnight" still an hour away
    assert table._today() == dt.date(2001, 1, 1)
    table._DAY[:] = [(dt.date(2001, 1, 1), time.time() - 0.001)]  # midnight just passed
    assert table._today() == dt.date.today()
    day, nxt = table._DAY[0]
    assert day == dt.date.today() and nxt == dt.datetime.combine(day + dt.timedelta(days=1), dt.time()).timestamp()
