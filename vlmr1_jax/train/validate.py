"""Periodic evaluation on the held-out split (`train.eval_every`): greedy decoding of every validation prompt with
the current policy, scored by the run's reward functions and, for REC data, by `vlmr1 eval rec`'s Acc@0.5.

It reads the train state and nothing else of the run: no random key, data iterator or counter of the training
stream is touched, so a run trains bit-identically with or without it. Every batch has `data.prompts_per_step`
prompts (the last one padded) and one prompt length for the whole split, so the decoder compiles once for a split
whose images share a size (once per image layout otherwise) and never again at later evaluations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlmr1_jax.config import RunConfig, SamplingConfig
from vlmr1_jax.data.jsonl import DataError, Sample
from vlmr1_jax.eval.rec import Frames, image_frames, score_rec, truth_box
from vlmr1_jax.models.family import processor_of
from vlmr1_jax.models.processor import PromptBatch, length_bucket
from vlmr1_jax.processing.batch import EncodedPrompt, build_prompt_batch, to_device
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rewards import reward_functions
from vlmr1_jax.rl.rollout import RewardFn, score
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids
from vlmr1_jax.train.setup import columns_for, to_host

log = logging.getLogger(__name__)

EncodeFn = Callable[[Sample], EncodedPrompt]  # one sample's prompt and images (`Trainer.encode_one`)


def is_rec(samples: Sequence[Sample]) -> bool:
    """Every sample has an image and a `[x1, y1, x2, y2]` solution: REC Acc@0.5 applies."""
    try:
        return all(s.image_paths and truth_box(s) for s in samples)
    except ValueError:
        return False


class Validation:
    """The validation split and its compiled greedy decoder; `run(state)` returns the `eval/*` metrics."""

    def __init__(
        self,
        cfg: RunConfig,
        samples: Sequence[Sample],
        *,
        encode: EncodeFn,
        tokenizer: Tokenizer,
        model_cfg: Any,
        graphdef: nnx.GraphDef,
        mesh: Mesh,
    ):
        """Encode every validation prompt once (a failure follows `data.on_error`, as in training) to fix the
        shared prompt length; the prompts are encoded again at each evaluation (images are not kept)."""
        self.every = cfg.train.eval_every
        self.batch_size = cfg.data.prompts_per_step
        self.encode, self.tokenizer, self.model_cfg, self.mesh = encode, tokenizer, model_cfg, mesh
        self.reward_fns: Mapping[str, RewardFn] = reward_functions(
            cfg.grpo.reward_funcs, cfg.grpo.reward_options, tokenizer, processor_of(model_cfg).reward_variants
        )
        self.task_type = cfg.data.task_type
        self.samples, lengths = [], []
        for sample in samples:
            try:
                encoded = encode(sample)
            except DataError as e:
                if cfg.data.on_error != "skip":
                    raise
                log.warning("validation: skipped %s (data.on_error=skip)", e)
                continue
            self.samples.append(sample)
            lengths.append(encoded.length(model_cfg))
        if not self.samples:
            raise ValueError("every validation sample failed to encode; see the warnings above")
        self.length = cfg.data.max_prompt_length or length_bucket(max(lengths))
        self.rec = is_rec(self.samples)
        sampler = Sampler(
            SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens, greedy=True),
            eos_ids=tokenizer.eos_ids,
            pad_id=tokenizer.pad_id,
            banned_ids=default_banned_ids(model_cfg),
        )
        self.generate = jax.jit(
            lambda trainable, frozen, prompts: sampler.generate(
                nnx.merge(graphdef, trainable, frozen), prompts, jax.random.key(0), 1
            )
        )
        log.info(
            "validation: %d samples, evaluated every %d steps (REC metrics: %s)",
            len(self.samples),
            self.every,
            self.rec,
        )

    def after_phase(self, first: int, step: int, last: bool, state: Any) -> dict[str, float]:
        """The metrics of `run(state)` when the optimizer steps `first + 1 .. step` of one rollout phase reach a
        multiple of `train.eval_every`, or `step` is the run's `last`; else none."""
        return self.run(state) if step // self.every > first // self.every or last else {}

    def _batch(self, chunk: Sequence[Sample]) -> PromptBatch:
        encoded = [self.encode(s) for s in chunk]
        encoded += [encoded[-1]] * (self.batch_size - len(chunk))  # pad rows: decoded, then dropped
        return build_prompt_batch(encoded, self.model_cfg, pad_id=self.tokenizer.pad_id, length=self.length)

    def run(self, state: Any) -> dict[str, float]:
        """Decode the split with the policy in `state` (a `TrainState`) and score it: `eval/<reward>` means,
        `eval/reward` (their sum), and for REC data `eval/acc@0.5` and `eval/mean_iou`; plus `time/eval`."""
        start = time.perf_counter()
        completions: list[str] = []
        frames: list[Frames] = []
        processor = processor_of(self.model_cfg)
        per_reward: dict[str, list[np.ndarray]] = {name: [] for name in self.reward_fns}
        for first in range(0, len(self.samples), self.batch_size):
            chunk = self.samples[first : first + self.batch_size]
            batch = self._batch(chunk)
            out = self.generate(state.trainable, state.frozen, to_device(batch, self.mesh))
            tokens, mask = to_host(out.tokens)[: len(chunk)], to_host(out.mask)[: len(chunk)]
            texts = self.tokenizer.batch_decode([row[m.astype(bool)] for row, m in zip(tokens, mask)])
            _, scores = score(texts, columns_for(chunk, batch, 1, processor, self.task_type), self.reward_fns)
            for name, values in scores.items():
                per_reward[name].append(values)
            completions += texts
            frames += image_frames(self.model_cfg, batch.image_grids[: len(chunk)])
        rewards = {name: np.concatenate(values) for name, values in per_reward.items()}
        metrics = {f"eval/{name}": float(values.mean()) for name, values in rewards.items()}
        metrics["eval/reward"] = float(np.sum(list(rewards.values()), axis=0).mean())
        if self.rec:
            summary, _ = score_rec(self.samples, completions, frames)
            metrics["eval/acc@0.5"] = summary["accuracy"] / 100.0
            metrics["eval/mean_iou"] = summary["mean_iou"]
        metrics["time/eval"] = time.perf_counter() - start
        return metrics
