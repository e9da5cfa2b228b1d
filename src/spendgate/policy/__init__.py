"""Budget rules: the data model, the strict TOML parser and the defaults."""

from spendgate.policy.defaults import default_policy
from spendgate.policy.model import (
    AlertSettings,
    ApprovalLimits,
    AuditSettings,
    Match,
    Policy,
    Rule,
    Tiers,
    Window,
    policy_hash,
)
from spendgate.policy.parse import load, parse

__all__ = ["AlertSettings", "ApprovalLimits", "AuditSettings", "Match", "Policy", "Rule", "Tiers", "Window",
           "default_policy", "load", "parse", "policy_hash"]
