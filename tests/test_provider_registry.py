"""The layout the provider registry promises: the doors and the engine name no provider."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from spendgate import providers

SRC = Path(__file__).parent.parent / "src" / "spendgate"
#: the code that must ask the registry rather than name a provider (issue: providers as modules)
PROVIDER_FREE = ("engine.py", "proxy", "sdk", "replay.py", "cli", "usage.py", "wire")
NAMES = {"openai", "anthropic", "gemini", "google", "bedrock"}


def _files() -> list[Path]:
    out: list[Path] = []
    for part in PROVIDER_FREE:
        path = SRC / part
        out.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_provider_is_named_outside_providers(path: Path) -> None:
    """A string literal that is a provider's name (``"openai"``) in these modules is knowledge that
    belongs in ``providers/``: the next provider would have to be added there too."""
    tree = ast.parse(path.read_text(), str(path))
    named = [(node.lineno, node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in NAMES]
    assert named == [], f"{path.relative_to(SRC)} names providers at {named}"


def test_every_route_belongs_to_exactly_one_provider() -> None:
    seen: dict[str, str] = {}
    for p in providers.all_providers():
        for route in (*p.routes, *p.free_routes):
            assert route not in seen, f"{route} is {seen[route]}'s and {p.name}'s"
            seen[route] = p.name
    assert {"openai", "anthropic", "gemini"} <= {p.name for p in providers.all_providers()}
