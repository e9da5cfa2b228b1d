"""``spendgate alerts``: the alert outbox — pending, sent and failed alerts with their attempts."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate alerts``."""
    sub.add_parser("alerts", parents=[common], help="alerts: pending, sent, failed, with their attempts")
