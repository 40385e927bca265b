"""check-export: a clean 310P release passes; broken copies fail with a problem that names what is wrong."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters.check import check_export
from converters.release import export_hf_folder
from ports.forward_report import forward_inputs, forward_report
from tests.helpers.cli import run_cli
from vlmr1_jax.models.safetensors_read import read_safetensors_header


@pytest.fixture(scope="module")
def releases(release_source, tmp_path_factory) -> dict[str, Path]:
    """A 310P (float16) release in one file and an ascend-a2 (bf16) one in several shards."""
    root = tmp_path_factory.mktemp("check")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 310P activation advice
        duo = export_hf_folder(release_source, root / "duo", target="ascend-310p")
    a2 = export_hf_folder(release_source, root / "a2", target="ascend-a2", max_shard_size="30KB")
    return {"duo": duo, "a2": a2}


def broken_copy(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / release.name))


def rewrite(path: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit the dict, save it back with {"format": "pt"}."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_clean_releases_pass(releases):
    assert check_export(releases["duo"], "ascend-310p") == []
    assert check_export(releases["a2"], "ascend-a2") == []
    assert check_export(releases["a2"], "hf") == []
    header = read_safetensors_header(releases["duo"] / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if not k.startswith("__")} == {"F16"}
    assert header["__metadata__"] == {"format": "pt"}


def test_wrong_target_dtype(releases):
    problems = check_export(releases["duo"], "ascend-a2")
    assert problems and "torch_dtype 'float16' is not allowed for target ascend-a2" in problems[0]
    problems = check_export(releases["a2"], "ascend-310p")
    assert any("torch_dtype 'bfloat16' is not allowed for target ascend-310p" in p for p in problems)
    assert any("81 tensors are BF16, expected F16" in p for p in problems)


def test_missing_shard(releases, tmp_path):
    folder = broken_copy(releases["a2"], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    problems = check_export(folder, "ascend-a2")
    assert len(problems) == 1 and problems[0].startswith(f"missing shard {shard.name}"), problems


def test_wrong_tensor_dtype(releases, tmp_path):
    folder = broken_copy(releases["duo"], tmp_path)
    rewrite(
        folder / "model.safetensors",
        lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.float32)}),
    )
    problems = check_export(folder, "ascend-310p")
    assert problems == ["1 tensors are F32, expected F16 (float16): model.norm.weight"]


def test_renamed_key(releases, tmp_path):
    folder = broken_copy(releases["duo"], tmp_path)
    rewrite(folder / "model.safetensors", lambda t: t.update({"model.final_norm.weight": t.pop("model.norm.weight")}))
    problems = check_export(folder, "ascend-310p")
    assert "missing tensors: model.norm.weight" in problems
    assert any("unexpected tensors" in p and "model.final_norm.weight" in p for p in problems)


def test_wrong_shape_and_tied_lm_head(releases, tmp_path):
    folder = broken_copy(releases["duo"], tmp_path)
    rewrite(folder / "model.safetensors", lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:32]}))
    assert check_export(folder, "ascend-310p") == ["wrong shapes: model.norm.weight (32,) (expected (64,))"]
    tied = broken_copy(releases["duo"], tmp_path / "tied")
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    assert check_export(tied, "ascend-310p") == [
        "lm_head.weight present although tie_word_embeddings is true (hub releases omit it)"
    ]


def test_index_and_metadata_problems(releases, tmp_path):
    folder = broken_copy(releases["a2"], tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 2
    index_path.write_text(json.dumps(index))
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    save_file(load_file(shard), str(shard))  # no {"format": "pt"}
    problems = check_export(folder, "ascend-a2")
    assert any("total_size" in p and "bytes of tensor data" in p for p in problems)
    assert any(p.startswith(f"{shard.name}: __metadata__") for p in problems)
    (folder / "model-99999-of-99999.safetensors").write_bytes(shard.read_bytes())
    assert any("not referenced" in p for p in check_export(folder, "ascend-a2"))


def test_truncated_shard(releases, tmp_path):
    folder = broken_copy(releases["duo"], tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    assert any("truncated" in p for p in check_export(folder, "ascend-310p"))


def test_tokenizer_and_processor_problems(releases, tmp_path):
    folder = broken_copy(releases["duo"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["image_token_id"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["merge_size"] = 3
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    (folder / "chat_template.json").unlink()
    problems = check_export(folder, "ascend-310p")
    assert any(p.startswith("config.json image_token_id is 7 but the tokenizer's <|image_pad|> is") for p in problems)
    assert "preprocessor_config.json: merge_size 3 != config's 2" in problems
    assert any(p.startswith("chat_template.json missing") for p in problems)


def test_check_export_command(releases, tmp_path, capsys):
    assert run_cli("check-export", str(releases["duo"]), "--target", "ascend-310p") == 0
    assert "OK for target ascend-310p" in capsys.readouterr().out
    folder = broken_copy(releases["a2"], tmp_path)
    sorted(folder.glob("model-*.safetensors"))[0].unlink()
    (folder / "generation_config.json").unlink()
    assert run_cli("check-export", str(folder), "--target", "ascend-a2") == 1
    out = capsys.readouterr().out
    assert "PROBLEM: missing shard model-00001-of-" in out and "PROBLEM: generation_config.json: missing" in out
    assert "2 problem(s)" in out


def test_forward_report_measures_activations(releases):
    """fp32 forward: one stat per vision block, merger, decoder layer, norm and head; the head's statistic is the
    logits' largest magnitude, computed here independently."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    report = forward_report(releases["a2"], dtype="float32")
    names = [s.name for s in report.layers]
    assert names == [f"visual.blocks.{i}" for i in range(4)] + [
        "visual.merger",
        "model.layers.0",
        "model.layers.1",
        "model.norm",
        "lm_head",
    ]
    assert report.problems() == [] and all(0 < s.max_abs < 1e3 and s.nonfinite == 0 for s in report.layers)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(releases["a2"], dtype=torch.float32)
    inputs = forward_inputs(model, releases["a2"], None, 448 * 448)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]  # the 224x224 synthetic image
    with torch.no_grad():
        logits = model(**inputs).logits
    assert report.layers[-1].max_abs == pytest.approx(float(logits.abs().max()), rel=1e-6)


def test_forward_flags_float16_overflow_in_the_last_vision_block(releases, tmp_path, capsys):
    """Pitfall 22 made deliberate: biases of the last vision block push its output past 65504. The weights are
    valid float16, the structural check passes, the float16 forward finds the overflow and names the block."""
    folder = broken_copy(releases["duo"], tmp_path)

    def push(tensors):
        for name in ("visual.blocks.3.attn.proj.bias", "visual.blocks.3.mlp.down_proj.bias"):
            tensors[name] = np.full_like(tensors[name], 40000.0)

    rewrite(folder / "model.safetensors", push)
    assert check_export(folder, "ascend-310p") == []
    report = forward_report(folder)
    assert report.dtype == "float16"
    assert report.problems()[0].startswith("float16 forward: inf/NaN activations, first in visual.blocks.3")
    assert all(s.nonfinite == 0 for s in report.layers[:3])
    assert run_cli("check-export", str(folder), "--target", "ascend-310p", "--forward") == 1
    out = capsys.readouterr().out
    assert "visual.blocks.2" in out and "% of fp16 max" in out and "PROBLEM: float16 forward: inf/NaN" in out
