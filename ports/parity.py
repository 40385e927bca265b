"""`vlmr1 check-parity`: run an HF Qwen2.5-VL folder through transformers and through our JAX port, same inputs.

Compares merged vision features, prompt logits on valid tokens, and each cached decode step's logits; transformers
runs in float32, our side in float32 (or --dtype bfloat16). Both sides get identical pixel values (random, so no
image backend differences) and identical 3-D position ids (ours, in transformers' semantics).

Each compared tensor passes when max|ours - ref| <= atol + rtol * max|ref|: the tolerance scales with the
tensor's magnitude (vision activations of real checkpoints reach the thousands, logits tens). float32 ports agree
to a relative 1e-6..1e-5; a real bug (a wrong rope section, a missing bias, a perturbed weight) shows at 1e-3..1.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # a stray torch-npu must not break `import torch`

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmr1_jax.extras import require_torch_extra
from vlmr1_jax.models.hf_weights import load_hf_model, read_config
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlmr1_jax.models.qwen2_5_vl.rope import get_rope_index
from vlmr1_jax.models.qwen2_5_vl.text import KVCache
from vlmr1_jax.models.qwen2_5_vl.vision_plan import VisionPlan, plan_vision, vision_gather_indices

RTOL = 1e-4  # 10-100x above float32 rounding at real widths, 10x below the smallest bug in tests/test_parity.py
ATOL = 1e-6  # only matters for a reference that is (nearly) all zeros


@dataclasses.dataclass
class ParityInputs:
    """One left-padded multimodal batch, in the processor's conventions."""

    input_ids: np.ndarray  # [B, L]
    attention_mask: np.ndarray  # [B, L]
    image_pixels: np.ndarray  # [sum t*h*w, patch_dim]
    image_grids: list[tuple[int, int, int]]
    video_pixels: np.ndarray
    video_grids: list[tuple[int, int, int]]
    second_per_grid_ts: list[float]
    decode_tokens: np.ndarray  # [B, steps] tokens fed during the cached decode steps


