"""The install script and the console script, as a new user gets them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_install_script_is_a_no_op_the_second_time():
    # The test run itself was started after an install, so this is at least the second run.
    result = subprocess.run(
        ["bash", "scripts/install.sh"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # nothing reinstalled, nothing said


def test_console_script_is_installed_and_documents_every_command():
    exe = Path(sys.executable).parent / "ftservice"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("validate", "schema", "models", "submit", "status", "logs", "stop", "list"):
        assert command in result.stdout
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == "ftservice 0.1.0"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [
        line.split("#")[0].strip() for line in readme[:25] if line.strip().startswith("make ")
    ]
    assert commands[:2] == ["make quickstart", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
