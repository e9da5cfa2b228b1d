"""The decision feed behind ``spendgate tail``: the store's event log, read as it grows.

Any process on the store can follow it (SQLite file or Redis), so ``tail`` runs in another shell,
or on another host, while ``serve`` decides. What the log holds is what the feed shows: refusals
(``block``, ``hold``, ``deny``), shadow rules' ``would_refuse``, approvals, released holds, and
every charge (``capture``, ``unknown``, ``expired``) — an allowed request appears once, when its
charge is recorded, with the model it was sent to (after any downgrade).

A poll asks for events from the newest timestamp seen minus :data:`LOOKBACK_S`: an event is
stamped when its decision started and written a moment later, so one stamped a little earlier can
land after a later one. Events already shown are skipped by (ts, decision id, kind, rule, bucket).
One written more than :data:`LOOKBACK_S` after its timestamp (a charge kept in the local spool
while the store was down) is not shown; ``spendgate report`` counts it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from spendgate.errors import ConfigError
from spendgate.ledger import Event, Ledger

#: how far before the newest event seen each poll looks again (seconds)
LOOKBACK_S = 5.0
#: what ``--filter`` may name: the event's own fields, then identity dimensions
FILTER_KEYS = ("rule", "kind", "model", "provider", "user", "key", "team", "session", "agent", "feature", "route")
#: ``kind=refused`` names every refusal at once
KIND_GROUPS = {"refused": ("block", "hold", "deny"), "charged": ("capture", "unknown", "expired")}
EventKey = tuple[float, str, str, str, str]


@dataclass(frozen=True, slots=True)
class Filter:
    """What ``--filter`` keeps: for each key named, an event whose value matches any of its
    patterns (shell globs: ``model=gpt-4o*``); keys not named match anything."""

    wants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def matches(self, e: Event) -> bool:
        for name, patterns in self.wants.items():
            if name == "rule":
                values = tuple(e.rule.split(",")) if e.rule else ("",)
            elif name == "kind":
                values = (e.kind,)
            elif name in ("model", "provider"):
                values = (getattr(e, name),)
            else:
                values = (e.dims.get(name, ""),)
            if not any(fnmatch.fnmatchcase(v, p) for v in values for p in patterns):
                return False
        return True


def parse_filter(text: str | None) -> Filter:
    """``rule=team-day,user=alice`` → a :class:`Filter`; a key given twice matches either value."""
    wants: dict[str, list[str]] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not value.strip():
            raise ConfigError(f"--filter {part!r}: expected key=value, such as rule=team-day or user=alice")
        if name not in FILTER_KEYS:
            raise ConfigError(f"--filter {part!r}: unknown key {name!r}; keys: {', '.join(FILTER_KEYS)}")
        value = value.strip()
        wants.setdefault(name, []).extend(KIND_GROUPS.get(value, (value,)) if name == "kind" else (value,))
    return Filter({k: tuple(v) for k, v in wants.items()})


def event_key(e: Event) -> EventKey:
    return (e.ts, e.decision_id, e.kind, e.rule, e.bucket)


class Cursor:
    """Where a reader of the log is: every event from ``since`` on, each returned once."""

    def __init__(self, since: float, lookback_s: float = LOOKBACK_S) -> None:
        self.floor = since
        self.newest = since
        self.lookback_s = lookback_s
        self._seen: dict[EventKey, float] = {}

    def poll(self, store: Ledger) -> list[Event]:
        """The events written since the last poll (in the store's order)."""
        start = max(self.floor, self.newest - self.lookback_s)
        fresh: list[Event] = []
        for e in store.events(start):
            key = event_key(e)
            if key in self._seen:
                continue
            self._seen[key] = e.ts
            fresh.append(e)
            self.newest = max(self.newest, e.ts)
        horizon = self.newest - self.lookback_s
        if len(self._seen) > len(fresh):  # forget what no later poll can return again
            self._seen = {k: ts for k, ts in self._seen.items() if ts >= horizon}
        return fresh
