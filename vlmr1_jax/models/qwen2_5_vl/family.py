"""Qwen2.5-VL as a `ModelFamily`: the first implementation of the interface."""

from __future__ import annotations

from vlmr1_jax.models.family import ModelFamily
from vlmr1_jax.models.qwen2_5_vl import costs, params
from vlmr1_jax.models.qwen2_5_vl.config import (
    Qwen25VLConfig,
    from_hf_config,
    get_preset,
    hf_config_problems,
    to_hf_config,
    with_overrides,
)
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.processor import QwenProcessor

FAMILY = ModelFamily(
    name="qwen2_5_vl",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    config_from_dict=Qwen25VLConfig.from_dict,
    from_hf_config=from_hf_config,
    to_hf_config=to_hf_config,
    get_preset=get_preset,
    with_overrides=with_overrides,
    model_class=Qwen25VL,
    layout=params,
    hf_config_problems=hf_config_problems,
    processor=QwenProcessor(),
    costs=costs,
)
