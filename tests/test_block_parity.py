"""Each block of our Qwen2.5-VL against the same transformers module, one block at a time: RMSNorm, the gated MLPs,
text attention with M-RoPE (whole sequence and KV-cached decode), the vision block (window and full attention), the
patch merger, and the rope tables (text M-RoPE, vision 2-D).

The transformers modules are built from TINY_CONFIG with every weight redrawn at random; ours get the same tensors,
copied here (not through converters.hf), so a mismatch points at the block itself. float32 on both sides unless a
test says otherwise. The whole model is compared in test_parity, blocked attention against the formula in
test_attention_blocks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen

from tests.helpers.hf_models import TINY_CONFIG, redraw
from vlmr1_jax.models.layers import Dense, GatedMLP, RMSNorm
from vlmr1_jax.models.qwen2_5_vl.config import from_hf_config
from vlmr1_jax.models.qwen2_5_vl.rope import inv_frequencies, mrope_cos_sin, vision_cos_sin
from vlmr1_jax.models.qwen2_5_vl.text import TextAttention
from vlmr1_jax.models.qwen2_5_vl.vision import PatchMerger, VisionBlock

CFG = from_hf_config(TINY_CONFIG)
# Tolerances (max |ours - HF|, absolute): float32 rounding of the same operations in another order. Outputs are
# O(1) (checked per test), so each bound is ~100x float32 resolution at that scale; a wrong weight layout, bias, eps,
# rope section or mask moves the outputs by 1e-2 or more.
ATOL = {"norm": 1e-5, "mlp": 1e-5, "rope": 1e-5, "attention": 2e-5, "vision block": 2e-5, "merger": 2e-5}


@pytest.fixture(scope="module")
def hf_config() -> Qwen2_5_VLConfig:
    config = Qwen2_5_VLConfig(**TINY_CONFIG)
    for section in (config.text_config, config.vision_config):
        section._attn_implementation = "eager"  # transformers' reference attention
    return config


def hf_random(make, seed: int) -> torch.nn.Module:
    """A transformers module from `make()`, float32, every parameter redrawn (seeded)."""
    torch.manual_seed(seed)
    module = make().float().eval()
    redraw(module)
    return module


def tensor(module_param: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(module_param.detach().numpy())


def copy_linear(dense: Dense, linear: torch.nn.Linear) -> None:
    """Our kernel is [in, out]: torch's weight transposed."""
    dense.kernel[...] = tensor(linear.weight).T
    assert (dense.bias is None) == (linear.bias is None)
    if linear.bias is not None:
        dense.bias[...] = tensor(linear.bias)


def copy_mlp(mlp: GatedMLP, hf_mlp: torch.nn.Module) -> None:
    for ours, theirs in ((mlp.gate, hf_mlp.gate_proj), (mlp.up, hf_mlp.up_proj), (mlp.down, hf_mlp.down_proj)):
        copy_linear(ours, theirs)


def copy_norm(norm: RMSNorm, hf_norm: torch.nn.Module) -> None:
    norm.scale[...] = tensor(hf_norm.weight).astype(norm.scale[...].dtype)


def assert_close(ours, reference: torch.Tensor | np.ndarray, atol: float, name: str) -> float:
    """max |ours - reference| <= atol on an output that is not vacuous (scale > 0.1); returns the error."""
    ref = reference.detach().float().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    ours = np.asarray(jnp.asarray(ours, jnp.float32))
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    error = float(np.abs(ours - ref).max())
    print(f"{name}: max |ours - hf| = {error:.2e} at output scale {np.abs(ref).max():.2f}")
    assert np.abs(ref).max() > 0.1, f"{name}: the reference output is ~0, the comparison proves nothing"
    assert error <= atol, f"{name}: max |ours - hf| = {error:.3e} > {atol:.0e}"
    return error


def rngs() -> nnx.Rngs:
    return nnx.Rngs(0)


