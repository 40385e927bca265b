"""LoRA (vlmr1_jax.rl.lora): VLM-R1's target selection, identity at init, adapter-only training, merging, dropout.

References: the set of `nn.Linear` modules PEFT would wrap in transformers' model (VLM-R1: every linear
without a vision keyword, not the embedding), the base model's logits, and inverted-dropout statistics.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.helpers.hf_models import load_hf
from tests.helpers.params import host_params
from tests.helpers.prompts import completions, device_prompts, train_prompts
from tests.helpers.train import optimizer
from vlmr1_jax.config import GRPOConfig
from vlmr1_jax.models.hf_weights import load_hf_model, read_config
from vlmr1_jax.models.layers import Dense, LoRADropoutKey, LoRAParam
from vlmr1_jax.models.qwen2_5_vl.params import canonical_hf_name, flat_paths, is_stacked, to_hf_name
from vlmr1_jax.rl.lora import apply_lora, lora_targets, merge_lora, set_lora_dropout_keys
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import current_model, init_train_state
from vlmr1_jax.rl.step import make_grpo_step

RANK, ALPHA, DROPOUT = 4, 8.0, 0.05  # VLM-R1's dropout; rank/alpha scaled down for the tiny model
G = 2


@partial(jax.jit, static_argnums=0)
def prompt_logits(
    graphdef: nnx.GraphDef, state: nnx.State, prompts: dict, dropout_key: jax.Array | None = None
) -> jax.Array:
    """Logits at every prompt position (images included); with `dropout_key`, adapter dropout is switched on."""
    model = nnx.merge(graphdef, state)
    if dropout_key is not None:
        set_lora_dropout_keys(model, dropout_key)
    features = model.encode_vision(prompts)
    hidden, _ = model(
        prompts["input_ids"], prompts["positions"], prompts["attention_mask"], features, prompts["vision_gather"]
    )
    return model.logits(hidden)


@pytest.fixture(scope="module")
def prompts(tiny_hf_dir):
    batch, _ = train_prompts(read_config(tiny_hf_dir))
    return batch, device_prompts(batch)


@pytest.fixture(scope="module")
def base_logits(tiny_hf_dir, prompts):
    graphdef, state = nnx.split(load_hf_model(tiny_hf_dir))
    return np.asarray(prompt_logits(graphdef, state, prompts[1]))


def test_targets_are_the_linears_peft_wraps_in_vlm_r1(tiny_hf_dir):
    model = load_hf_model(tiny_hf_dir)
    names = apply_lora(model, RANK, ALPHA)
    hf = load_hf(tiny_hf_dir)
    expected = {
        canonical_hf_name(n)
        for n, m in hf.named_modules()
        if isinstance(m, torch.nn.Linear) and "visual" not in n and "embed_tokens" not in n
    }
    assert "lm_head" in expected and len(expected) == 7 * model.cfg.text.num_hidden_layers + 1
    layers = range(model.cfg.text.num_hidden_layers)
    hf_names = {
        to_hf_name(n + ".kernel", i if is_stacked(n + ".kernel") else None).removesuffix(".weight")
        for n in names
        for i in layers
    }
    assert hf_names == expected
    adapted = {path for path, var in flat_paths(nnx.state(model, LoRAParam)).items()}
    assert adapted == {f"{n}.lora_{ab}" for n in names for ab in "ab"}
    assert all(
        dense.lora_a is None
        for path, dense in nnx.iter_graph(model)
        if isinstance(dense, Dense) and str(path[0]) == "visual"
    )
    assert not any("embed" in n for n in names)


def test_adapted_model_equals_base_at_init(tiny_hf_dir, prompts, base_logits):
    model = load_hf_model(tiny_hf_dir)
    apply_lora(model, RANK, ALPHA, dropout=DROPOUT)
    assert all(float(jnp.abs(d.lora_a[...]).max()) > 0 for _, d in lora_targets(model))  # A random, B zero
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(prompt_logits(graphdef, state, prompts[1])), base_logits)


@pytest.fixture(scope="module")
def trained(tiny_hf_dir, prompts):
    """Two GRPO steps in `lora` mode (dropout rate set, as VLM-R1's script)."""
    model = load_hf_model(tiny_hf_dir)
    apply_lora(model, RANK, ALPHA, dropout=DROPOUT)
    tx, schedule = optimizer()
    graphdef, state = init_train_state(model, "lora", tx, with_reference=True)
    base = host_params(state.frozen)
    step = make_grpo_step(graphdef, GRPOConfig(num_generations=G, beta=0.04), tx, schedule)
    tokens, mask = completions(len(prompts[0].input_ids) * G)
    rng = np.random.default_rng(5)
    batch = TrainExample(
        prompts[1],
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(rng.standard_normal(len(tokens)), jnp.float32),
        ref_logprobs=jnp.asarray(-5.0 + rng.standard_normal(tokens.shape), jnp.float32),
    )
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    return graphdef, state, base


def test_lora_steps_change_only_adapters(trained):
    graphdef, state, base = trained
    assert set(flat_paths(state.trainable)) == {p for p in flat_paths(state.trainable) if ".lora_" in p}
    model = current_model(graphdef, state)
    params = host_params(nnx.state(model, nnx.Param))
    assert params.keys() == base.keys()
    for path, value in params.items():
        np.testing.assert_array_equal(value, base[path], err_msg=path)
    moved = {name for name, d in lora_targets(model) if np.any(np.asarray(d.lora_b[...]))}
    assert {name for name, _ in lora_targets(model) if name.startswith("text.layers.")} <= moved, moved
    assert all(not np.any(v) for v in host_params(state.reference).values())  # reference = adapters off = base


def test_lm_head_adapter_changes_the_logits(tiny_hf_dir, prompts, base_logits):
    """VLM-R1 adapts lm_head too, so a non-zero head adapter must show in the logits."""
    model = load_hf_model(tiny_hf_dir)
    apply_lora(model, RANK, ALPHA)
    head = model.text.lm_head
    head.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(0), head.lora_b.shape)
    logits = np.asarray(prompt_logits(*nnx.split(model), prompts[1]))
    assert np.abs(logits - base_logits).max() > 1e-3


