"""`vlmr1 train`: the GRPO loop. data -> `rollout` (grouped sampling, rewards on the host, advantages, reference
log-probs: `rl/rollout.py`) -> jitted step.

One optimizer step takes `data.prompts_per_step` prompts x `grpo.num_generations` samples. Every process builds
the same global prompt batch (images are small next to generation), so the loop is identical on one CPU and on a
pod; only the jitted sampler and step are sharded. With `num_iterations` > 1 each rollout is reused for that many
updates, with the sampler's log-probs as the old policy (they equal the forward's to ~1e-6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from vlmr1_jax.config import RunConfig
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.models.family import family_of
from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rewards import reward_functions
from vlmr1_jax.rl.grpo import check_algorithm, group_advantages
from vlmr1_jax.rl.rollout import Prepared, TrainExample, rollout
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids
from vlmr1_jax.rl.step import make_grpo_step, make_logprob_fn
from vlmr1_jax.train.base import RunParts, Trainer
from vlmr1_jax.train.metrics import RolloutLog
from vlmr1_jax.train.setup import columns_for, to_device, to_host


def make_generate_fn(cfg: RunConfig, tokenizer: Tokenizer, model_cfg: Any, graphdef: nnx.GraphDef) -> Callable:
    """The jitted grouped sampler the loop runs, `(trainable, frozen, prompts, key) -> Rollout` (also what
    `vlmr1 plan` compiles)."""
    sampler = Sampler(
        cfg.sampling, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, banned_ids=default_banned_ids(model_cfg)
    )
    num_samples = cfg.grpo.num_generations
    return jax.jit(
        lambda tr, fr, prompts, key: sampler.generate(nnx.merge(graphdef, tr, fr), prompts, key, num_samples)
    )


class GRPOTrainer(Trainer):
    """GRPO: each step samples G completions per prompt, scores them on the host, and updates the policy."""

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
            updates_per_step=g.num_iterations,
            resume_anyway=resume_anyway,
        )
        self.reward_fns = reward_functions(g.reward_funcs, g.reward_options, self.tokenizer)
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

    def rollout(self, prepared: Prepared) -> tuple[TrainExample, dict[str, float]]:
        """Sample G completions per prompt with the current policy, score them, and log the rollout."""
        g, state = self.cfg.grpo, self.state
        example, scored = rollout(
            prepared.prompts,
            jax.random.fold_in(jax.random.key(self.cfg.train.seed), self.step),
            generate=functools.partial(self.generate, state.trainable, state.frozen),
            decode=self.tokenizer.batch_decode,
            reward_fns=self.reward_fns,
            columns=columns_for(
                prepared.samples,
                prepared.batch,
                g.num_generations,
                family_of(self.model_cfg).processor,
                self.cfg.data.task_type,
            ),
            advantage_fn=functools.partial(
                group_advantages, group_size=g.num_generations, estimator=g.algorithm().advantage_estimator
            ),
            ref_logprob_fn=functools.partial(self.logprobs, state.reference, state.frozen) if g.beta > 0 else None,
            keep_old_logprobs=g.num_iterations > 1,
            fetch=to_host,
        )
        if self.rollouts is not None:
            samples = prepared.samples
            self.rollouts.write(
                self.step + 1,
                [s.problem for s in samples],
                scored.completions,  # metrics' step
                scored.per_reward,  # type: ignore[arg-type]
                extra={
                    "solution": [s.solution for s in samples for _ in range(g.num_generations)],
                    "advantage": scored.advantages.tolist(),
                },
            )
        return example, scored.metrics()

    def dispatch(self, prepared: Prepared) -> tuple[dict[str, float], dict[str, jax.Array]]:
        example, metrics = self.rollout(prepared)
        for _ in range(self.cfg.grpo.num_iterations):
            self.state, step_metrics = self.step_fn(self.state, example)  # dispatched asynchronously
        return metrics, step_metrics

    def finish_metrics(self, metrics: dict[str, float]) -> None:
        metrics["time/train"] = metrics["time/step"] - metrics["time/sample"] - metrics["time/score"]

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.3f}", "kl": f"{metrics.get('kl', 0.0):.4f}"}

    def close(self) -> None:
        super().close()
        if self.rollouts is not None:
            self.rollouts.close()
