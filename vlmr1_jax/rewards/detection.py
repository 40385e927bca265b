"""Open-vocabulary detection rewards: COCO mAP (`map`, `od_ap`, `od_ap50`, `odLength`), `weighted_sum`.

Boxes are JSON lists `[{"bbox_2d": [x1, y1, x2, y2], "label": str}, ...]` inside a ```` ```json ``` ```` block.
A prediction that does not parse is an empty list; a ground truth that does not parse raises RewardInputError.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlmr1_jax.rewards.common import (
    RewardInputError,
    as_box,
    clean_text,
    first_answer,
    first_between,
    iou,
    last_answer,
    last_between,
)

JSON_OPEN, FENCE = "```json", "```"
IMAGE_SIZE = 2048  # VLM-R1's fixed COCO image size; boxes are never clipped to it


def json_block(text: str, *, last: bool) -> str | None:
    """Stripped body of the last (or first) ```` ```json ... ``` ```` block (VLM-R1's `` ```json(.*?)``` ``) or None."""
    body = last_between(text, JSON_OPEN, FENCE) if last else first_between(text, JSON_OPEN, FENCE)
    return body.strip() if body is not None else None


def _entries(data: Any) -> list:
    """`[item for item in data]` as VLM-R1 writes it: a list as is, a dict's keys, a string's chars; else empty."""
    return list(data) if isinstance(data, (list, dict, str)) else []


def predicted_entries(text: str, *, last: bool) -> list:
    """The model's box list from its json block; anything unparseable is an empty list."""
    block = json_block(text, last=last)
    if not block:
        return []
    try:
        return _entries(json.loads(block))
    except Exception:  # noqa: BLE001 -- JSONDecodeError, RecursionError, oversized integers: a reward never raises
        return []


def truth_entries(text: str, *, last: bool) -> list[dict]:
    """The ground-truth box list (no json block means no boxes); malformed data raises RewardInputError."""
    block = json_block(text, last=last)
    if not block:
        return []
    try:
        data = json.loads(block)
    except Exception as err:  # noqa: BLE001 -- any json.loads failure is one clear error
        raise RewardInputError(f"solution: the ```json block is not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise RewardInputError(f"solution: the ```json block holds a {type(data).__name__}, expected a list of boxes")
    for k, item in enumerate(data):
        if not isinstance(item, dict) or as_box(item.get("bbox_2d")) is None:
            raise RewardInputError(f"solution: box {k} needs 'bbox_2d': [x1, y1, x2, y2] finite numbers, got {item!r}")
        if not isinstance(item.get("label"), (str, int, float)):
            raise RewardInputError(f"solution: box {k} needs a 'label' (a string), got {item!r}")
    return data


def _xywh(box: tuple[float, float, float, float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def coco_map(predictions: list, truths: list[dict], *, ap50: bool = False) -> float:
    """pycocotools mAP@[.5:.95] (or AP50) on one 2048x2048 image, every prediction scored 1.0.

    Categories are the ground-truth labels only; predictions with another label (or no valid box) are dropped,
    so queried-but-absent labels are never penalised (VLM-R1 semantics). No surviving prediction gives 0.0;
    pycocotools' -1 "no valid ground truth" sentinel (all boxes inverted or huge) is returned as 0.0.
    """
    category: dict[Any, int] = {}
    annotations = []
    for k, truth in enumerate(truths):
        category.setdefault(truth["label"], len(category))
        box = as_box(truth["bbox_2d"])
        annotations.append(
            {
                "id": k + 1,
                "image_id": 0,
                "category_id": category[truth["label"]],
                "bbox": _xywh(box),  # type: ignore[arg-type]
                "area": (box[2] - box[0]) * (box[3] - box[1]),  # type: ignore[index]
                "iscrowd": 0,
            }
        )
    detections = []
    for pred in predictions:
        if not isinstance(pred, dict):
            continue
        try:
            category_id = category[pred.get("label")]
        except (KeyError, TypeError):  # unknown or unhashable label
            continue
        box = as_box(pred.get("bbox_2d"))
        if box is not None:
            detections.append({"image_id": 0, "category_id": category_id, "bbox": _xywh(box), "score": 1.0})
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_truth = COCO()
        coco_truth.dataset = {
            "images": [{"id": 0, "width": IMAGE_SIZE, "height": IMAGE_SIZE}],
            "categories": [{"id": i, "name": str(name)} for name, i in category.items()],
            "annotations": annotations,
        }
        coco_truth.createIndex()
        evaluation = COCOeval(coco_truth, coco_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return max(0.0, float(evaluation.stats[1 if ap50 else 0]))


def _map_from_entries(predictions: list, truths: list[dict], *, ap50: bool, length_penalty: bool) -> float:
    if predictions and truths:
        score = coco_map(predictions, truths, ap50=ap50)
    else:
        score = 1.0 if not predictions and not truths else 0.0
    if length_penalty and len(predictions) > len(truths):  # odLength: times min(1, L_gt / L_pred)
        score *= len(truths) / len(predictions)
    return score


def map_score(content: str, solution: str, *, ap50: bool = False, length_penalty: bool = False) -> float:
    """VLM-R1 `map_reward`: COCO mAP between the last json blocks; both empty 1.0, exactly one empty 0.0."""
    truths = truth_entries(solution, last=True)
    return _map_from_entries(predicted_entries(content, last=True), truths, ap50=ap50, length_penalty=length_penalty)


def od_score(content: str, solution: str, *, ap50: bool = False, length_penalty: bool = False) -> float:
    """`od_ap` / `od_ap50` / `odLength`: `map_score` of the last answer vs the first answer of the solution.

    No answer tag in the completion gives 0.0. VLM-R1's extra "both 'None' -> 1.0" rule is implied: two answers
    without json blocks are two empty lists, which score 1.0.
    """
    truth = first_answer(solution)
    if truth is None:
        raise RewardInputError("solution has no <answer>...</answer>")
    truths = truth_entries(truth.strip(), last=True)
    answer = last_answer(content)
    if answer is None:
        return 0.0
    predictions = predicted_entries(answer.strip(), last=True)
    return _map_from_entries(predictions, truths, ap50=ap50, length_penalty=length_penalty)


def _label(entry: Any) -> str | None:
    label = entry.get("label") if isinstance(entry, dict) else None
    return label.lower() if isinstance(label, str) else None


def _entry_iou(pred: Any, truth: dict) -> float:
    box = as_box(pred.get("bbox_2d")) if isinstance(pred, dict) else None
    return iou(box, as_box(truth["bbox_2d"])) if box is not None else 0.0  # type: ignore[arg-type]


def detection_score(
    content: str,
    solution: str,
    *,
    iou_threshold: float = 0.5,
    alpha: float = 0.7,
    beta: float = 0.0,
    gamma: float = 0.3,
    vlmr1_compat: bool = False,
) -> float:
    """VLM-R1 `detection_score`: greedy max-IoU matching of the first json blocks, then a weighted sum in [0, 1].

    position = sum of matched IoUs / |gt| (a match with the wrong label counts IoU 0); label = correct matches / |gt|;
    completeness = 1 - (miss rate + false-alarm rate) / 2; score = (alpha*position + beta*label + gamma*completeness)
    / (alpha + beta + gamma). [BUG in VLM-R1] a prediction without a string label keeps the previous match's label
    (or crashes on the first match); by default it is the empty label, `vlmr1_compat=True` keeps the stale label
    and scores 0.0 where VLM-R1 would crash.
    """
    content, solution = clean_text(content), clean_text(solution)
    truths = truth_entries(solution, last=False)
    predictions = predicted_entries(content, last=False)
    if not truths:
        return 0.0 if predictions else 1.0
    if not predictions:
        return 0.0
    # Greedy matching: repeatedly the best free pair, ties to the first in (pred, truth) order as VLM-R1's
    # strict-'>' double loop picks them; walking the pairs sorted that way is the same and O(PG log PG). Pairs
    # below the threshold end the walk, so only the others are sorted.
    scored = ((_entry_iou(pred, truth), p, t) for p, pred in enumerate(predictions) for t, truth in enumerate(truths))
    pairs = sorted((-value, p, t) for value, p, t in scored if value >= iou_threshold)
    free_preds, free_truths = set(range(len(predictions))), set(range(len(truths)))
    matched_ious, correct_labels = [], 0
    stale_label = None
    for negative_iou, p, t in pairs:
        if not (free_preds and free_truths):
            break
        if p not in free_preds or t not in free_truths:
            continue
        pred_label = _label(predictions[p])
        if pred_label is None:
            if vlmr1_compat and stale_label is None:
                return 0.0
            pred_label = stale_label if vlmr1_compat else ""
        stale_label = pred_label
        correct = pred_label == (_label(truths[t]) or "")
        matched_ious.append(-negative_iou if correct else 0.0)
        correct_labels += correct
        free_preds.discard(p)
        free_truths.discard(t)
    position = sum(matched_ious) / len(truths)
    label = correct_labels / len(truths)
    completeness = 1.0 - (len(free_truths) / len(truths) + len(free_preds) / len(predictions)) / 2.0
    return (alpha * position + beta * label + gamma * completeness) / (alpha + beta + gamma)


def weighted_sum_score(content: str, solution: str, *, vlmr1_compat: bool = False) -> float:
    """Accuracy method `weighted_sum`: 'none' ground truth wants 'none'; otherwise `detection_score`."""
    content, solution = clean_text(content), clean_text(solution)
    if solution == "none":
        return 1.0 if content == "none" else 0.0
    return detection_score(content, solution, vlmr1_compat=vlmr1_compat)
