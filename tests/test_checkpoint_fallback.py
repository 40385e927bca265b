"""A corrupt newest training checkpoint: the run warns naming both steps, moves the bad one aside (never deletes
it), resumes from the previous good one, and ends where an undisturbed run ends."""

from __future__ import annotations

import logging

import pytest

from tests.helpers.files import flip_bytes
from tests.helpers.runs import TINY_RUN, make_run_inputs, read_state
from vlmr1_jax.config import load_config
from vlmr1_jax.train.checkpoint import CorruptCheckpoint, committed_steps
from vlmr1_jax.train.loop import GRPOTrainer


def largest_array_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    inputs = make_run_inputs(tmp_path)
    run = tmp_path / "run"
    overrides = [*inputs, *TINY_RUN, "train.save_every=2", "train.keep_checkpoints=2", f"train.output_dir={run}"]
    GRPOTrainer.from_config(load_config("demo_tiny", [*overrides, "train.max_steps=4"]), progress=False).train()
    checkpoints = run / "checkpoints"
    assert committed_steps(checkpoints) == [2, 4]
    flip_bytes(largest_array_file(checkpoints / "4"))

    cfg = load_config("demo_tiny", [*overrides, "train.max_steps=6"])
    with caplog.at_level(logging.WARNING):
        trainer = GRPOTrainer.from_config(cfg, progress=False)
    assert trainer.step == 2
    assert any("checkpoint step 4 is corrupt; resuming from step 2" in r.getMessage() for r in caplog.records)
    moved = [p.name for p in checkpoints.iterdir() if p.name.startswith("4.corrupt-")]
    assert len(moved) == 1
    trainer.train()
    assert committed_steps(checkpoints) == [4, 6]

    reference = tmp_path / "reference"
    GRPOTrainer.from_config(
        load_config("demo_tiny", [*overrides, "train.max_steps=6", f"train.output_dir={reference}"]), progress=False
    ).train()
    got, want = read_state(checkpoints / "6" / "state"), read_state(reference / "checkpoints" / "6" / "state")
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), name


@pytest.mark.slow
def test_every_checkpoint_corrupt_is_one_clear_error(tmp_path):
    inputs = make_run_inputs(tmp_path)
    run = tmp_path / "run"
    overrides = [*inputs, *TINY_RUN, "train.save_every=2", "train.keep_checkpoints=1", f"train.output_dir={run}"]
    GRPOTrainer.from_config(load_config("demo_tiny", [*overrides, "train.max_steps=2"]), progress=False).train()
    flip_bytes(largest_array_file(run / "checkpoints" / "2"))
    with pytest.raises(CorruptCheckpoint, match=r"every checkpoint in .* is corrupt .*train\.output_dir=NEW_FOLDER"):
        GRPOTrainer.from_config(load_config("demo_tiny", [*overrides, "train.max_steps=4"]), progress=False)
    assert [p.name.split(".")[0] for p in (run / "checkpoints").iterdir()] == ["2"]
