"""``spendgate init``: a commented policy file to start from, written from a preset.

A first policy is easier to edit than to write: each preset is a complete ``spendgate.toml`` with
every budget explained, kept as package data (``spendgate/policy/presets/*.toml``) so the file a
user gets is exactly the file the tests load and replay.
"""

from __future__ import annotations

import argparse
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

from spendgate.cli.output import emit_json
from spendgate.errors import ConfigError

#: the presets, in the order ``--help`` lists them; the first is the default
PRESETS = ("solo", "team", "strict-tiers")
DEFAULT_PATH = "./spendgate.toml"


def preset_text(name: str) -> str:
    """The preset's TOML as shipped in the package."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: expected one of {', '.join(PRESETS)}; got {name!r}")
    return (resources.files("spendgate.policy") / "presets" / f"{name}.toml").read_text(encoding="utf-8")


def write_preset(name: str, path: str, force: bool = False) -> None:
    """Write preset ``name`` to ``path``. Without ``force`` an existing file is never touched: the
    file is created exclusively, so a file appearing meanwhile is refused too, not overwritten."""
    text = preset_text(name)
    try:
        with Path(path).expanduser().open("w" if force else "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it") from None


def cmd_init(args: argparse.Namespace) -> int:
    write_preset(args.preset, args.path, args.force)
    if args.json:
        emit_json({"path": args.path, "preset": args.preset})
        return 0
    quoted = shlex.quote(args.path)
    print(f"wrote {args.path} (preset {args.preset})")
    print("next:")
    print(f"  spendgate config check {quoted}")
    print(f"  spendgate serve --config {quoted}")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``spendgate init``."""
    p = sub.add_parser("init", parents=[common], help="write a commented policy file from a preset")
    p.add_argument("--preset", choices=PRESETS, default=PRESETS[0],
                   help="solo: the built-in protections written out (default); team: per-user and per-team "
                        "budgets with a downgrade; strict-tiers: 50¢/10¢/2¢ per call by model tier")
    p.add_argument("--path", default=DEFAULT_PATH, help=f"where to write the policy (default {DEFAULT_PATH})")
    p.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    p.set_defaults(func=cmd_init)
