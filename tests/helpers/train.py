"""Train states as the trainers build them: the tests' Adam, and trainer checkpoints saved with the trainers' meta."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from vlmr1_jax.config import OptimConfig, RunConfig, to_dict
from vlmr1_jax.rl.state import current_model, init_train_state, make_optimizer
from vlmr1_jax.train.checkpoint import Checkpointer
from vlmr1_jax.train.setup import build_model, frozen_dtype_of, load_tokenizer, setup_mesh

LR = 1e-3
# Adam's first update is lr * g / (|g| + eps): with the default eps=1e-8 a gradient entry at rounding-noise level
# (1e-10) moves its parameter by up to lr, so two correct programs differ by ~lr. A larger eps keeps the update a
# smooth function of the gradient, so parameters after a step agree as closely as the gradients do.
ADAM_EPS = 1e-3


def optimizer(grad_accum: int = 1):
    """AdamW at LR / ADAM_EPS, constant schedule: (transformation, schedule)."""
    return make_optimizer(
        OptimConfig(learning_rate=LR, schedule="constant", eps=ADAM_EPS, grad_accum=grad_accum), total_steps=10
    )


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


def save_trainer_checkpoint(run_dir: Path, cfg: RunConfig, kind: str, step: int, *, adjust=None) -> nnx.Module:
    """Build the state exactly as GRPOTrainer / SFTTrainer do (build_model, make_optimizer, init_train_state),
    perturb it (or `adjust(model)` before the split), save it with the trainer's meta; returns the saved model."""
    mesh = setup_mesh(cfg)
    model = build_model(cfg, load_tokenizer(cfg), mesh)
    if adjust is not None:
        adjust(model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.max_steps)
    graphdef, state = init_train_state(
        model,
        cfg.train.trainable,
        tx,
        with_reference=kind == "grpo" and cfg.grpo.beta > 0,
        frozen_dtype=frozen_dtype_of(cfg.model),
    )
    if adjust is None:
        state = dataclasses.replace(
            state,
            trainable=perturb(state.trainable, step),
            opt_state=perturb(state.opt_state, step + 1),
            step=state.step + step,
        )
    meta = {"run_config": to_dict(cfg), "model_config": dataclasses.asdict(model.cfg), "step": step, "kind": kind}
    with Checkpointer(run_dir / "checkpoints", save_every=1, keep=3, async_save=False) as checkpointer:
        checkpointer.save(step, state, meta=meta, force=True)
    return current_model(graphdef, state)
