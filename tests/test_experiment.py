"""`vlmr1 experiment sft-vs-rl` at a micro size: its files, and every JSONL number recomputed from the saved
predictions with VLM-R1's answer parsing and IoU written out here from the formula."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.helpers.cli import run_cli
from vlmr1_jax.cli import main

MICRO = {
    "--seeds": 1,
    "--n-train": 16,
    "--n-val": 4,
    "--n-ood": 3,
    "--warm-steps": 2,
    "--steps": 2,
    "--eval-every": 1,
    "--sft-batch": 2,
    "--grpo-prompts": 2,
    "--generations": 2,
    "--eval-batch": 4,
}


def vlm_r1_box(completion: str) -> list[int]:
    """test_rec_r1.py's parsing: the first <answer>, then a braced [x1, y1, x2, y2]; [0, 0, 0, 0] otherwise."""
    answer = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    if not answer:
        return [0, 0, 0, 0]
    box = re.search(r"\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}", answer.group(1), re.DOTALL)
    return [int(v) for v in box.groups()] if box else [0, 0, 0, 0]


def vlm_r1_baseline_box(completion: str) -> list[float]:
    """test_rec_baseline.py's parsing: the first [a, b, c, d] anywhere, floats and negatives allowed."""
    number = r"\s*(-?\d*\.?\d+)\s*"
    box = re.search(r"\[" + ",".join([number] * 4) + r"\]", completion)
    return [float(v) for v in box.groups()] if box else [0, 0, 0, 0]


PARSERS = {"r1": vlm_r1_box, "baseline": vlm_r1_baseline_box}


def vlm_r1_iou(a, b) -> float:
    """IoU with VLM-R1's +1 pixel convention (x2 / y2 exclusive, so the inclusive corner is x2 - 1)."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2] - 1, b[2] - 1), min(a[3] - 1, b[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@pytest.mark.slow
def test_sft_vs_rl_writes_curves_that_match_its_saved_predictions(tmp_path):
    out = tmp_path / "exp"
    argv = [a for flag, value in MICRO.items() for a in (flag, value)]
    assert run_cli("experiment", "sft-vs-rl", "--out", out, "--no-progress", *argv) == 0
    for name in ("curves.jsonl", "sft-vs-rl.png", "sft-vs-rl.md", "experiment.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    # Per method: the shared warm start (step 0) and steps 1 and 2, each on both splits under both protocols.
    assert sorted((r["method"], r["step"], r["split"], r["protocol"]) for r in rows) == sorted(
        (m, step, split, protocol)
        for m in ("sft", "grpo")
        for step in (0, 1, 2)
        for split in ("val", "ood")
        for protocol in PARSERS
    )
    truth = {}
    for split in ("val", "ood"):
        for line in (out / "data" / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            truth[record["id"]] = json.loads(record["conversations"][1]["value"])
            assert Image.open(out / "data" / "images" / record["image"]).size == (112, 112)  # model frame = image
    for row in rows:
        predictions = [json.loads(line) for line in (out / row["predictions"]).read_text().splitlines()]
        assert len(predictions) == row["n"] == MICRO["--n-val" if row["split"] == "val" else "--n-ood"]
        ious = [vlm_r1_iou(PARSERS[row["protocol"]](p["completion"]), truth[p["id"]]) for p in predictions]
        assert row["accuracy"] == pytest.approx(np.mean([v > 0.5 for v in ious]), abs=1e-12)
        assert row["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-9)
    table = (out / "sft-vs-rl.md").read_text()
    assert "| SFT | 2 |" in table and "| GRPO | 2 |" in table
    assert [line for line in table.splitlines() if line.startswith("### ")] == [f"### Protocol `{p}`" for p in PARSERS]


def test_sft_vs_rl_refuses_a_bad_size_naming_the_flag(capsys):
    assert main(["experiment", "sft-vs-rl", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