# ---------------------------------------------------------------- RMSNorm and the gated MLPs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_matches_hf(dtype):
    """bfloat16: weights and input in bf16 on both sides (fp32 statistics, bf16 product); equal up to one bf16
    rounding of the O(1) output (2^-8 relative, so atol 2^-8 * scale)."""
    hf = hf_random(lambda: hf_qwen.Qwen2_5_VLRMSNorm(CFG.text.hidden_size, eps=CFG.text.rms_norm_eps), seed=0)
    ours = RMSNorm(CFG.text.hidden_size, CFG.text.rms_norm_eps, None, param_dtype=jnp.dtype(dtype))
    copy_norm(ours, hf)  # float32 weights rounded to `dtype` here, by torch's .to(dtype) there
    hf = hf.to(getattr(torch, dtype))
    x = (3.0 * np.random.default_rng(0).standard_normal((2, 7, CFG.text.hidden_size)) + 0.5).astype(np.float32)
    x[0, :3] *= 1e-3  # mean square ~1e-5: there eps (1e-6) changes the output visibly, so a wrong eps is caught
    x_hf = torch.from_numpy(x).to(getattr(torch, dtype))
    with torch.no_grad():
        expected = hf(x_hf)
    out = ours(jnp.asarray(x, dtype))
    assert out.dtype == jnp.dtype(dtype)
    scale = float(expected.abs().max())
    assert_close(out, expected, ATOL["norm"] if dtype == "float32" else 2**-8 * scale, f"RMSNorm {dtype}")


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_gated_mlp_matches_hf(tower, hf_config):
    """Text: Qwen2MLP (no biases); vision: Qwen2_5_VLMLP (biases)."""
    if tower == "text":
        hf = hf_random(lambda: hf_qwen.Qwen2MLP(hf_config.text_config), seed=1)
        c = CFG.text
        ours = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, "embed", "mlp", use_bias=False, rngs=rngs())
    else:
        hf = hf_random(lambda: hf_qwen.Qwen2_5_VLMLP(hf_config.vision_config, bias=True), seed=2)
        c = CFG.vision
        ours = GatedMLP(
            c.hidden_size, c.intermediate_size, c.hidden_act, "vision_embed", "vision_mlp", use_bias=True, rngs=rngs()
        )
    copy_mlp(ours, hf)
    x = 4 * np.random.default_rng(1).standard_normal((3, 5, c.hidden_size)).astype(np.float32)  # O(1) outputs
    with torch.no_grad():
        expected = hf(torch.from_numpy(x))
    assert_close(ours(jnp.asarray(x)), expected, ATOL["mlp"], f"{tower} MLP")


# ---------------------------------------------------------------- rope tables


