"""The PyTorch bridge: device choice with a broken torch-npu, VLM-R1 prompt construction, greedy / sampled
generation on the CPU, `vlmr1 infer`; an NPU run behind the `npu` marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ports.torch_runtime import TorchRuntime, npu_unavailable_reason, pick_device
from tests.helpers.cli import run_cli
from tests.helpers.npu import require_npu
from tests.helpers.release import PROMPT


@pytest.fixture(scope="module")
def runtime(fp32_release) -> TorchRuntime:
    return TorchRuntime.load(fp32_release, device="cpu")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_broken_torch_npu_falls_back(tmp_path, monkeypatch):
    """A torch_npu whose import fails the way it does without CANN (OSError / ImportError from libhccl.so)."""
    fake = tmp_path / "torch_npu"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libhccl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "torch_npu", raising=False)
    assert "libhccl.so" in npu_unavailable_reason()
    import torch

    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match=r"--device npu: torch_npu does not import .*libhccl"):
        pick_device("npu")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")


def test_prompt_is_vlm_r1_user_turn(runtime):
    """Images first, then the text; the task template wraps the text as in training; 6 merged tokens for a
    60x90 image (smart_resize -> 56x84 -> 4x6 patches)."""
    image_entry = {"type": "image", "text": None}
    assert runtime.processor.prompt_messages("hi", 2, "{Question}") == [
        {"role": "user", "content": [image_entry, image_entry, {"type": "text", "text": "hi"}]}
    ]
    assert runtime.prompt_text(PROMPT, 1) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>what is in the image?<|im_end|>\n<|im_start|>assistant\n"
    )
    rec = runtime.prompt_text("the red box", 1, task_type="rec")
    assert (
        "<|vision_end|>the red box First output the thinking process in <think> </think> tags and then "
        "output the final answer in <answer> </answer> tags. Output the final answer in JSON format."
        "<|im_end|>"
    ) in rec
    image = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    inputs = runtime.inputs([image], PROMPT)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert tuple(inputs["pixel_values"].shape) == (24, 1176)
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(runtime.cfg.vision_start_token_id)
    assert ids[start + 1 : start + 8] == [runtime.cfg.image_token_id] * 6 + [runtime.cfg.vision_end_token_id]
    assert inputs["mm_token_type_ids"][0].tolist() == [int(t == runtime.cfg.image_token_id) for t in ids]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        runtime.batch_inputs([([image], "<|image_pad|>" + PROMPT)])


def test_greedy_generation_matches_an_argmax_loop(runtime, image_file):
    """`generate` (KV cache, transformers' rope deltas) against a plain loop re-running the whole sequence and
    taking the argmax, stopping at the same end tokens."""
    import torch

    ids = runtime.generate_ids([image_file], PROMPT, max_new_tokens=6)
    batch = runtime.inputs([image_file], PROMPT)
    sequence = batch["input_ids"]
    expected = []
    with torch.no_grad():
        for _ in range(6):
            logits = runtime.model(
                input_ids=sequence,
                attention_mask=torch.ones_like(sequence),
                pixel_values=batch["pixel_values"],
                image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=(sequence == runtime.cfg.image_token_id).long(),
            ).logits
            token = int(logits[0, -1].argmax())
            expected.append(token)
            if token in runtime.tokenizer.eos_ids:
                break
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert ids == expected and len(ids) >= 1
    assert runtime.generate([image_file], PROMPT, max_new_tokens=6) == runtime.tokenizer.decode(ids)


def test_sampling_is_seeded(runtime, image_file):
    first = runtime.generate_ids([image_file], PROMPT, max_new_tokens=8, greedy=False, seed=3)
    assert first == runtime.generate_ids([image_file], PROMPT, max_new_tokens=8, greedy=False, seed=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runtime.generate_ids([image_file], PROMPT, max_new_tokens=0)


def test_infer_command(fp32_release, image_file, capsys):
    assert (
        run_cli(
            "infer",
            "--model",
            str(fp32_release),
            "--image",
            str(image_file),
            "--prompt",
            PROMPT,
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
        )
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")
    assert run_cli("infer", "--model", str(fp32_release), "--prompt", PROMPT, "--backend", "jax", "--sample") == 1
    assert "decodes greedily" in capsys.readouterr().err
    assert run_cli("infer", "--model", str(fp32_release / "missing"), "--prompt", PROMPT, "--device", "cpu") == 1
    assert "config.json" in capsys.readouterr().err


@pytest.mark.npu
def test_generation_on_npu_matches_cpu(fp32_release, image_file, runtime):
    require_npu()
    npu = TorchRuntime.load(fp32_release, device="npu", dtype="float32")
    assert npu.device == "npu"
    assert npu.generate_ids([image_file], PROMPT, max_new_tokens=4) == runtime.generate_ids(
        [image_file], PROMPT, max_new_tokens=4
    )
