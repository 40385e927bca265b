"""InternVL's config.json mapping, presets and weight layout against transformers 5's own InternVLConfig /
InternVLForConditionalGeneration (built on the meta device), and the three weight spellings: native export ->
import is bit-exact, transformers loads our export, and an original-release (`InternVLChatModel`) folder, written
here from a native one with the conversion's renames inverted, imports to the same parameters."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, InternVLConfig as HFInternVLConfig, InternVLForConditionalGeneration

from converters.hf import save_hf_safetensors
from tests.helpers.internvl_models import TINY, TINY_B, save_random_internvl
from tests.helpers.params import assert_same_params
from vlmr1_jax.filenames import CONFIG_FILE, SINGLE_FILE
from vlmr1_jax.models.family import config_from_dict, family_for_hf_config, get_family
from vlmr1_jax.models.hf_weights import load_hf_model, load_hf_state
from vlmr1_jax.models.internvl.config import PRESETS, from_hf_config, get_preset, to_hf_config, with_overrides
from vlmr1_jax.models.internvl.model import InternVL
from vlmr1_jax.models.internvl.params import (
    LAYOUT,
    RULES,
    canonical_hf_name,
    expected_hf_shapes,
    flat_paths,
    hf_module_name,
    in_memory_hf_name,
    is_stacked,
    to_hf_tensor,
)
from vlmr1_jax.models.layers import Dense
from vlmr1_jax.models.qwen2_5_vl.params import expand

RELEASED = ["internvl2.5-1b", "internvl2.5-4b", "internvl3-1b", "internvl3-2b", "internvl3-8b"]
CONFIGS = {"untied layer_norm": TINY, "tied rms q/k-norm": TINY_B}


def hf_meta_model(config: dict) -> InternVLForConditionalGeneration:
    with torch.device("meta"):
        return InternVLForConditionalGeneration(HFInternVLConfig(**copy.deepcopy(config)))


def abstract_params(cfg, scan: bool = True) -> dict[str, nnx.Variable]:
    return flat_paths(nnx.state(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0), scan_layers=scan)), nnx.Param))


# ---------------------------------------------------------------- the layout table against transformers


def test_every_parameter_has_exactly_one_rule_and_no_rule_is_dead():
    seen = set()
    for config in CONFIGS.values():
        for path in abstract_params(from_hf_config(config)):
            assert len([r for r in RULES if path in dict(expand(r))]) == 1, path
            seen.add(path)
    assert seen == set(LAYOUT)  # the two configs use every rule (biases, q/k norms, LayerNorm shifts, head)


@pytest.mark.parametrize("name", CONFIGS)
def test_expected_shapes_equal_transformers_state_dict(name):
    """Names (canonical, from transformers 5's in-memory names) and shapes against a real HF model."""
    model = hf_meta_model(CONFIGS[name])
    hf = {canonical_hf_name(n): tuple(t.shape) for n, t in model.state_dict().items()}
    if CONFIGS[name]["tie_word_embeddings"]:
        assert hf.pop("language_model.lm_head.weight") == hf["language_model.model.embed_tokens.weight"]
    assert expected_hf_shapes(from_hf_config(CONFIGS[name])) == hf
    for in_memory in model.state_dict():
        assert in_memory_hf_name(canonical_hf_name(in_memory)) == in_memory


def test_canonical_names_are_the_ones_transformers_saves(tmp_path):
    saved = save_random_internvl(tmp_path / "saved", TINY)
    assert set(load_file(saved / SINGLE_FILE)) == set(expected_hf_shapes(from_hf_config(TINY)))


def test_module_names_are_transformers_linears():
    """Every Dense of ours names a torch Linear of the same in / out size (PEFT keys its adapters so)."""
    cfg = from_hf_config(TINY)
    modules = dict(hf_meta_model(TINY).named_modules())
    checked = 0
    for path, dense in nnx.iter_graph(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))):
        if not isinstance(dense, Dense):
            continue
        path = ".".join(map(str, path))
        for layer in range(dense.kernel.shape[0]) if is_stacked(path + ".kernel") else [None]:
            linear = modules[hf_module_name(path, layer)]
            if path == "visual.patch_embed":  # our matmul is transformers' Conv2d
                assert isinstance(linear, torch.nn.Conv2d)
            else:
                assert isinstance(linear, torch.nn.Linear), path
                assert (linear.in_features, linear.out_features) == dense.kernel.shape[-2:], path
            checked += 1
    assert checked == 2 * 7 + 1 + 3 * 6 + 2 + 1  # text layers x 7, lm_head, vision blocks x 6, projector, patches


