"""The overview's charts: pygal SVG rendered on the server, in the replay chart's style."""

from __future__ import annotations

import math

import pygal  # type: ignore[import-untyped]

from spendgate.chart import config, style, svg, usd_axis
from spendgate.proxy.ui.data import Overview

#: the refused series is drawn in the palette's vermilion, forwarded in its green
FORWARDED, REFUSED = "#009E73", "#D55E00"


#: the width a chart is drawn at for a phone (the wide one is 900); the page's CSS shows one or the other
NARROW_WIDTH = 420


def _size(narrow: bool) -> dict[str, object]:
    return {"width": NARROW_WIDTH, "legend_at_bottom_columns": 2} if narrow else {}


def _labels(o: Overview, narrow: bool = False) -> dict[str, object]:
    # at most ~12 labels under the axis (~5 on a phone), so a 7-day hourly chart stays legible
    every = max(1, len(o.labels) // (5 if narrow else 12))
    # pygal reserves too little room under labels turned 30°: the legend below them would be cut off
    return {"x_labels": o.labels, "x_labels_major_every": every, "show_minor_x_labels": False,
            "x_label_rotation": 30, "truncate_label": -1, "margin_bottom": 34}


def spend_svg(o: Overview, stack: str, narrow: bool = False) -> str:
    """Spend per time bucket, stacked by model or provider, with dollar gridlines."""
    chart = pygal.StackedBar(**config(height=380, value_formatter=usd_axis, y_title="spend", print_values=False,
                                      **{"legend_at_bottom_columns": 3, **_labels(o, narrow), **_size(narrow)}))
    if not o.spend:
        chart.add(f"no spend by {stack} yet", [0] * len(o.labels))
    for name, values in o.spend.items():
        chart.add(name, values)
    return svg(chart)


def traffic_svg(o: Overview, narrow: bool = False) -> str:
    """Requests per time bucket: forwarded (sent and charged) against refused (blocked or held)."""
    top = max((f + r for f, r in zip(o.forwarded, o.refused, strict=True)), default=0)
    step = max(1, math.ceil(top / 6))
    chart = pygal.StackedBar(**config(height=300, style=style((FORWARDED, REFUSED)), y_title="requests",
                                      y_labels=list(range(0, top + step + 1, step)),
                                      **{"legend_at_bottom_columns": 2, **_labels(o, narrow), **_size(narrow)}))
    chart.add(f"forwarded: {o.requests}", o.forwarded)
    chart.add(f"refused: {o.refusals}", o.refused)
    return svg(chart)
