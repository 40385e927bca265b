"""Checkpoints outside training (vlmr1_jax.train.restore): trainer-built states restored bit-exactly from their meta
alone, checkpoint layouts, `vlmr1 import-hf` against the HF loader, and `vlmr1 export` of checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers.cli import run_cli
from tests.helpers.params import assert_same_params
from tests.helpers.train import save_trainer_checkpoint
from vlmr1_jax.config import GRPOConfig, LoRAConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from vlmr1_jax.models.hf_weights import iter_hf_tensors, load_hf_model
from vlmr1_jax.train.checkpoint import CheckpointError
from vlmr1_jax.train.restore import find_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def grpo_run(release_source, tmp_path_factory):
    """GRPO, vision frozen, beta > 0 (reference kept), gradient accumulation, step 3."""
    cfg = RunConfig(
        model=ModelConfig(hf_model=str(release_source)),
        grpo=GRPOConfig(beta=0.04),
        optim=OptimConfig(grad_accum=2, warmup_steps=1),
        train=TrainConfig(trainable="freeze_vision", max_steps=7),
    )
    run = tmp_path_factory.mktemp("grpo_run")
    return run, save_trainer_checkpoint(run, cfg, "grpo", step=3)


def test_checkpoint_layouts(grpo_run, release_source, tmp_path):
    run, _ = grpo_run
    checkpoints = run / "checkpoints"
    assert find_checkpoint(run) == (checkpoints, None)
    assert find_checkpoint(checkpoints) == (checkpoints, None)
    assert find_checkpoint(checkpoints / "3") == (checkpoints, 3)
    assert find_checkpoint(release_source) is None and find_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="folder of step 3, but step 2"):
        load_checkpoint(checkpoints / "3", step=2)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(release_source)


def test_grpo_checkpoint_restores_bit_exact(grpo_run, release_source):
    run, saved = grpo_run
    model, meta, tokenizer_dir = load_checkpoint(run / "checkpoints" / "3")
    assert_same_params(model, saved)
    assert (meta["kind"], meta["step"], tokenizer_dir) == ("grpo", 3, str(release_source))


def test_lora_sft_checkpoint_restores_adapters(release_source, tmp_path):
    cfg = RunConfig(
        model=ModelConfig(hf_model=str(release_source)),
        lora=LoRAConfig(rank=4, alpha=8.0),
        train=TrainConfig(trainable="lora", max_steps=5, seed=3),
    )
    saved = save_trainer_checkpoint(tmp_path, cfg, "sft", step=5)
    model, _meta, _ = load_checkpoint(tmp_path)
    assert_same_params(model, saved)
    adapter = np.asarray(model.text.layers.mlp.up.lora_b[...])  # stacked: [layers, rank, out]
    assert adapter.shape == (model.cfg.text.num_hidden_layers, 4, 96) and np.abs(adapter[0]).max() > 0
    assert model.text.layers.mlp.up.lora_scale == 2.0


def test_meta_that_does_not_describe_the_state_is_refused(grpo_run, tmp_path):
    """The GRPO checkpoint (reference kept) with its meta edited to claim SFT: the rebuilt state has no
    reference, and the mismatch is named leaf by leaf; a checkpoint without our meta is refused too."""
    run, _ = grpo_run
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    meta_file = tmp_path / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "kind": "sft"}))
    with pytest.raises(CheckpointError, match=r"reference\..*not in the expected state"):
        load_checkpoint(tmp_path)
    meta_file.write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match=r"lacks .*run_config"):
        load_checkpoint(tmp_path)


def test_import_hf_round_trip_and_export(release_source, tmp_path, capsys):
    out = tmp_path / "imported"
    assert run_cli("import-hf", "--model", release_source, "--out", out) == 0
    assert "kind import" in capsys.readouterr().out
    model, meta, tokenizer_dir = load_checkpoint(out)
    assert_same_params(model, load_hf_model(release_source))
    assert (meta["kind"], meta["step"], tokenizer_dir) == ("import", 0, str(release_source))
    assert run_cli("import-hf", "--model", release_source, "--out", out) == 1
    assert "not an empty folder" in capsys.readouterr().err

    # `vlmr1 export` recognises the checkpoint and writes the HF weights back bit for bit.
    release = tmp_path / "release"
    assert run_cli("export", out, "--out", release, "--dtype", "fp32") == 0
    written = dict(iter_hf_tensors(release))
    expected = dict(iter_hf_tensors(release_source))
    assert written.keys() == expected.keys()
    assert all(np.array_equal(written[k], expected[k]) for k in expected)
    assert 'base_model: "source"' in (release / "README.md").read_text()


def test_export_argument_errors(grpo_run, release_source, tmp_path, capsys):
    checkpoint, _ = grpo_run
    assert run_cli("export", checkpoint, "--out", tmp_path / "a", "--lora", "adapter") == 1
    assert "needs a LoRA run" in capsys.readouterr().err
    assert run_cli("export", release_source, "--out", tmp_path / "b", "--lora", "merge") == 1
    assert "apply to training checkpoints" in capsys.readouterr().err
    assert run_cli("export", tmp_path, "--out", tmp_path / "c") == 1
    assert "neither an HF" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
