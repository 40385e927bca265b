"""Qwen2-VL as a `ModelFamily`: Qwen2.5-VL's decoder, processor and prompts with Qwen2-VL's vision tower."""

from __future__ import annotations

from vlmr1_jax.models.family import ModelFamily
from vlmr1_jax.models.qwen2_5_vl.config import hf_config_problems
from vlmr1_jax.models.qwen2_vl import params
from vlmr1_jax.models.qwen2_vl.config import Qwen2VLConfig, from_hf_config, get_preset, to_hf_config, with_overrides
from vlmr1_jax.models.qwen2_vl.model import Qwen2VL
from vlmr1_jax.models.qwen2_vl.processor import Qwen2VLProcessor

FAMILY = ModelFamily(
    name="qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration",),
    config_from_dict=Qwen2VLConfig.from_dict,
    from_hf_config=from_hf_config,
    to_hf_config=to_hf_config,
    get_preset=get_preset,
    with_overrides=with_overrides,
    model_class=Qwen2VL,
    layout=params,
    hf_config_problems=hf_config_problems,
    processor=Qwen2VLProcessor(),
)
