"""LoRA adapters as a PEFT adapter folder (`adapter_model.safetensors` + `adapter_config.json`) that
`peft.PeftModel.from_pretrained(Qwen2_5_VLForConditionalGeneration, folder)` loads onto the exported base model.

Key names follow what PEFT 0.21 saves for Qwen2.5-VL under transformers >= 4.52 (module tree
`model.language_model.*`, `model.visual.*`, `lm_head`; see `params.hf_module_name`):
`base_model.model.<module>.lora_A.weight` is [r, in] (our `lora_a` transposed) and `lora_B.weight` is [out, r]
(our `lora_b` transposed); the scale is lora_alpha / r, as ours. `target_modules` is a regex that excludes the
vision tower (whose linears share names with the decoder's: gate/up/down_proj, q/k/v_proj), found from the
family's layout.
A tied model's head adapter is saved as `lm_head`'s, as PEFT (without `ensure_weight_tying`) saves it: PEFT wraps the
tied lm_head Linear, whose weight is the embedding table, and leaves `embed_tokens` unadapted.
Older transformers (< 4.52, module tree `model.layers.*`) would not find these keys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from converters.release import check_replaceable, make_temp_sibling, move_into_place, write_marker
from converters.safetensors_io import save_tensors
from vlmr1_jax.dtypes import dtype_info
from vlmr1_jax.models.family import family_of
from vlmr1_jax.models.layers import LoRAParam

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LORA_LEAF = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[ab])$")


def adapter_weights(model_or_state: nnx.Module | nnx.State, cfg: Any, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """PEFT key -> array (torch layout) for every LoRA adapter of a model, or of a state holding its LoRAParams;
    each adapter's in / out sizes are checked against `cfg`'s linear layer."""
    state = nnx.state(model_or_state, LoRAParam) if isinstance(model_or_state, nnx.Module) else model_or_state
    layout = family_of(cfg).layout
    shapes = layout.expected_hf_shapes(cfg)
    if cfg.text.tie_word_embeddings:  # no stored lm_head.weight: the tied head applies the [vocab, hidden] table
        shapes[layout.TIED_HEAD] = (cfg.text.vocab_size, cfg.text.hidden_size)
    out: dict[str, np.ndarray] = {}
    for path, var in layout.flat_paths(state).items():
        match = _LORA_LEAF.match(path)
        if match is None or not isinstance(var, LoRAParam):
            continue
        module = match["module"]
        stack = np.asarray(jax.device_get(var[...])).astype(dtype)
        per_layer = list(enumerate(stack)) if layout.is_stacked(module + ".kernel") else [(None, stack)]
        for layer, matrix in per_layer:
            value = np.ascontiguousarray(matrix.T)
            weight = layout.to_hf_name(module + ".kernel", layer)
            out_size, in_size = shapes.get(weight, (None, None))
            size, expected = (value.shape[1], in_size) if match["which"] == "a" else (value.shape[0], out_size)
            if size != expected:
                raise ValueError(
                    f"{path}: adapter of size {size} does not fit {weight} {shapes.get(weight)} of this model config"
                )
            which = "A" if match["which"] == "a" else "B"
            out[f"{PEFT_PREFIX}{layout.hf_module_name(module, layer)}.lora_{which}.weight"] = value
    return out


def target_modules_regex(module_names: list[str], excluded: list[str]) -> str:
    """A PEFT `target_modules` regex (full match) for the adapted modules' last names, outside any module named in
    `excluded` (the vision tower: `excluded_components`)."""
    names = sorted({name.rsplit(".", 1)[-1] for name in module_names})
    outside = "|".join(map(re.escape, sorted(excluded)))
    return rf"^(?!(.*\.)?({outside})\.)(.*\.)?({'|'.join(map(re.escape, names))})$"


def excluded_components(module_names: list[str], cfg: Any) -> list[str]:
    """The module names that set apart the model's unadapted linear layers whose last name an adapted one shares
    (the vision tower's: Qwen's `visual`, InternVL's `vision_tower`): for each, the first component of its name
    that no adapted module's name has (layer numbers aside)."""
    adapted = {part for name in module_names for part in name.split(".")}
    last_names = {name.rsplit(".", 1)[-1] for name in module_names}
    out = set()
    for weight in family_of(cfg).layout.expected_hf_shapes(cfg):
        parts = weight.removesuffix(".weight").split(".")
        unseen = [p for p in parts if p not in adapted and not p.isdigit()]
        if parts[-1] in last_names and unseen:
            out.add(unseen[0])
    return sorted(out)


def adapter_config(
    module_names: list[str],
    excluded: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """adapter_config.json for a plain LoRA (no DoRA / rsLoRA, no bias, no extra saved modules)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules_regex(module_names, excluded),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def export_peft_adapter(
    model_or_state: nnx.Module | nnx.State,
    cfg: Any,
    out_dir: str | os.PathLike,
    rank: int,
    alpha: float,
    dropout: float,
    *,
    base_model_name_or_path: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the PEFT adapter folder `out_dir` (atomically) from a LoRA model (or a state with its LoRAParams).

    `rank` / `alpha` / `dropout` are the run's `lora` settings; every adapter must have rank `rank`.
    """
    weights = adapter_weights(model_or_state, cfg, np.dtype(dtype_info(dtype).numpy))
    if not weights:
        raise ValueError("the model has no LoRA adapters (train.trainable was not 'lora'); export it merged")
    modules = sorted({key[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for key in weights})
    for key, value in weights.items():
        r = value.shape[0] if ".lora_A." in key else value.shape[1]
        if r != rank:
            raise ValueError(f"{key}: adapter rank {r} differs from lora.rank {rank}")
    out = Path(out_dir).absolute()
    check_replaceable(out, overwrite)
    tmp = make_temp_sibling(out)
    try:
        save_tensors(weights, tmp / ADAPTER_WEIGHTS)
        write_marker(tmp)
        config = adapter_config(
            modules, excluded_components(modules, cfg), rank, alpha, dropout, base_model_name_or_path
        )
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
