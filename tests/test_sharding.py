"""The tiny model sharded over an 8-device CPU mesh (data 2, fsdp 2, tensor 2) computes what one device computes.

Parameters are placed by the logical-axis rules (`vlmr1_jax.parallel.mesh`), both when loading an HF folder and
when initialising in place; the batch goes on `batch_sharding`; under `jax.set_mesh` activations and the KV cache
are pinned by the same rules. Also: the rule fallback (and its warning) and mesh-shape errors.
"""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers.qwen_parity import make_inputs
from vlmr1_jax.config import MeshConfig
from vlmr1_jax.models.hf_weights import load_hf_model, read_config
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.params import flat_paths
from vlmr1_jax.models.qwen2_5_vl.text import KVCache
from vlmr1_jax.parallel.mesh import batch_sharding, create_sharded, logical_to_spec, make_mesh

IMAGE_GRIDS = [(1, 8, 12), (1, 6, 10)]
VIDEO_GRIDS = [(2, 4, 6)]
# Large kernels and where the rules must put them (tiny config: text 64/96/160, vision 32/48, merger 128).
EXPECTED_SPECS = {
    "text.embed": P("tensor", "fsdp"),  # [vocab, embed]
    "text.layers.mlp.gate.kernel": P(None, "fsdp", "tensor"),  # [layers, embed, mlp]: layers never sharded
    "text.layers.mlp.down.kernel": P(None, "tensor", "fsdp"),  # [layers, mlp, embed]
    "text.layers.attn.q.kernel": P(None, "fsdp", "tensor"),  # [layers, embed, heads]
    "text.lm_head.kernel": P("fsdp", "tensor"),  # [embed, vocab]
    "visual.blocks.attn.qkv.kernel": P(None, "fsdp", "tensor"),  # [layers, vision_embed, vision_heads]
    "visual.blocks.mlp.up.kernel": P(None, "fsdp", "tensor"),
    "visual.merger.fc1.kernel": P("fsdp", "tensor"),  # [vision_merge, vision_mlp]
}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def batch(tiny_hf_dir):
    """A left-padded batch of 4 rows (divisible by data x fsdp) with two images and a video."""
    model_cfg = read_config(tiny_hf_dir)
    b = make_inputs(model_cfg, IMAGE_GRIDS, VIDEO_GRIDS, [1.0], batch=4, steps=1).batch
    text = {
        "input_ids": b.input_ids,
        "positions": b.positions,
        "attention_mask": b.attention_mask,
        "gather": b.vision_gather,
    }
    return b.vision, text


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, vision, text):
    model = nnx.merge(graphdef, state)
    feats = model.encode_vision(vision)
    hidden, _ = model(text["input_ids"], text["positions"], text["attention_mask"], feats, text["gather"])
    return feats, model.logits(hidden)


@partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, vision, text, cache_size):
    """Vision + cached prefill, returning the cache (its sharding shows whether the constraints applied)."""
    model = nnx.merge(graphdef, state)
    feats = model.encode_vision(vision)
    cache = KVCache.empty(model.cfg.text, text["input_ids"].shape[0], cache_size, model.text.dtype)
    hidden, cache = model(text["input_ids"], text["positions"], text["attention_mask"], feats, text["gather"], cache)
    return model.logits(hidden), cache


def forward(model, batch, mesh=None):
    """(merged vision features in placeholder order, prompt logits); inputs sharded over `mesh` when given."""
    vision, text = batch
    if mesh is not None:  # batch axis of every array: rows of the patch layout, axis 1 of the [3, B, L] positions
        vision = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in vision.items()}
        text = {
            k: jax.device_put(v, batch_sharding(mesh, v.ndim, 1 if k == "positions" else 0)) for k, v in text.items()
        }
    feats, logits = _forward(*nnx.split(model), vision, text)
    gather = batch[1]["gather"]
    return np.asarray(feats)[gather[gather >= 0]], np.asarray(logits)


def assert_forward_equal(sharded, single, batch, mesh) -> float:
    """Sharded vs single-device vision features and valid-token logits to 1e-5; returns the logit scale."""
    valid = batch[1]["attention_mask"].astype(bool)
    feats_a, logits_a = forward(sharded, batch, mesh)
    feats_b, logits_b = forward(single, batch)
    np.testing.assert_allclose(feats_a, feats_b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits_a[valid], logits_b[valid], atol=1e-5, rtol=0)
    return float(np.abs(logits_b[valid]).max())


