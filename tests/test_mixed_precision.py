"""Mixed precision: float32 master weights and Adam moments, compute in `model.dtype`, frozen parts stored in
`model.frozen_dtype`; the start-up refusals (bf16 master weights, no model source).

The reference for the bf16-compute steps is the same steps computed in float32 (whose logits and loss are checked
against transformers in test_parity / test_train_step); the failure being fixed is demonstrated next to it.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.params import assert_same_params, host_params
from tests.helpers.prompts import SPECS, G, completions, device_prompts, train_prompts
from tests.helpers.train import save_trainer_checkpoint
from vlmr1_jax.config import GRPOConfig, LoRAConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, load_config
from vlmr1_jax.models.layers import LoRAParam
from vlmr1_jax.models.qwen2_5_vl.config import get_preset
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.params import flat_paths
from vlmr1_jax.rl.lora import apply_lora
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import init_train_state, make_optimizer
from vlmr1_jax.rl.step import make_grpo_step, make_logprob_fn
from vlmr1_jax.train.checkpoint import CheckpointError
from vlmr1_jax.train.restore import load_checkpoint
from vlmr1_jax.train.setup import build_model, check_model_config, load_tokenizer, setup_mesh

CFG = get_preset("tiny")
LR = 1e-6  # the 3B recipes' learning rate
STEPS = 3
RECIPES_3B = ("rec_3b", "rec_3b_lora", "gui_3b", "ovd_3b")
# Attention's key bias adds q.b_k to every score of a query alike, which the softmax cancels: its true gradient is
# zero, so its Adam update is rounding noise normalised to +-lr, in float32 as in bf16 compute.
NO_GRADIENT = "attn.k.bias"


def leaf_dtypes(tree: Any) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def grpo_deltas(dtype, param_dtype, frozen_dtype=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Full-parameter GRPO at lr 1e-6 (the recipes' AdamW) on the tiny preset, the same batch for STEPS steps:
    (initial trainable parameters, their change)."""
    model = Qwen25VL(CFG, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=LR, schedule="constant"), total_steps=10)
    graphdef, state = init_train_state(model, "full", tx, with_reference=True, frozen_dtype=frozen_dtype)
    before = host_params(state.trainable, np.float64)
    prompts, _ = train_prompts(CFG)
    tokens, mask = completions(len(SPECS) * G)
    rng = np.random.default_rng(2)
    batch = TrainExample(
        device_prompts(prompts),
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(rng.standard_normal(len(tokens)), jnp.float32),
        # near the random policy's log(1/vocab), so the KL term is of the size it has in training
        ref_logprobs=jnp.asarray(-np.log(CFG.text.vocab_size) + 0.3 * rng.standard_normal(tokens.shape), jnp.float32),
    )
    step = make_grpo_step(graphdef, GRPOConfig(num_generations=G, beta=0.04), tx, schedule)
    for _ in range(STEPS):
        state, _ = step(state, batch)
    assert leaf_dtypes(state.trainable) == {str(jnp.dtype(param_dtype))}
    return before, {k: v - before[k] for k, v in host_params(state.trainable, np.float64).items()}


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def fp32_run():
    return grpo_deltas(jnp.float32, jnp.float32)


# ---------------------------------------------------------------- (a) bf16 compute, fp32 masters


@pytest.mark.slow
def test_bf16_compute_with_fp32_masters_moves_parameters_like_fp32(fp32_run):
    """Tolerance, per leaf: |delta_bf16 - delta_fp32| / |delta_fp32| <= 0.35, and 0.15 over all leaves together.

    Adam normalises each gradient entry (its first update is lr * sign(g)), so bf16 compute (8-bit mantissa, a
    relative gradient error of a few 1e-3 after the forward and backward) changes a delta only where an entry's
    gradient is within that error of zero and flips sign. Measured: median leaf 0.07, worst 0.24 (a 96-entry
    bias), 0.09 overall. The failure modes give >= 1: a lost update (bf16 masters, below), a sign error, or no
    update at all.
    """
    _before, fp32 = fp32_run
    _, bf16 = grpo_deltas(jnp.bfloat16, jnp.float32, frozen_dtype=jnp.bfloat16)
    for path, delta in bf16.items():
        assert np.any(delta != 0), f"{path}: not updated"  # every trained tensor changes
        if NO_GRADIENT not in path:
            assert relative_difference(delta, fp32[path]) <= 0.35, (path, relative_difference(delta, fp32[path]))
    compared = [p for p in bf16 if NO_GRADIENT not in p]
    overall = relative_difference(
        np.concatenate([bf16[p].ravel() for p in compared]), np.concatenate([fp32[p].ravel() for p in compared])
    )
    assert 0 < overall <= 0.15, overall  # > 0: the bf16 run really computed in bf16


