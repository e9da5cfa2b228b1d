"""A self-contained HTML chart of a replay: cumulative spend with and without the guard.

Inline SVG, no script and no external asset, so the file opens anywhere, offline.
"""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path

from spendgate.money import fmt_usd
from spendgate.replay import ReplayResult

W, H, PAD = 900, 420, 60


def _path(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(points))


def render(result: ReplayResult, title: str = "spendgate replay") -> str:
    s = result.series
    if not s:
        return f"<!doctype html><title>{html.escape(title)}</title><p>empty trace</p>"
    t0, t1 = s[0][0], max(s[-1][0], s[0][0] + 1)
    top = max(s[-1][1], 1)

    def xy(t: float, v: int) -> tuple[float, float]:
        return PAD + (t - t0) / (t1 - t0) * (W - 2 * PAD), H - PAD - v / top * (H - 2 * PAD)

    without = _path([xy(t, a) for t, a, _ in s])
    with_guard = _path([xy(t, f) for t, _, f in s])
    marks = "".join(
        f'<line x1="{xy(f.ts, 0)[0]:.1f}" y1="{PAD}" x2="{xy(f.ts, 0)[0]:.1f}" y2="{H - PAD}" '
        f'stroke="#c33" stroke-dasharray="3,3"><title>{html.escape(f.rule)}: {html.escape(f.action)}</title></line>'
        for f in result.firings[:50])
    start = dt.datetime.fromtimestamp(t0, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}</style>
<h1>{html.escape(title)}</h1>
<p>{result.requests} requests from {start}: {fmt_usd(result.total_nanos)} without the guard,
{fmt_usd(result.forwarded_nanos)} forwarded with it ({result.reduction:.1%} less).</p>
<svg width="{W}" height="{H}" role="img" aria-label="cumulative spend">
<rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/>
<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#999"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#999"/>
<text x="{PAD - 8}" y="{PAD}" text-anchor="end">{fmt_usd(top)}</text>
<text x="{PAD - 8}" y="{H - PAD}" text-anchor="end">$0</text>
{marks}
<path d="{without}" fill="none" stroke="#888" stroke-width="2"/>
<path d="{with_guard}" fill="none" stroke="#06c" stroke-width="3"/>
<text x="{W - PAD}" y="{PAD + 16}" text-anchor="end" fill="#888">without the guard</text>
<text x="{W - PAD}" y="{PAD + 34}" text-anchor="end" fill="#06c">with the guard</text>
</svg>
"""


def write_chart(result: ReplayResult, path: Path) -> None:
    path.write_text(render(result))
