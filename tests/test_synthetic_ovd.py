"""Synthetic OVD data: every object found again in the pixels, the answer = exactly the queried objects' boxes,
VLM-R1's D³ jsonl shape, the odLength reward on it, determinism, and `vlmr1 data synth --task ovd`."""

from __future__ import annotations

import ast
import collections
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests.helpers.cli import run_cli
from tests.helpers.files import folder_digest
from tests.helpers.shapes import FILL, colour_mask
from vlmr1_jax.data import synthetic_ovd
from vlmr1_jax.data.jsonl import load_jsonl_datasets
from vlmr1_jax.rewards import get_reward

COLOURS = ("red", "green", "blue", "yellow")
QUESTION = re.compile(
    r"<image>Please carefully check the image and detect the following objects: (\[.*\])\. Output the bbox "
    r"coordinates of detected objects in JSON format in <answer></answer>\. The bbox coordinate format should be: "
    r'\n```json\n\[\{"bbox_2d": \[x1, y1, x2, y2\], "label": "object name"\}\]\n```\n\. If no targets are '
    r'detected in the image, simply respond with "None"\.'
)
ANSWER = re.compile(r"```json\n(.*)\n```", re.DOTALL)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[dict]:
    """60 train + 10 val records with their pixels."""
    out = str(tmp_path_factory.mktemp("ovd"))
    records = []
    for split, n in (("train", 60), ("val", 10)):
        path = synthetic_ovd.generate(out, n, seed=7, split=split)
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            r["pixels"] = np.asarray(Image.open(os.path.join(out, "images", r["image"])))
            r["path"] = path
            records.append(r)
    return records


def pixel_objects(pixels: np.ndarray) -> dict[tuple[str, tuple[int, ...]], float]:
    """{(colour, tight box [x1, y1, x2, y2)): share of the box painted} for every painted blob in the image."""
    found = {}
    for colour in COLOURS:
        mask = colour_mask(pixels, colour)
        blobs, _ = ndimage.label(mask)
        for rows, cols in ndimage.find_objects(blobs):
            box = (cols.start, rows.start, cols.stop, rows.stop)
            found[(colour, box)] = float(mask[rows, cols].mean())
    return found


def boxes_of(answer: str) -> list[tuple[str, tuple[int, ...]]]:
    if answer == "None":
        return []
    return [(b["label"], tuple(b["bbox_2d"])) for b in json.loads(ANSWER.fullmatch(answer).group(1))]


def test_objects_are_the_painted_shapes(samples):
    for r in samples:
        blobs = pixel_objects(r["pixels"])
        objects = {(o["label"].split()[0], tuple(o["box"])): o["label"].split()[1] for o in r["objects"]}
        assert blobs.keys() == objects.keys()
        for key, share in blobs.items():
            assert abs(share - FILL[objects[key]]) < 0.07, (key, objects[key], share)
        assert 2 <= len(objects) <= 4


def test_answer_is_every_box_of_every_queried_label(samples):
    none_answers, repeated_labels = 0, 0
    for r in samples:
        human, gpt = r["conversations"]
        queried = ast.literal_eval(QUESTION.fullmatch(human["value"]).group(1))
        present = collections.Counter(o["label"] for o in r["objects"])
        absent = [q for q in queried if q not in present]
        assert len(set(queried)) == len(queried) and 1 <= len(absent) <= 3 and sorted(absent) == r["negatives"]
        expected = [(o["label"], tuple(o["box"])) for o in r["objects"] if o["label"] in queried]
        assert sorted(boxes_of(gpt["value"])) == sorted(expected)
        if expected:
            assert set(present) <= set(queried)  # every label in the image is asked for
        none_answers += not expected
        repeated_labels += max(present.values()) > 1
    assert 0 < none_answers < len(samples) / 4 and repeated_labels > 0


def test_od_length_reward_on_the_answers(samples):
    """The true answer scores 1; one extra box with an absent label keeps mAP 1 and costs L_gt / L_pred."""
    accuracy = get_reward("accuracy")
    for r in samples[:8]:
        truth = r["conversations"][1]["value"]
        boxes = boxes_of(truth)
        solution = f"<answer> {truth} </answer>"
        extra = [*[{"bbox_2d": list(b), "label": lab} for lab, b in boxes], {"bbox_2d": [0, 0, 9, 9], "label": "x"}]
        completions = [
            f"<think>look</think><answer>{truth}</answer>",
            f"<think>look</think><answer>```json\n{json.dumps(extra)}\n```</answer>",
        ]
        scores = accuracy(completions, solution=[solution] * 2, accu_reward_method=["odLength"] * 2)
        assert scores[0] == pytest.approx(1.0)
        assert scores[1] == pytest.approx(len(boxes) / (len(boxes) + 1))  # the None answer: 0 / 1


def test_loads_as_vlm_r1_jsonl(samples):
    first = samples[0]
    loaded, report = load_jsonl_datasets(first["path"], os.path.join(os.path.dirname(first["path"]), "images"))
    assert report.problems == [] and len(loaded) == 60
    assert loaded[0].problem == first["conversations"][0]["value"].replace("<image>", "")
    assert loaded[0].solution == f"<answer> {first['conversations'][1]['value']} </answer>"
    assert len(loaded[0].image_paths) == 1


def test_same_seed_same_bytes(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthetic_ovd.generate(str(tmp_path / name), 4, seed)
    a, b, c = (folder_digest(tmp_path / n) for n in "abc")
    assert len(a) == 1 + 4 and a == b and a.keys() == c.keys() and a != c


def test_cli_writes_data_that_check_accepts(tmp_path, capsys):
    out = tmp_path / "ovd"
    assert run_cli("data", "synth", "--task", "ovd", "--out", out, "--n", 5, "--split", "val") == 0
    assert "wrote 5 ovd val samples" in capsys.readouterr().out
    assert run_cli("data", "check", "--data-files", out / "val.jsonl", "--image-folders", out / "images",
                   "--reward-method", "odLength") == 0  # fmt: skip


@pytest.mark.parametrize(
    "argv, match",
    [(["--split", "ood"], "--split for --task ovd"), (["--image-size", "120"], "--image-size for --task ovd")],
)
def test_bad_arguments_name_the_flag(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        run_cli("data", "synth", "--task", "ovd", "--out", tmp_path, "--n", 1, *argv)