@dataclasses.dataclass(frozen=True)
class Diff:
    """One compared tensor: the largest absolute difference and the reference's scale max|ref|."""

    name: str
    max_diff: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_diff / self.scale if self.scale else (0.0 if self.max_diff == 0 else math.inf)

    def passed(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        return self.max_diff <= atol + rtol * self.scale

    def line(self, rtol: float = RTOL, atol: float = ATOL) -> str:
        verdict = "ok" if self.passed(rtol, atol) else "FAIL"
        return (
            f"{self.name:<16} max|diff| {self.max_diff:.3e}  max|ref| {self.scale:.3e}  "
            f"relative {self.relative:.2e}  limit {atol + rtol * self.scale:.3e}  {verdict}"
        )

    @classmethod
    def of(cls, name: str, ours: np.ndarray, ref: np.ndarray) -> Diff:
        if ours.shape != ref.shape:
            raise ValueError(f"{name}: our shape {ours.shape} != reference shape {ref.shape}")
        diff = np.abs(ours - ref)  # NaN anywhere makes max_diff NaN, which fails every rule
        return cls(name, float(diff.max(initial=0.0)), float(np.abs(ref).max(initial=0.0)))


@dataclasses.dataclass
class ParityReport:
    """Per-tensor differences of one parity run; passes when every compared tensor does."""

    vision: Diff | None  # None without images or videos
    logits: Diff
    decode: list[Diff]

    @property
    def diffs(self) -> list[Diff]:
        return [d for d in (self.vision, self.logits, *self.decode) if d is not None]

    def passed(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        return all(d.passed(rtol, atol) for d in self.diffs)

    @property
    def worst_relative(self) -> float:
        return max(d.relative for d in self.diffs)


Outputs = tuple[np.ndarray, np.ndarray, list[np.ndarray]]  # (vision features, prompt logits, decode-step logits)


def make_inputs(
    cfg: Qwen25VLConfig,
    image_grids: Sequence[tuple[int, int, int]],
    video_grids: Sequence[tuple[int, int, int]] = (),
    second_per_grid_ts: Sequence[float] = (),
    batch: int = 2,
    steps: int = 4,
    seed: int = 0,
) -> ParityInputs:
    """Random text around the vision items; items go to rows round-robin; shorter rows are left-padded."""
    rng = np.random.default_rng(seed)
    specials = (
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
        cfg.vision_token_id,
        cfg.bos_token_id,
        cfg.eos_token_id,
    )
    plain = np.setdiff1d(np.arange(min(cfg.text.vocab_size, 151643)), specials)  # ordinary text tokens
    text = lambda n: list(rng.choice(plain, n))
    unit = cfg.vision.merge_unit
    rows: list[list[int]] = [text(3 + b) for b in range(batch)]
    items = [(cfg.image_token_id, g) for g in image_grids] + [(cfg.video_token_id, g) for g in video_grids]
    # Images must be consumed in processor order: row 0's items first, so assign images row-major.
    per_row: list[list[tuple[int, tuple[int, int, int]]]] = [[] for _ in range(batch)]
    for i, item in enumerate(items):
        per_row[i % batch].append(item)
    image_order: list[tuple[int, int, int]] = []
    video_order: list[tuple[int, int, int]] = []
    for b in range(batch):
        for token, grid in per_row[b]:
            n = int(np.prod(grid)) // unit
            rows[b] += [cfg.vision_start_token_id] + [token] * n + [cfg.vision_end_token_id] + text(2 + b)
            (image_order if token == cfg.image_token_id else video_order).append(grid)
    length = max(map(len, rows)) + 1
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    spg = [float(s) for s in second_per_grid_ts] or [1.0] * len(video_grids)
    spg_order = [spg[list(video_grids).index(g)] for g in video_order] if video_grids else []
    pixels = lambda grids: rng.standard_normal((sum(int(np.prod(g)) for g in grids), cfg.vision.patch_dim)).astype(
        np.float32
    )
    return ParityInputs(
        ids,
        mask,
        pixels(image_order),
        image_order,
        pixels(video_order),
        video_order,
        spg_order,
        rng.choice(plain, (batch, steps)),
    )


def positions_for(cfg: Qwen25VLConfig, inputs: ParityInputs) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE position ids [3, B, L] and per-row decode offsets, fed identically to both sides."""
    return get_rope_index(
        inputs.input_ids,
        inputs.attention_mask,
        inputs.image_grids,
        inputs.video_grids,
        inputs.second_per_grid_ts,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size,
        tokens_per_second=cfg.vision.tokens_per_second,
    )


def vision_layout(
    cfg: Qwen25VLConfig, input_ids: np.ndarray, pixels: np.ndarray, grids: list, num_images: int
) -> tuple[VisionPlan, np.ndarray]:
    """The vision tower's padded window plan of `pixels` (images, then videos) and each prompt token's row of its
    output (`vision_gather`)."""
    plan = plan_vision(
        pixels, grids, spatial_merge_size=cfg.vision.spatial_merge_size, window_merged=cfg.vision.window_merged
    )
    gather = vision_gather_indices(
        input_ids,
        plan,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        num_image_items=num_images,
    )
    return plan, gather


def run_jax(model_dir: str, inputs: ParityInputs, dtype: jnp.dtype = jnp.float32) -> Outputs:
    """Our side, computing in `dtype` (float32 parameters): (merged vision features in processor order, prompt
    logits, decode-step logits), all as float32."""
    model = load_hf_model(model_dir, dtype=dtype)
    cfg = model.cfg
    positions, deltas = positions_for(cfg, inputs)
    grids = inputs.image_grids + inputs.video_grids
    pixels = np.concatenate([inputs.image_pixels, inputs.video_pixels])
    plan, gather = vision_layout(cfg, inputs.input_ids, pixels, grids, len(inputs.image_grids))
    # Parameters go in as arguments: closed over, XLA would fold them as constants (>20 GB at the 3B's widths).
    graphdef, state = nnx.split(model)
    feats = jax.jit(lambda state, kw: nnx.merge(graphdef, state).encode_vision(kw))(
        state, {k: jnp.asarray(v) for k, v in plan.device_inputs().items()}
    )
    batch, length = inputs.input_ids.shape
    steps = inputs.decode_tokens.shape[1]
    cache = KVCache.empty(cfg.text, batch, length + steps, dtype)

    @jax.jit
    def step(state, ids, pos, mask, gather, feats, cache):
        model = nnx.merge(graphdef, state)
        hidden, cache = model(ids, pos, mask, feats, gather, cache)
        return model.logits(hidden), cache

    logits, cache = step(
        state,
        jnp.asarray(inputs.input_ids),
        jnp.asarray(positions),
        jnp.asarray(inputs.attention_mask),
        jnp.asarray(gather),
        feats,
        cache,
    )
    decode = []
    next_pos = inputs.attention_mask.sum(1) + deltas
    for s in range(steps):
        pos = np.broadcast_to((next_pos + s)[None, :, None], (3, batch, 1))
        out, cache = step(
            state,
            jnp.asarray(inputs.decode_tokens[:, s : s + 1]),
            jnp.asarray(pos),
            jnp.ones((batch, 1), jnp.int32),
            jnp.full((batch, 1), -1, jnp.int32),
            feats,
            cache,
        )
        decode.append(np.asarray(out[:, 0], np.float32))
    return np.asarray(feats, np.float32)[plan.merged_index], np.asarray(logits, np.float32), decode


def run_hf(model_dir: str, inputs: ParityInputs) -> Outputs:
    """transformers' side, in float32 eager attention, with our position ids passed explicitly."""
    require_torch_extra("check-parity")
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = read_config(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    positions, deltas = positions_for(cfg, inputs)
    t = torch.from_numpy
    kwargs: dict[str, Any] = {}
    feats = []
    with torch.no_grad():
        if inputs.image_grids:
            kwargs.update(pixel_values=t(inputs.image_pixels), image_grid_thw=torch.tensor(inputs.image_grids))
            feats += list(
                model.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"]).pooler_output
            )
        if inputs.video_grids:
            kwargs.update(
                pixel_values_videos=t(inputs.video_pixels),
                video_grid_thw=torch.tensor(inputs.video_grids),
                second_per_grid_ts=torch.tensor(inputs.second_per_grid_ts),
            )
            feats += list(
                model.model.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"]).pooler_output
            )
        mask = t(inputs.attention_mask)
        out = model(
            input_ids=t(inputs.input_ids), attention_mask=mask, position_ids=t(positions), use_cache=True, **kwargs
        )
        logits, past = out.logits.float().numpy(), out.past_key_values
        decode = []
        batch = inputs.input_ids.shape[0]
        next_pos = inputs.attention_mask.sum(1) + deltas
        for s in range(inputs.decode_tokens.shape[1]):
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
            pos = torch.from_numpy(np.ascontiguousarray(np.broadcast_to((next_pos + s)[None, :, None], (3, batch, 1))))
            out = model(
                input_ids=t(inputs.decode_tokens[:, s : s + 1]),
                attention_mask=mask,
                position_ids=pos,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            decode.append(out.logits[:, -1].float().numpy())
    vision = torch.cat(feats).float().numpy() if feats else np.zeros((0, cfg.text.hidden_size), np.float32)
    return vision, logits, decode


def compare(model_dir: str, inputs: ParityInputs, dtype: jnp.dtype = jnp.float32) -> ParityReport:
    """Run our side (computing in `dtype`) and transformers' (float32) on `inputs` and compare them."""
    return diff_report(inputs, run_jax(model_dir, inputs, dtype), run_hf(model_dir, inputs))


def diff_report(inputs: ParityInputs, ours: Outputs, ref: Outputs) -> ParityReport:
    """Differences of each compared tensor; prompt logits on valid (non-pad) positions only."""
    (ours_v, ours_l, ours_d), (hf_v, hf_l, hf_d) = ours, ref
    valid = inputs.attention_mask.astype(bool)  # pad query rows are garbage on both sides
    return ParityReport(
        vision=Diff.of("vision features", ours_v, hf_v) if hf_v.size else None,
        logits=Diff.of("prompt logits", ours_l[valid], hf_l[valid]),
        decode=[Diff.of(f"decode step {i}", a, b) for i, (a, b) in enumerate(zip(ours_d, hf_d))],
    )
