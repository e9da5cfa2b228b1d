"""A plain install works: `pip install spendgate` with no extras gives a working `spendgate` command.

The user who wants only the proxy installs no provider SDK; every command must run without
`openai`, `anthropic` and `httpx2`, and `spendgate.wrap` must say which extra it needs. The package
is installed from a copy of the source into a fresh venv (pip may use its cache) and driven as a
user would: the installed `spendgate` script, in a subprocess, asserting on what it prints.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDK_MODULES = ("openai", "anthropic", "httpx2")


@dataclass(frozen=True)
class Install:
    bin: Path
    home: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "SPENDGATE_HOME": str(self.home / ".spendgate"),
                "PYTHONPATH": "", "VIRTUAL_ENV": str(self.bin.parent)}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "spendgate"), *args], env=self.env(), cwd=self.home,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "python"), "-c", code], env=self.env(), cwd=self.home,
                              capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    """A fresh venv with the package installed from a clean copy of the source, no extras (a copy, so
    the build leaves nothing in the checkout)."""
    base = tmp_path_factory.mktemp("plain-install")
    src = base / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src" / "spendgate", src / "src" / "spendgate",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert pip.returncode == 0, pip.stderr
    home = base / "home"
    home.mkdir()
    yield Install(venv / "bin", home)


def test_no_provider_sdk_is_installed(plain: Install) -> None:
    found = plain.python("import importlib.util, json; "
                         f"print(json.dumps([m for m in {SDK_MODULES!r} if importlib.util.find_spec(m)]))")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == []


def test_version_and_config_check(plain: Install) -> None:
    version = plain.run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"spendgate {importlib.metadata.version('spendgate')}"
    policy = plain.home / "policy.toml"
    policy.write_text('[[budget]]\nname = "team-day"\nusd = 5\nwindow = "day"\nper = "team"\n')
    check = plain.run("config", "check", str(policy))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith(f"{policy}: OK, 5 budget(s)\n")
    assert "team-day" in check.stdout and "$5" in check.stdout


def test_import_spendgate_loads_no_sdk_and_wrap_names_the_extra(plain: Install) -> None:
    probe = plain.python(
        "import sys, spendgate\n"
        f"assert not [m for m in {SDK_MODULES!r} if m in sys.modules]\n"
        "try:\n"
        "    spendgate.wrap(object())\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == (
        "spendgate.wrap needs the provider SDKs (openai, anthropic): pip install 'spendgate[clients]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_health_then_terminates(plain: Install) -> None:
    port = _free_port()
    proc = subprocess.Popen([str(plain.bin / "spendgate"), "serve", "--port", str(port)], env=plain.env(),
                            cwd=plain.home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        assert "guarding" in banner, banner + proc.stderr.read()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:  # another process's bind cannot be awaited: poll until it answers
            try:
                with opener.open(f"http://127.0.0.1:{port}/spendgate/health", timeout=5) as r:
                    status, body = r.status, json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "spendgate serve never answered /spendgate/health"
                time.sleep(0.05)
        assert status == 200 and isinstance(body, dict)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert proc.returncode in (0, -15)


def test_demo_runs_and_holds_the_agent(plain: Install) -> None:
    demo = plain.run("demo", timeout=120)
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    assert "spendgate answered turn 86 with HTTP 402" in out
    assert "requests sent to the provider  85\n" in out
    assert "refused answers                4 (one hold: 1 decision id)\n" in out
    assert "To approve it" not in out and "admin API" not in out, "no approve hint the demo cannot honour"


def test_demo_json_is_one_document_with_the_summary() -> None:
    """``spendgate demo --json`` calls ``run(json=True)``: stdout is one JSON document, nothing else."""
    import io

    from spendgate.demo.run import IN_MEMORY_NOTE, run

    out = io.StringIO()
    result = run(out, json=True)
    doc = json.loads(out.getvalue())
    assert doc == result.as_dict()
    assert list(doc) == ["model", "session", "budget", "budget_usd", "planned_turns", "requests_sent", "spent_usd",
                         "refused", "decision_ids", "held_at_turn", "held_message", "would_have_cost_usd"]
    assert (doc["requests_sent"], doc["refused"], doc["held_at_turn"], len(doc["decision_ids"])) == (85, 4, 86, 1)
    assert doc["spent_usd"] == "9.87270125" and doc["would_have_cost_usd"] == "85.96784625"
    assert doc["held_message"].startswith('spendgate: this gpt-5 request is held for approval by budget "session-hour"')
    assert "approve" not in doc["held_message"], "no approve hint the demo cannot honour"
    assert IN_MEMORY_NOTE not in out.getvalue()