def assert_sharded_by_rules(model):
    leaves = flat_paths(nnx.state(model))
    for path, spec in EXPECTED_SPECS.items():
        value = leaves[path][...]
        assert value.sharding.spec == spec, path
        assert len(value.sharding.device_set) == 8, path
        shard_bytes = {s.data.nbytes for s in value.addressable_shards}
        assert shard_bytes == {value.nbytes // 4}, path  # split over fsdp x tensor, replicated over data
    total = sum(v[...].nbytes for v in leaves.values())
    device = jax.devices()[0]
    held = sum(s.data.nbytes for v in leaves.values() for s in v[...].addressable_shards if s.device == device)
    assert held < total / 3, (held, total)


def test_loaded_sharded_model_matches_single_device(tiny_hf_dir, mesh, batch):
    sharded = load_hf_model(tiny_hf_dir, mesh=mesh)
    assert_sharded_by_rules(sharded)
    assert assert_forward_equal(sharded, load_hf_model(tiny_hf_dir), batch, mesh) > 0.1  # not vacuous


def test_create_sharded_model_matches_single_device(tiny_hf_dir, mesh, batch):
    cfg = read_config(tiny_hf_dir)
    # The same dtypes as `load_hf_model`, so the forward reuses the programs compiled above.
    sharded = create_sharded(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=np.float32, param_dtype=np.float32), mesh)
    assert_sharded_by_rules(sharded)
    graphdef, state = nnx.split(sharded)
    single = nnx.merge(graphdef, jax.device_put(jax.device_get(state)))
    assert all(len(v[...].sharding.device_set) == 1 for v in flat_paths(nnx.state(single)).values())
    assert_forward_equal(sharded, single, batch, mesh)


def test_logical_to_spec_rules_and_fallback(mesh):
    assert logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (64, 95), mesh) == P("fsdp", None)  # 95 % 2: replicated
    assert logical_to_spec(("vocab", "embed"), (151, 64), mesh) == P(None, "fsdp")
    assert logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch",), (6,), mesh) == P(None)  # 6 % (2*2): whole axis replicated
    assert logical_to_spec(("embed", "vision_embed"), (4, 4), mesh) == P("fsdp", None)  # a mesh axis is used once
    assert logical_to_spec((None, "no_such_axis", "lora_rank"), (4, 4, 4), mesh) == P(None, None, None)
    flat = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    assert logical_to_spec(("batch", "mlp"), (8, 8), flat) == P("fsdp", None)  # size-1 mesh axes are skipped


def test_batch_sharding(mesh):
    assert batch_sharding(mesh, 3, batch_axis=1).spec == P(None, ("data", "fsdp"), None)
    assert batch_sharding(make_mesh(MeshConfig(data=1, fsdp=1, tensor=8)), 2).spec == P(None, None)
    x = jax.device_put(jnp.arange(8 * 3).reshape(8, 3), batch_sharding(mesh, 2))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}


def test_make_mesh_shapes_and_errors():
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(MeshConfig(data=2, fsdp=2), devices=jax.devices()[:4]).shape) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 1,
    }
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="8 devices do not divide"):
        make_mesh(MeshConfig(data=3, fsdp=-1))
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))


def shard_inputs(batch, mesh):
    vision, text = batch
    vision = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in vision.items()}
    text = {k: jax.device_put(v, batch_sharding(mesh, v.ndim, 1 if k == "positions" else 0)) for k, v in text.items()}
    return vision, text


def test_activation_and_cache_constraints_match_single_device(tiny_hf_dir, mesh, batch):
    """Under `jax.set_mesh` the cache comes out laid out by the rules (rows over data x fsdp, KV heads over
    tensor) and the logits and cache equal the single-device ones."""
    sharded = load_hf_model(tiny_hf_dir, mesh=mesh)
    vision, text = shard_inputs(batch, mesh)
    with jax.set_mesh(mesh):
        logits, cache = _prefill(*nnx.split(sharded), vision, text, 40)
    layout = lambda x, *spec: x.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), x.ndim)
    assert layout(cache.k, None, ("data", "fsdp"), None, "tensor", None), cache.k.sharding
    assert layout(logits, ("data", "fsdp"), None, "tensor"), logits.sharding
    single = load_hf_model(tiny_hf_dir)
    logits_1, cache_1 = _prefill(*nnx.split(single), batch[0], batch[1], 40)
    valid = batch[1]["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(logits_1)[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(cache_1.k), atol=1e-5, rtol=0)


def test_cache_bytes_per_device_fall_as_fsdp_grows(tiny_hf_dir, batch):
    """XLA's own accounting of the compiled prefill: the per-device output (logits + KV cache) shrinks with
    the fsdp size, because the cache rows are sharded, not replicated."""
    sizes = {}
    for fsdp in (1, 2, 4):
        mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=1), devices=jax.devices()[:fsdp])
        model = load_hf_model(tiny_hf_dir, mesh=mesh)
        vision, text = shard_inputs(batch, mesh)
        with jax.set_mesh(mesh):
            compiled = _prefill.lower(*nnx.split(model), vision, text, 256).compile()
        sizes[fsdp] = compiled.memory_analysis().output_size_in_bytes
    assert sizes[1] > 1.8 * sizes[2] > 1.8 * 1.8 * sizes[4], sizes


def test_replication_fallback_warns_once(mesh, caplog):
    with caplog.at_level(logging.WARNING, logger="vlmr1_jax.parallel.mesh"):
        assert logical_to_spec(("kv_heads",), (7,), mesh) == P(None)
        assert logical_to_spec(("kv_heads",), (7,), mesh) == P(None)
    warnings = [r.getMessage() for r in caplog.records if "'kv_heads' of size 7" in r.getMessage()]
    assert len(warnings) == 1 and "replicated" in warnings[0], warnings
