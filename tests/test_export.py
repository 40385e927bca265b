"""Release export (converters.release): files, shards, dtypes, atomic replacement, offline loading, JAX parity."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from converters.check import check_export
from converters.release import (
    RELEASE_MARKER,
    ExportError,
    export_hf_folder,
    export_release,
    parse_size,
    plan_shards,
    resolve_dtype,
)
from tests.helpers.cli import run_cli
from tests.helpers.release import CORPUS, PROMPT, make_release_source
from vlmr1_jax.models.hf_weights import iter_hf_tensors, load_hf_model
from vlmr1_jax.models.qwen2_5_vl.params import flat_paths
from vlmr1_jax.processing.tokenizer import build_compact_tokenizer


@pytest.fixture(scope="module")
def model(release_source):
    """Our JAX model, loaded from the tiny HF source (fp32)."""
    return load_hf_model(release_source)


def source_tensors(folder: Path) -> dict[str, np.ndarray]:
    return dict(iter_hf_tensors(folder))


def shard_tensors(folder: Path) -> dict[str, tuple[np.ndarray, str, dict]]:
    """name -> (array, file name, metadata) over every safetensors file, read with the safetensors library."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
                out[name] = (f.get_tensor(name), path.name, f.metadata())
    return out


def test_parse_size_and_plan_shards():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size("1.5KB") == 1500
    assert parse_size(123) == 123
    for bad in ("five", "5XB", "0", -1):
        with pytest.raises(ValueError):
            parse_size(bad)
    # Greedy in order: a shard closes when the next tensor would overflow it; a big tensor stands alone.
    sizes = [("a", 40), ("b", 50), ("c", 20), ("d", 200), ("e", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "d", "e"]]


def test_target_dtypes():
    assert resolve_dtype("hf", None) == "bfloat16"
    assert resolve_dtype("ascend-a2", None) == "bfloat16"
    assert resolve_dtype("ascend-310p", None) == "float16"
    assert resolve_dtype("ascend-a2", "fp32") == resolve_dtype("ascend-a2", "float32") == "float32"
    for target, dtype in (("ascend-310p", "bf16"), ("ascend-310p", "float32"), ("ascend-a2", "fp16")):
        with pytest.raises(ValueError, match="not allowed"):
            resolve_dtype(target, dtype)
    with pytest.raises(ValueError, match="unknown target"):
        resolve_dtype("tpu", None)