def test_conv_patch_embedding_computes_what_torch_computes():
    """Our patch matmul of (C, p, p)-flattened patches equals the exported Conv2d applied by torch."""
    cfg = from_hf_config(TINY)
    model = InternVL(cfg, rngs=nnx.Rngs(0))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
    ours = np.asarray(model.visual.patch_embed(model.visual.patches(jnp.asarray(pixels))))
    conv = torch.nn.Conv2d(3, 32, 14, 14)
    with torch.no_grad():
        conv.weight.copy_(
            torch.from_numpy(
                to_hf_tensor("visual.patch_embed.kernel", np.asarray(model.visual.patch_embed.kernel[...]), cfg)
            )
        )
        conv.bias.copy_(torch.from_numpy(np.array(model.visual.patch_embed.bias[...])))
        ref = conv(torch.from_numpy(pixels)).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- presets and config.json


@pytest.mark.parametrize("name", RELEASED)
def test_released_preset_matches_transformers_tensor_for_tensor(name, record_property):
    cfg = PRESETS[name]
    model = hf_meta_model(to_hf_config(cfg))
    hf = {canonical_hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}  # a tied head is listed once
    ours = expected_hf_shapes(cfg)
    assert ours == hf
    count = sum(int(np.prod(s)) for s in ours.values())
    record_property("parameters", count)
    print(name, f"{count / 1e9:.3f}B parameters")


def test_parameter_counts_of_the_released_sizes():
    """The released models' sizes (InternViT-300M + projector + Qwen2.5 decoder with an untied head)."""
    counts = {n: sum(int(np.prod(s)) for s in expected_hf_shapes(PRESETS[n]).values()) for n in RELEASED}
    vit = sum(int(np.prod(s)) for k, s in expected_hf_shapes(PRESETS["internvl3-1b"]).items() if "vision_tower" in k)
    assert abs(vit - 304e6) < 1e6, vit  # InternViT-300M
    assert counts["internvl3-1b"] == counts["internvl2.5-1b"]
    for name, billions in {
        "internvl3-1b": 0.94,
        "internvl3-2b": 2.09,
        "internvl2.5-4b": 3.71,
        "internvl3-8b": 7.94,
    }.items():
        assert abs(counts[name] / 1e9 - billions) < 0.01, (name, counts[name])


@pytest.mark.parametrize("name", [*RELEASED, "tiny"])
def test_config_round_trips_and_transformers_reads_it(name, tmp_path):
    cfg = PRESETS[name]
    assert from_hf_config(to_hf_config(cfg)) == cfg
    nested = HFInternVLConfig(**to_hf_config(cfg)).to_dict()  # transformers' own full form, rope_parameters included
    assert from_hf_config(nested) == cfg
    (tmp_path / CONFIG_FILE).write_text(json.dumps(to_hf_config(cfg)))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, HFInternVLConfig) and hf.text_config.hidden_size == cfg.text.hidden_size
    assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # checkpoint metadata


def original_config(text: dict, vision: dict, **top) -> dict:
    """An OpenGVLab `InternVLChatModel` config.json (the keys its releases write)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": vision["image_size"],
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "use_thumbnail": True,
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **text},
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", **vision},
        **top,
    }


INTERNVIT_300M = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
    "image_size": 448, "patch_size": 14, "num_channels": 3, "qkv_bias": True, "qk_normalization": False,
    "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu", "initializer_factor": 0.1,
    "use_flash_attn": True, "drop_path_rate": 0.1,
}  # fmt: skip
QWEN25_05B = {
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151674, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}, "max_position_embeddings": 32768,
    "use_sliding_window": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
    "tie_word_embeddings": False,
}  # fmt: skip


def test_original_release_config_reads_as_the_preset():
    """InternVL3-1B's original config.json (dynamic NTK rope: plain RoPE up to max_position_embeddings)."""
    assert (
        from_hf_config(original_config(QWEN25_05B, INTERNVIT_300M, tie_word_embeddings=False))
        == PRESETS["internvl3-1b"]
    )
    assert family_for_hf_config(original_config(QWEN25_05B, INTERNVIT_300M)) is get_family("internvl")


