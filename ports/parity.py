"""`vlmr1 check-parity`: run an HF Qwen2.5-VL folder through transformers and through our JAX port, same inputs.

Compares merged vision features, prompt logits on valid tokens, and cached decode steps, in float32. Both sides get
identical pixel values (random, so no image backend differences) and identical 3-D position ids (ours, reference
semantics: QWEN25VL-PORT.md pitfall 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # a stray torch-npu must not break `import torch`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from converters.hf import load_hf_model  # noqa: E402
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig  # noqa: E402
from vlmr1_jax.models.qwen2_5_vl.rope import get_rope_index  # noqa: E402
from vlmr1_jax.models.qwen2_5_vl.text import KVCache  # noqa: E402
from vlmr1_jax.processing.image import smart_resize  # noqa: E402
from vlmr1_jax.processing.vision_plan import plan_vision, vision_gather_indices  # noqa: E402


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


@dataclasses.dataclass
class ParityReport:
    vision: float
    logits: float
    decode: list[float]
    logit_scale: float

    def passed(self, vision_tol: float, logits_tol: float) -> bool:
        return self.vision <= vision_tol and self.logits <= logits_tol and max(self.decode, default=0) <= logits_tol


def make_inputs(cfg: Qwen25VLConfig, image_grids: Sequence[tuple[int, int, int]],
                video_grids: Sequence[tuple[int, int, int]] = (), second_per_grid_ts: Sequence[float] = (),
                batch: int = 2, steps: int = 4, seed: int = 0) -> ParityInputs:
    """Random text around the vision items; items go to rows round-robin; shorter rows are left-padded."""
    rng = np.random.default_rng(seed)
    specials = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
                cfg.vision_token_id, cfg.bos_token_id, cfg.eos_token_id)
    plain = np.setdiff1d(np.arange(min(cfg.text.vocab_size, 151643)), specials)  # ordinary text tokens
    text = lambda n: list(rng.choice(plain, n))  # noqa: E731
    unit = cfg.vision.merge_unit
    rows: list[list[int]] = [text(3 + b) for b in range(batch)]
    items = [(cfg.image_token_id, g) for g in image_grids] + [(cfg.video_token_id, g) for g in video_grids]
    # Images must be consumed in processor order: row 0's items first, so assign images row-major.
    per_row: list[list[tuple[int, tuple[int, int, int]]]] = [[] for _ in range(batch)]
    for i, item in enumerate(items):
        per_row[i % batch].append(item)
    image_order, video_order = [], []
    for b in range(batch):
        for token, grid in per_row[b]:
            n = int(np.prod(grid)) // unit
            rows[b] += [cfg.vision_start_token_id] + [token] * n + [cfg.vision_end_token_id] + text(2 + b)
            (image_order if token == cfg.image_token_id else video_order).append(grid)
    length = max(map(len, rows)) + 1
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros((batch, length), np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    spg = [float(s) for s in second_per_grid_ts] or [1.0] * len(video_grids)
    spg_order = [spg[list(video_grids).index(g)] for g in video_order] if video_grids else []
    pixels = lambda grids: (rng.standard_normal((sum(int(np.prod(g)) for g in grids), cfg.vision.patch_dim))  # noqa
                            .astype(np.float32))
    return ParityInputs(ids, mask, pixels(image_order), image_order, pixels(video_order), video_order, spg_order,
                        rng.choice(plain, (batch, steps)))


def positions_for(cfg: Qwen25VLConfig, inputs: ParityInputs) -> tuple[np.ndarray, np.ndarray]:
    return get_rope_index(
        inputs.input_ids, inputs.attention_mask, inputs.image_grids, inputs.video_grids, inputs.second_per_grid_ts,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
        tokens_per_second=cfg.vision.tokens_per_second)


def run_jax(model_dir: str, inputs: ParityInputs) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Our side: (merged vision features in processor order, prompt logits, decode-step logits)."""
    model = load_hf_model(model_dir)
    cfg = model.cfg
    positions, deltas = positions_for(cfg, inputs)
    grids = inputs.image_grids + inputs.video_grids
    pixels = np.concatenate([inputs.image_pixels, inputs.video_pixels])
    plan = plan_vision(pixels, grids, spatial_merge_size=cfg.vision.spatial_merge_size,
                       window_merged=cfg.vision.window_merged)
    gather = vision_gather_indices(inputs.input_ids, plan, image_token_id=cfg.image_token_id,
                                   video_token_id=cfg.video_token_id, num_image_items=len(inputs.image_grids))
    feats = jax.jit(model.encode_vision)(**{k: jnp.asarray(v) for k, v in plan.device_inputs().items()})
    batch, length = inputs.input_ids.shape
    steps = inputs.decode_tokens.shape[1]
    cache = KVCache.empty(cfg.text, batch, length + steps, jnp.float32)

    @jax.jit
    def step(ids, pos, mask, gather, feats, cache):
        hidden, cache = model(ids, pos, mask, feats, gather, cache)
        return model.logits(hidden), cache

    logits, cache = step(jnp.asarray(inputs.input_ids), jnp.asarray(positions), jnp.asarray(inputs.attention_mask),
                         jnp.asarray(gather), feats, cache)
    decode = []
    next_pos = inputs.attention_mask.sum(1) + deltas
    for s in range(steps):
        pos = np.broadcast_to((next_pos + s)[None, :, None], (3, batch, 1))
        out, cache = step(jnp.asarray(inputs.decode_tokens[:, s:s + 1]), jnp.asarray(pos),
                          jnp.ones((batch, 1), jnp.int32), jnp.full((batch, 1), -1, jnp.int32), feats, cache)
        decode.append(np.asarray(out[:, 0]))
    return np.asarray(feats)[plan.merged_index], np.asarray(logits), decode


