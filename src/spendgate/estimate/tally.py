"""Counting a request's input for a provider whose tokenizer is not published: o200k tokens scaled
by an upward factor, each run of a script o200k compresses far better than the provider does
floored (:mod:`spendgate.estimate.scripts`), tool schemas at their ``$ref``-inlined size when that is
larger (:mod:`spendgate.estimate.schemas`). Shared by the providers that estimate this way."""

from __future__ import annotations

import math
from typing import Any

from spendgate.estimate import schemas
from spendgate.estimate.scripts import Floors
from spendgate.estimate.shape import dumps, is_map
from spendgate.estimate.tokens import TokenCounter, counter


class Tally:
    """Input tokens of one request for a provider whose tokenizer is not published: o200k tokens
    to scale by the provider's upward factor, the script floors' excess over that (README:
    "Anthropic input estimates"), and fixed tokens (images, documents)."""

    __slots__ = ("excess", "factor", "fixed", "floors", "scaled", "tc")

    def __init__(self, tc: TokenCounter, floors: Floors, factor: float) -> None:
        self.tc, self.floors, self.factor = tc, floors, factor
        self.scaled = self.fixed = 0
        self.excess = 0.0

    def text(self, text: str) -> None:
        self.scaled += self.tc.count(text)
        if not text.isascii():
            self.excess += self.floors.excess(text, self.factor)

    def bound(self, text: str) -> float:
        """``text``'s tokens as this estimate counts them (scaled, floored), not yet added."""
        return self.factor * self.tc.count(text) + (0.0 if text.isascii() else self.floors.excess(text, self.factor))

    def tools(self, tools: Any) -> None:
        """The tool list: its JSON, or — when an ``input_schema`` uses ``$ref``s — each tool with
        its schema's references inlined, if that is longer (:func:`schemas.bound`)."""
        text = dumps(tools)
        if not schemas.is_composite(text):
            self.text(text)
            return
        inlined = 0.0
        for tool in tools if isinstance(tools, list) else [tools]:
            schema = tool.get("input_schema") if is_map(tool) else None
            if is_map(schema):
                rest = {k: v for k, v in tool.items() if k != "input_schema"}
                inlined += self.bound(dumps(rest)) + schemas.bound(schema, self.bound)
            else:
                inlined += self.bound(dumps(tool))
        self.excess += max(self.bound(text), inlined)

    def total(self) -> int:
        return math.ceil(self.scaled * self.factor + self.excess) + self.fixed


_floors: dict[int, Floors] = {}


def floors(tc: TokenCounter) -> Floors:
    """The process-wide script floors over ``tc`` (shared so their cache is shared)."""
    got = _floors.get(id(tc))
    if got is None:
        got = _floors.setdefault(id(tc), Floors(tc.count_uncached))
    return got


def tally(factor: float) -> Tally:
    """A fresh count of one request's input, scaled by ``factor``, over the shared o200k counter."""
    tc = counter("o200k_base")
    return Tally(tc, floors(tc), factor)