BAD_CONFIGS = {
    "InternLM2 decoder": (
        lambda c: c["llm_config"].update(architectures=["InternLM2ForCausalLM"], model_type="internlm2"),
        r"Qwen2 / Qwen2.5 decoders only \(not the InternLM2",
    ),
    "v1 pixel shuffle": (lambda c: c.pop("ps_version"), r"ps_version 'v1 \(the default\)'.*only the 'v2'"),
    "interpolated positions": (lambda c: c.update(force_image_size=224), "force_image_size 224 != vision_config"),
    "sliding window": (lambda c: c["llm_config"].update(use_sliding_window=True), "use_sliding_window is true"),
    "yarn rope": (lambda c: c["llm_config"].update(rope_scaling={"rope_type": "yarn"}), "rope type 'yarn'"),
    "token outside the vocabulary": (
        lambda c: c["llm_config"].update(vocab_size=1000),
        r"image_token_id 151667 is not a token id of the 1000-token vocabulary",
    ),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_unsupported_original_configs_are_refused_by_name(name):
    change, message = BAD_CONFIGS[name]
    config = original_config(dict(QWEN25_05B), dict(INTERNVIT_300M))
    change(config)
    with pytest.raises(ValueError, match=message):
        from_hf_config(config)


def test_unsupported_native_configs_are_refused_by_name():
    native = to_hf_config(PRESETS["tiny"])
    for key, value, message in [
        ("vision_feature_select_strategy", "full", "vision_feature_select_strategy must be 'default'"),
        ("vision_feature_layer", [-1, -2], "one layer index is supported"),
        ("downsample_ratio", 0.3, r"downsample_ratio 0.3 must be 1/n"),
    ]:
        with pytest.raises(ValueError, match=message):
            from_hf_config({**native, key: value})
    with pytest.raises(ValueError, match=r"vision_config.use_mean_pooling=False is not supported"):
        from_hf_config({**native, "vision_config": {**native["vision_config"], "use_mean_pooling": False}})
    with pytest.raises(ValueError, match="vision feature_layer 5 is outside the 3-block tower"):
        with_overrides(PRESETS["tiny"], {"vision.feature_layer": 5})


def test_presets_and_overrides():
    assert get_preset("4b") is PRESETS["internvl2.5-4b"] and get_preset("1B") is PRESETS["internvl3-1b"]
    with pytest.raises(KeyError, match=r"unknown model preset 'x'.*internvl3-8b.*aliases"):
        get_preset("x")
    wider = with_overrides(PRESETS["tiny"], {"text.hidden_size": 128, "text.num_attention_heads": 8})
    assert wider.text.mrope_section == (8, 0, 0)  # the rotary sections follow the new head width
    with pytest.raises(KeyError, match="unknown field 'nope'"):
        with_overrides(PRESETS["tiny"], {"vision.nope": 1})


# ---------------------------------------------------------------- weights: export, import, original layout


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_export_import_round_trip_is_bit_exact_and_transformers_loads_it(scan, tmp_path):
    cfg = from_hf_config(TINY_B)
    abstract = nnx.state(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0), scan_layers=scan)), nnx.Param)
    rng = np.random.default_rng(0)
    state = nnx.from_flat_state(
        [(p, v.replace(jnp.asarray(rng.standard_normal(v.shape), v.dtype))) for p, v in nnx.to_flat_state(abstract)]
    )
    save_hf_safetensors(state, cfg, tmp_path / SINGLE_FILE)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(to_hf_config(cfg, "float32")))
    loaded = flat_paths(load_hf_state(tmp_path, abstract, cfg))
    for path, var in flat_paths(state).items():
        assert np.array_equal(np.asarray(loaded[path][...]), np.asarray(var[...])), path
    _, info = InternVLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor


