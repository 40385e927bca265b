"""Our JAX Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration (fp32 reference), through
`ports.parity`'s relative rule max|ours - ref| <= atol + rtol * max|ref|: tiny shapes with videos, large
activations, the released 3B's widths, deliberately broken ports that the rule must catch, and `vlmr1
check-parity` (real prompts through the folder's tokenizer; transformers computes its own positions)."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ports import parity
from ports.parity import ATOL, RTOL, compare, diff_report, run_hf, run_jax
from tests.helpers.hf_models import TINY_CONFIG, TINY_CONFIG_B, WIDTH_3B_CONFIG, save_random_hf_model
from tests.helpers.qwen_parity import make_inputs
from tests.helpers.release import CORPUS, compact_config
from vlmr1_jax.cli import main as cli_main
from vlmr1_jax.models.hf_weights import load_hf_model, read_config

# Image A tiles its windows exactly, image B needs padded windows, two videos (T=2 and T=4 with spg 0.5)
# put text after video positions; batch 2 with left padding.
IMAGE_GRIDS = [(1, 8, 12), (1, 6, 10)]
VIDEO_GRIDS = [(2, 4, 6), (4, 4, 4)]
# The processor's grids for 336x448 and 252x532 images (multiples of 28 already).
WIDTH_3B_GRIDS = [(1, 24, 32), (1, 18, 38)]
MARGIN = 10  # a correct fp32 port must stay this far inside the tolerance


def tiny_inputs(model_dir):
    return make_inputs(read_config(model_dir), IMAGE_GRIDS, VIDEO_GRIDS, [1.0, 0.5], batch=2, steps=4)


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_hf_tied_dir"])
def test_logits_match_hf(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    inputs = tiny_inputs(model_dir)
    assert (inputs.batch.attention_mask == 0).any(), "the batch must contain left padding"
    report = compare(str(model_dir), inputs)
    assert report.passed(RTOL / MARGIN, ATOL), report
    assert len(report.decode) == 4 and report.vision is not None
    assert report.logits.scale > 0.1  # the comparison is not vacuous


def test_large_activations_pass_the_relative_rule(tmp_path):
    """Weights of std 0.2 give vision features of magnitude ~10: differences above 1e-5 absolute are fp32 rounding
    (an absolute 1e-5 rule failed this correct port)."""
    model_dir = save_random_hf_model(tmp_path / "std02", TINY_CONFIG, seed=3, std=0.2)
    report = compare(str(model_dir), tiny_inputs(model_dir))
    print(*(d.line() for d in report.diffs), sep="\n")
    assert report.vision.scale > 5, report
    assert report.passed(RTOL / MARGIN, ATOL), report


def _broken_copy(src, dst, tensor=None, change=None, config=None):
    """Copy an HF folder, then apply `change` to one tensor and/or `config` to the config.json dict."""
    shutil.copytree(src, dst)
    if tensor is not None:
        tensors = load_file(dst / "model.safetensors")
        tensors[tensor] = change(tensors[tensor]).astype(np.float32)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


BREAKAGES = {
    # (tensor, change, config.json change) applied to our side only; transformers saves the nested layout.
    "text rope sections swapped": (
        None,
        None,
        lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[3, 2, 3]),
    ),
    "vision qkv bias missing": ("visual.blocks.0.attn.qkv.bias", np.zeros_like, None),
    "text v bias missing": ("model.layers.1.self_attn.v_proj.bias", np.zeros_like, None),
    "one MLP weight 1% off": ("model.layers.1.mlp.down_proj.weight", lambda w: w * 1.01, None),
    "vision full-attention blocks moved": (
        None,
        None,
        lambda c: c["vision_config"].update(fullatt_block_indexes=[0, 3]),
    ),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_rule_catches_a_broken_port(name, tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """Our side loads a slightly broken copy of the folder, transformers the original: check-parity must FAIL."""
    tensor, change, config = BREAKAGES[name]
    broken = _broken_copy(tiny_hf_dir, tmp_path / "broken", tensor, change, config)
    monkeypatch.setattr(parity, "load_hf_model", lambda _, **kw: load_hf_model(broken, **kw))
    report = compare(str(tiny_hf_dir), tiny_inputs(tiny_hf_dir))
    print(name, *(d.line() for d in report.diffs), sep="\n")
    assert not report.passed(), report
    assert report.worst_relative > MARGIN * RTOL, report  # caught with margin, not by rounding luck


@pytest.fixture(scope="module")
def width_3b(tmp_path_factory):
    """The released 3B's widths at 2 text + 4 vision layers, transformers' own init, and transformers' outputs on
    a 336x448 and a 252x532 image (one per row): (folder, inputs, reference outputs). 2.3 GB on disk."""
    model_dir = save_random_hf_model(tmp_path_factory.mktemp("width_3b"), WIDTH_3B_CONFIG, seed=0, std=None)
    inputs = make_inputs(read_config(model_dir), WIDTH_3B_GRIDS, batch=2, steps=4)
    yield model_dir, inputs, run_hf(str(model_dir), inputs)
    shutil.rmtree(model_dir)


@pytest.mark.slow
def test_3b_widths_fp32(width_3b, record_property):
    model_dir, inputs, ref = width_3b
    report = diff_report(inputs, run_jax(str(model_dir), inputs), ref)
    print(*(d.line() for d in report.diffs), sep="\n")
    record_property("fp32_worst_relative", report.worst_relative)
    assert report.logits.scale > 1 and report.vision.scale > 1  # realistic scales, not a vacuous comparison
    assert report.passed(RTOL / MARGIN, ATOL), report


@pytest.mark.slow
def test_3b_widths_bf16_compute_reported(width_3b, record_property):
    """bfloat16 compute (float32 parameters) against transformers fp32: reported, bounded only loosely."""
    model_dir, inputs, ref = width_3b
    report = diff_report(inputs, run_jax(str(model_dir), inputs, jnp.bfloat16), ref)
    print(*(d.line() for d in report.diffs), sep="\n")
    record_property("bf16_worst_relative", report.worst_relative)
    assert report.worst_relative < 0.1, report


@pytest.fixture(scope="module")
def tiny_b_with_tokenizer(tmp_path_factory):
    """TINY_CONFIG_B's shapes (other depths, heads, windows, tied head) with a compact tokenizer beside it."""
    from vlmr1_jax.processing.tokenizer import build_compact_tokenizer

    tokenizer = build_compact_tokenizer(CORPUS, vocab_size=300)
    folder = save_random_hf_model(tmp_path_factory.mktemp("tiny_b_tok"), compact_config(tokenizer, TINY_CONFIG_B))
    tokenizer.save(folder)
    return folder


