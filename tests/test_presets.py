"""Released-size presets against transformers' own Qwen2_5_VLForConditionalGeneration, built on the meta device.

Every parameter of our abstract model (no memory: `nnx.eval_shape`) is mapped to its HF name and HF layout through
`models.qwen2_5_vl.params` and must match the HF module's tensor of that name exactly; the parameter counts (tied head
counted once) must be equal. Config mapping: hub-flat round trip and the 5.x nested `to_dict` form.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vlmr1_jax.models.qwen2_5_vl.config import PRESETS, from_hf_config, get_preset, to_hf_config
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.params import canonical_hf_name, hf_entries, to_hf_tensor

RELEASED = ["qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b"]
SHAPELESS = np.dtype([])  # zero-byte items: runs `to_hf_tensor`'s transposes/reshapes on huge shapes for free


def hf_shapes(cfg) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Legacy HF name -> shape of every (deduplicated) parameter, and whether lm_head is tied to the embedding."""
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**to_hf_config(cfg)))
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return {canonical_hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}, tied


@functools.cache
def our_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Legacy HF name -> HF-layout shape of every parameter of our model, via the converter's name/layout rules."""
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))))
    return {
        name: to_hf_tensor(path, np.empty(shape, SHAPELESS), cfg).shape for name, path, _, shape in hf_entries(abstract)
    }


@pytest.mark.parametrize("name", RELEASED)
def test_preset_matches_hf_tensor_for_tensor(name):
    cfg = PRESETS[name]
    hf, tied = hf_shapes(cfg)
    ours = our_shapes(cfg)
    assert tied == cfg.text.tie_word_embeddings
    assert ("lm_head.weight" in hf) == (not tied)  # named_parameters lists a tied matrix once
    assert sorted(ours) == sorted(hf)
    mismatched = {k: (ours[k], hf[k]) for k in hf if ours[k] != hf[k]}
    assert not mismatched
    assert sum(map(np.prod, ours.values())) == sum(map(np.prod, hf.values()))


def test_3b_parameter_count():
    count = sum(int(np.prod(s)) for s in our_shapes(PRESETS["qwen2.5-vl-3b"]).values())
    assert abs(count - 3.75e9) < 0.01e9, count  # 3.75e9 with the tied head counted once


@pytest.mark.parametrize("name", [*RELEASED, "tiny"])
def test_hf_config_round_trip(name):
    cfg = PRESETS[name]
    assert from_hf_config(to_hf_config(cfg)) == cfg


@pytest.mark.parametrize("name", [*RELEASED, "tiny"])
def test_reads_transformers_5_nested_config(name):
    cfg = PRESETS[name]
    nested = Qwen2_5_VLConfig(**to_hf_config(cfg)).to_dict()
    assert "text_config" in nested and "hidden_size" not in nested  # really the nested layout
    assert from_hf_config(nested) == cfg


def test_written_config_json_loads_in_transformers(tmp_path):
    """A config.json we write must pass transformers' strict config validation (e.g. int-typed fields)."""
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(PRESETS["qwen2.5-vl-7b"])))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, Qwen2_5_VLConfig)
    assert hf.vision_config.tokens_per_second == 2 and hf.text_config.hidden_size == 3584


def test_config_errors():
    """Missing keys take transformers' defaults (tests/test_config_hf.py); these ones then no longer fit the tiny
    model, which must be said by name."""
    flat = to_hf_config(PRESETS["tiny"])
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({**flat, "model_type": "qwen2_vl_x"})
    with pytest.raises(ValueError, match=r"mrope_section \(16, 24, 24\) must sum to head_dim/2 = 8"):
        from_hf_config({k: v for k, v in flat.items() if k != "rope_scaling"})
    with pytest.raises(ValueError, match="vision out_hidden_size 3584 != text hidden_size 64"):
        from_hf_config({k: v for k, v in flat.items() if k != "vision_config"})


@pytest.mark.parametrize(
    "alias, name",
    [
        ("3b", "qwen2.5-vl-3b"),
        ("7b", "qwen2.5-vl-7b"),
        ("32b", "qwen2.5-vl-32b"),
        ("72B", "qwen2.5-vl-72b"),
        ("tiny", "tiny"),
    ],
)
def test_preset_aliases(alias, name):
    assert get_preset(alias) is PRESETS[name]


def test_unknown_preset_lists_names_and_aliases():
    with pytest.raises(KeyError, match=r"unknown model preset '4b'.*qwen2\.5-vl-3b.*aliases \['32b', '3b'"):
        get_preset("4b")
