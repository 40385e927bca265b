"""Broken weights never load silently: a tensor with inf / NaN is refused, naming file and tensor, by every reader
(load for training / eval / infer, import-hf, export of an HF folder), and `check-export` reports it without
`--forward`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters.import_hf import import_hf
from converters.release import export_hf_folder, export_release
from tests.helpers.hf_models import tiny_model_with_qwen_ids
from vlmr1_jax.cli import main
from vlmr1_jax.models.hf_weights import load_hf_model

BROKEN = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def broken_dir(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("broken")
    for f in tiny_hf_dir.iterdir():
        shutil.copy(f, out / f.name)
    tensors = load_file(out / "model.safetensors")
    tensors[BROKEN] = tensors[BROKEN].copy()
    tensors[BROKEN][3, 5] = np.nan
    tensors[BROKEN][0, 0] = np.inf
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_loading_refuses_nonfinite_weights(broken_dir):
    with pytest.raises(ValueError, match=f"tensor '{BROKEN}' holds 2 inf/NaN values"):
        load_hf_model(broken_dir)


def test_import_and_export_refuse_nonfinite_weights(broken_dir, tmp_path):
    with pytest.raises(ValueError, match="2 inf/NaN values"):
        import_hf(broken_dir, tmp_path / "imported")
    with pytest.raises(ValueError, match="2 inf/NaN values"):
        export_hf_folder(broken_dir, tmp_path / "release", dtype="fp32")
    assert not (tmp_path / "release").exists()


def test_check_export_reports_nonfinite_weights_without_forward(tmp_path, capsys):
    """A valid release passes `check-export`; the same release with one NaN weight fails it, naming the tensor."""
    model = tiny_model_with_qwen_ids()
    release = export_release(model, model.cfg, tmp_path / "release", dtype="fp32")
    assert main(["check-export", str(release), "--target", "hf"]) == 0
    tensors = load_file(release / "model.safetensors")
    tensors[BROKEN][1, 1] = np.nan
    save_file(tensors, release / "model.safetensors", metadata={"format": "pt"})
    assert main(["check-export", str(release), "--target", "hf"]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM: {release / 'model.safetensors'}: tensor '{BROKEN}' holds 1 inf/NaN values" in out


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_infer_refuses_nonfinite_logits(backend, tmp_path, capsys):
    """Finite weights whose logits overflow (a head scaled to 3e38, as float16 overflow would) give one error line,
    not garbage text with exit code 0."""
    model = tiny_model_with_qwen_ids()
    release = export_release(model, model.cfg, tmp_path / "release", dtype="fp32")
    tensors = load_file(release / "model.safetensors")
    head = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    tensors[head] = np.full_like(tensors[head], 3e38)
    save_file(tensors, release / "model.safetensors", metadata={"format": "pt"})
    rc = main(["infer", "--model", str(release), "--prompt", "hello", "--backend", backend, "--max-new-tokens", "2"])
    assert rc == 1
    assert "logits are not finite" in capsys.readouterr().err
