"""Qwen2-VL against transformers' Qwen2VLForConditionalGeneration (float32 reference): the released presets tensor
for tensor on the meta device, the config.json mapping, the parameter layout against a real state_dict, each vision
part (LayerNorm, rope, block, merger), whole-model logits with cached decode on a left-padded image batch, the
import -> export round trip, `vlmr1 check-parity` on a held-out shape, and one GRPO step on the 8-device mesh."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import Qwen2VLConfig as HFQwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf_qwen2

from converters.hf import save_hf_safetensors
from ports.parity import RTOL, compare
from tests.helpers.cli import run_cli
from tests.helpers.hf_models import QWEN2_VL_TINY_CONFIG, QWEN2_VL_TINY_CONFIG_B, save_random_hf_model
from tests.helpers.params import host_params
from tests.helpers.prompts import SPECS, G, completions, train_prompts
from tests.helpers.qwen_parity import make_inputs
from tests.helpers.release import CORPUS, compact_config
from tests.test_block_parity import assert_close, copy_linear, hf_random, padded_groups
from tests.test_train_step import assert_params_close, device_batch, grpo_step
from vlmr1_jax.cli import main as cli_main
from vlmr1_jax.config import MeshConfig
from vlmr1_jax.models.family import family_for_hf_config, get_family
from vlmr1_jax.models.hf_weights import load_hf_model, read_config
from vlmr1_jax.models.qwen2_5_vl.rope import inv_frequencies, vision_cos_sin
from vlmr1_jax.models.qwen2_vl.config import PRESETS, from_hf_config, get_preset, to_hf_config
from vlmr1_jax.models.qwen2_vl.model import Qwen2VL
from vlmr1_jax.models.qwen2_vl.params import canonical_hf_name, hf_entries, to_hf_tensor
from vlmr1_jax.models.qwen2_vl.vision import LayerNorm, PatchMerger, VisionBlock
from vlmr1_jax.parallel.mesh import make_mesh

RELEASED = ["qwen2-vl-2b", "qwen2-vl-7b"]
SHAPELESS = np.dtype([])
CFG = from_hf_config(QWEN2_VL_TINY_CONFIG)


# ---------------------------------------------------------------- presets and config.json


def hf_shapes(cfg) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Legacy HF name -> shape of every parameter of transformers' model of `cfg` (meta device), and tied or not."""
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(HFQwen2VLConfig(**to_hf_config(cfg)))
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return {canonical_hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}, tied


def our_shapes(cfg) -> dict[str, tuple[int, ...]]:
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0))))
    return {
        name: to_hf_tensor(path, np.empty(shape, SHAPELESS), cfg).shape for name, path, _, shape in hf_entries(abstract)
    }


@pytest.mark.parametrize("name, billions", [("qwen2-vl-2b", 2.209), ("qwen2-vl-7b", 8.291)])
def test_preset_matches_hf_tensor_for_tensor(name, billions):
    cfg = PRESETS[name]
    hf, tied = hf_shapes(cfg)
    ours = our_shapes(cfg)
    assert tied == cfg.text.tie_word_embeddings
    assert sorted(ours) == sorted(hf)
    assert {k: (ours[k], hf[k]) for k in hf if ours[k] != hf[k]} == {}
    count = sum(int(np.prod(s)) for s in ours.values())
    assert count == sum(int(np.prod(s)) for s in hf.values())
    assert abs(count / 1e9 - billions) < 0.001, count  # the released models' sizes, tied head counted once


@pytest.mark.parametrize("name", [*RELEASED, "tiny"])
def test_hf_config_round_trip_flat_and_nested(name):
    cfg = PRESETS[name]
    assert from_hf_config(to_hf_config(cfg)) == cfg
    nested = HFQwen2VLConfig(**to_hf_config(cfg)).to_dict()
    assert "text_config" in nested and "hidden_size" not in nested
    assert from_hf_config(nested) == cfg


