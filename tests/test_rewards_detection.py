"""OVD rewards: COCO mAP against an independent numpy implementation of the COCO protocol,
hand-computed `weighted_sum` and odLength tables, and the ground-truth error contract."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from vlmr1_jax.rewards.common import RewardInputError
from vlmr1_jax.rewards.detection import coco_map, detection_score, map_score, od_score, weighted_sum_score

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _iou_xyxy(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def reference_map(preds, truths):
    """COCO bbox AP written from the protocol: all scores 1 (input order), greedy matching per IoU threshold to the
    best free ground truth (ties to the later one), 101-point interpolated precision, mean over labels present in
    the ground truth. Returns (mAP@[.5:.95], AP50)."""
    ap = np.zeros((len(IOU_THRESHOLDS), 0)).tolist()
    per_label = []
    for label in dict.fromkeys(t["label"] for t in truths):
        gts = [t["bbox_2d"] for t in truths if t["label"] == label]
        dts = [p["bbox_2d"] for p in preds if p["label"] == label][:100]
        row = []
        for threshold in IOU_THRESHOLDS:
            taken, hits = set(), []
            for d in dts:
                best, best_iou = None, min(threshold, 1 - 1e-10)
                for g, box in enumerate(gts):
                    value = _iou_xyxy(d, box)
                    if g not in taken and value >= best_iou:
                        best, best_iou = g, value
                hits.append(best is not None)
                if best is not None:
                    taken.add(best)
            tp = np.cumsum(hits)
            recall = tp / len(gts)
            precision = tp / np.arange(1, len(hits) + 1)
            precision = np.maximum.accumulate(precision[::-1])[::-1] if len(hits) else precision
            idx = np.searchsorted(recall, RECALL_POINTS, side="left")
            row.append(np.mean([precision[i] if i < len(hits) else 0.0 for i in idx]))
        per_label.append(row)
    ap = np.array(per_label)  # [labels, thresholds]
    return float(ap.mean()), float(ap[:, 0].mean())


def _random_box(rng):
    x, y = rng.uniform(0, 200), rng.uniform(0, 200)
    return [x, y, x + rng.uniform(35, 120), y + rng.uniform(35, 120)]  # jitter keeps it proper


def _jittered(rng, box):
    return [v + rng.uniform(-15, 15) for v in box[:2]] + [v + rng.uniform(-15, 15) for v in box[2:]]


@pytest.mark.parametrize("seed", range(40))
def test_coco_map_matches_independent_reference(seed):
    rng = random.Random(seed)
    labels = ["cat", "dog", "bird"][: rng.randint(1, 3)]
    truths = [{"bbox_2d": _random_box(rng), "label": rng.choice(labels)} for _ in range(rng.randint(1, 5))]
    preds = [{"bbox_2d": _jittered(rng, t["bbox_2d"]), "label": t["label"]} for t in truths if rng.random() < 0.8]
    preds += [{"bbox_2d": _random_box(rng), "label": rng.choice(labels)} for _ in range(rng.randint(0, 3))]
    rng.shuffle(preds)
    if not preds:
        preds = [{"bbox_2d": _random_box(rng), "label": labels[0]}]
    expected_map, expected_ap50 = reference_map(preds, truths)
    with_noise = preds + [{"bbox_2d": _random_box(rng), "label": "not-in-truth"}]  # dropped by VLM-R1's mAP
    assert coco_map(with_noise, truths) == pytest.approx(expected_map, abs=1e-9)
    assert coco_map(with_noise, truths, ap50=True) == pytest.approx(expected_ap50, abs=1e-9)


def _block(boxes):
    return "```json\n" + json.dumps(boxes) + "\n```"


def _answer(text):
    return f"<answer> {text} </answer>"


CAT = {"bbox_2d": [0, 0, 100, 100], "label": "cat"}


@pytest.mark.parametrize(
    "pred, expected_map, expected_ap50",
    [
        ([CAT], 1.0, 1.0),
        # IoU 0.64 (box [0, 0, 100, 64]): a hit for thresholds .50 .55 .60 only -> 3/10
        ([{"bbox_2d": [0, 0, 100, 64], "label": "cat"}], 0.3, 1.0),
        ([{"bbox_2d": [0, 0, 100, 100], "label": "dog"}], 0.0, 0.0),  # label not in truth: dropped
        ([CAT, {"bbox_2d": [300, 300, 400, 400], "label": "cat"}], 1.0, 1.0),  # the FP comes after the TP
        ([{"bbox_2d": [300, 300, 400, 400], "label": "cat"}, CAT], 0.5, 0.5),  # FP first: precision 1/2 at recall 1
    ],
)
def test_map_table(pred, expected_map, expected_ap50):
    content, solution = _answer(_block(pred)), _answer(_block([CAT]))
    assert map_score(content, solution) == pytest.approx(expected_map)
    assert od_score(content, solution) == pytest.approx(expected_map)
    assert od_score(content, solution, ap50=True) == pytest.approx(expected_ap50)


@pytest.mark.parametrize(
    "content, solution, expected",
    [
        ("<answer>None</answer>", _answer("None"), 1.0),
        ("no answer tag", _answer("None"), 0.0),
        ("<answer>None</answer>", _answer(_block([CAT])), 0.0),  # one side empty
        ("<answer>" + _block([CAT]) + "</answer>", _answer("None"), 0.0),
        ("<answer>```json [broken```</answer>", _answer(_block([CAT])), 0.0),  # unparseable prediction = no boxes
        ("<answer>x</answer><answer>" + _block([CAT]) + "</answer>", _answer(_block([CAT])), 1.0),  # last answer
    ],
)
def test_od_edge_cases(content, solution, expected):
    assert od_score(content, solution) == pytest.approx(expected)


@pytest.mark.parametrize(
    "pred, expected",
    [
        ([CAT], 1.0),
        ([CAT, {"bbox_2d": [300, 300, 400, 400], "label": "cat"}], 0.5),  # mAP 1 * min(1, 1/2)
        ([CAT, {"bbox_2d": [0, 0, 5, 5], "label": "zebra"}], 0.5),  # wrong-label entries still count in L
        ([CAT, CAT, CAT, CAT], 0.25),
    ],
)
def test_od_length_penalty(pred, expected):
    content, solution = _answer(_block(pred)), _answer(_block([CAT]))
    assert od_score(content, solution, length_penalty=True) == pytest.approx(expected)


DOG = {"bbox_2d": [20, 20, 30, 30], "label": "dog"}


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        ([CAT], [CAT], 1.0),
        # one of two found: position 1/2, miss 1/2, fa 0 -> completeness 3/4; 0.7*0.5 + 0.3*0.75
        ([CAT], [CAT, DOG], 0.7 * 0.5 + 0.3 * 0.75),
        # matched with the wrong label: IoU recorded as 0
        ([{"bbox_2d": [0, 0, 100, 100], "label": "dog"}], [CAT, DOG], 0.3 * 0.75),
        # IoU 0.4 < 0.5: no match; miss 1, fa 1 -> 0
        ([{"bbox_2d": [0, 0, 100, 40], "label": "cat"}], [CAT], 0.0),
        # IoU 0.64 match + a false alarm: position 0.64, fa 1/2 -> completeness 3/4
        (
            [{"bbox_2d": [0, 0, 100, 64], "label": "CAT"}, {"bbox_2d": [500, 500, 600, 600], "label": "cat"}],
            [CAT],
            0.7 * 0.64 + 0.3 * 0.75,
        ),
        ([], [CAT], 0.0),
        ([CAT], [], 0.0),
        ([], [], 1.0),
    ],
)
def test_weighted_sum_table(pred, truth, expected):
    content = "<think>hm</think><answer>" + _block(pred) + "</answer>"
    assert weighted_sum_score(content, _answer(_block(truth))) == pytest.approx(expected)


@pytest.mark.parametrize("content, expected", [("<answer>None.</answer>", 1.0), ("<answer>a cat</answer>", 0.0)])
def test_weighted_sum_none_truth(content, expected):
    assert weighted_sum_score(content, _answer("None")) == expected


def test_weighted_sum_stale_label_bug_only_in_compat_mode():
    truth = [CAT, {"bbox_2d": [200, 200, 300, 300], "label": "cat"}]
    pred = [CAT, {"bbox_2d": [200, 200, 300, 300]}]  # the second prediction has no label
    content, solution = _answer(_block(pred)), _answer(_block(truth))
    # intended: the unlabeled match is wrong (IoU 0): position 1/2, completeness 1
    assert detection_score(content, solution) == pytest.approx(0.7 * 0.5 + 0.3)
    # VLM-R1: the unlabeled prediction inherits the previous match's 'cat': a perfect score
    assert detection_score(content, solution, vlmr1_compat=True) == pytest.approx(1.0)
    # VLM-R1 crashes when the first match is unlabeled; compat mode scores it 0
    assert (
        detection_score(_answer(_block([{"bbox_2d": [0, 0, 100, 100]}])), _answer(_block([CAT])), vlmr1_compat=True)
        == 0.0
    )


@pytest.mark.parametrize(
    "solution, fragment",
    [
        (_answer("```json [{broken ```"), "not valid JSON"),
        (_answer('```json {"bbox_2d": [1, 2, 3, 4]} ```'), "expected a list"),
        (_answer('```json [{"bbox_2d": [1, 2, 3], "label": "a"}] ```'), "bbox_2d"),
        (_answer('```json [{"bbox_2d": [1, 2, 3, 4]}] ```'), "label"),
        (_answer('```json [{"bbox_2d": [1, 2, 1e999, 4], "label": "a"}] ```'), "bbox_2d"),  # infinite
    ],
)
def test_malformed_truth_raises_naming_the_field(solution, fragment):
    for score in (map_score, od_score, weighted_sum_score):
        with pytest.raises(RewardInputError, match="solution") as info:
            score("<answer>x</answer>", solution)
        assert fragment in str(info.value)


def test_all_truth_boxes_ignored_by_coco_scores_zero_not_minus_one():
    # An inverted truth box has negative area; pycocotools ignores it and reports -1 (VLM-R1 returns that).
    truth = [{"bbox_2d": [50, 50, 10, 10], "label": "cat"}]
    assert coco_map([{"bbox_2d": [10, 10, 50, 50], "label": "cat"}], truth) == 0.0
