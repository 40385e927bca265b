"""REC evaluation with the JAX model: greedy decoding, then VLM-R1's protocol (docs/facts.md: VLM-R1 REC evaluation).

Acc@0.5 follows `test_rec_r1.py`: the first `<answer>`, a JSON-brace box regex (failure -> [0,0,0,0]), the rescale
from the resized frame to the original image, and the +-1 IoU strictly above 0.5. We also report the mean of the
`rec_iou` and `rec_format` training rewards, which is what the demo tracks.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image

from vlmr1_jax.config import DataConfig, SamplingConfig
from vlmr1_jax.data.jsonl import Sample, load_jsonl_datasets
from vlmr1_jax.models.family import family_of
from vlmr1_jax.processing.batch import encode_prompts
from vlmr1_jax.rewards import get_reward
from vlmr1_jax.rewards.common import iou
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids

_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BRACED_BOX = re.compile(r"\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}", re.DOTALL)


def eval_subset(samples: Sequence[Sample], limit: int | None = 2000, seed: int = 42) -> list[Sample]:
    """VLM-R1's subsampling: `random.seed(42); random.shuffle(data); data[:2000]`."""
    data = list(samples)
    random.Random(seed).shuffle(data)
    return data[:limit] if limit else data


def extract_box(completion: str) -> list[int]:
    """First `<answer>` block, then the first braced `[x1, y1, x2, y2]`; [0, 0, 0, 0] when absent (VLM-R1)."""
    answer = _FIRST_ANSWER.search(completion)
    match = _BRACED_BOX.search(answer.group(1)) if answer else None
    return [int(v) for v in match.groups()] if match else [0, 0, 0, 0]


Frames = list[list[int] | None]  # per image of a sample: the [height, width] its boxes live in (None: unscaled)


def image_frames(cfg: Any, grids: Sequence[Sequence[Sequence[int]]]) -> list[Frames]:
    """Per sample, each image's box frame by the model family's processor, from the images' grids."""
    processor = family_of(cfg).processor
    return [[None if (f := processor.model_frame(g)) is None else list(f) for g in gs] for gs in grids]


def rescale_box(box: Sequence[float], frame: Sequence[int] | None, image_path: str) -> list[float]:
    """Model coordinates live in the frame the model saw ([height, width] from the family's processor); map them
    back to the original image. A None frame (a family whose boxes are not in resized pixels) leaves them."""
    if frame is None:
        return [float(v) for v in box]
    with Image.open(image_path) as img:
        width, height = img.size
    in_h, in_w = frame
    x1, y1, x2, y2 = box
    return [x1 * width / in_w, y1 * height / in_h, x2 * width / in_w, y2 * height / in_h]


def truth_box(sample: Sample) -> list[float]:
    """The ground-truth [x1, y1, x2, y2] (original pixels) inside the sample's `<answer>`."""
    answer = _FIRST_ANSWER.search(sample.solution)
    try:
        box = json.loads(answer.group(1) if answer else sample.solution)
        if len(box) != 4:
            raise ValueError
        return [float(v) for v in box]
    except (ValueError, TypeError):
        raise ValueError(
            f"{sample.source}:{sample.line}: field 'solution': expected a box [x1, y1, x2, y2], got {sample.solution!r}"
        ) from None


