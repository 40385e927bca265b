"""Pod preemption (SIGTERM) and Ctrl-C (SIGINT) during `vlmr1 train`: the current step finishes, a checkpoint of
that step is written, and the run exits 0 / 130 with a line saying how to resume - nothing since the last
`save_every` checkpoint is lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs, worker_env
from vlmr1_jax.train.checkpoint import committed_steps


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_exits(tmp_path, sig, code):
    inputs = make_run_inputs(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlmr1_jax.cli",
            "train",
            "demo_tiny",
            *inputs,
            *TINY_RUN,
            "train.max_steps=500",
            "train.save_every=1000",
            f"train.output_dir={run}",
            "--no-progress",
        ],
        env=worker_env(1),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert f"stopped by {sig.name}" in err and "Traceback" not in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert committed_steps(run / "checkpoints") == [steps[-1]] and steps[-1] < 500  # saved exactly where it stopped
