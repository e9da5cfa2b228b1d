"""The replay chart: pygal SVG with a time axis, dollar gridlines, the guarded level labelled, each
rule firing marked and named, the legend below the plot, and nothing that runs or loads."""

from __future__ import annotations

import re
from pathlib import Path

from spendgate.chart import render, replay_svg
from spendgate.policy import default_policy
from spendgate.pricing import PriceTable
from spendgate.replay import Firing, ReplayResult, read_trace, replay

TRACE = Path(__file__).parent.parent / "examples" / "runaway-agent.jsonl"
T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC


def _result() -> ReplayResult:
    """120 requests of $0.25, one every minute; a hold after 12 and a block later."""
    r = ReplayResult(requests=120)
    total = forwarded = 0
    for i in range(120):
        total += 250_000_000
        forwarded += 250_000_000 if i < 12 else 0
        r.series.append((T0 + i * 60, total, forwarded))
    r.total_nanos, r.forwarded_nanos = total, forwarded
    r.firings = [Firing(T0 + 12 * 60, "session-hour", "hold", "s1", "gpt-4o", "0.25", ""),
                 Firing(T0 + 50 * 60, "day-cap", "block", "s1", "gpt-4o", "0.25", ""),
                 Firing(T0 + 51 * 60, "day-cap", "block", "s1", "gpt-4o", "0.25", "")]
    return r


def _texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]+)</text>", svg)


def test_time_axis_dollar_gridlines_guarded_level_and_firings_named() -> None:
    svg = replay_svg(_result())
    texts = _texts(svg)
    assert "time (UTC)" in texts and "cumulative spend" in texts
    assert "14:30" in texts  # minutes on the time axis (a two-hour trace)
    assert [t for t in texts if t.startswith("$")][:8] == [f"${n}.00" for n in range(0, 32, 4)]  # dollar gridlines
    assert "guarded at $3.00" in texts  # the flat level the guard held, on the plot
    # each firing marked: one named series per rule and action, the first firing of each labelled
    assert "session-hour (hold): fired 1×" in texts and "day-cap (block): fired 2×" in texts
    assert texts.count("session-hour") == 1 and texts.count("day-cap") == 1
    assert "without the guard: $30.00" in texts and "with the guard: $3.00" in texts


def test_legend_is_below_the_plot_and_nothing_runs_or_loads() -> None:
    svg = replay_svg(_result())
    plot = re.search(r'translate\(([\d.]+), ([\d.]+)\)" class="plot"><rect x="0" y="0" width="[\d.]+" '
                     r'height="([\d.]+)"', svg)
    legend = re.search(r'translate\(([\d.]+), ([\d.]+)\)" class="legends"', svg)
    assert plot and legend
    assert float(legend[2]) > float(plot[2]) + float(plot[3])  # the legend starts below the plot's bottom
    # every legend row inside the picture (pygal leaves room for one row only; the rest is added)
    box = re.search(r'viewBox="0 0 [\d.]+ ([\d.]+)"', svg)
    assert box
    height = float(box[1])
    rows = -(-5 // 2)
    assert float(legend[2]) + rows * 20 < height
    assert "<script" not in svg and "<!--" not in svg
    assert set(re.findall(r"https?://[^\s\"<]+", svg)) == {"http://www.w3.org/2000/svg"}  # no CDN, no link


def test_the_runaway_trace_page(tmp_path: Path) -> None:
    prices = PriceTable.bundled()
    result = replay(list(read_trace(TRACE, prices)), default_policy(), prices)
    page = render(result)
    assert page.count("<svg") == 1 and "<script" not in page
    assert "session-hour (hold): fired 1×" in page
    assert "384 requests" in page
    assert render(ReplayResult()).endswith("<p>empty trace</p>")