def test_config_json_is_transformers_qwen2_vl(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(get_preset("7b"))))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, HFQwen2VLConfig)
    assert (hf.vision_config.embed_dim, hf.vision_config.hidden_size, hf.vision_config.mlp_ratio) == (1280, 3584, 4)
    assert family_for_hf_config(to_hf_config(get_preset("2b"))) is get_family("qwen2_vl")
    assert get_preset("2b") is PRESETS["qwen2-vl-2b"] and CFG.family == "qwen2_vl"
    with pytest.raises(ValueError, match="model_type is 'qwen2_5_vl', expected 'qwen2_vl'"):
        from_hf_config({**to_hf_config(CFG), "model_type": "qwen2_5_vl"})
    with pytest.raises(ValueError, match="vision out_hidden_size 3584 != text hidden_size 64"):
        from_hf_config({**to_hf_config(CFG), "vision_config": {"depth": 2}})


# ---------------------------------------------------------------- layout and weights


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_random_hf_model(tmp_path_factory.mktemp("qwen2_vl"), QWEN2_VL_TINY_CONFIG, seed=5)


@pytest.fixture(scope="module")
def hf_tied_dir(tmp_path_factory):
    return save_random_hf_model(tmp_path_factory.mktemp("qwen2_vl_tied"), QWEN2_VL_TINY_CONFIG, seed=6, tied=True)


def test_layout_is_transformers_state_dict(hf_dir):
    """Every tensor transformers saves has exactly one rule, with our shape in its layout."""
    saved = {name: value.shape for name, value in load_file(hf_dir / "model.safetensors").items()}
    assert saved == our_shapes(read_config(hf_dir))
    assert "visual.blocks.2.mlp.fc2.bias" in saved and "visual.merger.ln_q.bias" in saved


