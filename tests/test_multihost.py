"""`vlmr1 train` as two processes of 4 CPU devices each on one (data=2, fsdp=4) mesh of 8 global devices
(docs/facts.md: Multi-host on CPU): both finish, agree on every metric, write one shared checkpoint and one
copy of the logs."""

from __future__ import annotations

import math

import portpicker
import pytest

from tests.helpers.runs import (
    TINY_RUN,
    jsonl,
    log_tail,
    make_run_inputs,
    reproducible,
    start_training,
    summary,
    wait_all,
    worker_env,
)
from vlmr1_jax.train.checkpoint import committed_steps

STEPS = 2


@pytest.mark.slow
def test_two_processes_train_on_one_global_mesh(tmp_path):
    out = tmp_path / "run"
    # 4 local devices, but the mesh needs 8: make_mesh raises unless it spans both processes.
    overrides = [
        *make_run_inputs(tmp_path),
        *TINY_RUN,
        "train.distributed=true",
        "mesh.data=2",
        "mesh.fsdp=4",
        "mesh.tensor=1",
        f"train.max_steps={STEPS}",
        f"train.save_every={STEPS}",
        f"train.output_dir={out}",
    ]
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    logs = [tmp_path / f"process{i}" for i in range(2)]
    procs = [
        start_training(overrides, logs[i], worker_env(4, COORDINATOR=coordinator, NUM_PROCESSES="2", PROCESS_ID=str(i)))
        for i in range(2)
    ]
    wait_all(procs, timeout=400)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log_tail(log)

    # Every metric is a global value: both processes print the same summary, and it is process 0's last record.
    printed = [reproducible(summary(log)) for log in logs]
    assert printed[0] == printed[1]
    records = jsonl(out / "metrics.jsonl")  # written by process 0 only
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    last = reproducible(records[-1])
    assert printed[1] == {k: f"{v:.4g}" for k, v in last.items() if k != "step"}
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records), records
    assert last["completion_length"] > 0

    # One checkpoint, with array shards and a data-iterator position from each process.
    assert committed_steps(out / "checkpoints") == [STEPS]
    step_dir = out / "checkpoints" / str(STEPS)
    assert sorted(p.name for p in (step_dir / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    assert sorted(p.name for p in (step_dir / "data").glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    # Rollouts are global too: one copy of each step's 2 prompts x 4 completions, not one per process.
    rollouts = jsonl(out / "rollouts.jsonl")
    assert sorted((r["step"], r["prompt_index"]) for r in rollouts) == [
        (s, p) for s in range(1, STEPS + 1) for p in range(2) for _ in range(4)
    ]
