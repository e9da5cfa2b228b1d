"""Charts drawn by pygal as SVG on the server: the replay's cumulative spend, and the dashboard's.

One style and one way to render for both, so a chart looks the same in a replay file and at
``/ui``. pygal writes a small configuration ``<script>`` and comments with its home page into
every SVG even when told to load no JavaScript; both are stripped, so a chart makes no request
and runs nothing, offline or under a strict Content-Security-Policy.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pygal  # type: ignore[import-untyped]
from pygal.style import Style  # type: ignore[import-untyped]

from spendgate.money import fmt_usd
from spendgate.replay import ReplayResult

#: colours that stay apart for the common colour-vision deficiencies (Okabe–Ito)
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")


def style(colours: tuple[str, ...] = COLOURS) -> Any:
    """The look every spendgate chart shares, with its own series colours if given."""
    return Style(background="#ffffff", plot_background="#ffffff", foreground="#333333",
                 foreground_strong="#111111", foreground_subtle="#dddddd", colors=colours,
                 font_family="system-ui, sans-serif", label_font_size=12, major_label_font_size=12,
                 legend_font_size=13, title_font_size=15, value_label_font_size=12, stroke_width="3",
                 tooltip_font_size=12, opacity=".85", opacity_hover=".95")


#: most points a line is drawn with; a longer trace is thinned evenly (its last point is kept)
MAX_POINTS = 1500

_SCRIPT = re.compile(r"<script\b.*?</script>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)


def config(**over: Any) -> dict[str, Any]:
    """pygal options every spendgate chart shares: no JavaScript, no XML declaration (the SVG is
    inlined in HTML), sized by its viewBox so CSS scales it to the page, legend below the plot."""
    base: dict[str, Any] = {"style": style(), "js": [], "disable_xml_declaration": True, "explicit_size": False,
                            "legend_at_bottom": True, "legend_at_bottom_columns": 2, "width": 900, "height": 420,
                            "show_y_guides": True, "show_x_guides": False, "truncate_legend": -1,
                            "margin_bottom": 10}
    base.update(over)
    return base


def svg(chart: Any) -> str:
    """The chart's SVG markup, with pygal's configuration script and comments removed. pygal
    reserves room below the plot for one row of legend only; more rows would fall outside the
    picture, so room is added for each further row."""
    columns = chart.config.legend_at_bottom_columns or 1
    rows = -(-len(chart.raw_series) // columns)
    chart.config.margin_bottom = (chart.config.margin_bottom or 0) + 24 * max(0, rows - 1)
    out: str = chart.render(is_unicode=True)
    return _COMMENT.sub("", _SCRIPT.sub("", out))


def usd_axis(nanos: float) -> str:
    """A gridline or value label in dollars (the value is in nano-dollars): cents from a cent up,
    so an axis reads $0.20, $0.40 …; smaller amounts in full."""
    n = round(nanos)
    return f"${n / 1e9:,.2f}" if n == 0 or abs(n) >= 10_000_000 else fmt_usd(n)


def _thin(points: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    if len(points) <= MAX_POINTS:
        return points
    step = len(points) / MAX_POINTS
    kept = [points[int(i * step)] for i in range(MAX_POINTS)]
    return [*kept, points[-1]] if kept[-1] is not points[-1] else kept


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC).replace(tzinfo=None)


def replay_svg(result: ReplayResult) -> str:
    """Cumulative spend over time without the guard and with it, the level the guard held spend
    at labelled, and each rule firing marked at the time it fired (one series per rule and action,
    named in the legend; the first firing of each also labelled on the plot)."""
    s = _thin(result.series)
    span = s[-1][0] - s[0][0]
    fmt = "%H:%M:%S" if span < 600 else "%H:%M" if span < 2 * 86400 else "%m-%d %H:%M"
    chart = pygal.DateTimeLine(**config(
        x_value_formatter=lambda t: t.strftime(fmt), value_formatter=usd_axis, x_label_rotation=20,
        x_title="time (UTC)", y_title="cumulative spend", print_labels=True, dots_size=2, show_dots=False,
        range=(0, max(s[-1][1], 1) * 1.05), min_scale=5, max_scale=8))
    chart.add(f"without the guard: {fmt_usd(result.total_nanos)}", [(_when(t), a) for t, a, _ in s],
              stroke_style={"width": 2.5})
    chart.add(f"with the guard: {fmt_usd(result.forwarded_nanos)}", [(_when(t), f) for t, _, f in s],
              stroke_style={"width": 3.5})
    # the flat level the guard kept spend at, labelled two thirds along (an end label is clipped)
    mid = s[len(s) * 2 // 3]
    chart.add(f"guarded level: {fmt_usd(result.forwarded_nanos)}",
              [{"value": (_when(mid[0]), mid[2]), "label": f"guarded at {fmt_usd(result.forwarded_nanos)}"}],
              stroke=False, show_dots=True, dots_size=5)
    fired: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for f in result.firings:
        # the with-guard total when the rule fired: where the refusal kept the line flat
        level = next((fw for t, _, fw in reversed(result.series) if t <= f.ts), 0)
        name = f"{f.rule} ({f.action})"
        marks = fired.setdefault(name, [])
        marks.append({"value": (_when(f.ts), level), "label": f.rule if not marks else ""})
    for name, marks in fired.items():
        chart.add(f"{name}: fired {len(marks)}×", marks, stroke=False, show_dots=True, dots_size=5)
    return svg(chart)


def render(result: ReplayResult, title: str = "spendgate replay") -> str:
    """A self-contained HTML page: a summary line and the chart, no script and no external asset."""
    s = result.series
    if not s:
        return f"<!doctype html><title>{html.escape(title)}</title><p>empty trace</p>"
    start = dt.datetime.fromtimestamp(s[0][0], dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:14px system-ui,sans-serif;margin:1.5em;max-width:960px}}svg{{width:100%;height:auto}}</style>
<h1>{html.escape(title)}</h1>
<p>{result.requests} requests from {start}: {fmt_usd(result.total_nanos)} without the guard,
{fmt_usd(result.forwarded_nanos)} forwarded with it ({result.reduction:.1%} less);
{len(result.firings)} rule firings.</p>
{replay_svg(result)}
"""


def write_chart(result: ReplayResult, path: Path) -> None:
    path.write_text(render(result))
