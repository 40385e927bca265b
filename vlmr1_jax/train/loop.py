"""`vlmr1 train`: the GRPO loop. data -> `rollout` (grouped sampling, rewards on the host, advantages, reference
log-probs: `rl/rollout.py`) -> jitted step.

One optimizer step takes `data.prompts_per_step` prompts x `grpo.num_generations` samples, as `optim.grad_accum`
micro-batches. VLM-R1's order (docs/grpo.md, "Accumulation and iterations"): a rollout phase samples one rollout per
micro-batch with the current policy (its buffer slots), then makes `num_iterations` optimizer steps, each on the
mean gradient of all the slots; with `num_iterations` > 1 the sampler's log-probs are the old policy (they equal
the forward's to ~1e-6). Every process builds the same global prompt batch (images are small next to generation),
so the loop is identical on one CPU and on a pod; only the jitted sampler and step are sharded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from vlmr1_jax.config import RunConfig
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.models.family import processor_of
from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.processing.batch import to_device
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rewards import reward_functions
from vlmr1_jax.rl.grpo import check_algorithm, group_advantages
from vlmr1_jax.rl.rollout import Prepared, Scored, TrainExample, rollout
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids
from vlmr1_jax.rl.step import make_grpo_step, make_logprob_fn
from vlmr1_jax.train.base import RunParts, Trainer
from vlmr1_jax.train.metrics import RolloutLog
from vlmr1_jax.train.setup import columns_for, to_host


def merge_scored(parts: Sequence[Scored]) -> Scored:
    """The host side of a phase's rollouts (one per accumulation slot) as one, so its metrics cover them all."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
    return Scored(
        [c for p in parts for c in p.completions],
        cat("rewards"),
        {name: np.concatenate([p.per_reward[name] for p in parts]) for name in parts[0].per_reward},
        cat("advantages"),
        cat("group_std"),
        cat("lengths"),
        sum(p.sample_seconds for p in parts),
        sum(p.score_seconds for p in parts),
    )


def make_generate_fn(
    cfg: RunConfig,
    tokenizer: Tokenizer,
    model_cfg: Any,
    graphdef: nnx.GraphDef,
    unstack_layers: bool | None = None,
) -> Callable:
    """The jitted grouped sampler the loop runs, `(trainable, frozen, prompts, key) -> Rollout` (also what
    `vlmr1 plan` compiles, with the layer stacking of the accelerator it simulates: `Sampler.unstack_layers`)."""
    sampler = Sampler(
        cfg.sampling,
        eos_ids=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id,
        banned_ids=default_banned_ids(model_cfg),
        unstack_layers=unstack_layers,
    )
    num_samples = cfg.grpo.num_generations
    return jax.jit(
        lambda tr, fr, prompts, key: sampler.generate(nnx.merge(graphdef, tr, fr), prompts, key, num_samples)
    )


class GRPOTrainer(Trainer):
    """GRPO: each rollout phase samples G completions per prompt, scores them on the host, and makes
    `num_iterations` optimizer steps on them."""

    kind = "grpo"

    def __init__(self, cfg: RunConfig, parts: RunParts, *, progress: bool = True, resume_anyway: bool = False):
        g = cfg.grpo
        check_algorithm(g)  # a bad part name or user path fails before the model is built
        if g.num_generations < 2:
            raise ValueError("grpo.num_generations must be >= 2 (advantages need a group)")
        super().__init__(
            cfg,
            parts,
            progress=progress,
            with_reference=g.beta > 0,
            updates_per_rollout=g.num_iterations,
            resume_anyway=resume_anyway,
        )
        self.reward_fns = reward_functions(
            g.reward_funcs, g.reward_options, self.tokenizer, processor_of(self.model_cfg).reward_variants
        )
        self.generate = make_generate_fn(cfg, self.tokenizer, self.model_cfg, self.graphdef)
        self.logprobs = make_logprob_fn(self.graphdef, g.num_generations)
        self.step_fn = make_grpo_step(
            self.graphdef, g, self.optimizer, self.schedule, cfg.optim.grad_accum, seed=cfg.train.seed
        )
        # Every process holds the same global rollouts: one copy, from process 0.
        self.rollouts = (
            RolloutLog(self.out, resume_step=self.step) if cfg.train.rollout_log and jax.process_index() == 0 else None
        )

    def prepare(self, samples: list[Sample], batch: PromptBatch) -> Prepared:
        """The next prompts and their transfer to the devices."""
        return Prepared(samples, batch, to_device(batch, self.mesh))

    def rollout(self, prepared: Prepared, slot: int) -> tuple[TrainExample, Scored]:
        """Sample G completions per prompt of accumulation slot `slot` with the current policy and score them."""
        g, state = self.cfg.grpo, self.state
        micro_step = self.step * self.cfg.optim.grad_accum + slot
        return rollout(
            prepared.prompts,
            jax.random.fold_in(jax.random.key(self.cfg.train.seed), micro_step),
            generate=functools.partial(self.generate, state.trainable, state.frozen),
            decode=self.tokenizer.batch_decode,
            reward_fns=self.reward_fns,
            columns=columns_for(
                prepared.samples,
                prepared.batch,
                g.num_generations,
                processor_of(self.model_cfg),
                self.cfg.data.task_type,
            ),
            advantage_fn=functools.partial(
                group_advantages, group_size=g.num_generations, estimator=g.algorithm().advantage_estimator
            ),
            ref_logprob_fn=functools.partial(self.logprobs, state.reference, state.frozen) if g.beta > 0 else None,
            keep_old_logprobs=g.num_iterations > 1,
            fetch=to_host,
        )

    def dispatch(self, prepared: list[Prepared]) -> tuple[dict[str, float], list[dict[str, jax.Array]]]:
        """One rollout phase: a rollout per accumulation slot (all with the current policy), then `num_iterations`
        optimizer steps, each over every slot in order."""
        examples, scored = zip(*(self.rollout(p, slot) for slot, p in enumerate(prepared)))
        merged = merge_scored(scored)
        if self.rollouts is not None:
            self.log_rollouts([s for p in prepared for s in p.samples], merged)
        updates = []
        for _ in range(self.updates_per_rollout):
            self.state, step_metrics = self.step_fn(self.state, *examples)  # dispatched asynchronously
            updates.append(step_metrics)
        return merged.metrics(), updates

    def log_rollouts(self, samples: list[Sample], scored: Scored) -> None:
        """The phase's prompts, completions, rewards and advantages, at its first optimizer step."""
        assert self.rollouts is not None
        g = self.cfg.grpo
        self.rollouts.write(
            self.step + 1,  # metrics' step
            [s.problem for s in samples],
            scored.completions,
            scored.per_reward,  # type: ignore[arg-type]
            extra={
                "solution": [s.solution for s in samples for _ in range(g.num_generations)],
                "advantage": scored.advantages.tolist(),
            },
        )

    def finish_metrics(self, metrics: dict[str, float]) -> None:
        metrics["time/train"] = metrics["time/step"] - metrics["time/sample"] - metrics["time/score"]

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.3f}", "kl": f"{metrics.get('kl', 0.0):.4f}"}

    def close(self) -> None:
        super().close()
        if self.rollouts is not None:
            self.rollouts.close()
