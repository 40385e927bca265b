"""Our JAX Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration, fp32, all parameters random."""

from __future__ import annotations

import pytest

from converters.hf import read_config
from ports.parity import compare, make_inputs
from vlmr1_jax.cli import main as cli_main

# Image A tiles its windows exactly, image B needs padded windows, two videos (T=2 and T=4 with spg 0.5)
# put text after video positions; batch 2 with left padding (QWEN25VL-PORT.md 1.3).
IMAGE_GRIDS = [(1, 8, 12), (1, 6, 10)]
VIDEO_GRIDS = [(2, 4, 6), (4, 4, 4)]


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_hf_tied_dir"])
def test_logits_match_hf(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    cfg = read_config(model_dir)
    inputs = make_inputs(cfg, IMAGE_GRIDS, VIDEO_GRIDS, [1.0, 0.5], batch=2, steps=4)
    assert (inputs.attention_mask == 0).any(), "the batch must contain left padding"
    report = compare(str(model_dir), inputs)
    assert report.vision <= 1e-5, report
    assert report.logits <= 1e-4, report
    assert len(report.decode) == 4 and max(report.decode) <= 1e-4, report
    assert report.logit_scale > 0.1  # the comparison is not vacuous


def test_check_parity_command_second_config(tiny_hf_b_dir, capsys):
    code = cli_main(["check-parity", "--hf-model", str(tiny_hf_b_dir), "--images", "3",
                     "--image-sizes", "112x168,84x140,60x200", "--video", "--batch", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out


def test_check_parity_command_fails_above_tolerance(tiny_hf_dir, capsys):
    code = cli_main(["check-parity", "--hf-model", str(tiny_hf_dir), "--images", "1", "--logits-tol", "0",
                     "--steps", "1"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
