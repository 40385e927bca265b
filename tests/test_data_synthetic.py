"""Synthetic REC data: boxes checked against the pixels, expressions resolved by an independent reader, splits,
determinism and the tokenizer corpus."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.files import folder_digest
from tests.helpers.shapes import FILL, colour_mask
from vlmr1_jax.data import synthetic
from vlmr1_jax.data.jsonl import load_jsonl_datasets

HELD_OUT = {("red", "star"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle")}
ALL_FAMILIES = ("simple", "superlative", "relational")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, list[dict]]:
    """10 samples per family and split, with their decoded images."""
    out = str(tmp_path_factory.mktemp("syn"))
    data = {}
    for family in ALL_FAMILIES:
        for split in ("train", "val", "ood"):
            path = synthetic.generate(os.path.join(out, family), 10, seed=4, split=split, families=(family,))
            records = [json.loads(line) for line in Path(path).read_text().splitlines()]
            for r in records:
                r["pixels"] = np.asarray(Image.open(os.path.join(out, family, "images", r["image"])))
                r["path"] = path
            data[(family, split)] = records
    return data


def all_records(dataset) -> list[dict]:
    return [r for records in dataset.values() for r in records]


def test_images_and_boxes_match_the_pixels(dataset):
    for r in all_records(dataset):
        pixels = r["pixels"]
        assert pixels.shape == (112, 112, 3) and pixels.dtype == np.uint8
        objects = r["objects"]
        assert 1 <= len(objects) <= 3
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)  # colour+shape unique
        background = np.ones((112, 112), bool)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112
            assert 14 <= max(x2 - x1, y2 - y1) <= 48
            mask = colour_mask(pixels, o["colour"])
            inside = mask[y1:y2, x1:x2]
            # Tight: every edge row/column of the box holds paint, the lines just outside (over its span) hold none.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            if x1 > 0:
                assert not mask[y1:y2, x1 - 1].any()
            if x2 < 112:
                assert not mask[y1:y2, x2].any()
            if y1 > 0:
                assert not mask[y1 - 1, x1:x2].any()
            if y2 < 112:
                assert not mask[y2, x1:x2].any()
            # The painted shape is the named one: its share of the box matches the geometry.
            assert abs(inside.mean() - FILL[o["shape"]]) < 0.07, (o, inside.mean())
            background[y1:y2, x1:x2] = False
        assert pixels[background].mean() < 60 and pixels[background].max() <= 60 + 6 * 8
        for a, b in [(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]]:  # boxes never overlap
            ax1, ay1, ax2, ay2 = a["box"]
            bx1, by1, bx2, by2 = b["box"]
            assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1


def pixel_area(r: dict, o: dict) -> int:
    x1, y1, x2, y2 = o["box"]
    return int(colour_mask(r["pixels"], o["colour"])[y1:y2, x1:x2].sum())


def extent(o: dict) -> int:
    x1, y1, x2, y2 = o["box"]
    return max(x2 - x1, y2 - y1)


def centre_x(o: dict) -> float:
    return (o["box"][0] + o["box"][2]) / 2


def clearly_more(r: dict, a: dict, b: dict, word: str) -> bool:
    """The reader's notion of 'a is clearly the <word> of a and b' (area x1.5 and extent, or 8 px of centre x)."""
    if word == "largest":
        return pixel_area(r, a) >= 1.5 * pixel_area(r, b) and extent(a) >= extent(b)
    if word == "smallest":
        return pixel_area(r, b) >= 1.5 * pixel_area(r, a) and extent(b) >= extent(a)
    if word == "leftmost":
        return centre_x(a) + 8 <= centre_x(b)
    return centre_x(a) >= centre_x(b) + 8


SIDE = {
    "left of": lambda t, a: t[2] <= a[0],
    "right of": lambda t, a: t[0] >= a[2],
    "above": lambda t, a: t[3] <= a[1],
    "below": lambda t, a: t[1] >= a[3],
}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COLOUR = "(red|green|blue|yellow)"
SHAPE = "(circle|square|triangle|star)"