@pytest.mark.parametrize("fixture", ["hf_dir", "hf_tied_dir"])
def test_import_export_round_trip_is_bit_exact(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    model = load_hf_model(folder)
    assert type(model) is Qwen2VL
    save_hf_safetensors(nnx.state(model, nnx.Param), model.cfg, tmp_path / "model.safetensors")
    original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    if model.cfg.text.tie_word_embeddings:  # a tied head is the embedding: some saves keep a copy, ours none
        original.pop("lm_head.weight", None)
    assert original.keys() == exported.keys()
    assert all(np.array_equal(original[k], exported[k]) for k in original)


# ---------------------------------------------------------------- vision parts, one at a time


@pytest.fixture(scope="module")
def hf_vision_config():
    config = HFQwen2VLConfig(**QWEN2_VL_TINY_CONFIG).vision_config
    config._attn_implementation = "eager"
    return config


def copy_layer_norm(ours: LayerNorm, theirs: torch.nn.LayerNorm) -> None:
    ours.scale[...] = jnp.asarray(theirs.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())


def test_layer_norm_matches_torch():
    hf = hf_random(lambda: torch.nn.LayerNorm(32, eps=1e-6), seed=0)
    ours = LayerNorm(32, 1e-6, None)
    copy_layer_norm(ours, hf)
    x = (3 * np.random.default_rng(0).standard_normal((4, 32)) + 2).astype(np.float32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(x))
    assert_close(ours(jnp.asarray(x)), expected, 1e-5, "LayerNorm")


def test_vision_rope_matches_hf(hf_vision_config):
    hf = hf_qwen2.Qwen2VLVisionRotaryEmbedding(hf_vision_config)
    inv_freq = inv_frequencies(CFG.vision.head_dim // 2, CFG.vision.rope_theta)
    np.testing.assert_array_equal(inv_freq, hf.inv_freq.numpy())
    hw = np.stack(np.meshgrid(np.arange(6), np.arange(10), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        cos, sin = hf(torch.zeros(1), torch.from_numpy(hw))
    ours_cos, ours_sin = vision_cos_sin(jnp.asarray(hw), inv_freq)
    assert_close(ours_cos, cos, 1e-5, "vision rope cos")
    assert_close(ours_sin, sin, 1e-5, "vision rope sin")


def test_vision_block_matches_hf(hf_vision_config):
    """LayerNorms, 2-D rope, attention within each of two frames (36 and 16 patches), QuickGELU fc1 / fc2."""
    hf = hf_random(lambda: hf_qwen2.Qwen2VLVisionBlock(hf_vision_config), seed=1)
    ours = VisionBlock(CFG.vision, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    copy_layer_norm(ours.norm1, hf.norm1)
    copy_layer_norm(ours.norm2, hf.norm2)
    for mine, theirs in ((ours.attn.qkv, hf.attn.qkv), (ours.attn.proj, hf.attn.proj)):
        copy_linear(mine, theirs)
    copy_linear(ours.mlp.fc1, hf.mlp.fc1)
    copy_linear(ours.mlp.fc2, hf.mlp.fc2)
    lengths = [36, 16]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((sum(lengths), CFG.vision.hidden_size)).astype(np.float32)
    hw = rng.integers(0, 40, (sum(lengths), 2))
    rotary = hf_qwen2.Qwen2VLVisionRotaryEmbedding(hf_vision_config)
    with torch.no_grad():
        cu_seqlens = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
        expected = hf(
            torch.from_numpy(x), cu_seqlens=cu_seqlens, position_embeddings=rotary(torch.zeros(1), torch.from_numpy(hw))
        )
    cos, sin = vision_cos_sin(jnp.asarray(hw), inv_frequencies(CFG.vision.head_dim // 2, CFG.vision.rope_theta))
    blocks, mask = padded_groups(lengths)
    assert_close(ours(jnp.asarray(x), cos, sin, jnp.asarray(blocks), jnp.asarray(mask)), expected, 2e-5, "block")


def test_patch_merger_matches_hf():
    hf = hf_random(lambda: hf_qwen2.PatchMerger(dim=CFG.vision.out_hidden_size, context_dim=CFG.vision.hidden_size), 2)
    ours = PatchMerger(CFG.vision, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    copy_layer_norm(ours.ln_q, hf.ln_q)
    copy_linear(ours.fc1, hf.mlp[0])
    copy_linear(ours.fc2, hf.mlp[2])
    x = 2 * np.random.default_rng(2).standard_normal((24, CFG.vision.hidden_size)).astype(np.float32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(x))
    assert_close(ours(jnp.asarray(x)), expected, 2e-5, "merger")


# ---------------------------------------------------------------- the whole model


@pytest.mark.parametrize("fixture", ["hf_dir", "hf_tied_dir"])
def test_logits_match_hf(fixture, request):
    """Three images (one tiling its slot groups exactly, two padded) over a left-padded batch of 2, 4 cached decode
    steps; transformers computes its own positions from `mm_token_type_ids`."""
    folder = request.getfixturevalue(fixture)
    inputs = make_inputs(read_config(folder), [(1, 8, 12), (1, 6, 10), (1, 2, 6)], batch=2, steps=4)
    assert (inputs.batch.attention_mask == 0).any() and inputs.position_ids is None
    report = compare(str(folder), inputs)
    print(*(d.line() for d in report.diffs), sep="\n")
    assert report.passed(RTOL / 10), report
    assert len(report.decode) == 4 and report.vision is not None and report.logits.scale > 0.1


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory):
    """The held-out shape with a compact tokenizer beside it (check-parity renders real prompts)."""
    from vlmr1_jax.processing.tokenizer import build_compact_tokenizer

    tokenizer = build_compact_tokenizer(CORPUS, vocab_size=300)
    config = compact_config(tokenizer, QWEN2_VL_TINY_CONFIG_B)
    folder = save_random_hf_model(tmp_path_factory.mktemp("qwen2_vl_b"), config, seed=7)
    tokenizer.save(folder)
    return folder


def test_check_parity_passes_on_a_held_out_config(held_out_dir, capsys):
    code = cli_main(["check-parity", "--hf-model", str(held_out_dir), "--images", "3", "--batch", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("qwen2_vl: ") and "PASS" in out and "vision features" in out and "decode step 3" in out


def test_grpo_step_on_the_mesh_equals_one_device(hf_dir):
    """One full-parameter GRPO step, sharded over data 2 x fsdp 2 x tensor 2 and on one device."""
    cfg = read_config(hf_dir)
    batch, _ = train_prompts(cfg)
    tokens, mask = completions(len(SPECS) * G)
    rng = np.random.default_rng(2)
    data = {
        "batch": batch,
        "tokens": tokens,
        "mask": mask,
        "advantages": rng.standard_normal(len(tokens)).astype(np.float32),
        "ref_logprobs": (-3 + 0.3 * rng.standard_normal(tokens.shape)).astype(np.float32),
    }
    _, state, step = grpo_step(load_hf_model(hf_dir))
    before = host_params(state.trainable)
    state, metrics = step(state, device_batch(data))
    single = host_params(state.trainable)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, sharded_state, step = grpo_step(load_hf_model(hf_dir, mesh=mesh))
    assert any("tensor" in str(v.sharding.spec) for v in jax.tree.leaves(sharded_state.trainable))
    sharded_state, sharded_metrics = step(sharded_state, device_batch(data, mesh))
    np.testing.assert_allclose(float(sharded_metrics["loss"]), float(metrics["loss"]), atol=1e-6)
    assert_params_close(host_params(sharded_state.trainable), single, atol=1e-5)
    assert max(np.abs(single[k] - before[k]).max() for k in before) > 1e-4  # the step moved the weights


def test_infer_backends_agree_on_a_qwen2_vl_folder(held_out_dir, tmp_path, capsys):
    """`vlmr1 infer` through transformers and through our JAX model: the same greedy text, with a task template too;
    a template the family lacks is one error line."""
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(image)
    common = ["infer", "--model", str(held_out_dir), "--image", str(image), "--prompt", "find the red box"]
    for extra in ([], ["--task-type", "rec"]):
        texts = []
        for backend in ("torch", "jax"):
            assert run_cli(*common, *extra, "--backend", backend, "--max-new-tokens", "5") == 0
            texts.append(capsys.readouterr().out)
        assert texts[0] == texts[1] and texts[0].strip(), texts
    assert run_cli(*common, "--task-type", "nope") == 1
    assert "--task-type 'nope': the qwen2_vl family's question templates are ['default'," in capsys.readouterr().err


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_hf_model_inputs_are_the_processor_rows_in_order(family):
    """Images spanning several slot groups come back in the image processor's row order with their grids, and
    `mm_token_type_ids` marks exactly the image tokens."""
    processor = get_family(family).processor
    cfg = get_family(family).get_preset("tiny")
    rng = np.random.default_rng(4)
    images = [
        processor.preprocess_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), min_pixels=3136, max_pixels=10**6)
        for h, w in ((168, 252), (84, 140), (112, 56))
    ]
    wrap = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
    ids = [[5, *wrap, 6, *wrap], [7, 8, *wrap, 9]]
    batch = processor.build_prompt_batch(ids, [images[:2], images[2:]], cfg, pad_id=0)
    hf = processor.hf_model_inputs(batch)
    assert hf.keys() == {"pixel_values", "image_grid_thw", "mm_token_type_ids"}
    np.testing.assert_array_equal(hf["pixel_values"], np.concatenate([px for px, _ in images]))
    assert hf["image_grid_thw"].tolist() == [list(g) for _, g in images] == [[1, 12, 18], [1, 6, 10], [1, 8, 4]]
    np.testing.assert_array_equal(hf["mm_token_type_ids"], batch.input_ids == cfg.image_token_id)
    assert processor.hf_model_inputs(processor.build_prompt_batch([[5, 6]], [[]], cfg, pad_id=0)) == {}
