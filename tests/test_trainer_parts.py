"""A trainer is built from injected parts (mesh, tokenizer, samples, model), not only from a recipe: a test hands
it a 2-device mesh, an in-memory sample list and a model it built itself, and one GRPO step trains that model."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from tests.helpers.runs import TINY_RUN, make_run_inputs
from vlmr1_jax.config import load_config
from vlmr1_jax.parallel.mesh import MeshConfig, make_mesh
from vlmr1_jax.train.base import RunParts, build_parts
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.setup import build_model, load_samples, load_tokenizer


def test_one_grpo_step_on_injected_parts(tmp_path):
    cfg = load_config(
        "demo_tiny",
        [*make_run_inputs(tmp_path), *TINY_RUN, "train.max_steps=1", f"train.output_dir={tmp_path / 'run'}"],
    )
    mesh = make_mesh(MeshConfig(fsdp=2), devices=jax.devices()[:2])  # not the recipe's mesh (all 8 devices)
    tokenizer = load_tokenizer(cfg)
    samples = load_samples(cfg)[:4]  # an in-memory subset the recipe does not describe
    model = build_model(cfg, tokenizer, mesh)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

    trainer = GRPOTrainer(cfg, RunParts(mesh, tokenizer, samples, model), progress=False)
    assert trainer.mesh is mesh and trainer.samples == samples
    trainer.train()
    after = jax.tree.map(np.asarray, nnx.state(trainer.model(), nnx.Param))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert any(changed)
    devices = {d for leaf in jax.tree.leaves(trainer.state.trainable) for d in leaf.sharding.device_set}
    assert devices == set(jax.devices()[:2])


def test_build_parts_is_what_from_config_uses(tmp_path):
    cfg = load_config("demo_tiny", [*make_run_inputs(tmp_path), *TINY_RUN, f"train.output_dir={tmp_path / 'run'}"])
    parts = build_parts(cfg)
    assert parts.imported is None and len(parts.samples) == 16 and parts.mesh.size == len(jax.devices())
