"""A sample whose image breaks after loading (replaced on disk, or corruption the load-time check did not decode):
`data.on_error=skip` skips it, counts it and fills the batch from the stream, and resume stays exact;
`on_error=raise` stops with one error naming the file, line and field, after the in-flight checkpoint commits."""

from __future__ import annotations

import json
import logging

import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs, read_state
from vlmr1_jax.config import load_config
from vlmr1_jax.data.jsonl import DataError
from vlmr1_jax.data.pipeline import make_sample_dataset
from vlmr1_jax.train import base
from vlmr1_jax.train.checkpoint import committed_steps
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.metrics import read_metrics

BATCH = 2


def run_overrides(tmp_path, run, *extra):
    return [*make_run_inputs(tmp_path), *TINY_RUN, f"data.prompts_per_step={BATCH}", f"train.output_dir={run}", *extra]


def sample_at(trainer: GRPOTrainer, position: int):
    """The sample the trainer draws at stream `position`."""
    cfg = trainer.cfg.data
    return make_sample_dataset(trainer.samples, BATCH, cfg.seed, cfg.num_epochs)[position]


def fail_to_read(monkeypatch, bad_path: str):
    """Make one image unreadable when a batch is drawn (corruption that the load-time check did not decode)."""
    real = base.load_prompt_images

    def load(paths, *args, **kwargs):
        if bad_path in paths:
            raise ValueError(f"{bad_path}: cannot read image (truncated)")
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(base, "load_prompt_images", load)


@pytest.mark.slow
def test_skip_refills_the_batch_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    overrides = run_overrides(tmp_path, tmp_path / "run", "data.on_error=skip", "train.save_every=2")
    trainer = GRPOTrainer.from_config(load_config("demo_tiny", [*overrides, "train.max_steps=2"]), progress=False)
    bad = sample_at(trainer, 2)  # the first sample of step 2
    fail_to_read(monkeypatch, bad.image_paths[0])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert any(f"{bad.source}:{bad.line}: field 'image'" in r.getMessage() for r in caplog.records)
    assert [m["data/skipped"] for m in read_metrics(tmp_path / "run")] == [0.0, 1.0]
    rollouts = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    step2 = {r["prompt_index"]: r["prompt"] for r in rollouts if r["step"] == 2}
    refill = [sample_at(trainer, 3), sample_at(trainer, 4)]
    assert len(step2) == BATCH and all(s.problem in step2[i] for i, s in enumerate(refill))

    # Resume to step 4; one uninterrupted run that skips the same sample must end identical.
    GRPOTrainer.from_config(load_config("demo_tiny", [*overrides, "train.max_steps=4"]), progress=False).train()
    reference = tmp_path / "reference"
    GRPOTrainer.from_config(
        load_config(
            "demo_tiny",
            [*run_overrides(tmp_path, reference, "data.on_error=skip", "train.save_every=2"), "train.max_steps=4"],
        ),
        progress=False,
    ).train()
    assert [m["data/skipped"] for m in read_metrics(reference)] == [0.0, 1.0, 1.0, 1.0]
    assert [m["data/skipped"] for m in read_metrics(tmp_path / "run")] == [0.0, 1.0, 1.0, 1.0]
    got = read_state(tmp_path / "run" / "checkpoints" / "4" / "state")
    want = read_state(reference / "checkpoints" / "4" / "state")
    for name in want:
        assert (got[name] == want[name]).all(), name


@pytest.mark.slow
def test_raise_names_the_sample_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    overrides = run_overrides(tmp_path, run, "train.save_every=1", "train.max_steps=3")
    trainer = GRPOTrainer.from_config(load_config("demo_tiny", overrides), progress=False)
    bad = sample_at(trainer, 3)  # the second sample of step 2, broken on disk after the data was loaded
    with open(bad.image_paths[0], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image any more")
    with pytest.raises(DataError, match=rf"{bad.source}:{bad.line}: field 'image': .*cannot read image"):
        trainer.train()
    assert committed_steps(run / "checkpoints") == [1]
