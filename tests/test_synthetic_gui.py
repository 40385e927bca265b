"""Synthetic GUI data: the answer read back from the two screenshots' pixels, VLM-R1's GUI jsonl shape, the
all_match reward on it, determinism, and `vlmr1 data synth --task gui`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.cli import run_cli
from tests.helpers.files import folder_digest
from vlmr1_jax.data import synthetic_gui
from vlmr1_jax.data.jsonl import load_jsonl_datasets
from vlmr1_jax.rewards import get_reward

PAINT = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
GREY = (128, 128, 128)
HEADER_ROW = 18  # a row through the coloured strip under the status bar of a 112 px screen
ANSWERS = ("Operation No Response", "Unexpected Task Result")
OPERATION = re.compile(r"tap the (red|green|blue|yellow) (circle|square|triangle|star) button, which should open the")


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[dict]:
    """24 train + 8 val records with their (before, after) pixels."""
    out = str(tmp_path_factory.mktemp("gui"))
    records = []
    for split, n in (("train", 24), ("val", 8)):
        path = synthetic_gui.generate(out, n, seed=3, split=split)
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            r["pixels"] = [np.asarray(Image.open(os.path.join(out, "images", p))) for p in r["image"]]
            r["path"] = path
            records.append(r)
    return records


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def painted(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == rgb, axis=-1)


def read_defect(before: np.ndarray, after: np.ndarray, tapped: tuple[int, int, int]) -> str:
    """The defect as a reader of the two screenshots sees it: the same home screen with only the tapped button
    changed (darker) is no response; a page in another button's colour is a wrong result."""
    assert tuple(before[HEADER_ROW, 56]) == GREY  # the first screenshot is the home screen
    header = tuple(int(v) for v in after[HEADER_ROW, 56])
    if header == GREY:
        changed = np.any(before != after, axis=-1)
        button = painted(before, tapped)
        assert changed.any() and bounding_box(changed) == bounding_box(button)
        assert after[changed].mean() < 0.8 * before[changed].mean()  # drawn pressed: darker
        return "Operation No Response"
    assert header in PAINT.values() and header != tapped
    assert painted(before, header).sum() > 100  # the page of a button that was on the home screen
    assert painted(after[HEADER_ROW + 20 :], header).sum() > 50  # its icon in the page body
    return "Unexpected Task Result"


def test_the_second_screenshot_shows_the_answered_defect(samples):
    for r in samples:
        human, gpt = r["conversations"]
        colour, _ = OPERATION.search(human["value"]).groups()
        before, after = r["pixels"]
        assert before.shape == after.shape == (112, 112, 3) and before.dtype == np.uint8
        assert painted(before, PAINT[colour]).sum() > 100  # the tapped button is on the first screen
        assert read_defect(before, after, PAINT[colour]) == gpt["value"]
    assert {r["conversations"][1]["value"] for r in samples} == set(ANSWERS)


def test_jsonl_is_vlm_r1_gui_shaped(samples):
    """Keys as VLM-R1's GUI file (plus metadata), two images, no <image> tokens; loads as a two-image sample."""
    for r in samples:
        assert {"id", "image", "conversations"} <= r.keys() and len(r["image"]) == 2
        assert "<image>" not in r["conversations"][0]["value"]
    first = samples[0]
    loaded, report = load_jsonl_datasets(first["path"], os.path.join(os.path.dirname(first["path"]), "images"))
    assert report.problems == [] and len(loaded) == 24
    assert loaded[0].problem == first["conversations"][0]["value"]
    assert loaded[0].solution == f"<answer> {first['conversations'][1]['value']} </answer>"
    assert [os.path.basename(p) for p in loaded[0].image_paths] == ["train_000000_before.png", "train_000000_after.png"]


def test_all_match_scores_only_the_right_label(samples):
    accuracy = get_reward("accuracy")
    for r in samples[:6]:
        truth = r["conversations"][1]["value"]
        solution = f"<answer> {truth} </answer>"
        completions = [f"<think>compare</think><answer>{a}</answer>" for a in ANSWERS]
        scores = accuracy(completions, solution=[solution] * 2, accu_reward_method=["all_match"] * 2)
        assert scores == [1.0 if a == truth else 0.0 for a in ANSWERS]


def test_same_seed_same_bytes_and_no_temporary_files(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthetic_gui.generate(str(tmp_path / name), 4, seed)
    a, b, c = (folder_digest(tmp_path / n) for n in "abc")
    assert len(a) == 1 + 8 and a == b and not any(k.endswith(".tmp") for k in a)
    assert a.keys() == c.keys() and a != c


def test_an_interrupted_write_keeps_the_old_split(tmp_path, monkeypatch):
    """A crash while writing leaves the previous jsonl as it was and no temporary file behind."""
    path = Path(synthetic_gui.generate(str(tmp_path), 2, seed=1))
    old = path.read_bytes()
    make_record = synthetic_gui.make_record

    def crash_at_third(index, *args):
        if index == 2:
            raise RuntimeError("killed")
        return make_record(index, *args)

    monkeypatch.setattr(synthetic_gui, "make_record", crash_at_third)
    with pytest.raises(RuntimeError, match="killed"):
        synthetic_gui.generate(str(tmp_path), 4, seed=2)
    assert path.read_bytes() == old
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_cli_writes_data_that_check_accepts(tmp_path, capsys):
    out = tmp_path / "gui"
    assert run_cli("data", "synth", "--task", "gui", "--out", out, "--n", 6, "--seed", 1) == 0
    assert "wrote 6 gui train samples" in capsys.readouterr().out
    folders = out / "images"
    assert run_cli("data", "check", "--data-files", out / "train.jsonl", "--image-folders", folders,
                   "--reward-method", "all_match") == 0  # fmt: skip
    assert "images: 12 in valid samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--split", "ood"], "--split for --task gui"),
        (["--image-size", "100"], "--image-size for --task gui"),
        (["--families", "simple"], "--families applies to --task rec only"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        run_cli("data", "synth", "--task", "gui", "--out", tmp_path, "--n", 1, *argv)
