"""A run folder belongs to its configuration: resuming with other settings is refused (naming the keys and both
ways out), run length / logging / checkpoint cadence may change, a finished run says so and exits non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs, worker_env
from vlmr1_jax.config import RunConfig, load_config, to_dict
from vlmr1_jax.models.family import family_of
from vlmr1_jax.models.qwen2_5_vl.config import get_preset
from vlmr1_jax.train.checkpoint import read_meta
from vlmr1_jax.train.identity import RunMismatch, check_resume, config_differences


def test_differences_ignore_run_length_logging_and_new_keys():
    base = to_dict(load_config("demo_tiny"))
    longer = to_dict(load_config("demo_tiny", ["train.max_steps=40", "train.log_every=5", "train.save_every=9"]))
    assert config_differences(base, longer) == []
    other = to_dict(load_config("demo_tiny", ["optim.learning_rate=0.5", "grpo.loss=dapo"]))
    assert config_differences(base, other) == ["grpo.loss: 'grpo' -> 'dapo'", "optim.learning_rate: 0.0001 -> 0.5"]
    older = {section: dict(values) for section, values in base.items()}
    del older["model"]["logits_chunk"]  # a checkpoint written before the setting existed
    assert config_differences(older, base) == []


def test_mismatch_names_keys_and_both_ways_out():
    stored = to_dict(RunConfig())
    with pytest.raises(RunMismatch, match=r"trainer: 'sft' -> 'grpo'.*train.output_dir=NEW_FOLDER.*--resume-anyway"):
        check_resume(stored, stored, "grpo", "sft", "runs/x/checkpoints")
    check_resume(stored, stored, "grpo", "grpo", "runs/x/checkpoints")


@pytest.mark.slow
def test_cli_refuses_other_config_and_finished_runs(tmp_path):
    inputs = make_run_inputs(tmp_path)
    run = tmp_path / "run"

    def train(*overrides: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "vlmr1_jax.cli",
                "train",
                "demo_tiny",
                *inputs,
                *TINY_RUN,
                f"train.output_dir={run}",
                "train.save_every=2",
                *overrides,
                "--no-progress",
                *flags,
            ],
            env=worker_env(1),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    assert train("train.max_steps=2").returncode == 0
    # The recipe leaves data.max_pixels unset: the run stores the family's budget in effect, the number runs stored
    # before the default became the family's, so those resume too.
    stored = read_meta(run / "checkpoints")["run_config"]["data"]["max_pixels"]
    assert stored == family_of(get_preset("tiny")).processor.default_max_pixels == 12845056
    other = train("train.max_steps=4", "optim.learning_rate=0.5")
    assert other.returncode == 2 and "optim.learning_rate: 0.0001 -> 0.5" in other.stderr, other.stderr[-2000:]
    finished = train("train.max_steps=2")
    assert finished.returncode == 1 and "already finished at step 2" in finished.stderr, finished.stderr[-2000:]
    assert train("train.max_steps=4", "optim.learning_rate=0.5", flags=("--resume-anyway",)).returncode == 0
