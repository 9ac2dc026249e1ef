"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Tests check results, not speed, and XLA's compiles dominate the suite on CPU: LLVM at -O0 halves
# them. Set before any test module touches a JAX backend; benchmarks and the demo keep the default.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def run_in_subprocess(code: str, *, devices: int = 8, timeout: int = 300) -> str:
    """Runs `code` in a fresh Python with `devices` simulated CPU devices; returns its stdout.

    XLA_FLAGS must be set before JAX starts, so multi-device checks run in their own process.
    The test fails with the child's stderr when the child fails.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {_FAST_COMPILE}"
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
