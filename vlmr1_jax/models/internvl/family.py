"""InternVL as a `ModelFamily`: InternVL2.5 / InternVL3 sizes on Qwen2 / Qwen2.5 decoders."""

from __future__ import annotations

from vlmr1_jax.models.family import ModelFamily
from vlmr1_jax.models.internvl import params
from vlmr1_jax.models.internvl.config import (
    ARCHITECTURES,
    InternVLConfig,
    from_hf_config,
    get_preset,
    hf_config_problems,
    to_hf_config,
    with_overrides,
)
from vlmr1_jax.models.internvl.model import InternVL
from vlmr1_jax.models.internvl.processor import INTERNVL_PROCESSOR

FAMILY = ModelFamily(
    name="internvl",
    architectures=ARCHITECTURES,
    config_from_dict=InternVLConfig.from_dict,
    from_hf_config=from_hf_config,
    to_hf_config=to_hf_config,
    get_preset=get_preset,
    with_overrides=with_overrides,
    model_class=InternVL,
    layout=params,
    hf_config_problems=hf_config_problems,
    processor=INTERNVL_PROCESSOR,
)
