"""`vlmr1 check-export --forward`: transformers' model of the release (any family) on CPU in the release dtype, one
image prompt, with the largest |activation| and the inf/NaN count of every vision block, the vision-to-text
projector, every decoder layer, the final norm and the logits.

Finds float16 overflow, a property of the inputs rather than of the file (docs/facts.md: float16); the structural
checks stay in `converters.check`, which never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from vlmr1_jax.dtypes import canonical_dtype
from vlmr1_jax.filenames import CONFIG_FILE
from vlmr1_jax.models.family import family_for_hf_config

FP16_MAX = 65504.0
PROMPT = "Describe the image."
# transformers' module names of the vision-to-text projector, recorded beside the blocks and layers.
PROJECTORS = ("merger", "multi_modal_projector")


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


def forward_inputs(
    model, folder: Path, image: str | os.PathLike | np.ndarray | None, max_pixels: int
) -> dict[str, object]:
    """The keyword inputs of `model` (a transformers model of the release in `folder`) for VLM-R1's prompt of
    `PROMPT` on `image` (default `synthetic_image()`), built by the family's processor (ports.torch_runtime)."""
    from ports.torch_runtime import TorchRuntime
    from vlmr1_jax.processing.tokenizer import Tokenizer

    config = json.loads((folder / CONFIG_FILE).read_text())
    cfg = family_for_hf_config(config).from_hf_config(config)
    runtime = TorchRuntime(model, Tokenizer.load(folder), cfg, "cpu", min_pixels=3136, max_pixels=max_pixels)
    return runtime.inputs([synthetic_image() if image is None else image], PROMPT)


def forward_report(
    model_dir: str | os.PathLike,
    dtype: str | None = None,
    image: str | os.PathLike | None = None,
    max_pixels: int = 448 * 448,
) -> ForwardReport:
    """Run transformers' model of the release on CPU in `dtype` (default: the config's torch_dtype) on one image
    prompt, recording the largest |activation| and inf/NaN count of every block and layer (the children of the
    model's module lists), the projector, the final norm and the logits, in the order they run, under their legacy
    HF names. Random-looking inputs can miss overflows that real images trigger: pass a real `image`."""
    from ports.torch_runtime import hf_model_class, import_torch

    torch = import_torch()  # before transformers imports it
    folder = Path(model_dir)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    torch_dtype = canonical_dtype(dtype or raw.get("torch_dtype", "float32"), "dtype")
    layout = family_for_hf_config(raw).layout
    model = (
        hf_model_class(raw)
        .from_pretrained(folder, dtype=getattr(torch, torch_dtype), attn_implementation="eager")
        .eval()
    )
    inputs = forward_inputs(model, folder, image, max_pixels)
    stats: dict[str, LayerStat] = {}

    def record(name: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            values = out.detach().float()
            finite = torch.isfinite(values)
            peak = float(values[finite].abs().max()) if finite.any() else float("inf")
            stats.setdefault(name, LayerStat(name, peak, int((~finite).sum())))

        return hook

    modules = [
        (f"{name}.{i}", child)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        for i, child in enumerate(module)
    ]
    modules += [(name, m) for name, m in model.named_modules() if name.rpartition(".")[2] in PROJECTORS]
    decoder = model.get_decoder()
    modules += [(n, m) for n, m in model.named_modules() if m is decoder.norm or m is model.get_output_embeddings()]
    handles = [m.register_forward_hook(record(layout.canonical_hf_name(name))) for name, m in modules]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return ForwardReport(torch_dtype, list(stats.values()))  # in the order the modules ran
