"""InternVL's HF checkpoint layout against our parameter tree: one table of rules, as `qwen2_5_vl.params` (whose
rule format, `{a,b}` groups and `{i}` layer index this module uses; see there).

Canonical HF names are those transformers 5 writes for `InternVLForConditionalGeneration` (`vision_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`): what export writes and what
transformers and vLLM read. Reading also accepts two other spellings of the same tensors (`canonical_hf_name`):
- transformers 5's in-memory names (`model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head.*`), which PEFT adapters are keyed by (`hf_module_name`);
- the original OpenGVLab release (`vision_model.*` with one fused `attn.qkv` per block, `ls1` / `ls2`, `mlp1.0/1/3`;
  its `language_model.*` names are the canonical ones), renamed as transformers' conversion script does; a fused
  qkv tensor becomes the three canonical q / k / v names, each reading its third of the rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from vlmr1_jax.models.internvl.config import InternVLConfig
from vlmr1_jax.models.qwen2_5_vl import params as qwen
from vlmr1_jax.models.qwen2_5_vl.params import IDENTITY, TRANSPOSE, Rule, Transform, flat_paths


def _conv_to_hf(value: np.ndarray, cfg: Any) -> np.ndarray:
    """[C*p*p, hidden] matmul weight -> the Conv2d weight [hidden, C, p, p]."""
    v = cfg.vision
    return np.ascontiguousarray(value.T).reshape(v.hidden_size, v.in_channels, v.patch_size, v.patch_size)


CONV2D = Transform(
    "conv2d patch embedding", _conv_to_hf, lambda value: np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
)

VISION = "vision_tower."
BLOCK = VISION + "encoder.layer.{i}."
PROJECTOR = "multi_modal_projector."

RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed.kernel", VISION + "embeddings.patch_embeddings.projection.weight", CONV2D),
    Rule("visual.patch_embed.bias", VISION + "embeddings.patch_embeddings.projection.bias", IDENTITY),
    Rule("visual.{cls_token,pos_embed}", VISION + "embeddings.{cls_token,position_embeddings}", IDENTITY),
    Rule(
        "visual.blocks.{norm1,norm2}.{scale,bias}", BLOCK + "{layernorm_before,layernorm_after}.{weight,bias}", IDENTITY
    ),
    Rule("visual.blocks.{ls1,ls2}", BLOCK + "{lambda_1,lambda_2}", IDENTITY),
    Rule(
        "visual.blocks.attn.{q,k,v,proj}.kernel",
        BLOCK + "attention.{q_proj,k_proj,v_proj,projection_layer}.weight",
        TRANSPOSE,
    ),
    Rule(
        "visual.blocks.attn.{q,k,v,proj}.bias",
        BLOCK + "attention.{q_proj,k_proj,v_proj,projection_layer}.bias",
        IDENTITY,
    ),
    Rule("visual.blocks.attn.{q_norm,k_norm}.scale", BLOCK + "attention.{q_norm,k_norm}.weight", IDENTITY),
    Rule("visual.blocks.mlp.{fc1,fc2}.kernel", BLOCK + "mlp.{fc1,fc2}.weight", TRANSPOSE),
    Rule("visual.blocks.mlp.{fc1,fc2}.bias", BLOCK + "mlp.{fc1,fc2}.bias", IDENTITY),
    Rule("projector.norm.{scale,bias}", PROJECTOR + "layer_norm.{weight,bias}", IDENTITY),
    Rule("projector.{fc1,fc2}.kernel", PROJECTOR + "{linear_1,linear_2}.weight", TRANSPOSE),
    Rule("projector.{fc1,fc2}.bias", PROJECTOR + "{linear_1,linear_2}.bias", IDENTITY),
    # The decoder is Qwen2.5-VL's: its rules, under transformers' language-model prefix.
    *(
        dataclasses.replace(rule, hf="language_model." + rule.hf)
        for rule in qwen.RULES
        if rule.ours.startswith("text.")
    ),
)

LAYOUT = qwen._index(RULES)

# (transformers 5 in-memory prefix, canonical prefix).
IN_MEMORY: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", VISION),
    ("model.multi_modal_projector.", PROJECTOR),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# (prefix of another spelling, canonical prefix), tried in order; the original's block-level renames follow.
ALIASES: tuple[tuple[str, str], ...] = (
    *IN_MEMORY,
    ("mlp1.0.", PROJECTOR + "layer_norm."),
    ("mlp1.1.", PROJECTOR + "linear_1."),
    ("mlp1.3.", PROJECTOR + "linear_2."),
    ("vision_model.embeddings.class_embedding", VISION + "embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", VISION + "embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.", VISION + "embeddings.patch_embeddings.projection."),
)
_ORIGINAL_BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(ls1|ls2|norm1|norm2|attn\.\w+|mlp\.fc[12])(.*)")
ORIGINAL_BLOCK_NAMES = {
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
FUSED_QKV = ("q_proj", "k_proj", "v_proj")  # the row blocks of the original `attn.qkv`, in order


def canonical_hf_name(name: str) -> str | tuple[str, ...]:
    """Any accepted spelling of a tensor's name -> its canonical name; the original's fused `attn.qkv` -> the three
    names of its q / k / v row blocks. Unknown names come back unchanged (the loader then names them)."""
    block = _ORIGINAL_BLOCK.fullmatch(name)
    if block is not None:
        layer, module, rest = block.groups()
        prefix = f"{VISION}encoder.layer.{layer}."
        if module == "attn.qkv":
            return tuple(f"{prefix}attention.{part}{rest}" for part in FUSED_QKV)
        if module in ORIGINAL_BLOCK_NAMES:
            return prefix + ORIGINAL_BLOCK_NAMES[module] + rest
        return name
    for alias, canonical in ALIASES:
        if name.startswith(alias):
            return canonical + name[len(alias) :]
    return name


def layout_of(path: str) -> tuple[str, Transform]:
    """(HF name template, transform) of our parameter `path`."""
    try:
        return LAYOUT[path]
    except KeyError:
        raise KeyError(f"no HF layout rule for parameter {path!r} (see {__name__}.RULES)") from None


def is_stacked(path: str) -> bool:
    """Whether our parameter `path` holds one tensor per layer on a leading axis (HF: one name per layer)."""
    return "{i}" in layout_of(path)[0]


def to_hf_name(path: str, layer: int | None = None) -> str:
    """Our dotted parameter path (and, for stacked layers, the layer index) -> the canonical HF tensor name."""
    template = layout_of(path)[0]
    if ("{i}" in template) != (layer is not None):
        raise ValueError(f"{path}: a layer index is {'required' if layer is None else 'not allowed'}")
    return template.replace("{i}", str(layer))


def to_hf_tensor(path: str, value: np.ndarray, cfg: Any) -> np.ndarray:
    """Our array (one layer of a stacked parameter) -> the HF tensor layout (`cfg`: an `InternVLConfig`; the
    shared `Transform` type names Qwen2.5-VL's)."""
    return layout_of(path)[1].to_hf(value, cfg)


def from_hf_tensor(path: str, value: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout (the inverse of `to_hf_tensor`)."""
    return layout_of(path)[1].from_hf(value)


# Our tree has no head when tie_word_embeddings is set; some exports still store this copy of the embedding.
TIED_HEAD = to_hf_name("text.lm_head.kernel")


def hf_shape(path: str, shape: Sequence[int], cfg: InternVLConfig) -> tuple[int, ...]:
    """Shape of our (per-layer) parameter `path` in the HF layout: its transform applied to a zero-byte array."""
    return tuple(to_hf_tensor(path, np.empty(tuple(shape), np.dtype([])), cfg).shape)


def hf_entries(state: nnx.State) -> list[tuple[str, str, int | None, tuple[int, ...]]]:
    """(HF name, our path, layer index or None, our per-layer shape) for every tensor HF stores, in HF order."""
    entries: list[tuple[str, str, int | None, tuple[int, ...]]] = []
    for path, var in flat_paths(state).items():
        if is_stacked(path):
            entries += [(to_hf_name(path, i), path, i, tuple(var.shape[1:])) for i in range(var.shape[0])]
        else:
            entries.append((to_hf_name(path), path, None, tuple(var.shape)))
    natural = lambda entry: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", entry[0])]
    return sorted(entries, key=natural)


def expected_hf_shapes(cfg: InternVLConfig) -> dict[str, tuple[int, ...]]:
    """Canonical HF name -> shape of every tensor a checkpoint of `cfg` holds (our abstract model, no memory)."""
    from vlmr1_jax.models.internvl.model import InternVL

    abstract = nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))
    return {name: hf_shape(path, shape, cfg) for name, path, _, shape in hf_entries(nnx.state(abstract, nnx.Param))}


def in_memory_hf_name(name: str) -> str:
    """A canonical HF name -> the name transformers 5 gives it in memory (`canonical_hf_name`'s inverse there)."""
    for in_memory, canonical in IN_MEMORY:
        if name.startswith(canonical):
            return in_memory + name[len(canonical) :]
    return name


def hf_module_name(module_path: str, layer: int | None = None) -> str:
    """Our Dense path (e.g. `text.layers.attn.q`, layer 0) -> its transformers 5 module name
    (`model.language_model.layers.0.self_attn.q_proj`), which PEFT adapters are keyed by."""
    return in_memory_hf_name(to_hf_name(module_path + ".kernel", layer)).removesuffix(".weight")