@dataclasses.dataclass
class GreedyDecoder:
    """Compiled greedy decoding of prompt batches of a fixed size (the last batch is padded, not recompiled)."""

    model: Any
    tokenizer: Any
    task_type: str | None
    min_pixels: int = 3136
    max_pixels: int = 12845056
    batch_size: int = 100
    max_new_tokens: int = 256
    prompt_length: int | None = None

    def __post_init__(self):
        graphdef, self._state = nnx.split(self.model)
        sampler = Sampler(
            SamplingConfig(max_new_tokens=self.max_new_tokens, greedy=True),
            eos_ids=self.tokenizer.eos_ids,
            pad_id=self.tokenizer.pad_id,
            banned_ids=default_banned_ids(self.model.cfg),
        )
        self._run = sampler.jitted(graphdef, 1)

    def generate(self, samples: Sequence[Sample]) -> tuple[list[list[int]], list[Frames]]:
        """Completion token ids (through the first EOS) and, per sample, each image's frame (for the rescale)."""
        ids: list[list[int]] = []
        frames: list[Frames] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = list(samples[start : start + self.batch_size])
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            batch = encode_prompts(
                [s.problem for s in padded],
                [s.image_paths for s in padded],
                self.tokenizer,
                self.model.cfg,
                task_type=self.task_type,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
                length=self.prompt_length,
            )
            out = self._run(
                self._state, {k: jax.numpy.asarray(v) for k, v in batch.arrays().items()}, jax.random.key(0)
            )
            tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
            if not np.isfinite(np.asarray(out.logprobs)[mask.astype(bool)]).all():  # a non-finite logit anywhere
                raise ValueError(
                    "the model's logits are not finite (inf/NaN): its weights overflow in this dtype or are broken; "
                    "its text would be garbage"
                )
            ids += [t[m.astype(bool)].tolist() for t, m in zip(tokens[: len(chunk)], mask[: len(chunk)])]
            frames += image_frames(self.model.cfg, batch.image_grids[: len(chunk)])
        return ids, frames

    def __call__(self, samples: Sequence[Sample]) -> tuple[list[str], list[Frames]]:
        """Completions (special tokens dropped) and, per sample, each image's frame (for the rescale)."""
        ids, frames = self.generate(samples)
        return self.tokenizer.batch_decode(ids), frames


def score_rec(
    samples: Sequence[Sample],
    completions: Sequence[str],
    frames: Sequence[Frames],
) -> tuple[dict[str, float], list[dict]]:
    """Acc@0.5 (VLM-R1 protocol) and the mean IoU it thresholds, mean `rec_iou` / `rec_format` rewards, and
    per-sample records, for the completions of `samples` whose models answered in the frames `frames[i][0]`
    ([height, width] or None)."""
    columns = {
        "solution": [s.solution for s in samples],
        "image_path": [list(s.image_paths) for s in samples],
        "model_image_size": [list(fs) for fs in frames],
    }
    iou_rewards = get_reward("rec_iou")(list(completions), **columns)
    format_rewards = get_reward("rec_format")(list(completions), **columns)
    records, correct, ious = [], 0, []
    for sample, completion, fs, r_iou, r_fmt in zip(samples, completions, frames, iou_rewards, format_rewards):
        box = rescale_box(extract_box(completion), fs[0], sample.image_paths[0])
        ious.append(iou(box, truth_box(sample)))
        hit = ious[-1] > 0.5
        correct += hit
        records.append(
            {
                "id": sample.id,
                "image": sample.image_paths[0],
                "problem": sample.problem,
                "solution": sample.solution,
                "completion": completion,
                "pred_box": box,
                "iou": float(ious[-1]),
                "correct": bool(hit),
                "rec_iou": float(r_iou),
                "rec_format": float(r_fmt),
            }
        )
    n = max(len(samples), 1)
    summary = {
        "accuracy": 100.0 * correct / n,
        "mean_iou": float(np.mean(ious)) if samples else 0.0,  # of the rescaled boxes Acc@0.5 thresholds
        "iou": float(np.mean(iou_rewards)) if samples else 0.0,
        "format": float(np.mean(format_rewards)) if samples else 0.0,
        "n": len(samples),
    }
    return summary, records


def evaluate_rec(decoder: GreedyDecoder, samples: Sequence[Sample]) -> tuple[dict[str, float], list[dict]]:
    """Acc@0.5 (VLM-R1 protocol) plus mean `rec_iou` / `rec_format` rewards, and per-sample records."""
    completions, frames = decoder(samples)
    return score_rec(samples, completions, frames)


def load_eval_samples(data: str, image_root: str, limit: int | None, seed: int = 42) -> list[Sample]:
    """The evaluation subset of a VLM-R1 jsonl (VLM-R1's seeded shuffle, then the first `limit`; 0/None = all);
    every sample must have an image."""
    samples, _ = load_jsonl_datasets(data, image_root)
    for sample in samples:
        if not sample.image_paths:
            raise ValueError(f"{sample.source}:{sample.line}: field 'image': REC evaluation needs an image")
    return eval_subset(samples, limit or None, seed)


def pixel_bounds(model_dir: Path, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """The resize bounds: given values, else the release's preprocessor_config.json, else Qwen2.5-VL's."""
    config = model_dir / "preprocessor_config.json"
    stored = json.loads(config.read_text()) if config.is_file() else {}
    defaults = DataConfig()
    return (
        min_pixels or stored.get("min_pixels", defaults.min_pixels),
        max_pixels or stored.get("max_pixels", defaults.max_pixels),
    )
