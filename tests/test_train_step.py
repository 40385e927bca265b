"""GRPO / SFT train steps (vlmr1_jax.rl.step) against independent references.

References: the single-device step for the sharded one; transformers' logits on the same prompts + completions for
the SFT cross-entropy and the GRPO loss (numpy float64 from VLM-R1's loss, old = policy since num_iterations = 1);
the full-batch step for gradient accumulation; gradients without rematerialisation for the remat variants.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.hf_models import load_hf
from tests.helpers.params import host_params
from tests.helpers.prompts import (
    LENGTH,
    SPECS,
    G,
    completions,
    device_prompts,
    hf_completion_logprobs,
    hf_inputs,
    train_prompts,
)
from tests.helpers.train import optimizer
from vlmr1_jax.config import GRPOConfig, MeshConfig, OptimConfig
from vlmr1_jax.models.hf_weights import load_hf_model, read_config
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.params import flat_paths
from vlmr1_jax.models.qwen2_5_vl.text import KVCache
from vlmr1_jax.parallel.mesh import batch_sharding, make_mesh
from vlmr1_jax.processing.batch import to_device
from vlmr1_jax.rl.lora import apply_lora, lora_targets
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import current_model, init_train_state, make_optimizer, trainable_filter
from vlmr1_jax.rl.step import completion_logprobs, make_grpo_step, make_sft_step

BETA = 0.04


def assert_params_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: np.abs(a[k] - b[k]).max())
    assert np.abs(a[worst] - b[worst]).max() <= atol, (worst, np.abs(a[worst] - b[worst]).max())


# ---------------------------------------------------------------- shared GRPO batch and the HF reference


@pytest.fixture(scope="module")
def cfg(tiny_hf_dir):
    return read_config(tiny_hf_dir)


@pytest.fixture(scope="module")
def grpo_data(cfg, tiny_hf_dir):
    """Host arrays of one GRPO batch, and HF float64 log-probs of its completions."""
    batch, pixels = train_prompts(cfg)
    tokens, mask = completions(len(SPECS) * G)
    hf_logp = hf_completion_logprobs(
        load_hf(tiny_hf_dir), hf_inputs(batch, pixels, cfg, G, tokens, mask), LENGTH, tokens
    )
    rng = np.random.default_rng(2)
    return {
        "batch": batch,
        "tokens": tokens,
        "mask": mask,
        "hf_logp": hf_logp,
        "advantages": rng.standard_normal(len(tokens)).astype(np.float32),
        "ref_logprobs": (hf_logp + 0.3 * rng.standard_normal(tokens.shape)).astype(np.float32),
    }


def device_batch(data: dict, mesh=None, rows: slice = slice(None), prompts=None) -> TrainExample:
    prompts = data["batch"] if prompts is None else prompts
    arrays = {k: data[k][rows] for k in ("tokens", "mask", "advantages", "ref_logprobs")}
    if mesh is None:
        return TrainExample(device_prompts(prompts), **{k: jnp.asarray(v) for k, v in arrays.items()})
    return TrainExample(
        to_device(prompts, mesh), **{k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in arrays.items()}
    )


def grpo_step(model, mode: str = "full", grad_accum: int = 1):
    tx, schedule = optimizer(grad_accum)
    graphdef, state = init_train_state(model, mode, tx, with_reference=True)
    step = make_grpo_step(graphdef, GRPOConfig(num_generations=G, beta=BETA, loss="grpo"), tx, schedule, grad_accum)
    return graphdef, state, step


@pytest.fixture(scope="module")
def single(tiny_hf_dir, grpo_data):
    """Two full-parameter GRPO steps on one device: parameters before / after each step, metrics, reference."""
    _graphdef, state, step = grpo_step(load_hf_model(tiny_hf_dir))
    before = host_params(state.trainable)
    batch = device_batch(grpo_data)
    state, metrics1 = step(state, batch)
    after1 = host_params(state.trainable)
    state, metrics2 = step(state, batch)
    return {
        "before": before,
        "after1": after1,
        "after2": host_params(state.trainable),
        "reference": host_params(state.reference),
        "metrics1": jax.device_get(metrics1),
        "metrics2": jax.device_get(metrics2),
    }


# ---------------------------------------------------------------- (a) sharded step == single-device step


def test_sharded_grpo_step_matches_single_device(tiny_hf_dir, grpo_data, single):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _graphdef, state, step = grpo_step(load_hf_model(tiny_hf_dir, mesh=mesh))
    specs = {str(var.sharding.spec) for var in jax.tree.leaves(state.trainable)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs  # really sharded
    batch = device_batch(grpo_data, mesh)
    assert batch.tokens.sharding.spec[0] == ("data", "fsdp")
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(single["metrics1"]["loss"]), atol=1e-6)
    assert_params_close(host_params(state.trainable), single["after1"], atol=1e-5)
    moved = max(np.abs(single["after1"][k] - single["before"][k]).max() for k in single["before"])
    assert moved > 10 * 1e-5, "the update must be far larger than the tolerance"


# ---------------------------------------------------------------- (e) loss plumbing, fixed reference


def test_chunked_logprobs_match_hf_and_unchunked_gradients(tiny_hf_dir, grpo_data):
    """Log-probs computed 2 positions at a time under remat (5 positions: a padded last chunk) equal transformers'
    and give the unchunked gradients."""
    model = load_hf_model(tiny_hf_dir)
    batch = device_batch(grpo_data)
    mask = jnp.asarray(grpo_data["mask"], jnp.float32)

    def run(chunk):
        model.text.logits_chunk = chunk
        graphdef, params = nnx.split(model)

        def total(params):
            m = nnx.merge(graphdef, params)
            logp = completion_logprobs(m, batch.prompts, batch.tokens, batch.mask, G)
            return (logp * mask).sum(), logp

        (_, logp), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
        return np.asarray(logp), host_params(grads)

    chunked, chunked_grads = run(2)
    whole, whole_grads = run(256)
    valid = grpo_data["mask"].astype(bool)
    np.testing.assert_allclose(chunked[valid], grpo_data["hf_logp"][valid], atol=2e-5, rtol=0)
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)
    assert_params_close(chunked_grads, whole_grads, atol=1e-6)


def test_grpo_loss_equals_formula_on_hf_logprobs(grpo_data, single):
    """num_iterations = 1: ratio = 1, so loss_i = masked mean_t(-A_i + beta * k3(ref - logp))."""
    logp, ref, mask = grpo_data["hf_logp"], grpo_data["ref_logprobs"].astype(np.float64), grpo_data["mask"]
    k3 = np.exp(ref - logp) - (ref - logp) - 1.0
    per_token = -grpo_data["advantages"][:, None].astype(np.float64) + BETA * k3
    n = mask.sum(1)
    loss = np.mean((per_token * mask).sum(1) / n)
    kl = np.mean((k3 * mask).sum(1) / n)
    m = single["metrics1"]
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, atol=1e-6)
    assert float(m["grad_norm"]) > 0


def test_grpo_loss_with_old_logprobs_equals_clipped_formula(tiny_hf_dir, grpo_data):
    """num_iterations > 1: the example carries the rollout policy's log-probs, ratio = exp(logp - old) is clipped to
    [1 - 0.2, 1 + 0.2] (VLM-R1's loss, numpy float64 on transformers' log-probs)."""
    logp, ref, mask = grpo_data["hf_logp"], grpo_data["ref_logprobs"].astype(np.float64), grpo_data["mask"]
    old = (logp + 0.3 * np.random.default_rng(6).standard_normal(logp.shape)).astype(np.float32)
    _, state, step = grpo_step(load_hf_model(tiny_hf_dir))
    _, metrics = step(state, dataclasses.replace(device_batch(grpo_data), old_logprobs=jnp.asarray(old)))

    adv = grpo_data["advantages"][:, None].astype(np.float64)
    ratio = np.exp(logp - old)
    objective, clipped = ratio * adv, np.clip(ratio, 0.8, 1.2) * adv
    k3 = np.exp(ref - logp) - (ref - logp) - 1.0
    per_token = -np.minimum(objective, clipped) + BETA * k3
    loss = np.mean((per_token * mask).sum(1) / mask.sum(1))
    clip_ratio = ((objective < clipped) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), (ratio * mask).sum() / mask.sum(), rtol=1e-4)
    assert float(metrics["clip_ratio"]) == pytest.approx(clip_ratio) and 0 < clip_ratio < 0.5  # some clipped


def test_reference_stays_fixed_across_steps(single):
    for path, value in single["before"].items():
        np.testing.assert_array_equal(single["reference"][path], value, err_msg=path)
    assert any(not np.array_equal(single["after2"][k], single["after1"][k]) for k in single["after1"])
    assert float(single["metrics2"]["kl"]) > 0  # the policy moved away from the reference


# ---------------------------------------------------------------- (d) gradient accumulation


def test_grad_accum_over_half_batches_equals_full_batch_step(cfg, tiny_hf_dir, grpo_data, single):
    """`grpo` averages per row, so the mean of two equal-size half-batch losses is the full-batch loss."""
    _graphdef, state, step = grpo_step(load_hf_model(tiny_hf_dir), grad_accum=2)
    half = len(SPECS) // 2
    halves = []
    for start, stop in [(0, half), (half, len(SPECS))]:
        prompts, _ = train_prompts(cfg, slice(start, stop))
        halves.append(device_batch(grpo_data, rows=slice(start * G, stop * G), prompts=prompts))
    state, _ = step(state, *halves)
    assert int(state.step) == 1  # one optimizer update
    assert_params_close(host_params(state.trainable), single["after1"], atol=1e-5)


# ---------------------------------------------------------------- (b) freeze_vision


def test_freeze_vision_updates_text_only(tiny_hf_dir, grpo_data, single):
    graphdef, state, step = grpo_step(load_hf_model(tiny_hf_dir), mode="freeze_vision")
    assert all(not path.startswith("visual.") for path in flat_paths(state.trainable))
    state, _ = step(state, device_batch(grpo_data))
    after = host_params(nnx.state(current_model(graphdef, state), nnx.Param))
    for path, value in after.items():
        changed = not np.array_equal(value, single["before"][path])
        assert changed != path.startswith("visual."), path
    # In full mode the same batch does move the vision tower, so freezing is what kept it fixed.
    assert any(not np.array_equal(single["after1"][k], single["before"][k]) for k in after if k.startswith("visual."))


# ---------------------------------------------------------------- (c) SFT


def test_sft_loss_equals_hf_cross_entropy_and_decreases(cfg, tiny_hf_dir):
    batch, pixels = train_prompts(cfg)
    tokens, mask = completions(len(SPECS), seed=3)
    hf_logp = hf_completion_logprobs(
        load_hf(tiny_hf_dir), hf_inputs(batch, pixels, cfg, 1, tokens, mask), LENGTH, tokens
    )
    expected = -(hf_logp * mask).sum() / mask.sum()  # token mean over all answer tokens of the batch

    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant"), total_steps=10)
    graphdef, state = init_train_state(load_hf_model(tiny_hf_dir), "full", tx, with_reference=False)
    step = make_sft_step(graphdef, tx, schedule)
    data = {"prompts": device_prompts(batch), "tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
    losses = []
    for _ in range(4):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- rematerialisation


def text_grads(model_dir, remat: str, trainable: str, scan: bool = True) -> tuple[dict[str, np.ndarray], str]:
    """Gradients of a text-only loss w.r.t. the `trainable` variables (the rest enters as a plain jit argument, as in
    the train step) for the checkpoint in a model built with `remat` and `scan`, and the gradient's jaxpr."""
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(3, 150, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12)[None, None], (3, 2, 12))
    attention = jnp.ones((2, 12), jnp.int32).at[1, :3].set(0)
    loaded = load_hf_model(model_dir)
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: Qwen25VL(loaded.cfg, rngs=nnx.Rngs(0), remat=remat, scan_layers=scan))
    )
    model = nnx.merge(graphdef, nnx.state(loaded))
    if trainable == "lora":
        apply_lora(model, rank=4, alpha=8.0)
        for i, (_, dense) in enumerate(lora_targets(model)):  # non-zero B, so lora_a gets gradients too
            dense.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), dense.lora_b.shape)
    graphdef, params, rest = nnx.split(model, trainable_filter(trainable), ...)

    def loss(params, rest):
        """Cross-entropy of a cached prefix + continuation, the decoder path the train forward takes."""
        model = nnx.merge(graphdef, params, rest)
        cache = KVCache.empty(model.cfg.text, 2, 12, jnp.float32)
        prefix, cache = model(ids[:, :7], positions[..., :7], attention[:, :7], cache=cache)
        continuation, _ = model(ids[:, 7:], positions[..., 7:], attention[:, 7:], cache=cache)
        logp = jax.nn.log_softmax(model.logits(jnp.concatenate([prefix, continuation], 1))[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0] * attention[:, 1:])

    fn = jax.grad(loss)
    return host_params(jax.jit(fn)(params, rest)), str(jax.make_jaxpr(fn)(params, rest))


