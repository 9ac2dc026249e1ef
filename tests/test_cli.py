"""The demo, end to end, in a short configuration."""

import json
import subprocess
import sys

import pytest

from jaxcomp.cli import _prune_schedule, main, run_demo


def test_demo_trains_prunes_quantizes_and_ends_with_a_json_line_of_real_figures():
    """`python -m jaxcomp demo` runs its three stages; the stored size is the int8 size."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxcomp", "demo", "--epochs", "2", "--prune-epochs", "2",
         "--sparsity", "0.5", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert 0.5 < figures["accuracy"] <= 1.0
    assert 0.5 < figures["accuracy_dense"] <= 1.0
    assert figures["dense_bytes"] == 4 * figures["params"]
    # int8 kernels plus float32 scales and biases: between 3x and 4x smaller than float32.
    assert 3.0 < figures["compression_ratio"] < 4.0
    assert figures["params_bytes"] * figures["compression_ratio"] == pytest.approx(
        figures["dense_bytes"])
    assert 0.45 < figures["sparsity"] < 0.5  # kernels at 50%, biases dense
    assert abs(figures["kernel_sparsity"] - 0.5) < 1e-3
    assert any(line.startswith("epoch   1/2") for line in lines)
    assert any(line.startswith("  prune epoch   2/2") for line in lines)
    assert any(line.startswith("path") for line in lines)  # the report table
    assert any("QArray" in line for line in lines)


@pytest.mark.parametrize("prune_steps", [1, 2, 3, 7, 12])
def test_the_demo_schedule_reaches_its_target_by_the_last_step(prune_steps):
    """One pruning step prunes at once (regression: a one-step run printed 99% and pruned
    nothing, its target due at a step that never ran)."""
    schedule = _prune_schedule(0.9, prune_steps, steps_per_epoch=1)
    assert float(schedule(prune_steps - 1)) == pytest.approx(0.9)


def test_run_demo_rejects_bad_settings():
    with pytest.raises(ValueError, match="sparsity"):
        run_demo(sparsity=1.0, log=None)
    with pytest.raises(ValueError, match="bits"):
        run_demo(bits=1, log=None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--batch-size", "100000"], "batch size must be in 1..1438"),
        (["--seed", "-1"], "seed must be in [0, 2**32)"),
        (["--seed", str(2**64)], "seed must be in [0, 2**32)"),
        (["--learning-rate", "nan"], "learning rate must be a finite number > 0"),
        (["--prune-epochs", "0"], "sparsity 0.75 needs prune epochs >= 1"),
    ],
)
def test_bad_arguments_exit_with_status_2(capsys, argv, message):
    assert main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err
