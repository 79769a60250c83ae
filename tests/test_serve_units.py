"""firmware_scripts' systemd units: well-formed, loopback by default, commands that exist."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge.cli import cli

UNITS = Path(__file__).resolve().parent.parent / "firmware_scripts"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((UNITS / name).read_text())
    return cp


@pytest.mark.parametrize(("name", "command"), [("edge-worker.service", "worker"),
                                               ("edge-serve.service", "serve")])
def test_unit_runs_a_real_edge_command_on_loopback(name: str, command: str) -> None:
    u = unit(name)
    assert {"Unit", "Service", "Install"} <= set(u.sections())
    argv = shlex.split(u["Service"]["ExecStart"])
    assert argv[0].endswith("/bin/edge") and argv[1] == command
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    # every option in ExecStart is one the command accepts
    help_text = CliRunner().invoke(cli, [command, "--help"]).output
    for opt in (a for a in argv[2:] if a.startswith("--")):
        assert opt in help_text, f"{name}: edge {command} has no {opt}"
    assert u["Service"]["Restart"] == "on-failure"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_finds_only_the_missing_venv(tmp_path: Path) -> None:
    for name in ("edge-worker.service", "edge-serve.service"):
        shutil.copy(UNITS / name, tmp_path / name)
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=60)
        problems = [line for line in r.stderr.splitlines()
                    if line.strip() and "/home/pi/edge-venv/bin/edge" not in line]
        assert problems == [], problems
