"""The demo, end to end, in a short configuration."""

import json
import subprocess
import sys

from jaxcomp.cli import main, run_demo


def test_run_demo_returns_the_figures():
    lines = []
    figures = run_demo(epochs=2, log=lines.append)
    assert 0.5 < figures["accuracy"] <= 1.0
    assert figures["params_bytes"] == figures["dense_bytes"] == 4 * figures["params"]
    assert any(line.startswith("epoch   1/2") for line in lines)
    assert any("total" in line for line in lines)


def test_bad_arguments_exit_with_status_2(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_python_dash_m_demo_ends_with_a_json_line():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxcomp", "demo", "--epochs", "3", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert {"accuracy", "params_bytes", "params"} <= set(figures)
    assert any(line.startswith("path") for line in lines)  # the report table