def to_original_name(name: str) -> str:
    """transformers' saved name -> the original release's (the conversion script's renames, inverted)."""
    renames = [
        (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
        (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
        (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
        (r"^vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
        (r"^vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
        (r"^vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
        (r"^vision_tower\.encoder\.layer\.", "vision_model.encoder.layers."),
        (r"\.lambda_(\d)$", r".ls\1"),
        (r"\.layernorm_before\.", ".norm1."),
        (r"\.layernorm_after\.", ".norm2."),
        (r"\.attention\.projection_layer\.", ".attn.proj."),
        (r"\.attention\.([qk])_norm\.", r".attn.\1_norm."),
    ]  # language_model.* names are the same in both
    for pattern, repl in renames:
        name = re.sub(pattern, repl, name)
    return name


def write_original_folder(native_dir, out_dir, config: dict):
    """The native folder's tensors under the original names, q / k / v fused into `attn.qkv` (rows q, k, v)."""
    tensors = load_file(native_dir / SINGLE_FILE)
    original = {}
    for name, value in tensors.items():
        fused = re.fullmatch(r"(vision_tower\.encoder\.layer\.\d+)\.attention\.q_proj\.(weight|bias)", name)
        if fused:
            parts = [tensors[f"{fused[1]}.attention.{p}_proj.{fused[2]}"] for p in "qkv"]
            original[to_original_name(f"{fused[1]}.x.{fused[2]}").replace(".x.", ".attn.qkv.")] = np.concatenate(parts)
        elif not re.search(r"\.attention\.[kv]_proj\.", name):
            original[to_original_name(name)] = value
    out_dir.mkdir()
    save_file(original, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config))
    return original


def test_original_release_folder_imports_like_the_native_one(tmp_path):
    """A tiny model with InternVL's real vocabulary (the original config.json does not name <IMG_CONTEXT>: its
    Qwen id 151667 must be a token), saved by transformers, then rewritten as an original release."""
    native_cfg = copy.deepcopy(TINY)
    native_cfg.update(image_token_id=151667)
    native_cfg["text_config"].update(vocab_size=151674, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    native = save_random_internvl(tmp_path / "native", native_cfg, seed=3)
    text = {k: v for k, v in native_cfg["text_config"].items() if k not in ("model_type", "rope_parameters")}
    vision = {
        "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 48,
        "image_size": 56, "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6, "initializer_factor": 0.1,
    }  # fmt: skip
    config = original_config({**text, "rope_theta": 1000000.0}, vision, tie_word_embeddings=False)
    stored = write_original_folder(native, tmp_path / "original", config)
    assert "vision_model.encoder.layers.2.attn.qkv.weight" in stored and "mlp1.3.bias" in stored
    assert not any("vision_tower" in n or "multi_modal" in n for n in stored)
    from_native, from_original = load_hf_model(native), load_hf_model(tmp_path / "original")
    assert from_original.cfg == from_native.cfg
    assert_same_params(from_original, from_native)


def test_in_memory_and_original_names_map_to_canonical_ones():
    assert canonical_hf_name("model.language_model.layers.3.mlp.up_proj.weight") == (
        "language_model.model.layers.3.mlp.up_proj.weight"
    )
    assert canonical_hf_name("lm_head.weight") == "language_model.lm_head.weight"
    assert canonical_hf_name("model.vision_tower.encoder.layer.0.lambda_1") == "vision_tower.encoder.layer.0.lambda_1"
    assert canonical_hf_name("vision_model.encoder.layers.7.attn.qkv.bias") == tuple(
        f"vision_tower.encoder.layer.7.attention.{p}_proj.bias" for p in "qkv"
    )
    assert canonical_hf_name("vision_model.encoder.layers.7.ls2") == "vision_tower.encoder.layer.7.lambda_2"
    assert canonical_hf_name("mlp1.1.weight") == "multi_modal_projector.linear_1.weight"
    assert hf_module_name("projector.fc1") == "model.multi_modal_projector.linear_1"
    assert hf_module_name("text.layers.attn.q", 3) == "model.language_model.layers.3.self_attn.q_proj"
    assert hf_module_name("text.lm_head") == "lm_head"
