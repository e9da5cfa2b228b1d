"""Deliver the store's alert outbox to webhooks: at least once, one sender at a time per alert.

The engine writes each alert into the ledger's outbox in the same transaction as its cause, so an
alert exists exactly when its cause does. This sender drains it: it *claims* due rows
(:meth:`~spendgate.ledger.Ledger.claim_alerts` — atomic across processes and instances, so two
proxies on one Redis never both deliver an alert at once), POSTs each to every webhook that has not
yet taken it, and records the outcome with :meth:`~spendgate.ledger.Ledger.update_alert`. A crash
between the POST and the update leaves the claim to lapse and the alert to be sent again — at least
once, never lost; the ``Idempotency-Key`` header (and the same value in the body) lets a receiver
drop that rare duplicate.

A destination is done after its first 2xx and never sent that alert again (the row's ``done`` list),
so one failing webhook does not spam the healthy ones. Failures retry with exponential backoff
(1 s, 2 s, 4 s … capped at 5 min, ±10 % jitter so many instances do not retry in lock-step) until
``max_age_s`` after the alert was created; then it is ``failed`` with its last error kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from spendgate.events.alerts import dest_id, idempotency_key, redact_url, text_of, webhook_body
from spendgate.ledger import Ledger, OutboxAlert

log = logging.getLogger("spendgate.alerts")

#: The longest wait between two tries of one alert.
MAX_BACKOFF_S = 300.0
#: Jitter: each wait is moved by up to this fraction either way.
JITTER = 0.1
#: The most characters of an error kept on a row (the store is not a log).
MAX_ERROR = 300


def backoff(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failed try: 1, 2, 4 … capped at
    :data:`MAX_BACKOFF_S`, then moved by up to ±:data:`JITTER` of itself."""
    base = min(MAX_BACKOFF_S, 2.0 ** max(0, min(attempts - 1, 30)))
    return base * (1 + (rng or random).uniform(-JITTER, JITTER))


@dataclass(slots=True)
class _Outcome:
    """What one pass did for one row at one destination."""

    ok: bool
    error: str = ""
    #: not tried (the pass ran out of its lease): neither a success nor a failed attempt
    skipped: bool = False


def _scrub(text: str, url: str) -> str:
    """An error message with the webhook URL (a secret) reduced to scheme://host."""
    safe = redact_url(url)
    for secret in {url, url.rstrip("/")}:
        text = text.replace(secret, safe)
    return " ".join(text.split())


