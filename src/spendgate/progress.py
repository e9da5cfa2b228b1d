"""A budget's use drawn as text, ``[#######.............]``: shared by the CLI and the demo.

It lives outside ``spendgate.cli`` because nothing may import the CLI (the demo, the proxy and the
SDK are used without it); the CLI draws the same bar through ``rich`` on a terminal.
"""

from __future__ import annotations


def text_bar(fraction: float, width: int = 20) -> str:
    """``fraction`` of ``width`` cells filled; a ``!`` after the bar when the fraction is over 1 (overspent)."""
    f = max(0.0, min(fraction, 1.0))
    full = round(f * width)
    return "[" + "#" * full + "." * (width - full) + "]" + ("!" if fraction > 1 else "")
