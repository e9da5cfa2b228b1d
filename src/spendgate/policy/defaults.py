"""The policy in force when no file is given: the guard is on out of the box (SPEC §3)."""

from __future__ import annotations

from decimal import Decimal

from spendgate.policy.model import Policy, Rule, Window

DEFAULT_RULES = (
    # One request's worst case above $10 or 500K tokens waits for a person.
    Rule(name="request-soft", window=Window("request", text="request"), usd=Decimal(10),
         tokens=500_000, action="hold"),
    # A session spending more than $10 in any hour waits for a person; a request with no session
    # header is counted under a session derived from its credentials, never skipped.
    Rule(name="session-hour", window=Window("rolling", seconds=3600, text="1h"), usd=Decimal(10),
         per="session", action="hold"),
    # Sessions are chosen by clients; a key is not. A client rotating session ids escapes
    # session-hour, never key-day (64 sessions each under the session cap once spent $566 in 8 h).
    Rule(name="key-day", window=Window("rolling", seconds=86400, text="24h"), usd=Decimal(100),
         per="key", action="hold"),
    # Nothing passes one request above $50 or 1M tokens.
    Rule(name="request-hard", window=Window("request", text="request"), usd=Decimal(50),
         tokens=1_000_000, action="block", immutable=True),
)


def default_policy() -> Policy:
    return Policy(rules=DEFAULT_RULES)