def test_text_mrope_tables_match_hf(hf_config):
    """Sectioned M-RoPE cos / sin for positions that differ per axis (T, H, W), as image tokens have."""
    hf = hf_qwen.Qwen2_5_VLRotaryEmbedding(hf_config.text_config)
    inv_freq = inv_frequencies(CFG.text.head_dim, CFG.text.rope_theta)
    np.testing.assert_array_equal(inv_freq, hf.inv_freq.numpy())  # same float32 operations, bit for bit
    positions = np.random.default_rng(2).integers(0, 3000, (3, 2, 11))
    with torch.no_grad():
        cos, sin = hf(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
    ours_cos, ours_sin = mrope_cos_sin(jnp.asarray(positions), inv_freq, CFG.text.mrope_section, jnp.float32)
    assert_close(ours_cos, cos, ATOL["rope"], "text M-RoPE cos")
    assert_close(ours_sin, sin, ATOL["rope"], "text M-RoPE sin")


def test_vision_rope_tables_match_hf(hf_config):
    """2-D rope over a 6 x 10 patch grid: [row frequencies | column frequencies], repeated for rotate_half."""
    hf = hf_qwen.Qwen2_5_VLVisionRotaryEmbedding(hf_config.vision_config)
    inv_freq = inv_frequencies(CFG.vision.head_dim // 2, CFG.vision.rope_theta)
    np.testing.assert_array_equal(inv_freq, hf.inv_freq.numpy())
    hw = np.stack(np.meshgrid(np.arange(6), np.arange(10), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        cos, sin = hf(torch.zeros(1), torch.from_numpy(hw))
    ours_cos, ours_sin = vision_cos_sin(jnp.asarray(hw), inv_freq)
    assert_close(ours_cos, cos, ATOL["rope"], "vision rope cos")
    assert_close(ours_sin, sin, ATOL["rope"], "vision rope sin")


# ---------------------------------------------------------------- text attention (GQA, M-RoPE, left padding)

BATCH, LENGTH, PAD_ROWS = 2, 9, 3  # row 1 is left-padded by PAD_ROWS


@pytest.fixture(scope="module")
def text_attention(hf_config):
    """(HF attention, ours with the same weights, inputs, per-axis positions, valid mask, HF output)."""
    hf = hf_random(lambda: hf_qwen.Qwen2_5_VLAttention(hf_config.text_config, layer_idx=0), seed=3)
    ours = TextAttention(CFG.text, rngs=rngs(), dtype=jnp.float32, param_dtype=jnp.float32)
    for mine, theirs in ((ours.q, hf.q_proj), (ours.k, hf.k_proj), (ours.v, hf.v_proj), (ours.o, hf.o_proj)):
        copy_linear(mine, theirs)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((BATCH, LENGTH, CFG.text.hidden_size)).astype(np.float32)
    positions = rng.integers(0, 60, (3, BATCH, LENGTH))  # T, H, W differ, so every rope section matters
    valid = np.ones((BATCH, LENGTH), bool)
    valid[1, :PAD_ROWS] = False
    mask = np.tril(np.ones((LENGTH, LENGTH), bool))[None] & valid[:, None, :]
    rotary = hf_qwen.Qwen2_5_VLRotaryEmbedding(hf_config.text_config)
    x_hf = torch.from_numpy(x)
    with torch.no_grad():
        cos, sin = rotary(x_hf, torch.from_numpy(positions))
        additive = torch.where(torch.from_numpy(mask), 0.0, torch.finfo(torch.float32).min)[:, None]
        expected, _ = hf(x_hf, attention_mask=additive, position_embeddings=(cos, sin))
    return ours, x, positions, valid, mask, expected.numpy()


def our_rope(positions: np.ndarray):
    return mrope_cos_sin(
        jnp.asarray(positions),
        inv_frequencies(CFG.text.head_dim, CFG.text.rope_theta),
        CFG.text.mrope_section,
        jnp.float32,
    )


def test_text_attention_matches_hf(text_attention):
    """Whole sequence, causal, one left-padded row (pad queries are compared nowhere: both sides mask them)."""
    ours, x, positions, valid, mask, expected = text_attention
    cos, sin = our_rope(positions)
    out, _ = ours(jnp.asarray(x), cos, sin, jnp.asarray(mask), None)
    assert_close(np.asarray(out)[valid], expected[valid], ATOL["attention"], "text attention")


def test_cached_text_attention_matches_hf(text_attention):
    """Prefill LENGTH - 2 tokens into an empty KV cache, then decode the last 2 from it: the outputs equal HF's on
    the whole sequence (keys are cached after rotation, each token's own M-RoPE position)."""
    ours, x, positions, valid, mask, expected = text_attention
    cos, sin = our_rope(positions)
    shape = (BATCH, LENGTH, CFG.text.num_key_value_heads, CFG.text.head_dim)
    cache = (jnp.zeros(shape), jnp.zeros(shape), 0)
    outputs = []
    for rows in (slice(0, LENGTH - 2), slice(LENGTH - 2, LENGTH)):
        out, (k, v) = ours(jnp.asarray(x[:, rows]), cos[:, rows], sin[:, rows], jnp.asarray(mask[:, rows]), cache)
        cache = (k, v, rows.stop)
        outputs.append(np.asarray(out))
    assert_close(np.concatenate(outputs, 1)[valid], expected[valid], ATOL["attention"], "cached text attention")


# ---------------------------------------------------------------- vision block and patch merger

# Attention groups as transformers sees them (cu_seqlens): windows of at most 16 patches, one padded (12) and one
# short (8); full attention over two images of 36 and 16 patches.
GROUPS = {"window": [16, 12, 16, 8], "full": [36, 16]}


def padded_groups(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Our layout of the same groups: slot indices [G, S] (N = the padding row) and the [G, S, S] mask."""
    n, slots = sum(lengths), max(lengths)
    blocks = np.full((len(lengths), slots), n)
    starts = np.cumsum([0, *lengths[:-1]])
    for g, (start, length) in enumerate(zip(starts, lengths)):
        blocks[g, :length] = np.arange(start, start + length)
    ok = blocks < n
    return blocks, ok[:, :, None] & ok[:, None, :]


@pytest.mark.parametrize("attention", GROUPS)
def test_vision_block_matches_hf(attention, hf_config):
    """One vision block (norms, 2-D rope in float32, attention inside each group, biased MLP)."""
    hf = hf_random(lambda: hf_qwen.Qwen2_5_VLVisionBlock(hf_config.vision_config), seed=4)
    ours = VisionBlock(CFG.vision, rngs=rngs(), dtype=jnp.float32, param_dtype=jnp.float32)
    copy_norm(ours.norm1, hf.norm1)
    copy_norm(ours.norm2, hf.norm2)
    copy_linear(ours.attn.qkv, hf.attn.qkv)
    copy_linear(ours.attn.proj, hf.attn.proj)
    copy_mlp(ours.mlp, hf.mlp)
    lengths = GROUPS[attention]
    n = sum(lengths)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, CFG.vision.hidden_size)).astype(np.float32)
    hw = rng.integers(0, 40, (n, 2))
    rotary = hf_qwen.Qwen2_5_VLVisionRotaryEmbedding(hf_config.vision_config)
    with torch.no_grad():
        position_embeddings = rotary(torch.zeros(1), torch.from_numpy(hw))
        cu_seqlens = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
        expected = hf(torch.from_numpy(x), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
    cos, sin = vision_cos_sin(jnp.asarray(hw), inv_frequencies(CFG.vision.head_dim // 2, CFG.vision.rope_theta))
    blocks, mask = padded_groups(lengths)
    out = ours(jnp.asarray(x), cos, sin, jnp.asarray(blocks), jnp.asarray(mask))
    assert_close(out, expected, ATOL["vision block"], f"vision block ({attention} attention)")


def test_patch_merger_matches_hf():
    """RMSNorm, 2 x 2 neighbouring patches concatenated, Linear, exact GELU, Linear to the text width."""
    v = CFG.vision
    hf = hf_random(
        lambda: hf_qwen.Qwen2_5_VLPatchMerger(v.out_hidden_size, v.hidden_size, v.spatial_merge_size), seed=5
    )
    ours = PatchMerger(v, rngs=rngs(), dtype=jnp.float32, param_dtype=jnp.float32)
    copy_norm(ours.ln_q, hf.ln_q)
    copy_linear(ours.fc1, hf.mlp[0])
    copy_linear(ours.fc2, hf.mlp[2])
    x = np.random.default_rng(5).standard_normal((6 * v.merge_unit, v.hidden_size)).astype(np.float32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(x))
    assert_close(ours(jnp.asarray(x)), expected, ATOL["merger"], "patch merger")