def test_merge_lora_gives_the_adapted_logits(trained, prompts, base_logits):
    graphdef, state, _ = trained
    model = current_model(graphdef, state)
    adapted = np.asarray(prompt_logits(*nnx.split(model), prompts[1]))
    merge_lora(model)
    assert not flat_paths(nnx.state(model, LoRAParam))
    merged = np.asarray(prompt_logits(*nnx.split(model), prompts[1]))
    np.testing.assert_allclose(merged, adapted, atol=1e-5)
    assert np.abs(adapted - base_logits).max() > 1e-3  # the adapters did change the model


# ---------------------------------------------------------------- adapter dropout


def test_dense_adapter_dropout_is_inverted_dropout_on_the_adapter_input():
    dim, rate = 64, 0.25
    dense = Dense(dim, dim, (None, None), use_bias=False, rngs=nnx.Rngs(0))
    dense.kernel[...] = jnp.zeros((dim, dim))  # y = scale * drop(x) @ I @ I = drop(x)
    dense.lora_a = LoRAParam(jnp.eye(dim))
    dense.lora_b = LoRAParam(jnp.eye(dim))
    dense.lora_scale, dense.lora_dropout = 1.0, rate
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (32, 16, dim)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(dense(x)), np.asarray(x))  # no key: no dropout
    dense.lora_dropout_key = LoRADropoutKey(jax.random.key(0))
    y, xs = np.asarray(dense(x)), np.asarray(x)
    dropped = y == 0
    n = dropped.size
    assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n), dropped.mean()  # binomial, 4 sigma
    np.testing.assert_allclose(y[~dropped], xs[~dropped] / (1 - rate), rtol=1e-6)


def test_dropout_only_when_keys_are_set(tiny_hf_dir, trained, prompts):
    graphdef, state, _ = trained
    model_graphdef, model_state = nnx.split(current_model(graphdef, state))
    plain = np.asarray(prompt_logits(model_graphdef, model_state, prompts[1]))
    a = np.asarray(prompt_logits(model_graphdef, model_state, prompts[1], jax.random.key(1)))
    again = np.asarray(prompt_logits(model_graphdef, model_state, prompts[1], jax.random.key(1)))
    b = np.asarray(prompt_logits(model_graphdef, model_state, prompts[1], jax.random.key(2)))
    np.testing.assert_array_equal(a, again)  # deterministic given the key
    assert np.abs(a - plain).max() > 1e-6 and np.abs(a - b).max() > 1e-6
    # The key lives only on the merged object inside the call: the split model never holds one.
    assert all(d.lora_dropout_key is None for _, d in lora_targets(nnx.merge(model_graphdef, model_state)))


def test_bad_lora_settings_are_rejected(tiny_hf_dir):
    model = load_hf_model(tiny_hf_dir)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(model, RANK, ALPHA, dropout=1.0)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, 0, ALPHA)


def _lora_step_params(tiny_hf_dir, prompts, dropout: float, seed: int) -> dict[str, np.ndarray]:
    """Adapters after one GRPO step with adapter dropout `dropout` and step seed `seed`."""
    model = load_hf_model(tiny_hf_dir)
    apply_lora(model, RANK, ALPHA, dropout=dropout)
    tx, schedule = optimizer()
    graphdef, state = init_train_state(model, "lora", tx, with_reference=False)
    step = make_grpo_step(graphdef, GRPOConfig(num_generations=G, beta=0.0), tx, schedule, seed=seed)
    tokens, mask = completions(len(prompts[0].input_ids) * G)
    rng = np.random.default_rng(5)
    batch = TrainExample(
        prompts[1], jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(rng.standard_normal(len(tokens)), jnp.float32)
    )
    state, _ = step(state, batch)
    return host_params(state.trainable)


def test_train_step_dropout_is_deterministic_per_seed_and_off_at_rate_zero(tiny_hf_dir, prompts):
    same_a = _lora_step_params(tiny_hf_dir, prompts, DROPOUT, seed=3)
    same_b = _lora_step_params(tiny_hf_dir, prompts, DROPOUT, seed=3)
    other = _lora_step_params(tiny_hf_dir, prompts, DROPOUT, seed=4)
    plain = _lora_step_params(tiny_hf_dir, prompts, 0.0, seed=3)
    plain_other_seed = _lora_step_params(tiny_hf_dir, prompts, 0.0, seed=4)
    assert all(np.array_equal(same_a[k], same_b[k]) for k in same_a)
    assert any(not np.allclose(same_a[k], other[k], atol=1e-6) for k in same_a)  # the masks depend on the seed
    assert any(not np.allclose(same_a[k], plain[k], atol=1e-6) for k in same_a)  # dropout really applied
    assert all(np.array_equal(plain[k], plain_other_seed[k]) for k in plain)  # rate 0: the seed is irrelevant
