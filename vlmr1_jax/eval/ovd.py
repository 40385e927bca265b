"""OVD evaluation: dataset-level COCO mAP@[.5:.95] and AP50 (pycocotools) over all samples, and OVDEval's NMS-AP.

Each completion is read as the `od_ap` / `odLength` rewards read it (the last `<answer>`, its last ```` ```json ````
block, a list of `{"bbox_2d": [x1, y1, x2, y2], "label": ...}`), every box scored 1.0 and mapped from the frame the
model saw to the original image. Unlike the per-sample reward, one COCO ground truth holds every image and every
ground-truth label of the dataset, so a box with a label that is absent from its image is a false positive.
docs/evaluation.md says which parts of VLM-R1's (unreleased) OVD evaluation this defines and which it cannot.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.eval.rec import Frames, image_size, scale_box
from vlmr1_jax.rewards.common import RewardInputError, as_box, first_answer, last_answer
from vlmr1_jax.rewards.detection import predicted_entries, truth_entries

NMS_IOU = 0.5  # OVDEval: predictions overlapping one ground-truth box by more than this compete


def _box_entry(entry: Any) -> dict | None:
    """`{"bbox_2d": [4 floats], "label": label}` of a predicted entry, or None when it has no box or label."""
    if not isinstance(entry, dict):
        return None
    box, label = as_box(entry.get("bbox_2d")), entry.get("label")
    if box is None or not isinstance(label, (str, int, float)):
        return None
    return {"bbox_2d": list(box), "label": label}


def ovd_records(samples: Sequence[Sample], completions: Sequence[str], frames: Sequence[Frames]) -> list[dict]:
    """Per-sample OVD records: the ground-truth boxes, the predicted boxes (in original pixels) and how many
    predicted entries had no usable box or label."""
    records = []
    for sample, completion, fs in zip(samples, completions, frames):
        truth = first_answer(sample.solution)
        try:
            truths = truth_entries((truth if truth is not None else sample.solution).strip(), last=True)
        except RewardInputError as err:
            raise ValueError(f"{sample.source}:{sample.line}: field 'solution': {err}") from None
        answer = last_answer(completion)
        entries = predicted_entries(answer.strip(), last=True) if answer is not None else []
        boxes = [b for b in map(_box_entry, entries) if b is not None]
        width, height = image_size(sample.image_paths[0])
        for box in boxes:
            box["bbox_2d"] = scale_box(box["bbox_2d"], fs[0], (width, height))
        records.append(
            {
                "id": sample.id,
                "image": sample.image_paths[0],
                "problem": sample.problem,
                "solution": sample.solution,
                "completion": completion,
                "width": width,
                "height": height,
                "truths": [{"bbox_2d": list(as_box(t["bbox_2d"])), "label": t["label"]} for t in truths],  # type: ignore[arg-type]
                "predictions": boxes,
                "invalid": len(entries) - len(boxes),
            }
        )
    return records


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Continuous IoU of two [x1, y1, x2, y2] boxes (OVDEval's and COCO's; 0 for an empty union)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def nms_with_truth(predictions: Sequence[dict], truths: Sequence[dict]) -> list[dict]:
    """OVDEval's NMS before AP: for each ground-truth box, of the predictions (any label) overlapping it by IoU >
    0.5 only the best-scored survives (all scores are 1.0 here: the first in the model's output); a prediction
    removed for one box but kept for another survives. Order is kept."""
    kept: set[int] = set()
    removed: set[int] = set()
    for truth in truths:
        overlapping = [k for k, p in enumerate(predictions) if box_iou(truth["bbox_2d"], p["bbox_2d"]) > NMS_IOU]
        if overlapping:
            kept.add(overlapping[0])
            removed.update(overlapping[1:])
    return [p for k, p in enumerate(predictions) if k not in removed - kept]


def _xywh(box: Sequence[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def coco_metrics(records: Sequence[dict], *, nms: bool = False) -> tuple[float | None, float | None, int]:
    """Dataset-level (mAP@[.5:.95], AP50) in percent over all records, every box scored 1.0, and the number of
    predictions dropped because no ground truth of the dataset has their label. None when the dataset has no
    ground-truth box; with `nms`, OVDEval's NMS-AP (`nms_with_truth` per image first)."""
    categories: dict[Any, int] = {}
    images: list[dict] = []
    annotations: list[dict] = []
    detections: list[dict] = []
    dropped = 0
    for image_id, record in enumerate(records):
        images.append({"id": image_id, "width": record["width"], "height": record["height"]})
        for truth in record["truths"]:
            category = categories.setdefault(truth["label"], len(categories) + 1)
            box = _xywh(truth["bbox_2d"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    for image_id, record in enumerate(records):
        predictions = record["predictions"]
        for pred in nms_with_truth(predictions, record["truths"]) if nms else predictions:
            if pred["label"] not in categories:
                dropped += 1
                continue
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": categories[pred["label"]],
                    "bbox": _xywh(pred["bbox_2d"]),
                    "score": 1.0,
                }
            )
    if not annotations:
        return None, None, dropped
    if not detections:
        return 0.0, 0.0, dropped
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        truth = COCO()
        truth.dataset = {
            "images": images,
            "categories": [{"id": i, "name": str(name)} for name, i in categories.items()],
            "annotations": annotations,
        }
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return 100.0 * max(0.0, float(evaluation.stats[0])), 100.0 * max(0.0, float(evaluation.stats[1])), dropped


def summarize_ovd(records: Sequence[dict]) -> dict[str, Any]:
    """COCO mAP / AP50 and OVDEval NMS-AP / NMS-AP50 (percent) over the dataset, with box counts."""
    mean_ap, ap50, dropped = coco_metrics(records)
    nms_ap, nms_ap50, _ = coco_metrics(records, nms=True)
    return {
        "map": mean_ap,
        "ap50": ap50,
        "nms_map": nms_ap,
        "nms_ap50": nms_ap50,
        "n": len(records),
        "truth_boxes": sum(len(r["truths"]) for r in records),
        "predicted_boxes": sum(len(r["predictions"]) for r in records),
        "dropped_boxes": dropped,
        "invalid_entries": sum(r["invalid"] for r in records),
    }
