"""Markdown result tables, one row per dataset, shaped like VLM-R1's result tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Per task: (column header, summary key, format); percentages as VLM-R1 reports them.
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "rec": [
        ("samples", "n", "{}"),
        ("Acc@0.5 (%)", "accuracy", "{:.2f}"),
        ("mean IoU", "mean_iou", "{:.4f}"),
        ("rec_iou", "iou", "{:.4f}"),
        ("rec_format", "format", "{:.4f}"),
    ],
    "ovd": [
        ("samples", "n", "{}"),
        ("mAP@[.5:.95]", "map", "{:.2f}"),
        ("AP50", "ap50", "{:.2f}"),
        ("NMS-AP", "nms_map", "{:.2f}"),
        ("NMS-AP50", "nms_ap50", "{:.2f}"),
        ("boxes (truth / predicted / unknown label)", "boxes", "{}"),
    ],
    "math": [
        ("samples", "n", "{}"),
        ("accuracy (%)", "accuracy", "{:.2f}"),
        ("mean accuracy reward", "mean_reward", "{:.4f}"),
    ],
}


def _cell(summary: Mapping[str, Any], key: str, fmt: str) -> str:
    if key == "boxes":
        return f"{summary['truth_boxes']} / {summary['predicted_boxes']} / {summary['dropped_boxes']}"
    value = summary.get(key)
    return "n/a" if value is None else fmt.format(value)


def results_table(task: str, summaries: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """A markdown table of `summaries` ({dataset: summary}) for `task`, under an optional title line."""
    columns = COLUMNS[task]
    lines: Sequence[str] = [
        *([title, ""] if title else []),
        "| dataset | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
        *(
            f"| {name} | " + " | ".join(_cell(summary, key, fmt) for _, key, fmt in columns) + " |"
            for name, summary in summaries.items()
        ),
    ]
    return "\n".join(lines) + "\n"
