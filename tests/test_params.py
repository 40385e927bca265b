"""The HF layout table (`models.qwen2_5_vl.params`) is the single source: every parameter of a tiny model has
exactly one rule, ours -> HF -> ours is exact with scan_layers on and off, and the names, shapes and module names
it derives equal those of transformers' own Qwen2_5_VLForConditionalGeneration built from the same config."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from converters.hf import save_hf_safetensors
from tests.helpers.hf_models import TINY_CONFIG, TINY_CONFIG_B
from vlmr1_jax.filenames import SINGLE_FILE
from vlmr1_jax.models.hf_weights import load_hf_state
from vlmr1_jax.models.layers import Dense
from vlmr1_jax.models.qwen2_5_vl.config import from_hf_config
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.params import (
    IDENTITY,
    LAYOUT,
    PATCH_EMBED,
    RULES,
    TRANSPOSE,
    Rule,
    _index,
    canonical_hf_name,
    expand,
    expected_hf_shapes,
    flat_paths,
    from_hf_tensor,
    hf_module_name,
    in_memory_hf_name,
    is_stacked,
    to_hf_name,
    to_hf_tensor,
)

CONFIGS = {"untied": TINY_CONFIG, "tied": TINY_CONFIG_B}


def abstract_params(cfg) -> dict[str, nnx.Variable]:
    return flat_paths(nnx.state(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))), nnx.Param))


def hf_model(config: dict) -> Qwen2_5_VLForConditionalGeneration:
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_parameter_has_exactly_one_rule(name):
    paths = abstract_params(from_hf_config(CONFIGS[name]))
    for path in paths:
        owners = [rule for rule in RULES if path in dict(expand(rule))]
        assert len(owners) == 1, (path, owners)
    if name == "untied":  # and no rule is dead: the untied tiny model uses every one
        assert sorted(paths) == sorted(LAYOUT)


def test_table_refuses_ambiguous_or_unpaired_rules():
    with pytest.raises(ValueError, match="already has a rule"):
        _index(RULES + (Rule("text.norm.scale", "model.final_norm.weight", IDENTITY),))
    with pytest.raises(ValueError, match="already has a rule"):
        _index(RULES + (Rule("text.extra", "model.norm.weight", IDENTITY),))
    with pytest.raises(ValueError, match="do not pair up"):
        expand(Rule("text.layers.attn.{q,k}.kernel", "model.layers.{i}.self_attn.{q_proj}.weight", TRANSPOSE))


@pytest.mark.parametrize("name", CONFIGS)
def test_expected_shapes_equal_transformers_state_dict(name):
    """Names (legacy, from transformers 5's in-memory names) and shapes against a real HF model."""
    model = hf_model(CONFIGS[name])
    hf = {canonical_hf_name(n): tuple(t.shape) for n, t in model.state_dict().items()}
    if CONFIGS[name]["tie_word_embeddings"]:
        assert hf.pop("lm_head.weight") == hf["model.embed_tokens.weight"]  # the tied alias is not stored
    assert expected_hf_shapes(from_hf_config(CONFIGS[name])) == hf
    for in_memory in model.state_dict():
        assert in_memory_hf_name(canonical_hf_name(in_memory)) == in_memory


def test_module_names_are_transformers_linears():
    """Every Dense of ours (text and vision) names a torch Linear of the same in / out size in transformers 5."""
    cfg = from_hf_config(TINY_CONFIG)
    modules = dict(hf_model(TINY_CONFIG).named_modules())
    ours = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    checked = 0
    for path, dense in nnx.iter_graph(ours):
        if not isinstance(dense, Dense):
            continue
        path = ".".join(map(str, path))
        shape = dense.kernel.shape
        for layer in range(shape[0]) if is_stacked(path + ".kernel") else [None]:
            linear = modules[hf_module_name(path, layer)]
            assert isinstance(linear, torch.nn.Linear)
            assert (linear.in_features, linear.out_features) == shape[-2:]
            checked += 1
    assert checked == 2 * 7 + 1 + 4 * 5 + 2  # text layers x 7, lm_head, vision blocks x 5, merger x 2


def test_transforms_compute_what_torch_computes():
    """Against the formulas of the torch modules (numpy, independent of our code): a Linear is x @ W.T; the
    patch embedding is a Conv3d with stride = kernel, i.e. one dot product per output channel and patch."""
    cfg = from_hf_config(TINY_CONFIG)
    v = cfg.vision
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((v.in_channels * v.temporal_patch_size * v.patch_size**2, v.hidden_size))
    conv = to_hf_tensor("visual.patch_embed", ours, cfg)
    assert conv.shape == (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    patch = rng.standard_normal(conv.shape[1:])
    np.testing.assert_allclose(np.einsum("octhw,cthw->o", conv, patch), patch.reshape(-1) @ ours, rtol=1e-12)
    kernel = rng.standard_normal((5, 3))
    weight = to_hf_tensor("text.layers.attn.q.kernel", kernel, cfg)
    x = rng.standard_normal((2, 5))
    np.testing.assert_allclose(x @ weight.T, x @ kernel, rtol=1e-12)
    for path, value in (("visual.patch_embed", ours), ("text.layers.attn.q.kernel", kernel)):
        back = from_hf_tensor(path, to_hf_tensor(path, value, cfg))
        assert back.flags.c_contiguous and np.array_equal(back, value)
    assert LAYOUT["visual.patch_embed"][1] is PATCH_EMBED


def test_names_of_stacked_and_single_parameters():
    assert to_hf_name("text.layers.attn.k.bias", 1) == "model.layers.1.self_attn.k_proj.bias"
    assert to_hf_name("visual.merger.fc2.kernel") == "visual.merger.mlp.2.weight"
    assert hf_module_name("visual.blocks.attn.qkv", 3) == "model.visual.blocks.3.attn.qkv"
    with pytest.raises(ValueError, match="layer index is required"):
        to_hf_name("text.layers.attn.k.bias")
    with pytest.raises(ValueError, match="layer index is not allowed"):
        to_hf_name("text.norm.scale", 0)
    with pytest.raises(KeyError, match=r"no HF layout rule for parameter 'text\.layers\.attn\.o\.bias'"):
        to_hf_name("text.layers.attn.o.bias", 0)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_round_trip_ours_hf_ours_is_exact(scan, tmp_path):
    """Random parameters of a model built with scan_layers on / off -> an HF file -> that model's abstract state
    filled by the loader: bit-identical."""
    cfg = from_hf_config(TINY_CONFIG)
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), scan_layers=scan)), nnx.Param)
    rng = np.random.default_rng(0)
    state = nnx.from_flat_state(
        [
            (path, var.replace(jnp.asarray(rng.standard_normal(var.shape), var.dtype)))
            for path, var in nnx.to_flat_state(abstract)
        ]
    )
    save_hf_safetensors(state, cfg, tmp_path / SINGLE_FILE)
    loaded = flat_paths(load_hf_state(tmp_path, abstract, cfg))
    original = flat_paths(state)
    assert loaded.keys() == original.keys()
    for path, var in original.items():
        assert np.array_equal(np.asarray(loaded[path][...]), np.asarray(var[...])), path


def test_converters_never_import_torch():
    """Importing every converter (check-export included) leaves torch unloaded; `--forward` lives in ports."""
    code = (
        "import sys; import converters.check, converters.export, converters.hf, converters.import_hf, "
        "converters.peft, converters.release, vlmr1_jax.cli; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
