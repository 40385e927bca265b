"""A non-finite loss or gradient skips the update (parameters and optimizer state untouched, counted in the
metrics), and a run stops after `train.max_nonfinite_steps` of them in a row with one error line."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs, worker_env
from vlmr1_jax.config import OptimConfig
from vlmr1_jax.rl.state import TrainState, make_optimizer
from vlmr1_jax.rl.step import _apply_gradients


def toy_state(optimizer) -> TrainState:
    trainable = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    return TrainState(jnp.zeros((), jnp.int32), trainable, {}, optimizer.init(trainable), None)


@pytest.mark.parametrize("loss, grad", [(jnp.nan, 1.0), (1.0, jnp.inf), (jnp.inf, 1.0), (1.0, jnp.nan)])
def test_nonfinite_step_leaves_parameters_and_optimizer_untouched(loss, grad):
    optimizer, schedule = make_optimizer(OptimConfig(learning_rate=0.1), 10)
    state = toy_state(optimizer)
    good, metrics = _apply_gradients(state, jnp.float32(1.0), {"w": jnp.ones(4), "b": jnp.ones(2)}, optimizer, schedule)
    assert float(metrics["nonfinite"]) == 0 and not np.allclose(good.trainable["w"], state.trainable["w"])
    bad, metrics = _apply_gradients(
        good, jnp.float32(loss), {"w": jnp.full(4, grad), "b": jnp.ones(2)}, optimizer, schedule
    )
    assert float(metrics["nonfinite"]) == 1
    assert int(bad.step) == int(good.step) + 1  # the step (and its data) is consumed
    for before, after in zip(
        jax.tree.leaves((good.trainable, good.opt_state)), jax.tree.leaves((bad.trainable, bad.opt_state))
    ):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_overflowing_update_is_skipped():
    """Finite loss and gradient, but an update that overflows float32 (learning rate 3e38 times Adam's unit-size
    first step plus weight decay's share): skipped like a NaN loss."""
    optimizer, schedule = make_optimizer(OptimConfig(learning_rate=3e38, schedule="constant"), 10)
    state = toy_state(optimizer)
    grads = {"w": jnp.ones(4), "b": jnp.ones(2)}
    after, metrics = _apply_gradients(state, jnp.float32(1.0), grads, optimizer, schedule)
    updates, _ = optimizer.update(grads, state.opt_state, state.trainable)
    assert not bool(jnp.isfinite(optax.global_norm(updates)))  # the premise: the raw update overflows
    assert float(metrics["nonfinite"]) == 1
    np.testing.assert_array_equal(after.trainable["w"], state.trainable["w"])


@pytest.mark.slow
def test_diverging_run_stops_with_one_error_line(tmp_path):
    """`optim.learning_rate=1e38`: the first update makes the weights huge, later losses are not finite; the run
    stops after 2 skipped steps in a row with exit code 2 and a one-line error, and no metrics line has a NaN
    parameter update behind it."""
    inputs = make_run_inputs(tmp_path)
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmr1_jax.cli",
            "train",
            "demo_tiny",
            *inputs,
            *TINY_RUN,
            "train.max_steps=12",
            "train.save_every=100",
            "optim.learning_rate=1e38",
            "train.max_nonfinite_steps=2",
            f"train.output_dir={run}",
            "--no-progress",
        ],
        env=worker_env(1),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2 steps in a row" in errors[0] and "optim.learning_rate" in errors[0], errors
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] < 12 and records[-1]["nonfinite"] == 1.0
