"""Qwen2-VL's HF checkpoint layout against our parameter tree: its own vision rules, Qwen2.5-VL's decoder rules and
table machinery (models/qwen2_5_vl/params.py explains the rule syntax and what derives from the table)."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from vlmr1_jax.models.qwen2_5_vl.params import (
    IDENTITY,
    PATCH_EMBED,
    TEXT_RULES,
    TRANSPOSE,
    Layout,
    Rule,
    canonical_hf_name,
    flat_paths,
    in_memory_hf_name,
)

VISION_RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed", "visual.patch_embed.proj.weight", PATCH_EMBED),
    Rule("visual.blocks.{norm1,norm2}.{scale,bias}", "visual.blocks.{i}.{norm1,norm2}.{weight,bias}", IDENTITY),
    Rule("visual.blocks.attn.{qkv,proj}.kernel", "visual.blocks.{i}.attn.{qkv,proj}.weight", TRANSPOSE),
    Rule("visual.blocks.attn.{qkv,proj}.bias", "visual.blocks.{i}.attn.{qkv,proj}.bias", IDENTITY),
    Rule("visual.blocks.mlp.{fc1,fc2}.kernel", "visual.blocks.{i}.mlp.{fc1,fc2}.weight", TRANSPOSE),
    Rule("visual.blocks.mlp.{fc1,fc2}.bias", "visual.blocks.{i}.mlp.{fc1,fc2}.bias", IDENTITY),
    Rule("visual.merger.ln_q.{scale,bias}", "visual.merger.ln_q.{weight,bias}", IDENTITY),
    Rule("visual.merger.{fc1,fc2}.kernel", "visual.merger.mlp.{0,2}.weight", TRANSPOSE),
    Rule("visual.merger.{fc1,fc2}.bias", "visual.merger.mlp.{0,2}.bias", IDENTITY),
)
RULES = VISION_RULES + TEXT_RULES


def _model_class() -> Callable[..., nnx.Module]:
    from vlmr1_jax.models.qwen2_vl.model import Qwen2VL

    return Qwen2VL


# The module-level API `ModelFamily.layout` exposes, bound to this family's table.
QWEN2_VL = Layout(RULES, _model_class)
LAYOUT = QWEN2_VL.table
layout_of = QWEN2_VL.layout_of
is_stacked = QWEN2_VL.is_stacked
to_hf_name = QWEN2_VL.to_hf_name
to_hf_tensor = QWEN2_VL.to_hf_tensor
from_hf_tensor = QWEN2_VL.from_hf_tensor
hf_shape = QWEN2_VL.hf_shape
hf_entries = QWEN2_VL.hf_entries
expected_hf_shapes = QWEN2_VL.expected_hf_shapes
hf_module_name = QWEN2_VL.hf_module_name
TIED_HEAD = QWEN2_VL.tied_head

__all__ = [
    "LAYOUT",
    "RULES",
    "TIED_HEAD",
    "canonical_hf_name",
    "expected_hf_shapes",
    "flat_paths",
    "from_hf_tensor",
    "hf_entries",
    "hf_module_name",
    "hf_shape",
    "in_memory_hf_name",
    "is_stacked",
    "layout_of",
    "to_hf_name",
    "to_hf_tensor",
]