def test_hf_release_loads_offline_and_matches_jax(model, release_source, tmp_path, monkeypatch):
    """fp32 release of our JAX model: complete file set, transformers loads it offline, its tokenizer and image
    processor reproduce our inputs, and its logits match our JAX model on an image prompt."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from ports.parity import ParityInputs, compare
    from ports.torch_runtime import TorchRuntime

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = {
        "base_model": "Qwen/Qwen2.5-VL-3B-Instruct",
        "datasets": ["refcoco_train"],
        "rewards": ["accuracy", "format"],
        "steps": 120,
        "metrics": {"rec_acc@0.5": 0.8125},
        "license": "apache-2.0",
    }
    out = export_release(
        model, model.cfg, tmp_path / "release", target="hf", dtype="fp32", tokenizer_dir=release_source, card=card
    )
    files = {p.name for p in out.iterdir()}
    assert files == {
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "chat_template.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
        "README.md",
        RELEASE_MARKER,
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "text_config" not in config
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert {
        k: preprocessor[k]
        for k in (
            "min_pixels",
            "max_pixels",
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "resample",
            "image_processor_type",
        )
    } == {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    assert preprocessor["rescale_factor"] == pytest.approx(1 / 255)
    readme = (out / "README.md").read_text()
    for text in (
        'base_model: "Qwen/Qwen2.5-VL-3B-Instruct"',
        "refcoco_train",
        "accuracy, format",
        "steps: 120",
        "| rec_acc@0.5 | 0.8125 |",
        'license: "apache-2.0"',
    ):
        assert text in readme

    runtime = TorchRuntime.load(out, device="cpu")  # from_pretrained, float32 on the CPU
    assert isinstance(runtime.model, Qwen2_5_VLForConditionalGeneration)
    assert runtime.model.dtype == torch.float32 and runtime.model.config.vision_config.depth == 4
    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    inputs = runtime.inputs([image], PROMPT)
    text = runtime.prompt_text(PROMPT, 1)
    ids = inputs["input_ids"][0].tolist()
    # 56x84 pixels -> a 4x6 patch grid -> 6 merged tokens replace the one <|image_pad|> of the text.
    assert ids.count(model.cfg.image_token_id) == 6 and len(ids) == len(runtime.tokenizer.encode(text)) + 5
    # transformers' own tokenizer and (PIL) image processor, read from the release, agree with ours.
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == runtime.tokenizer.encode(text)
    hf_images = AutoImageProcessor.from_pretrained(out)(images=[image], return_tensors="np")
    assert hf_images["image_grid_thw"].tolist() == [[1, 4, 6]] == inputs["image_grid_thw"].tolist()
    np.testing.assert_allclose(hf_images["pixel_values"], inputs["pixel_values"].numpy(), atol=1e-5)
    try:  # transformers 5.x builds Qwen2.5-VL's video processor, which needs torchvision
        from transformers import AutoProcessor

        assert (
            AutoProcessor.from_pretrained(out).tokenizer.convert_tokens_to_ids("<|image_pad|>")
            == model.cfg.image_token_id
        )
    except ImportError as e:
        assert "torchvision" in str(e).lower()

    parity = ParityInputs(
        runtime.prompt_batch([([image], PROMPT)]),
        {k: v.numpy() for k, v in inputs.items() if k not in ("input_ids", "attention_mask")},
        decode_tokens=np.array([[5, 17, 33]]),
    )
    report = compare(str(out), parity)
    assert report.passed(), report
    assert report.logits.scale > 0.1


def test_jax_export_import_is_bit_exact_and_sharded(model, release_source, tmp_path):
    """Small shards: several files, a correct index, legacy names equal to transformers' own save, and a
    round trip back into JAX that is bit-exact in fp32."""
    out = export_release(
        model, model.cfg, tmp_path / "sharded", dtype="fp32", max_shard_size="40KB", tokenizer_dir=release_source
    )
    tensors = shard_tensors(out)
    files = sorted({file for _, file, _ in tensors.values()})
    assert len(files) > 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: file for name, (_, file, _) in tensors.items()}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a, _, _ in tensors.values())
    assert all(meta == {"format": "pt"} for _, _, meta in tensors.values())
    for file in files:
        in_file = [a.nbytes for a, f, _ in tensors.values() if f == file]
        assert sum(in_file) <= 40_000 or len(in_file) == 1

    reference = source_tensors(release_source)  # what transformers' save_pretrained wrote
    assert set(tensors) == set(reference) and len(tensors) == 81
    for name, (array, _, _) in tensors.items():
        assert array.dtype == np.float32 and np.array_equal(array, reference[name]), name

    back = load_hf_model(out)
    ours, theirs = flat_paths(nnx.state(model)), flat_paths(nnx.state(back))
    assert ours.keys() == theirs.keys()
    for path in ours:
        assert np.array_equal(np.asarray(ours[path][...]), np.asarray(theirs[path][...])), path


def test_tied_release_has_no_lm_head_and_bf16_rounds_like_torch(tmp_path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    source = make_release_source(tmp_path / "tied_source", tied=True, seed=3)
    out = export_hf_folder(source, tmp_path / "tied")  # target hf: bf16 by default
    tensors = shard_tensors(out)
    assert "lm_head.weight" not in tensors and len(tensors) == 80
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reference = source_tensors(source)
    for name, (array, _, _) in tensors.items():
        expected = torch.from_numpy(reference[name]).to(torch.bfloat16).view(torch.int16).numpy()
        assert array.dtype == ml_dtypes.bfloat16 and np.array_equal(array.view(np.int16), expected), name
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert hf.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(hf.lm_head.weight, hf.get_input_embeddings().weight)
    # The base model's generation_config.json and tokenizer files are copied byte for byte.
    for name in ("generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


def test_ascend_310p_release_is_float16_only(model, release_source, tmp_path):
    with pytest.warns(UserWarning, match="check-export .* --forward"):
        out = export_release(model, model.cfg, tmp_path / "duo", target="ascend-310p", tokenizer_dir=release_source)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    reference = source_tensors(release_source)
    tensors = shard_tensors(out)
    for name, (array, _, _) in tensors.items():
        assert array.dtype == np.float16 and np.array_equal(array, reference[name].astype(np.float16)), name
    with pytest.raises(ValueError, match="only float16"):
        export_release(model, model.cfg, tmp_path / "duo_bf16", target="ascend-310p", dtype="bf16")


def test_generated_generation_config_uses_tokenizer_ids(model, release_source, tmp_path):
    out = export_release(model, model.cfg, tmp_path / "no_base", dtype="fp32", tokenizer_dir=release_source)
    generation = json.loads((out / "generation_config.json").read_text())
    tokenizer = build_compact_tokenizer(CORPUS, vocab_size=300)
    end_of_text, im_end = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")
    assert generation["eos_token_id"] == [im_end, end_of_text]
    assert generation["pad_token_id"] == generation["bos_token_id"] == end_of_text
    assert generation["do_sample"] is False
    assert "vlmr1-jax defaults" in (out / "README.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temporary folder


def test_float16_overflowing_weights_are_refused(release_source, tmp_path):
    big = load_hf_model(release_source)
    big.text.norm.scale[...] = np.full(big.text.norm.scale.shape, 1e5, np.float32)
    with pytest.raises(ValueError, match=r"model\.norm\.weight: 64 values are inf/NaN as float16"):
        export_release(big, big.cfg, tmp_path / "overflow", target="ascend-310p", tokenizer_dir=release_source)
    assert not list(tmp_path.iterdir()), "a failed export must leave nothing behind"


def test_existing_folder_is_never_half_overwritten(model, release_source, tmp_path, monkeypatch):
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("previous release")
    (out / RELEASE_MARKER).write_text("")  # a release we wrote: --overwrite may replace it
    with pytest.raises(FileExistsError, match="overwrite"):
        export_release(model, model.cfg, out, dtype="fp32", tokenizer_dir=release_source)
    monkeypatch.setattr("converters.release.check_export", lambda folder, target: ["config.json: broken"])
    with pytest.raises(ExportError, match=r"config\.json: broken"):
        export_release(model, model.cfg, out, dtype="fp32", tokenizer_dir=release_source, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    assert sorted(p.name for p in out.iterdir()) == sorted([RELEASE_MARKER, "keep.txt"])
    monkeypatch.undo()
    export_release(model, model.cfg, out, dtype="fp32", tokenizer_dir=release_source, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert check_export(out, "hf") == []
    # Without an atomic exchange (non-Linux), the old folder is moved aside, then deleted.
    monkeypatch.setattr("converters.release._exchange", lambda a, b: False)
    export_release(model, model.cfg, out, dtype="bf16", tokenizer_dir=release_source, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_command(release_source, tmp_path, capsys):
    out = tmp_path / "a2"
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"steps": 7, "rewards": ["accuracy"]}))
    assert (
        run_cli(
            "export", release_source, "--out", out, "--target", "ascend-a2", "--max-shard-size", "30KB", "--card", card
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert len(list(out.glob("model-*.safetensors"))) > 1 and "steps: 7" in (out / "README.md").read_text()
    assert {shard_tensors(out)[n][0].dtype for n in shard_tensors(out)} == {np.dtype(ml_dtypes.bfloat16)}
    assert run_cli("export", release_source, "--out", out, "--target", "ascend-a2") == 1
    assert "overwrite" in capsys.readouterr().err
    assert run_cli("export", release_source, "--out", tmp_path / "x", "--target", "ascend-a2", "--dtype", "fp16") == 1
    assert "not allowed" in capsys.readouterr().err
    assert run_cli("export", tmp_path, "--out", tmp_path / "y") == 1
    assert "no config.json" in capsys.readouterr().err
