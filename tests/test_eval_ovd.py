"""OVD evaluation: dataset-level COCO mAP / AP50 and OVDEval's NMS-AP against a table computed by hand from the
COCO definition (per category, detections in image then output order, 101-point interpolated precision, mean over
IoU thresholds .50:.05:.95 and over categories with ground truth); VLM-R1's answer parsing and the rescale."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.eval.ovd import coco_metrics, nms_with_truth, ovd_records, summarize_ovd


def record(truths, predictions):
    box = lambda label, b: {"bbox_2d": list(map(float, b)), "label": label}
    return {
        "width": 100,
        "height": 100,
        "truths": [box(*t) for t in truths],
        "predictions": [box(*p) for p in predictions],
        "invalid": 0,
    }


# Image 0: a cat and a dog; image 1: a cat; image 2: nothing. IoUs: cat-1 prediction 288/400 = 0.72, dog prediction
# 332/400 = 0.83 (no IoU sits on a threshold).
RECORDS = [
    record(
        [("cat", [0, 0, 10, 10]), ("dog", [50, 50, 70, 70])],
        [
            ("dog", [80, 80, 90, 90]),  # a false dog, before the true one
            ("cat", [0, 0, 10, 10]),  # exact
            ("dog", [50, 50, 70, 66.6]),  # IoU 0.83
            ("cat", [50, 50, 70, 70]),  # the dog's box called cat (a hard negative): NMS removes it
        ],
    ),
    record([("cat", [20, 20, 40, 40])], [("cat", [20, 20, 40, 34.4])]),  # IoU 0.72
    record([], [("cat", [0, 0, 5, 5]), ("bird", [1, 1, 9, 9])]),  # a false cat; bird is no category: dropped
]
THRESHOLDS = 10  # .50, .55, ..., .95


def ap_hand() -> dict[str, float]:
    """The table, by hand. 101 recall points r = 0, .01, ..., 1; precision at r = the best precision at recall >= r.

    cat (2 truths), detections in order: img0 exact TP, img0 cat-on-dog FP, img1 (0.72) TP, img2 FP.
      threshold <= .70 (5 of 10): TP FP TP FP: recall .5 .5 1 1, precision 1 .5 .67 .5 -> r <= .5: 1 (51
        points), r > .5: 2/3 (50 points): (51 + 50 * 2/3) / 101.
      threshold >= .75 (5): TP FP FP FP: recall .5 -> 51 points at 1: 51 / 101.
    cat after NMS (cat-on-dog removed): TP TP FP: 1 for <= .70, 51 / 101 above.
    dog (1 truth): img0 FP then TP (0.83): for threshold <= .80 (7): precision .5 at recall 1 -> 0.5; above
      (3): 0. NMS keeps both dog boxes (the false one overlaps no truth; the true one comes before the cat).
    """
    cat = (5 * (51 + 50 * 2 / 3) / 101 + 5 * 51 / 101) / THRESHOLDS
    cat_nms = (5 * 1.0 + 5 * 51 / 101) / THRESHOLDS
    dog = 7 * 0.5 / THRESHOLDS
    return {
        "map": 100 * (cat + dog) / 2,
        "ap50": 100 * ((51 + 50 * 2 / 3) / 101 + 0.5) / 2,
        "nms_map": 100 * (cat_nms + dog) / 2,
        "nms_ap50": 100 * (1.0 + 0.5) / 2,
    }


def test_dataset_map_matches_the_hand_computed_table():
    summary = summarize_ovd(RECORDS)
    expected = ap_hand()
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-9), key
    assert summary["dropped_boxes"] == 1 and summary["truth_boxes"] == 3 and summary["predicted_boxes"] == 7


def test_map_edges():
    """All boxes exact: 100. No truth anywhere: undefined (None). Truths but no prediction: 0."""
    exact = [record([("cat", [0, 0, 10, 10])], [("cat", [0, 0, 10, 10])])]
    assert coco_metrics(exact)[:2] == (pytest.approx(100.0), pytest.approx(100.0))
    assert coco_metrics([record([], [("cat", [0, 0, 10, 10])])]) == (None, None, 1)
    assert coco_metrics([record([("cat", [0, 0, 10, 10])], [])]) == (0.0, 0.0, 0)


def test_nms_keeps_one_box_per_truth_and_boxes_kept_elsewhere():
    truths = [{"bbox_2d": [0, 0, 10, 10], "label": "a"}, {"bbox_2d": [0, 0, 10, 12], "label": "b"}]
    preds = [
        {"bbox_2d": [0, 0, 10, 12], "label": "b"},  # overlaps both truths; first for both -> kept
        {"bbox_2d": [0, 0, 10, 10], "label": "a"},  # overlaps both; never first -> removed
        {"bbox_2d": [50, 50, 60, 60], "label": "a"},  # overlaps nothing -> kept
    ]
    assert nms_with_truth(preds, truths) == [preds[0], preds[2]]
    # Removed for one truth but the survivor of another: kept. p1 overlaps a (IoU 80/120) after p0 and b (70/130)
    # first; p2 overlaps only b, after p1.
    truths = [{"bbox_2d": [0, 0, 10, 10], "label": "a"}, {"bbox_2d": [5, 0, 15, 10], "label": "b"}]
    preds = [
        {"bbox_2d": [0, 0, 9, 10], "label": "a"},
        {"bbox_2d": [2, 0, 12, 10], "label": "x"},
        {"bbox_2d": [5, 0, 15, 10], "label": "b"},
    ]
    assert nms_with_truth(preds, truths) == preds[:2]


def test_records_parse_the_last_answer_and_rescale(tmp_path):
    """VLM-R1's OVD answer: the last <answer>, its last ```json block; boxes from the 56 x 56 frame the model saw
    to the 112 x 112 image (x2); entries without a box or label are counted, "None" is no boxes."""
    image = tmp_path / "a.png"
    Image.new("RGB", (112, 112)).save(image)
    truth = [{"bbox_2d": [10, 10, 40, 40], "label": "red circle"}]
    sample = lambda solution: Sample(0, "q", f"<answer> {solution} </answer>", (str(image),), "odLength", "t", 1)
    answer = [{"bbox_2d": [5, 5, 20, 20], "label": "red circle"}, {"bbox_2d": [1, 2], "label": "x"}, {"label": "y"}]
    completions = [
        f"<think>```json\n[]\n```</think><answer>```json\n{json.dumps(answer)}\n```</answer>",
        "<answer>None</answer>",
    ]
    solutions = [f"```json\n{json.dumps(truth)}\n```", "None"]
    records = ovd_records([sample(s) for s in solutions], completions, [[[56, 56]], [[56, 56]]])
    assert records[0]["predictions"] == [{"bbox_2d": [10.0, 10.0, 40.0, 40.0], "label": "red circle"}]
    assert records[0]["invalid"] == 2 and records[0]["truths"] == [
        {"bbox_2d": [10.0, 10.0, 40.0, 40.0], "label": "red circle"}
    ]
    assert records[1]["predictions"] == [] and records[1]["truths"] == []
    assert summarize_ovd(records)["map"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="t:1: field 'solution'"):
        ovd_records([sample("```json\n[{]\n```")], ["x"], [[None]])
