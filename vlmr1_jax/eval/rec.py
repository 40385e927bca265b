"""REC evaluation: greedy decoding with the JAX model, then a REC protocol's Acc@0.5 (docs/evaluation.md).

Acc@0.5 follows VLM-R1: the protocol's box parser (failure -> [0, 0, 0, 0]), the rescale from the resized frame to
the original image, and the +-1 IoU strictly above 0.5. We also report the mean of the `rec_iou` and `rec_format`
training rewards, which is what the demo tracks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from vlmr1_jax.config import DataConfig, SamplingConfig
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.eval.protocols import R1, RecProtocol
from vlmr1_jax.models.family import processor_of
from vlmr1_jax.models.processor import Processor, max_pixels_or_default
from vlmr1_jax.parallel.mesh import state_shardings
from vlmr1_jax.processing.batch import encode_prompts, to_device
from vlmr1_jax.rewards import get_reward
from vlmr1_jax.rewards.common import first_answer, iou
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids

Frames = list[list[int] | None]  # per image of a sample: the [height, width] its boxes live in (None: unscaled)


def image_frames(cfg: Any, grids: Sequence[Sequence[Sequence[int]]]) -> list[Frames]:
    """Per sample, each image's box frame by the model family's processor, from the images' grids."""
    processor = processor_of(cfg)
    return [[None if (f := processor.model_frame(g)) is None else list(f) for g in gs] for gs in grids]


def image_size(image_path: str) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    with Image.open(image_path) as img:
        return img.size


def scale_box(box: Sequence[float], frame: Sequence[int] | None, size: tuple[int, int]) -> list[float]:
    """A box from the model's frame ([height, width]; None: unscaled) to an image of `size` (width, height)."""
    if frame is None:
        return [float(v) for v in box]
    (width, height), (in_h, in_w) = size, frame
    x1, y1, x2, y2 = box
    return [x1 * width / in_w, y1 * height / in_h, x2 * width / in_w, y2 * height / in_h]


def rescale_box(box: Sequence[float], frame: Sequence[int] | None, image_path: str) -> list[float]:
    """Model coordinates live in the frame the model saw ([height, width] from the family's processor); map them
    back to the original image. A None frame (a family whose boxes are not in resized pixels) leaves them."""
    return [float(v) for v in box] if frame is None else scale_box(box, frame, image_size(image_path))


def truth_box(sample: Sample) -> list[float]:
    """The ground-truth [x1, y1, x2, y2] (original pixels) inside the sample's `<answer>`."""
    answer = first_answer(sample.solution)
    try:
        box = json.loads(answer if answer is not None else sample.solution)
        if len(box) != 4:
            raise ValueError
        return [float(v) for v in box]
    except (ValueError, TypeError):
        raise ValueError(
            f"{sample.source}:{sample.line}: field 'solution': expected a box [x1, y1, x2, y2], got {sample.solution!r}"
        ) from None


@dataclasses.dataclass
class GreedyDecoder:
    """Compiled greedy decoding of prompt batches of a fixed size (the last batch is padded, not recompiled). With a
    `mesh`, the weights are sharded by their logical axes and each batch split over the mesh's batch axes, as in
    training."""

    model: Any
    tokenizer: Any
    task_type: str | None
    min_pixels: int = DataConfig.min_pixels
    max_pixels: int | None = None  # None: the family's default
    batch_size: int = 100
    max_new_tokens: int = 256
    prompt_length: int | None = None
    mesh: Mesh | None = None

    def __post_init__(self):
        graphdef, self._state = nnx.split(self.model)
        if self.mesh is not None:
            self._state = jax.device_put(self._state, state_shardings(self._state, self.mesh))
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
                max_pixels=max_pixels_or_default(self.max_pixels, processor_of(self.model.cfg)),
                length=self.prompt_length,
            )
            key = jax.random.key(0)  # greedy: unused
            if self.mesh is None:
                out = self._run(self._state, {k: jax.numpy.asarray(v) for k, v in batch.arrays().items()}, key)
            else:
                with jax.set_mesh(self.mesh):
                    out = self._run(self._state, to_device(batch, self.mesh), key)
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


def rec_records(
    samples: Sequence[Sample], completions: Sequence[str], frames: Sequence[Frames], protocol: RecProtocol = R1
) -> list[dict]:
    """Per-sample REC records: the protocol's box (rescaled), its IoU with the truth, the hit (IoU > 0.5), and the
    `rec_iou` / `rec_format` training rewards; `frames[i][0]` is the frame sample i's model answered in."""
    columns = {
        "solution": [s.solution for s in samples],
        "image_path": [list(s.image_paths) for s in samples],
        "model_image_size": [list(fs) for fs in frames],
    }
    iou_rewards = get_reward("rec_iou")(list(completions), **columns)
    format_rewards = get_reward("rec_format")(list(completions), **columns)
    records = []
    for sample, completion, fs, r_iou, r_fmt in zip(samples, completions, frames, iou_rewards, format_rewards):
        frame = fs[0] if protocol.rescale else None
        box = rescale_box(protocol.extract_box(completion), frame, sample.image_paths[0])
        value = iou(box, truth_box(sample))
        records.append(
            {
                "id": sample.id,
                "image": sample.image_paths[0],
                "problem": sample.problem,
                "solution": sample.solution,
                "completion": completion,
                "pred_box": box,
                "iou": float(value),
                "correct": bool(value > 0.5),
                "rec_iou": float(r_iou),
                "rec_format": float(r_fmt),
            }
        )
    return records


def summarize_rec(records: Sequence[dict]) -> dict[str, float]:
    """Acc@0.5 in percent, the mean IoU it thresholds, and the mean `rec_iou` / `rec_format` rewards."""
    n = len(records)
    mean = lambda key: float(np.mean([r[key] for r in records])) if n else 0.0
    return {
        "accuracy": 100.0 * sum(r["correct"] for r in records) / max(n, 1),
        "mean_iou": mean("iou"),
        "iou": mean("rec_iou"),
        "format": mean("rec_format"),
        "n": n,
    }


def score_rec(
    samples: Sequence[Sample], completions: Sequence[str], frames: Sequence[Frames], protocol: RecProtocol = R1
) -> tuple[dict[str, float], list[dict]]:
    """`summarize_rec` of `rec_records`: the summary and the per-sample records."""
    records = rec_records(samples, completions, frames, protocol)
    return summarize_rec(records), records


def evaluate_rec(
    decoder: GreedyDecoder, samples: Sequence[Sample], protocol: RecProtocol = R1
) -> tuple[dict[str, float], list[dict]]:
    """Acc@0.5 under `protocol` plus mean `rec_iou` / `rec_format` rewards, and per-sample records. The decoder's
    question template is its own (build it with `protocol.task_type` to follow the protocol's prompt)."""
    completions, frames = decoder(samples)
    return score_rec(samples, completions, frames, protocol)


def pixel_bounds(
    model_dir: Path, min_pixels: int | None, max_pixels: int | None, processor: Processor
) -> tuple[int, int]:
    """The resize bounds: given values, else the release's preprocessor_config.json, else the family's defaults."""
    config = model_dir / "preprocessor_config.json"
    stored = json.loads(config.read_text()) if config.is_file() else {}
    return (
        min_pixels or stored.get("min_pixels", DataConfig.min_pixels),
        max_pixels or stored.get("max_pixels", processor.default_max_pixels),
    )
