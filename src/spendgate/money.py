"""Exact money.

Prices are ``Decimal`` dollars per million tokens. The ledger stores integer **nano-dollars**
(1e-9 USD): integer micro-dollars cannot hold the price of ten ``gpt-4o-mini`` input tokens
(1.5 µ$), and binary floats cannot hold anything exactly. A nano-dollar integer fits Redis'
64-bit counters and Lua's 53-bit doubles up to about $9 million per bucket.

Rounding only ever goes *up* (a hold or charge is never smaller than the exact cost) and only at
the nano-dollar: nothing is rounded to cents.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

NANOS_PER_USD = 1_000_000_000
_NANO = Decimal(NANOS_PER_USD)
_MTOK = Decimal(1_000_000)


def usd_to_nanos(usd: Decimal | int | str) -> int:
    """Dollars to integer nano-dollars, rounding any sub-nano remainder up."""
    return int((Decimal(usd) * _NANO).to_integral_value(rounding=ROUND_CEILING))


def nanos_to_usd(nanos: int) -> Decimal:
    """Integer nano-dollars to exact dollars (no trailing zeros beyond what the value needs)."""
    d = Decimal(nanos) / _NANO
    return d.quantize(Decimal(1)) if d == d.to_integral_value() else d.normalize()


def token_cost_nanos(tokens: int, usd_per_mtok: Decimal) -> int:
    """Exact cost of ``tokens`` at a per-million-token rate, in nano-dollars (ceiling)."""
    return usd_to_nanos(Decimal(tokens) * usd_per_mtok / _MTOK)


def fmt_usd(nanos: int) -> str:
    """A human-readable dollar figure that never hides a non-zero amount as $0.00."""
    d = Decimal(nanos) / _NANO
    if nanos == 0:
        return "$0.00"
    if abs(d) >= 1:
        return f"${d:,.2f}"
    if abs(d) >= Decimal("0.0001"):
        return f"${d:.4f}"
    return f"${d.normalize():f}"