# ---------------------------------------------------------------- (b) the failure: bf16 parameters updated in place


@pytest.mark.slow
def test_bf16_master_weights_lose_lr_1e6_updates(fp32_run):
    """The old recipe setting (param_dtype bfloat16, AdamW applied to the bf16 values): an update of ~lr moves a
    bf16 weight only when it exceeds half an ulp (6e-5 at |w| = 0.02, 4e-3 at a norm's 1.0), so only weights within
    ~3e-4 of zero (about 1% of a std-0.02 init) and zero-initialised biases move, while fp32 masters move all."""
    before, fp32 = fp32_run
    _, old = grpo_deltas(jnp.bfloat16, jnp.bfloat16)
    for path, delta in old.items():
        if not np.any(before[path]):
            continue  # zero-initialised biases: small values near 0 are representable
        moved, moved_fp32 = np.mean(delta != 0), np.mean(fp32[path] != 0)
        assert moved < 0.05 and moved < 0.1 * moved_fp32, (path, moved, moved_fp32)
        assert relative_difference(delta, fp32[path]) > 0.9, path
        if path.endswith("scale"):
            assert moved == 0, path  # no norm weight moves at all


# ---------------------------------------------------------------- compute dtype


def dot_input_dtypes(jaxpr) -> set[str]:
    """dtypes of every matmul operand in `jaxpr` and the jaxprs nested in it (jit, remat, scan, custom_vjp)."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found |= {str(v.aval.dtype) for v in eqn.invars}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= dot_input_dtypes(inner)
    return found


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matmuls_run_in_model_dtype_whatever_the_storage(dtype):
    """fp32 trainable text, bf16-stored frozen vision tower and reference: the policy and reference forwards (and
    so the train step's) multiply in model.dtype only."""
    model = Qwen25VL(CFG, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    tx, _ = make_optimizer(OptimConfig(), total_steps=10)
    graphdef, state = init_train_state(model, "freeze_vision", tx, with_reference=True, frozen_dtype=jnp.bfloat16)
    assert leaf_dtypes(state.trainable) == {"float32"} and leaf_dtypes(state.frozen) == {"bfloat16"}
    prompts, _ = train_prompts(CFG)
    tokens, mask = (jnp.asarray(x) for x in completions(len(SPECS) * G))
    logprobs = make_logprob_fn(graphdef, G)
    for trainable in (state.trainable, state.reference):
        jaxpr = jax.make_jaxpr(logprobs)(trainable, state.frozen, device_prompts(prompts), tokens, mask).jaxpr
        assert dot_input_dtypes(jaxpr) == {str(jnp.dtype(dtype))}


# ---------------------------------------------------------------- (d) frozen parts in bf16, checkpoint round trip


@pytest.mark.parametrize("mode", ["full", "freeze_vision", "lora"])
def test_frozen_dtype_stores_reference_and_frozen_parts(mode):
    model = Qwen25VL(CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    if mode == "lora":
        apply_lora(model, rank=4, alpha=8.0)
    tx, _ = make_optimizer(OptimConfig(), total_steps=10)
    initial = host_params(model, np.float64)
    _, state = init_train_state(model, mode, tx, with_reference=True, frozen_dtype=jnp.bfloat16)
    assert leaf_dtypes(state.trainable) == leaf_dtypes(state.opt_state) == {"float32"}  # masters, moments
    assert leaf_dtypes(state.reference) == {"bfloat16"}
    frozen, reference = host_params(state.frozen, np.float64), host_params(state.reference, np.float64)
    assert bool(frozen) == (mode != "full") and leaf_dtypes(state.frozen) <= {"bfloat16"}
    if mode == "lora":  # the LoRA reference is the base model: zero adapters
        assert not any(np.any(v) for v in reference.values())
        reference = {}
    for path, value in {**frozen, **reference}.items():  # stored once, rounded to the nearest bf16
        expected = initial[path].astype(np.float32).astype(jnp.bfloat16).astype(np.float64)
        np.testing.assert_array_equal(value, expected, err_msg=path)


@pytest.mark.parametrize("trainable,kind", [("freeze_vision", "grpo"), ("lora", "sft")])
def test_bf16_frozen_checkpoint_round_trip(release_source, tmp_path, trainable, kind):
    """A trainer-built state with bf16 frozen parts (and reference) restores from its meta alone, dtypes and
    values exact; the same checkpoint read as if frozen_dtype were unset is refused (the restore mirrors it)."""
    cfg = RunConfig(
        model=ModelConfig(hf_model=str(release_source), dtype="bfloat16", frozen_dtype="bfloat16"),
        grpo=GRPOConfig(beta=0.04),
        lora=LoRAConfig(rank=4, alpha=8.0),
        train=TrainConfig(trainable=trainable, max_steps=3),
    )
    saved = save_trainer_checkpoint(tmp_path, cfg, kind, step=2)
    model, _meta, _ = load_checkpoint(tmp_path)
    assert_same_params(model, saved)
    stored = {path: str(var[...].dtype) for path, var in flat_paths(nnx.state(model, nnx.Param)).items()}
    frozen_part = "visual." if trainable == "freeze_vision" else ""
    assert all(
        dtype == ("bfloat16" if path.startswith(frozen_part) else "float32") for path, dtype in stored.items()
    ), stored
    if trainable == "lora":
        assert leaf_dtypes(nnx.state(model, LoRAParam)) == {"float32"}
    assert model.text.dtype == jnp.bfloat16  # computes in model.dtype

    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    edited = json.loads(meta_file.read_text())
    edited["run_config"]["model"]["frozen_dtype"] = None
    meta_file.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="bfloat16"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- (c) bf16 master weights refused


BF16_MASTERS = "model.param_dtype=bfloat16: trained parameters are AdamW's master weights"


@pytest.mark.parametrize("name", RECIPES_3B)
def test_3b_recipes_train_fp32_masters_with_bf16_compute_and_frozen_parts(name):
    model = load_config(name).model
    assert (model.preset, model.hf_model) == (None, None)
    assert (model.dtype, model.param_dtype, model.frozen_dtype) == ("bfloat16", "float32", "bfloat16")
    check_model_config(load_config(name, ["model.hf_model=/ckpt/Qwen2.5-VL-3B-Instruct"]))


@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_bf16_master_weights_are_refused_at_start_up(kind):
    """Refused before any data or weights are read: rec_3b has neither data files nor a real model folder."""
    from vlmr1_jax.train.loop import GRPOTrainer
    from vlmr1_jax.train.sft import SFTTrainer

    cfg = load_config("rec_3b", ["model.hf_model=/nonexistent", "model.param_dtype=bfloat16"])
    with pytest.raises(ValueError, match=f"^{BF16_MASTERS}.*set model.param_dtype=float32") as error:
        (GRPOTrainer if kind == "grpo" else SFTTrainer).from_config(cfg, progress=False)
    assert "\n" not in str(error.value)


def test_bf16_master_weights_are_refused_by_build_model():
    cfg = RunConfig(model=ModelConfig(param_dtype="bfloat16"))
    with pytest.raises(ValueError, match=BF16_MASTERS):
        build_model(cfg, load_tokenizer(cfg), setup_mesh(cfg))
    with pytest.raises(ValueError, match=r"^model\.frozen_dtype='bf16': unknown dtype; choose one of"):
        check_model_config(RunConfig(model=ModelConfig(frozen_dtype="bf16")))


# ---------------------------------------------------------------- (e) no silent preset


NO_SOURCE = (
    r"^model\.hf_model and model\.preset are both unset: set model\.hf_model=/ckpt/Qwen2\.5-VL-3B-Instruct "
    r".*or model\.preset=NAME for a random-init experiment$"
)


def test_build_model_without_source_is_refused():
    cfg = RunConfig(model=ModelConfig(preset=None))
    with pytest.raises(ValueError, match=NO_SOURCE):
        build_model(cfg, load_tokenizer(cfg), setup_mesh(cfg))
    check_model_config(RunConfig(model=ModelConfig(preset="tiny")))  # a preset alone is a source


def test_3b_recipe_without_hf_model_fails_first():
    """`vlmr1 train rec_3b` with no model.hf_model: the guard speaks before the (also missing) data is read."""
    from vlmr1_jax.train.loop import GRPOTrainer

    with pytest.raises(ValueError, match=NO_SOURCE):
        GRPOTrainer.from_config(load_config("rec_3b"), progress=False)
