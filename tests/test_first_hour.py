"""The first hour of a new user, driven through the command line as they would type it:
what each command prints and the status it exits with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from spendgate.cli.main import main

CLI = [sys.executable, "-m", "spendgate.cli.main"]


def sg(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``spendgate ARGV…`` in a child process, as a shell would run it."""
    return subprocess.run([*CLI, *argv], input=stdin, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- item 7: missing basics -------------------------------------------------------------------

def test_version_names_the_installed_distribution() -> None:
    r = sg("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"spendgate {version('spendgate')}"


def test_estimate_reads_the_body_from_stdin() -> None:
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    r = sg("estimate", "-", "--json", stdin=json.dumps(body))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == "gpt-4o" and doc["output_tokens"] == 100 and doc["route"] == "/v1/chat/completions"
    bad = sg("estimate", "-", stdin="not json")
    assert bad.returncode != 0 and bad.stderr.startswith("spendgate: error: stdin: not JSON")
