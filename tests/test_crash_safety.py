"""An error while the next batch is prepared (after a checkpoint started writing) lets that checkpoint commit:
the run folder holds the finished step, no half-written temporary, and a rerun resumes from it."""

from __future__ import annotations

import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs
from vlmr1_jax.config import load_config
from vlmr1_jax.train.checkpoint import committed_steps
from vlmr1_jax.train.loop import GRPOTrainer


@pytest.mark.slow
def test_error_in_prepare_keeps_the_inflight_checkpoint(tmp_path, monkeypatch):
    inputs = make_run_inputs(tmp_path)
    run = tmp_path / "run"
    cfg = load_config(
        "demo_tiny", [*inputs, *TINY_RUN, "train.max_steps=6", "train.save_every=2", f"train.output_dir={run}"]
    )
    trainer = GRPOTrainer.from_config(cfg, progress=False)
    prepare, calls = trainer.prepare, []

    def failing_prepare(samples, batch):
        calls.append(1)
        if len(calls) == 3:  # the batch of step 3, prepared right after step 2's checkpoint was started
            raise ValueError("undecodable image in sample 7")
        return prepare(samples, batch)

    monkeypatch.setattr(trainer, "prepare", failing_prepare)
    with pytest.raises(ValueError, match="sample 7"):
        trainer.train()
    assert committed_steps(run / "checkpoints") == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    resumed = GRPOTrainer.from_config(cfg, progress=False)
    assert resumed.step == 2
    resumed.close()
