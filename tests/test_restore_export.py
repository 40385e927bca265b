"""Checkpoints outside training (vlmr1_jax.train.restore): trainer-built states restored bit-exactly from their meta
alone, checkpoint layouts, `vlmr1 import-hf` against the HF loader, and `vlmr1 export` of checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from converters import cli as converters_cli
from converters.hf import flat_paths, iter_hf_tensors, load_hf_model
from test_export import make_release_source
from vlmr1_jax.config import GRPOConfig, LoRAConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, to_dict
from vlmr1_jax.rl.state import current_model, init_train_state, make_optimizer
from vlmr1_jax.train.checkpoint import Checkpointer, CheckpointError
from vlmr1_jax.train.restore import find_checkpoint, load_checkpoint
from vlmr1_jax.train.setup import build_model, frozen_dtype_of, load_tokenizer, setup_mesh

_SHARED: dict[str, Path] = {}


def shared_source(tmp_path_factory) -> Path:
    """One tiny HF source (TINY_CONFIG shapes, compact tokenizer) for every module that imports this helper."""
    if "source" not in _SHARED:
        _SHARED["source"] = make_release_source(tmp_path_factory.mktemp("shared") / "source", seed=13)
    return _SHARED["source"]


def perturb(tree, seed: int):
    """Every float leaf plus noise (on the host, put back on its sharding), so a restore that silently fell back
    to the HF weights would be caught."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not np.issubdtype(x.dtype, np.floating):
            return x
        noisy = np.asarray(x) + 0.01 * rng.standard_normal(x.shape).astype(x.dtype)
        return jax.device_put(noisy, x.sharding)

    return jax.tree.map(one, tree)


def save_trainer_checkpoint(run_dir: Path, cfg: RunConfig, kind: str, step: int, *, adjust=None):
    """Build the state exactly as GRPOTrainer / SFTTrainer do (build_model, make_optimizer, init_train_state),
    perturb it (or `adjust(model)` before the split), save it with the trainer's meta; returns the saved model."""
    mesh = setup_mesh(cfg)
    model = build_model(cfg, load_tokenizer(cfg), mesh)
    if adjust is not None:
        adjust(model)
    optimizer, _ = make_optimizer(cfg.optim, cfg.train.max_steps)
    graphdef, state = init_train_state(model, cfg.train.trainable, optimizer,
                                       with_reference=kind == "grpo" and cfg.grpo.beta > 0,
                                       frozen_dtype=frozen_dtype_of(cfg.model))
    if adjust is None:
        state = dataclasses.replace(state, trainable=perturb(state.trainable, step),
                                    opt_state=perturb(state.opt_state, step + 1), step=state.step + step)
    meta = {"run_config": to_dict(cfg), "model_config": dataclasses.asdict(model.cfg), "step": step,
            "kind": kind}
    with Checkpointer(run_dir / "checkpoints", save_every=1, keep=3, async_save=False) as checkpointer:
        checkpointer.save(step, state, meta=meta, force=True)
    return current_model(graphdef, state)


def host_params(model) -> dict[str, np.ndarray]:
    return {path: np.asarray(var[...]) for path, var in flat_paths(nnx.state(model)).items()}


def assert_same_params(a, b) -> None:
    pa, pb = host_params(a), host_params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype and np.array_equal(pa[path], pb[path]), path


def cli():
    parser = argparse.ArgumentParser()
    converters_cli.register(parser.add_subparsers(dest="command"))
    return lambda *argv: (lambda a: a.func(a))(parser.parse_args([str(x) for x in argv]))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return shared_source(tmp_path_factory)


@pytest.fixture(scope="module")
def grpo_run(source, tmp_path_factory):
    """GRPO, vision frozen, beta > 0 (reference kept), gradient accumulation (optax MultiSteps), step 3."""
    cfg = RunConfig(model=ModelConfig(hf_model=str(source)), grpo=GRPOConfig(beta=0.04),
                    optim=OptimConfig(grad_accum=2, warmup_steps=1),
                    train=TrainConfig(trainable="freeze_vision", max_steps=7))
    run = tmp_path_factory.mktemp("grpo_run")
    return run, save_trainer_checkpoint(run, cfg, "grpo", step=3)


def test_checkpoint_layouts(grpo_run, source, tmp_path):
    run, _ = grpo_run
    checkpoints = run / "checkpoints"
    assert find_checkpoint(run) == (checkpoints, None)
    assert find_checkpoint(checkpoints) == (checkpoints, None)
    assert find_checkpoint(checkpoints / "3") == (checkpoints, 3)
    assert find_checkpoint(source) is None and find_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="folder of step 3, but step 2"):
        load_checkpoint(checkpoints / "3", step=2)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(source)


def test_grpo_checkpoint_restores_bit_exact(grpo_run, source):
    run, saved = grpo_run
    model, meta, tokenizer_dir = load_checkpoint(run / "checkpoints" / "3")
    assert_same_params(model, saved)
    assert (meta["kind"], meta["step"], tokenizer_dir) == ("grpo", 3, str(source))


def test_lora_sft_checkpoint_restores_adapters(source, tmp_path):
    cfg = RunConfig(model=ModelConfig(hf_model=str(source)), lora=LoRAConfig(rank=4, alpha=8.0),
                    train=TrainConfig(trainable="lora", max_steps=5, seed=3))
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


def test_import_hf_round_trip_and_export(source, tmp_path, capsys):
    run = cli()
    out = tmp_path / "imported"
    assert run("import-hf", "--model", source, "--out", out) == 0
    assert "kind import" in capsys.readouterr().out
    model, meta, tokenizer_dir = load_checkpoint(out)
    assert_same_params(model, load_hf_model(source))
    assert (meta["kind"], meta["step"], tokenizer_dir) == ("import", 0, str(source))
    assert run("import-hf", "--model", source, "--out", out) == 1
    assert "not an empty folder" in capsys.readouterr().err

    # `vlmr1 export` recognises the checkpoint and writes the HF weights back bit for bit.
    release = tmp_path / "release"
    assert run("export", out, "--out", release, "--dtype", "fp32") == 0
    written = dict(iter_hf_tensors(release))
    expected = dict(iter_hf_tensors(source))
    assert written.keys() == expected.keys()
    assert all(np.array_equal(written[k], expected[k]) for k in expected)
    assert "base_model: \"source\"" in (release / "README.md").read_text()


def test_export_argument_errors(grpo_run, source, tmp_path, capsys):
    run = cli()
    checkpoint, _ = grpo_run
    assert run("export", checkpoint, "--out", tmp_path / "a", "--lora", "adapter") == 1
    assert "needs a LoRA run" in capsys.readouterr().err
    assert run("export", source, "--out", tmp_path / "b", "--lora", "merge") == 1
    assert "apply to training checkpoints" in capsys.readouterr().err
    assert run("export", tmp_path, "--out", tmp_path / "c") == 1
    assert "neither an HF" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