def run_hf(model_dir: str, inputs: ParityInputs) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """transformers' side, in float32 eager attention, with our position ids passed explicitly."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from converters.hf import read_config

    cfg = read_config(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    positions, deltas = positions_for(cfg, inputs)
    t = torch.from_numpy
    kwargs = {}
    feats = []
    with torch.no_grad():
        if inputs.image_grids:
            kwargs.update(pixel_values=t(inputs.image_pixels), image_grid_thw=torch.tensor(inputs.image_grids))
            feats += list(model.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"])
                          .pooler_output)
        if inputs.video_grids:
            kwargs.update(pixel_values_videos=t(inputs.video_pixels), video_grid_thw=torch.tensor(inputs.video_grids),
                          second_per_grid_ts=torch.tensor(inputs.second_per_grid_ts))
            feats += list(model.model.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"])
                          .pooler_output)
        mask = t(inputs.attention_mask)
        out = model(input_ids=t(inputs.input_ids), attention_mask=mask, position_ids=t(positions), use_cache=True,
                    **kwargs)
        logits, past = out.logits.float().numpy(), out.past_key_values
        decode = []
        batch = inputs.input_ids.shape[0]
        next_pos = inputs.attention_mask.sum(1) + deltas
        for s in range(inputs.decode_tokens.shape[1]):
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
            pos = torch.from_numpy(np.ascontiguousarray(np.broadcast_to((next_pos + s)[None, :, None], (3, batch, 1))))
            out = model(input_ids=t(inputs.decode_tokens[:, s:s + 1]), attention_mask=mask, position_ids=pos,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            decode.append(out.logits[:, -1].float().numpy())
    vision = torch.cat(feats).float().numpy() if feats else np.zeros((0, cfg.text.hidden_size), np.float32)
    return vision, logits, decode


def compare(model_dir: str, inputs: ParityInputs) -> ParityReport:
    ours_v, ours_l, ours_d = run_jax(model_dir, inputs)
    hf_v, hf_l, hf_d = run_hf(model_dir, inputs)
    valid = inputs.attention_mask.astype(bool)  # pad query rows are garbage on both sides (pitfall 21)
    vision = float(np.abs(ours_v - hf_v).max()) if ours_v.size else 0.0
    return ParityReport(vision=vision, logits=float(np.abs(ours_l - hf_l)[valid].max()),
                        decode=[float(np.abs(a - b).max()) for a, b in zip(ours_d, hf_d)],
                        logit_scale=float(np.abs(hf_l[valid]).max()))


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, text.split(",")):
        h, _, w = part.lower().partition("x")
        out.append((int(h), int(w)))
    return out


def run_cli(args: argparse.Namespace) -> int:
    from converters.hf import read_config

    cfg = read_config(args.hf_model)
    sizes = _parse_sizes(args.image_sizes) or [(112, 168), (84, 140)]
    sizes = [sizes[i % len(sizes)] for i in range(args.images)]
    p, m = cfg.vision.patch_size, cfg.vision.spatial_merge_size
    grids = []
    for h, w in sizes:
        rh, rw = smart_resize(h, w, factor=p * m, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        grids.append((1, rh // p, rw // p))
    videos = [(2, 4, 6)] if args.video else []
    inputs = make_inputs(cfg, grids, videos, [1.0] * len(videos), batch=args.batch, steps=args.steps,
                         seed=args.seed)
    report = compare(args.hf_model, inputs)
    ok = report.passed(args.vision_tol, args.logits_tol)
    print(f"image grids: {grids}; videos: {videos}; batch {args.batch}; prompt length {inputs.input_ids.shape[1]}")
    print(f"vision features  max|diff| = {report.vision:.3e}  (tolerance {args.vision_tol:g})")
    print(f"prompt logits    max|diff| = {report.logits:.3e}  (tolerance {args.logits_tol:g}, "
          f"logit scale {report.logit_scale:.3g})")
    for i, d in enumerate(report.decode):
        print(f"decode step {i}    max|diff| = {d:.3e}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check-parity", help="compare our JAX model with transformers on an HF folder",
                              description=__doc__)
    p.add_argument("--hf-model", required=True, help="HF Qwen2.5-VL folder (config.json + safetensors)")
    p.add_argument("--images", type=int, default=2, help="number of images in the batch")
    p.add_argument("--image-sizes", default="", help="comma-separated HxW pixel sizes, cycled over the images")
    p.add_argument("--video", action="store_true", help="add one video with 4 frames (T=2)")
    p.add_argument("--batch", type=int, default=2, help="batch rows (shorter rows are left-padded)")
    p.add_argument("--steps", type=int, default=4, help="cached decode steps to compare")
    p.add_argument("--min-pixels", type=int, default=3136)
    p.add_argument("--max-pixels", type=int, default=12845056)
    p.add_argument("--vision-tol", type=float, default=1e-5)
    p.add_argument("--logits-tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_cli)
