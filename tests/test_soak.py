"""Soak: the tiny model trains 300 steps, checkpointing every 20, killed with SIGKILL every 50 and restarted with the
same command. Every step's metrics appear exactly once, host memory stays flat within each process, and nothing
compiles again once the steps and the first checkpoint have run."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs
from vlmr1_jax.train.checkpoint import committed_steps

STEPS, SAVE_EVERY, KILL_EVERY = 300, 20, 50


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def logged_steps(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            records.append(json.loads(line))
    return records


@pytest.mark.slow
def test_300_steps_with_a_sigkill_every_50(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "vlmr1_jax.cli",
        "train",
        "demo_tiny",
        *make_run_inputs(tmp_path),
        *TINY_RUN,
        f"train.max_steps={STEPS}",
        f"train.save_every={SAVE_EVERY}",
        "train.keep_checkpoints=2",
        f"train.output_dir={run}",
    ]
    metrics = run / "metrics.jsonl"
    processes = []  # per process: the records it logged {step: record}, memory {step: MiB}, killed
    next_kill = KILL_EVERY
    while len(processes) < 12:
        resume = max(committed_steps(run / "checkpoints"), default=0)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        own: dict[int, dict] = {}
        memory: dict[int, float] = {}
        truncated, killed = False, False
        while process.poll() is None:
            records = logged_steps(metrics)
            # The new process first drops the records past its checkpoint; what it logs after that is its own.
            truncated = truncated or all(r["step"] <= resume for r in records)
            if truncated:
                own.update({r["step"]: r for r in records if r["step"] > resume})
            rss = rss_mib(process.pid)
            if own and rss is not None:
                memory[max(own)] = rss
            if own and max(own) >= next_kill and next_kill < STEPS:
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed, next_kill = True, next_kill + KILL_EVERY
                break
            time.sleep(0.05)
        stderr = process.stderr.read()
        process.stderr.close()
        processes.append({"own": own, "memory": memory, "killed": killed})
        if not killed:
            assert process.returncode == 0, stderr[-3000:]
            break

    assert [p["killed"] for p in processes] == [True] * (STEPS // KILL_EVERY - 1) + [False]
    assert [r["step"] for r in logged_steps(metrics)] == list(range(1, STEPS + 1))  # each step once, in order

    for p in processes:
        steps = sorted(p["own"])
        saved = [s for s in steps if s % SAVE_EVERY == 0]
        # Compilations: constant once the process has run a step after its first checkpoint (which compiles the
        # checkpoint fingerprints).
        warm = [p["own"][s]["compilations"] for s in steps if saved and s > saved[0]]
        assert len(set(warm)) <= 1, (steps[0], warm)
        # Host memory: no growth past warm-up beyond noise.
        samples = [m for s, m in sorted(p["memory"].items()) if saved and s > saved[0]]
        if len(samples) >= 5:
            growth = samples[-1] - min(samples[: len(samples) // 4 + 1])
            assert growth < 64, f"host memory grew {growth:.0f} MiB from {samples[0]:.0f} MiB after step {saved[0]}"
    print(
        "memory MiB per process (first, last sample):",
        [(round(min(p["memory"].values())), round(max(p["memory"].values()))) for p in processes if p["memory"]],
    )
