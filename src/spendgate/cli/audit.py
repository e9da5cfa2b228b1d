"""``spendgate audit export | verify | pubkey``: the signed decision log."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate audit …``."""
    audit = sub.add_parser("audit", help="the signed, hash-chained decision log")
    audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
