"""`vlmr1 demo` at a micro size: the machine-readable last line, its numbers against the saved result, the picture."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from tests.helpers.cli import run_cli

LINE = re.compile(
    r"demo: iou_sft=(?P<iou_sft>\S+) iou_grpo=(?P<iou_grpo>\S+) acc_sft=(?P<acc_sft>\S+) acc_grpo=(?P<acc_grpo>\S+) "
    r"ood_iou_sft=(?P<ood_iou_sft>\S+) ood_iou_grpo=(?P<ood_iou_grpo>\S+) format_sft=(?P<format_sft>\S+) "
    r"format_grpo=(?P<format_grpo>\S+) steps=(?P<steps>\d+) seconds=(?P<seconds>\S+)"
)


@pytest.mark.slow
def test_demo_ends_with_its_line_and_names_its_picture(tmp_path, capsys):
    out = tmp_path / "demo"
    sizes = ["--n-train", 16, "--n-eval", 4, "--n-ood", 3, "--sft-steps", 2, "--grpo-steps", 2]
    sizes += ["--sft-batch", 2, "--grpo-prompts", 2, "--generations", 2, "--n-show", 3]
    assert run_cli("demo", "--out", out, "--no-progress", *sizes) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    saved = json.loads((out / "demo_result.json").read_text())
    for name, value in match.groupdict().items():
        if name != "seconds":
            assert float(value) == pytest.approx(saved[name], abs=5e-5), name
    assert saved["summaries"]["grpo"]["ood"]["n"] == 3
    assert saved["acc_grpo"] == pytest.approx(saved["summaries"]["grpo"]["val"]["accuracy"] / 100)
    picture = out / "boxes.png"
    assert any(str(picture) in line for line in lines)
    assert Image.open(picture).size == (3 * 190, 2 * 210 + 40)  # 3 held-out samples, after SFT / after GRPO