def test_check_parity_command_second_config(tiny_b_with_tokenizer, capsys):
    code = cli_main(
        [
            "check-parity",
            "--hf-model",
            str(tiny_b_with_tokenizer),
            "--images",
            "3",
            "--image-sizes",
            "112x168,84x140,60x200",
            "--batch",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "qwen2_5_vl: image sizes" in out and "grids [(1, 8, 12), (1, 6, 10), (1, 4, 14)]" in out, out
    assert "PASS" in out and "vision features" in out and "relative" in out and "decode step 3" in out


def test_check_parity_command_fails_above_tolerance(release_source, capsys):
    args = ["--images", "1", "--rtol", "0", "--atol", "0", "--steps", "1"]
    code = cli_main(["check-parity", "--hf-model", str(release_source), *args])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_parity_command_needs_a_tokenizer_and_fitting_images(tiny_hf_dir, release_source, capsys):
    """One error line each: a folder without tokenizer files, an image the processor cannot take."""
    assert cli_main(["check-parity", "--hf-model", str(tiny_hf_dir), "--images", "1"]) == 2
    assert "error: check-parity renders its prompts with the model folder's tokenizer" in capsys.readouterr().err
    assert cli_main(["check-parity", "--hf-model", str(release_source), "--image-sizes", "10x3000"]) == 2
    assert "error: --image-sizes 10x3000: absolute aspect ratio must be smaller than 200" in capsys.readouterr().err


def test_check_parity_help_states_the_rule(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["check-parity", "--help"])
    assert e.value.code == 0
    assert "max|ours - ref| <= atol + rtol * max|ref|" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch", "0"),
        ("--image-sizes", "0x0"),
        ("--images", "-1"),
        ("--steps", "-1"),
        ("--image-sizes", "336"),
        ("--rtol", "-1"),
        ("--atol", "nan"),
        ("--max-pixels", "0"),
    ],
)
def test_check_parity_refuses_bad_arguments(flag, value, capsys):
    """Refused by argparse before any model is read (the folder does not exist)."""
    with pytest.raises(SystemExit) as e:
        cli_main(["check-parity", "--hf-model", "/nonexistent", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err, err