# Each policy once, each trainable split once (LoRA is where graph-mode nnx.remat breaks); compiles are costly.
@pytest.mark.parametrize("remat,trainable", [("full", "lora"), ("dots", "full")])
def test_remat_gives_the_same_gradients(tiny_hf_dir, remat, trainable):
    plain, plain_jaxpr = text_grads(tiny_hf_dir, "none", trainable)
    rematted, jaxpr = text_grads(tiny_hf_dir, remat, trainable)
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    assert "checkpoint" not in plain_jaxpr and "remat" not in plain_jaxpr
    assert_params_close(rematted, plain, atol=1e-6)
    assert min(np.abs(v).max() for k, v in plain.items() if k.startswith("text.layers")) > 1e-6


def test_scanned_and_unrolled_layers_give_the_same_gradients(tiny_hf_dir):
    """One stacked layout, two programs: lax.scan over the layers (rematerialised) and the unrolled loop."""
    scanned, scan_jaxpr = text_grads(tiny_hf_dir, "full", "full", scan=True)
    unrolled, loop_jaxpr = text_grads(tiny_hf_dir, "none", "full", scan=False)
    assert "scan[" in scan_jaxpr and "scan[" not in loop_jaxpr
    assert_params_close(scanned, unrolled, atol=1e-6)
    assert min(np.abs(v).max() for k, v in unrolled.items() if k.startswith("text.layers")) > 1e-6


def test_scanned_and_unrolled_vision_towers_agree(tiny_hf_b_dir):
    """Window and full-attention blocks (a `lax.cond` per scanned block) against the static unrolled choice."""
    model = load_hf_model(tiny_hf_b_dir)
    arrays = train_prompts(model.cfg)[0].arrays()
    inputs = {k: jnp.asarray(arrays[k]) for k in ("pixel_values", "hw_positions", "frame_ids", "frame_index")}
    features = {}
    for scan in (True, False):
        model.set_scan_layers(scan)
        features[scan] = np.asarray(jax.jit(lambda m, x: m.encode_vision(x))(model, inputs))
    np.testing.assert_allclose(features[True], features[False], atol=1e-5, rtol=0)
    assert np.abs(features[False]).max() > 0.1


def test_unknown_remat_is_rejected(cfg):
    with pytest.raises(ValueError, match="remat"):
        Qwen25VL(cfg, rngs=nnx.Rngs(0), remat="sometimes")
