"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run_in_subprocess(code: str, *, devices: int = 8, timeout: int = 300) -> str:
    """Runs `code` in a fresh Python with `devices` simulated CPU devices; returns its stdout.

    XLA_FLAGS must be set before JAX starts, so multi-device checks run in their own process.
    The test fails with the child's stderr when the child fails.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # The child imports test helpers (e.g. `leaves`) from this folder.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture
def subprocess_runner():
    return run_in_subprocess
