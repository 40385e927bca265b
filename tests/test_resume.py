"""Kill `vlmr1 train` between checkpoints and start it again: it continues from the last checkpoint and, on CPU,
ends bit-identical to an uninterrupted run with the same seed (every TrainState array, the data iterator
position, every logged metric and every sampled completion)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.runs import (
    TINY_RUN,
    jsonl,
    log_tail,
    make_run_inputs,
    read_state,
    reproducible,
    start_training,
    wait_all,
    worker_env,
)
from vlmr1_jax.train.checkpoint import committed_steps

STEPS, SAVE_EVERY = 6, 2


def by_step(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for record in records:
        out.setdefault(record["step"], []).append(record)
    return out


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tmp_path):
    inputs = make_run_inputs(tmp_path)
    env = worker_env(2)  # a 2-device fsdp mesh: checkpoints hold sharded arrays

    def overrides(run: Path) -> list[str]:
        return [
            *inputs,
            *TINY_RUN,
            f"train.max_steps={STEPS}",
            f"train.save_every={SAVE_EVERY}",
            f"train.keep_checkpoints={STEPS}",
            f"train.output_dir={run}",
        ]

    # Run B, first life: SIGKILL as soon as the first checkpoint is complete (it fills the compile cache).
    a, b = tmp_path / "a", tmp_path / "b"
    first = start_training(overrides(b), tmp_path / "b_first", env)
    try:
        deadline = time.monotonic() + 400
        while not committed_steps(b / "checkpoints"):
            assert first.poll() is None, log_tail(tmp_path / "b_first")
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        wait_all([first], timeout=30)
    assert first.returncode == -signal.SIGKILL
    saved = committed_steps(b / "checkpoints")
    assert saved and max(saved) < STEPS, f"run B was not interrupted (checkpoints {saved})"
    resumed_at = max(saved)

    # Run A uninterrupted and run B's second life, side by side.
    procs = [
        start_training(overrides(a), tmp_path / "a", env),
        start_training(overrides(b), tmp_path / "b_second", env),
    ]
    wait_all(procs, timeout=400)
    for proc, log in zip(procs, ("a", "b_second")):
        assert proc.returncode == 0, log_tail(tmp_path / log)
    assert f"resumed from step {resumed_at} " in (tmp_path / "b_second.err").read_text()
    # The second life drops what the first logged after its checkpoint and logs those steps again: each once.
    assert [r["step"] for r in jsonl(b / "metrics.jsonl")] == list(range(1, STEPS + 1))

    # Final TrainState (params, optimizer moments and counts, step, reference policy): bit for bit.
    state_a, state_b = (read_state(run / "checkpoints" / str(STEPS) / "state") for run in (a, b))
    assert state_a.keys() == state_b.keys() and any("trainable" in k for k in state_a)
    for name, x in state_a.items():
        y = state_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (
            f"{name} differs after resuming: max |a-b| = {np.max(np.abs(x.astype(np.float64) - y)):.3g}"
        )
    assert int(state_a["['step']"]) == STEPS
    iterator = [(run / "checkpoints" / str(STEPS) / "data" / "process_0-of-1.json").read_text() for run in (a, b)]
    assert iterator[0] == iterator[1]

    # Every step's metrics and completions, including steps the first life logged and the second redid.
    metrics_a, metrics_b = (by_step(jsonl(run / "metrics.jsonl")) for run in (a, b))
    assert sorted(metrics_a) == sorted(metrics_b) == list(range(1, STEPS + 1))
    for step, records in metrics_b.items():
        assert [reproducible(r) for r in records] == [reproducible(metrics_a[step][0])] * len(records), step
    rollouts_a, rollouts_b = (by_step(jsonl(run / "rollouts.jsonl")) for run in (a, b))
    assert sorted(rollouts_a) == sorted(rollouts_b) == list(range(1, STEPS + 1))
    for step, rows in rollouts_b.items():
        life = len(rollouts_a[step])
        for start in range(0, len(rows), life):
            assert rows[start : start + life] == rollouts_a[step], step
