"""Budget rules: the data model, the strict TOML parser and the defaults."""

from spendgate.policy.defaults import default_policy
from spendgate.policy.model import ApprovalLimits, Match, Policy, Rule, Tiers, Window
from spendgate.policy.parse import load, parse

__all__ = ["ApprovalLimits", "Match", "Policy", "Rule", "Tiers", "Window", "default_policy", "load", "parse"]
