"""`vlmr1 sft`: supervised fine-tuning on the same jsonl (cross-entropy on the answer tokens), with the GRPO step
machinery. It is VLM-R1's comparison baseline and the demo's warm start; the result is saved as an HF folder that
`model.hf_model` (and transformers) can load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vlmr1_jax.config import RunConfig
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.processing.batch import to_device
from vlmr1_jax.rl.step import make_sft_step
from vlmr1_jax.train.base import RunParts, Trainer

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def answer_text(sample: Sample) -> str:
    """The sample's answer without VLM-R1's `<answer> ... </answer>` wrapping."""
    match = _ANSWER.search(sample.solution)
    return match.group(1) if match else sample.solution


def target_ids(samples: Sequence[Sample], tokenizer, template: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Answer tokens + <|im_end|>, right-padded to `length`; an answer that does not fit is an error, not a cut."""
    tokens = np.full((len(samples), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(samples), length), np.int32)
    for i, sample in enumerate(samples):
        ids = tokenizer.encode(template.replace("{answer}", answer_text(sample))) + [tokenizer.eos_ids[0]]
        if len(ids) > length:
            raise ValueError(
                f"{sample.source}:{sample.line}: answer needs {len(ids)} tokens > sft.max_target_length={length}"
            )
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return tokens, mask


class SFTTrainer(Trainer):
    """Cross-entropy on the answer tokens (`sft.target_template`), prompts built exactly as for GRPO."""

    kind = "sft"

    def __init__(self, cfg: RunConfig, parts: RunParts, *, progress: bool = True, resume_anyway: bool = False):
        super().__init__(cfg, parts, progress=progress, resume_anyway=resume_anyway)
        self.step_fn = make_sft_step(
            self.graphdef, self.optimizer, self.schedule, cfg.optim.grad_accum, seed=cfg.train.seed
        )

    def prepare(self, samples: Sequence[Sample], batch: PromptBatch) -> dict[str, Any]:
        sft = self.cfg.sft
        tokens, mask = target_ids(samples, self.tokenizer, sft.target_template, sft.max_target_length)
        arrays = to_device({"tokens": tokens, "mask": mask}, self.mesh, {"tokens": 0, "mask": 0})
        return {"prompts": to_device(batch, self.mesh), **arrays}

    def dispatch(self, prepared: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, jax.Array]]]:
        self.state, metrics = self.step_fn(self.state, *prepared)  # dispatched asynchronously
        return {}, [metrics]