def _exc_text(exc: BaseException, url: str) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    msg = _scrub(str(exc), url)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class AlertSender:
    """Drains the outbox of ``store`` to ``webhooks`` (Slack-compatible incoming-webhook URLs).

    ``store_url`` and ``admin_base`` go into a held request's notification (the approve command and
    the admin API URL). ``owner`` names this sender's claims (default: host, pid and a random
    suffix); ``lease_s`` is how long a claim keeps other senders off a row; ``timeout_s`` bounds one
    POST; ``batch`` is how many rows one pass claims.
    """

    def __init__(self, store: Ledger, webhooks: Sequence[str], *, store_url: str, admin_base: str | None,
                 owner: str | None = None, lease_s: float = 60, max_age_s: float = 86400, timeout_s: float = 10,
                 batch: int = 20, rng: random.Random | None = None) -> None:
        self.store = store
        self.webhooks = tuple(dict.fromkeys(webhooks))  # a URL listed twice is one destination
        self.store_url = store_url
        self.admin_base = admin_base
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.lease_s = lease_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.batch = batch
        self._rng = rng or random.Random()

    # -- one pass ---------------------------------------------------------------------------------

    async def deliver_due(self, now: float | None = None, session: aiohttp.ClientSession | None = None) -> int:
        """Claim up to ``batch`` due alerts, send each to every destination not yet done, record the
        outcomes; how many rows this pass handled. ``now`` (epoch seconds) is the time the claim,
        backoff and age are reckoned at (tests drive it; the default is the clock)."""
        now = time.time() if now is None else now
        # always off the event loop: a networked store is a round trip, and SQLite may wait on a lock
        rows = await asyncio.to_thread(self.store.claim_alerts, now, self.owner, self.lease_s, self.batch)
        if not rows:
            return 0
        if not self.webhooks:
            for row in rows:
                log.warning("alert (no webhook configured): %s",
                            text_of(row, store_url=self.store_url, admin_base=self.admin_base))
                await self._update(row, status="logged", attempts=row.attempts, next_at=now, done=row.done)
            return len(rows)
        own = session is None
        sess = session if session is not None else aiohttp.ClientSession()
        try:
            results = await asyncio.gather(*(self._to_destination(sess, url, rows) for url in self.webhooks))
        finally:
            if own:
                await sess.close()
        for row in rows:
            await self._finish(row, {url: res[row.key] for url, res in zip(self.webhooks, results, strict=True)
                                     if row.key in res}, now)
        return len(rows)

    async def _to_destination(self, session: aiohttp.ClientSession, url: str,
                              rows: Sequence[OutboxAlert]) -> dict[str, _Outcome]:
        """Send ``rows`` to one destination in order (oldest first, so a channel reads them in the
        order they happened). A destination that cannot be reached (refused, reset, timed out) is not
        tried again this pass — its remaining rows count a failed attempt and back off with it —
        while an HTTP error answer is about one body and does not hold back the rows after it. Rows
        not reached before the claim's lease runs short are left untried, for the next pass."""
        did = dest_id(url)
        deadline = time.monotonic() + max(0.0, self.lease_s - self.timeout_s - 1)
        out: dict[str, _Outcome] = {}
        unreachable = ""
        first = True
        for row in rows:
            if did in row.done:
                continue
            if unreachable:
                out[row.key] = _Outcome(False, f"{redact_url(url)}: not tried, unreachable ({unreachable})")
                continue
            if not first and time.monotonic() > deadline:
                out[row.key] = _Outcome(False, skipped=True)
                continue
            first = False
            body = json.dumps(webhook_body(row, store_url=self.store_url, admin_base=self.admin_base)).encode()
            headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key(row)}
            try:
                async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                    if 200 <= resp.status < 300:
                        out[row.key] = _Outcome(True)
                        continue
                    detail = _scrub(await resp.text(errors="replace"), url)[:80]  # scrubbed whole, then cut
                    out[row.key] = _Outcome(False, f"{redact_url(url)}: HTTP {resp.status}"
                                                   + (f" {detail}" if detail else ""))
            except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
                unreachable = _exc_text(exc, url)
                out[row.key] = _Outcome(False, f"{redact_url(url)}: {unreachable}")
            except aiohttp.ClientError as exc:
                out[row.key] = _Outcome(False, f"{redact_url(url)}: {_exc_text(exc, url)}")
        return out

    async def _finish(self, row: OutboxAlert, outcomes: dict[str, _Outcome], now: float) -> None:
        """Record one row's pass: sent once every destination is done; else a failed attempt (backoff,
        or ``failed`` past ``max_age_s``); a row only skipped goes back as it was, due now."""
        done = tuple(dict.fromkeys((*row.done, *(dest_id(u) for u, o in outcomes.items() if o.ok))))
        if all(dest_id(u) in done for u in self.webhooks):
            await self._update(row, status="sent", attempts=row.attempts + 1, next_at=now, done=done, sent_at=now)
            return
        errors = [o.error for o in outcomes.values() if not o.ok and not o.skipped]
        if not errors:  # nothing failed, something untried: release the claim without counting a try
            await self._update(row, status="pending", attempts=row.attempts, next_at=now, done=done,
                               error=row.error)
            return
        attempts = row.attempts + 1
        error = "; ".join(errors)[:MAX_ERROR]
        give_up_at = row.created + self.max_age_s
        if now >= give_up_at:
            log.warning("alert %s failed after %d attempts over %.0f s: %s", row.key, attempts, now - row.created,
                        error)
            await self._update(row, status="failed", attempts=attempts, next_at=now, done=done, error=error)
            return
        # the last try lands on the deadline itself, so an alert is never failed before its time is up
        next_at = min(now + backoff(attempts, self._rng), give_up_at)
        await self._update(row, status="pending", attempts=attempts, next_at=next_at, done=done, error=error)

    async def _update(self, row: OutboxAlert, *, status: str, attempts: int, next_at: float,
                      done: Sequence[str], error: str = "", sent_at: float | None = None) -> None:
        kept = await asyncio.to_thread(self.store.update_alert, row.key, self.owner, status=status, attempts=attempts,
                                       next_at=next_at, error=error, done=tuple(done), sent_at=sent_at)
        if not kept:
            # the claim lapsed and another sender may hold the row now: it will (re)deliver; the
            # receivers' idempotency key absorbs a duplicate
            log.warning("alert %s: claim lapsed before its outcome (%s) was recorded", row.key, status)

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self, poll_s: float = 1.0) -> None:
        """Deliver forever (until cancelled), with one HTTP session. A pass that fails (store down)
        is logged — once per distinct error a minute, not every poll — and the loop goes on; a full
        batch is followed at once by the next pass, so a backlog drains without waiting to poll."""
        last_error, last_logged = "", 0.0
        self._stopping = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            while not self._stopping.is_set():
                handled = 0
                try:
                    handled = await self.deliver_due(session=session)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the sender must outlive a bad pass
                    text = f"{type(exc).__name__}: {exc}"
                    if text != last_error or time.monotonic() - last_logged > 60:
                        log.warning("alert sender: delivery pass failed: %s", text, exc_info=True)
                        last_error, last_logged = text, time.monotonic()
                if handled < self.batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), poll_s)

    def stop(self) -> None:
        """Ask :meth:`run` to end after the pass in flight: a delivery a receiver already took is
        then recorded as sent, not left claimed to be sent again after a restart."""
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()
