"""Evaluation files: VLM-R1's `{ds}.json` lists (`image`, `problem`, `solution`) and our jsonl, read into `Sample`s,
and VLM-R1's evaluation subset (`random.seed(42); random.shuffle(data); data[:N]`)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmr1_jax.data.jsonl import (
    DEFAULT_REWARD_METHOD,
    DataError,
    Sample,
    check_image_file,
    load_jsonl_datasets,
    safe_image_path,
)


def eval_subset(samples: Sequence[Any], limit: int | None = 2000, seed: int = 42) -> list:
    """VLM-R1's subsampling: `random.seed(42); random.shuffle(data); data[:2000]` (limit 0/None: all)."""
    data = list(samples)
    random.Random(seed).shuffle(data)
    return data[:limit] if limit else data


def dataset_name(path: str | Path) -> str:
    """A dataset's name in tables and output files: its file name without the extension (`refcoco_val`)."""
    return Path(path).stem


def file_digest(path: str | Path) -> str:
    """sha256 of a data file: a resumed evaluation must be scoring the same file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_json_list(path: str | Path) -> bool:
    """True for a JSON list file (VLM-R1's evaluation format), False for jsonl (one object per line)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _solution_text(value: Any) -> str:
    """VLM-R1's solution column: a string loses its `<answer>` tags; a box list or number is written as JSON."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("<answer>", "").replace("</answer>", "").strip()


def _list_sample(item: Any, index: int, file: str, image_root: str, reward_method: str) -> Sample:
    """One entry of a VLM-R1 evaluation list (`line` is its 1-based position in the list)."""
    line = index + 1
    if not isinstance(item, dict):
        raise DataError("wrong_type", file, line, "<item>", f"expected a JSON object, got {type(item).__name__}")
    for key in ("problem", "solution"):
        if key not in item:
            raise DataError(
                "missing_key", file, line, key, "key is missing (an evaluation item needs problem, solution)"
            )
    if not isinstance(item["problem"], str):
        raise DataError("wrong_type", file, line, "problem", f"expected a string, got {type(item['problem']).__name__}")
    images = item.get("image", [])
    rels = [images] if isinstance(images, str) else images
    if not isinstance(rels, list):
        raise DataError("wrong_type", file, line, "image", "expected a string or a list of strings")
    paths = []
    for k, rel in enumerate(rels):
        field = "image" if isinstance(images, str) else f"image[{k}]"
        path = safe_image_path(image_root, rel, file=file, line=line, field=field)
        check_image_file(path, image_root, file=file, line=line, field=field)
        paths.append(path)
    method = item.get("accu_reward_method", reward_method)
    if not isinstance(method, str):
        raise DataError("wrong_type", file, line, "accu_reward_method", "expected a string")
    return Sample(
        id=item.get("id", index),
        problem=item["problem"].replace("<image>", ""),
        solution=f"<answer> {_solution_text(item['solution'])} </answer>",
        image_paths=tuple(paths),
        accu_reward_method=method,
        source=file,
        line=line,
    )


def load_eval_file(path: str, image_root: str, reward_method: str = DEFAULT_REWARD_METHOD) -> list[Sample]:
    """Every sample of a VLM-R1 evaluation list (`.json`) or jsonl file, in file order; bad input is a `DataError`
    naming the file, item (or line) and field."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--data {path}: file not found")
    if not is_json_list(path):
        return load_jsonl_datasets(path, image_root, reward_method)[0]
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError("invalid_json", path, 0, "<file>", f"not a JSON list ({e})") from None
    if not isinstance(items, list) or not items:
        raise DataError("empty_file", path, 0, "<file>", "expected a non-empty JSON list of {image, problem, solution}")
    return [_list_sample(item, i, path, image_root, reward_method) for i, item in enumerate(items)]


def load_eval_samples(
    data: str,
    image_root: str,
    limit: int | None,
    seed: int = 42,
    *,
    need_image: bool = True,
    reward_method: str = "default",
) -> list[Sample]:
    """The evaluation subset of a file (VLM-R1's seeded shuffle, then the first `limit`; 0/None = all); with
    `need_image` every sample must have an image."""
    samples = load_eval_file(data, image_root, reward_method)
    if need_image:
        for sample in samples:
            if not sample.image_paths:
                raise DataError("missing_key", sample.source, sample.line, "image", "this evaluation needs an image")
    return eval_subset(samples, limit or None, seed)