def resolve(r: dict, expression: str) -> list[dict]:
    """Every object the expression can mean, read from the sentence alone; also asserts rival shapes are clear."""
    objects = r["objects"]
    if m := re.fullmatch(f"the {COLOUR} {SHAPE}", expression):
        return [o for o in objects if (o["colour"], o["shape"]) == m.groups()]
    if m := re.fullmatch(f"the (largest|smallest|leftmost|rightmost) (?:{COLOUR} shape|{SHAPE}|shape)", expression):
        word, colour, shape = m.groups()
        group = [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"])]
        assert len(group) >= 2
        return [a for a in group if all(clearly_more(r, a, b, word) for b in group if b is not a)]
    m = re.fullmatch(f"the (?:{COLOUR} )?{SHAPE} (left of|right of|above|below) the {COLOUR} {SHAPE}", expression)
    assert m, expression
    colour, shape, relation, anchor_colour, anchor_shape = m.groups()
    (anchor,) = [o for o in objects if (o["colour"], o["shape"]) == (anchor_colour, anchor_shape)]
    named = [o for o in objects if o is not anchor and o["shape"] == shape and colour in (None, o["colour"])]
    hits = [o for o in named if SIDE[relation](o["box"], anchor["box"])]
    assert all(SIDE[OPPOSITE[relation]](o["box"], anchor["box"]) for o in named if o not in hits)
    return hits


def expression_of(r: dict) -> str:
    question = r["conversations"][0]["value"]
    assert question.startswith(
        "<image>Please provide the bounding box coordinates of the region this sentence describes: "
    ) and question.endswith(".")
    return question.split("describes: ", 1)[1][:-1]


def answer_box(r: dict) -> list[int]:
    answer = r["conversations"][1]["value"]
    assert re.fullmatch(r"\[\d+, \d+, \d+, \d+\]", answer)
    return json.loads(answer)


def test_every_expression_means_exactly_the_answer_box(dataset):
    for (family, _), records in dataset.items():
        for r in records:
            assert r["family"] == family
            (hit,) = resolve(r, expression_of(r))
            assert hit["box"] == answer_box(r)


def test_relational_uses_a_bare_shape_word_sometimes(dataset):
    expressions = [expression_of(r) for r in dataset[("relational", "train")] + dataset[("relational", "val")]]
    bare = [e for e in expressions if re.match(f"the {SHAPE} ", e)]
    assert bare, expressions


def test_held_out_pairs_only_in_ood_and_always_the_target_there(dataset):
    for (_family, split), records in dataset.items():
        for r in records:
            pairs = {(o["colour"], o["shape"]) for o in r["objects"]}
            target = next(o for o in r["objects"] if o["box"] == answer_box(r))
            if split == "ood":
                assert (target["colour"], target["shape"]) in HELD_OUT
            else:
                assert not pairs & HELD_OUT


def test_loads_as_vlm_r1_jsonl(dataset):
    r = dataset[("simple", "train")][0]
    samples, report = load_jsonl_datasets(r["path"], os.path.join(os.path.dirname(r["path"]), "images"))
    assert report.problems == [] and len(samples) == 10
    s = samples[0]
    assert s.problem == r["conversations"][0]["value"].replace("<image>", "")
    x1, y1, x2, y2 = answer_box(r)
    assert s.solution == f"<answer> [{x1}, {y1}, {x2}, {y2}] </answer>"
    assert s.id == "train_000000" and s.image_paths[0].endswith(os.path.join("train", "train_000000.png"))


def test_same_seed_gives_identical_bytes(tmp_path):
    for name, seed in (("a", 9), ("b", 9), ("c", 10)):
        synthetic.write_default_dataset(str(tmp_path / name), 4, 2, 2, seed, families=ALL_FAMILIES)
    a, b, c = (folder_digest(tmp_path / n) for n in "abc")
    assert len(a) == 3 + 8 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_splits_differ_and_families_mix(tmp_path):
    out = str(tmp_path)
    paths = synthetic.write_default_dataset(out, 30, 30, 0, seed=1, families=ALL_FAMILIES)
    train, val = ([json.loads(line) for line in Path(paths[s]).read_text().splitlines()] for s in ("train", "val"))
    assert [r["conversations"] for r in train] != [r["conversations"] for r in val]
    assert {r["family"] for r in train} == set(ALL_FAMILIES)


def test_corpus_covers_everything_the_task_writes(dataset):
    corpus = synthetic.corpus_strings()
    texts = set(corpus)
    characters = set("".join(corpus))
    for r in all_records(dataset):
        assert r["conversations"][0]["value"].replace("<image>", "") in texts
        assert set(r["conversations"][1]["value"]) <= characters
    assert set("0123456789[], ") <= characters


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="test"), "split"),
        (dict(families=("fancy",)), "families"),
        (dict(image_size=64), "image_size"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.generate(str(tmp_path), 1, 0, **kwargs)
