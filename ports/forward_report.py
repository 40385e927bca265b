"""`vlmr1 check-export --forward`: transformers' Qwen2.5-VL on CPU in the release dtype, one image prompt, with the
largest |activation| and the inf/NaN count of every vision block, the merger, every decoder layer and the logits.

Finds float16 overflow, a property of the inputs rather than of the file (docs/facts.md: float16); the structural
checks stay in `converters.check`, which never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from converters.check import SPECIAL_TOKEN_FIELDS
from vlmr1_jax.dtypes import canonical_dtype
from vlmr1_jax.filenames import CONFIG_FILE
from vlmr1_jax.models.qwen2_5_vl.config import from_hf_config

FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class LayerStat:
    name: str
    max_abs: float  # largest finite |activation|
    nonfinite: int  # count of inf/NaN outputs


@dataclasses.dataclass(frozen=True)
class ForwardReport:
    dtype: str
    layers: list[LayerStat]

    def problems(self) -> list[str]:
        """inf/NaN anywhere, or (in float16) activations at the float16 limit."""
        out = []
        bad = [s for s in self.layers if s.nonfinite]
        if bad:
            out.append(
                f"{self.dtype} forward: inf/NaN activations, first in {bad[0].name} "
                f"({len(bad)} of {len(self.layers)} layers affected)"
            )
        if self.dtype == "float16":
            hot = [s for s in self.layers if s.max_abs >= FP16_MAX]
            if hot and not bad:
                out.append(f"float16 forward: activations reach the float16 limit {FP16_MAX:g} in {hot[0].name}")
        return out

    def lines(self) -> list[str]:
        """One line per layer: the largest activation and its share of the float16 limit."""
        return [
            f"{s.name:<28} max|x| {s.max_abs:>12.4g}  {100 * s.max_abs / FP16_MAX:6.2f}% of fp16 max"
            + (f"  {s.nonfinite} inf/NaN" if s.nonfinite else "")
            for s in self.layers
        ]


def synthetic_image(size: int = 224, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB image (gradients plus noise) for forward checks when no real image is given."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    base = np.stack(
        [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], axis=-1
    )
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def forward_report(
    model_dir: str | os.PathLike,
    dtype: str | None = None,
    image: str | os.PathLike | None = None,
    max_pixels: int = 448 * 448,
) -> ForwardReport:
    """Run transformers' Qwen2.5-VL on CPU in `dtype` (default: the config's torch_dtype) on one image prompt,
    recording the largest |activation| and inf/NaN count of every vision block, the merger, every decoder layer
    and the logits. Random-looking inputs can miss overflows that real images trigger: pass a real `image`."""
    from ports.torch_runtime import import_torch
    from vlmr1_jax.models.qwen2_5_vl.image import preprocess_image
    from vlmr1_jax.processing.image import load_image

    torch = import_torch()  # before transformers imports it
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = Path(model_dir)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    torch_dtype = canonical_dtype(dtype or raw.get("torch_dtype", "float32"), "dtype")
    cfg = from_hf_config(raw)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype=getattr(torch, torch_dtype), attn_implementation="eager"
    ).eval()
    pixels, grid = preprocess_image(
        load_image(image) if image else synthetic_image(), min_pixels=3136, max_pixels=max_pixels
    )
    n_image = int(np.prod(grid)) // cfg.vision.merge_unit
    text = [
        t for t in range(min(cfg.text.vocab_size, 100)) if t not in {getattr(cfg, f) for f in SPECIAL_TOKEN_FIELDS}
    ][:8]
    ids = torch.tensor(
        [[cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + [cfg.vision_end_token_id] + text]
    )
    stats: dict[str, LayerStat] = {}

    def record(name: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            values = out.detach().float()
            finite = torch.isfinite(values)
            peak = float(values[finite].abs().max()) if finite.any() else float("inf")
            stats[name] = LayerStat(name, peak, int((~finite).sum()))

        return hook

    core = model.model
    modules = [(f"visual.blocks.{i}", b) for i, b in enumerate(core.visual.blocks)]
    modules += [("visual.merger", core.visual.merger)]
    modules += [(f"model.layers.{i}", layer) for i, layer in enumerate(core.language_model.layers)]
    modules += [("model.norm", core.language_model.norm), ("lm_head", model.lm_head)]
    handles = [m.register_forward_hook(record(name)) for name, m in modules]
    try:
        with torch.no_grad():
            model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=torch.from_numpy(pixels).to(getattr(torch, torch_dtype)),
                image_grid_thw=torch.tensor([grid]),
                mm_token_type_ids=(ids == cfg.image_token_id).long(),
            )  # else 5.x silently uses 1-D positions
    finally:
        for h in handles:
            h.remove()
    return ForwardReport(torch_dtype, [stats[name] for name, _ in modules if name in stats])
