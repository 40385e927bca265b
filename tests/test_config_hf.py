"""Reading HF `config.json` like transformers does: its defaults for missing keys, its default (out-of-range)
full-attention blocks, and special token ids checked against the vocabulary. transformers' own config objects (and
its model, for vision features) are the reference."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

from ports.parity import compare
from tests.helpers.hf_models import TINY_CONFIG, save_random_hf_model
from tests.helpers.qwen_parity import make_inputs
from vlmr1_jax.models.hf_weights import read_config
from vlmr1_jax.models.qwen2_5_vl.config import (
    PRESETS,
    TOKEN_ID_FIELDS,
    Qwen25VLConfig,
    from_hf_config,
    to_hf_config,
    with_overrides,
)

SMALL = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"depth": 2, "out_hidden_size": 8192}}


def hf_view(hf: Qwen2_5_VLConfig) -> dict:
    """transformers' resolved config in our field names (vision_token_id is no transformers field: left out)."""
    t, v = hf.text_config, hf.vision_config
    return {
        "text": {
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_parameters["rope_theta"],
            "mrope_section": tuple(Qwen2_5_VLRotaryEmbedding(t).mrope_section),
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": hf.tie_word_embeddings,
            "hidden_act": t.hidden_act,
        },
        "vision": {
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": tuple(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "in_channels": v.in_channels,
            "hidden_act": v.hidden_act,
            "rope_theta": v.rope_parameters["rope_theta"],
            "norm_eps": 1e-6,
        },  # transformers' vision RMSNorms hard-code 1e-6
        "image_token_id": hf.image_token_id,
        "video_token_id": hf.video_token_id,
        "vision_start_token_id": hf.vision_start_token_id,
        "vision_end_token_id": hf.vision_end_token_id,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
    }


def our_view(cfg: Qwen25VLConfig) -> dict:
    out = dataclasses.asdict(cfg)
    del out["vision_token_id"], out["family"]  # ours only: HF's config has neither
    return out


def test_hf_defaults_round_trip():
    """transformers' default config at a small depth, written by its to_dict, reads back as transformers sees it."""
    hf = Qwen2_5_VLConfig(**copy.deepcopy(SMALL))
    ours = from_hf_config(hf.to_dict())
    assert our_view(ours) == hf_view(hf)
    assert ours.vision.fullatt_block_indexes == (7, 15, 23, 31) and ours.vision.tokens_per_second == 4
    assert ours.text.rms_norm_eps == 1e-5 and ours.text.max_position_embeddings == 32768


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_missing_keys_take_transformers_defaults(layout):
    """A config.json holding only a few keys means, key for key, what transformers makes of it."""
    raw = (
        copy.deepcopy(SMALL)
        if layout == "nested"
        else {"num_hidden_layers": 2, "vision_config": SMALL["vision_config"]}
    )
    raw["model_type"] = "qwen2_5_vl"
    hf = Qwen2_5_VLConfig(**copy.deepcopy(raw))
    assert our_view(from_hf_config(raw)) == hf_view(hf)
    assert hf_view(hf)["text"]["num_hidden_layers"] == 2  # the layout really was read


def test_hf_default_widths_are_refused_clearly():
    """transformers' plain defaults pair a 3584-wide vision output with an 8192-wide text model (not runnable)."""
    with pytest.raises(ValueError, match="out_hidden_size 3584 != text hidden_size 8192"):
        from_hf_config(Qwen2_5_VLConfig(vision_config={"depth": 2}).to_dict())


def test_out_of_range_full_attention_blocks_match_hf(tmp_path):
    """transformers' default [7, 15, 23, 31] on a 4-block tower: no block is full attention, on both sides."""
    config = copy.deepcopy(TINY_CONFIG)
    config["vision_config"]["fullatt_block_indexes"] = [7, 15, 23, 31]
    model_dir = save_random_hf_model(tmp_path / "fullatt", config, seed=4)
    cfg = read_config(model_dir)
    assert cfg.vision.fullatt_block_indexes == (7, 15, 23, 31)
    report = compare(str(model_dir), make_inputs(cfg, [(1, 8, 12), (1, 6, 10)], batch=2, steps=1))
    assert report.passed(), report
    assert report.vision.scale > 0.1


def test_round_trip_keeps_out_of_range_blocks():
    cfg = with_overrides(PRESETS["tiny"], {"vision.fullatt_block_indexes": [7, 15, 23, 31]})
    assert from_hf_config(to_hf_config(cfg)) == cfg


@pytest.mark.parametrize("field", TOKEN_ID_FIELDS)
@pytest.mark.parametrize("value", [160, 10**6, -1])
def test_special_ids_outside_vocab_are_refused(field, value, tmp_path):
    """The tiny vocabulary has 160 tokens: an id >= 160 (or < 0) would embed as NaN, so reading it must fail."""
    flat = {**to_hf_config(PRESETS["tiny"]), field: value}
    with pytest.raises(ValueError, match=rf"{field} {value} is not a token id of the 160-token vocabulary"):
        from_hf_config(flat)
    with pytest.raises(ValueError, match=field):
        with_overrides(PRESETS["tiny"], {field: value})
    with pytest.raises(ValueError, match=field):
        Qwen25VLConfig.from_dict({**dataclasses.asdict(PRESETS["tiny"]), field: value})


def test_nested_special_id_outside_vocab_names_file(tmp_path):
    raw = Qwen2_5_VLConfig(**to_hf_config(PRESETS["tiny"])).to_dict()
    raw["text_config"]["eos_token_id"] = 200
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config\.json: eos_token_id 200 is not a token id"):
        read_config(tmp_path)


def test_demo_preset_gets_its_ids_from_the_tokenizer():
    """demo-s carries Qwen's ids and a placeholder vocabulary until the tokenizer's are set (train/setup.py)."""
    demo = PRESETS["demo-s"]
    assert demo.image_token_id >= demo.text.vocab_size
    ids = {name: 500 + i for i, name in enumerate(TOKEN_ID_FIELDS)}
    assert with_overrides(demo, {**ids, "text.vocab_size": 576}).image_token_id == 500
    with pytest.raises(ValueError, match="image_token_id 151655"):
        with_overrides(demo, {"text.vocab_size": 576})  # finalised without the tokenizer's ids
