"""`vlmr1 train`: the GRPO loop. data -> grouped sampling -> rewards (host) -> advantages -> jitted step.

One optimizer step takes `data.prompts_per_step` prompts x `grpo.num_generations` samples. Every process builds
the same global prompt batch (images are small next to generation), so the loop is identical on one CPU and on a
pod; only the jitted sampler and step are sharded. With `num_iterations` > 1 each rollout is reused for that many
updates, with the sampler's log-probs as the old policy (they equal the forward's to ~1e-6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmr1_jax.config import RunConfig
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlmr1_jax.processing.batch import PromptBatch
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rewards import get_reward
from vlmr1_jax.rl.grpo import group_advantages
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids
from vlmr1_jax.rl.step import make_grpo_step, make_logprob_fn
from vlmr1_jax.train.base import Trainer
from vlmr1_jax.train.metrics import RolloutLog
from vlmr1_jax.train.setup import columns_for, to_device, to_host


def score(completions: list[str], columns: dict[str, list[Any]],
          reward_fns: dict[str, Callable]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each reward function's scores, and their sum per completion (VLM-R1: unit weights)."""
    per_fn = {name: np.asarray(fn(completions, **columns), np.float32) for name, fn in reward_fns.items()}
    return np.sum(list(per_fn.values()), axis=0), per_fn


def make_generate_fn(cfg: RunConfig, tokenizer: Tokenizer, model_cfg: Qwen25VLConfig,
                     graphdef: nnx.GraphDef) -> Callable:
    """The jitted grouped sampler the loop runs, `(trainable, frozen, prompts, key) -> rollouts` (also what
    `vlmr1 plan` compiles)."""
    sampler = Sampler(cfg.sampling, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                      banned_ids=default_banned_ids(model_cfg))
    num_samples = cfg.grpo.num_generations
    return jax.jit(lambda tr, fr, prompts, key: sampler.generate(nnx.merge(graphdef, tr, fr), prompts, key,
                                                                 num_samples))


class GRPOTrainer(Trainer):
    """GRPO: each step samples G completions per prompt, scores them on the host, and updates the policy."""

    kind = "grpo"

    def __init__(self, cfg: RunConfig, *, progress: bool = True, resume_anyway: bool = False):
        g = cfg.grpo
        if g.num_generations < 2:
            raise ValueError("grpo.num_generations must be >= 2 (advantages need a group)")
        super().__init__(cfg, progress=progress, with_reference=g.beta > 0, updates_per_step=g.num_iterations,
                         resume_anyway=resume_anyway)
        self.reward_fns = {name: get_reward(name) for name in g.reward_funcs}
        self.generate = make_generate_fn(cfg, self.tokenizer, self.model_cfg, self.graphdef)
        self.logprobs = make_logprob_fn(self.graphdef, g.num_generations)
        self.step_fn = make_grpo_step(self.graphdef, g, self.optimizer, self.schedule, cfg.optim.grad_accum,
                                      seed=cfg.train.seed)
        # Every process holds the same global rollouts: one copy, from process 0.
        self.rollouts = (RolloutLog(self.out, resume_step=self.step)
                         if cfg.train.rollout_log and jax.process_index() == 0 else None)

    def prepare(self, samples, batch: PromptBatch) -> tuple[list, PromptBatch, dict[str, jax.Array]]:
        """The next prompts and their transfer to the devices."""
        return samples, batch, to_device(batch, self.mesh)

    def rollout(self, prepared) -> tuple[dict[str, Any], dict[str, float]]:
        """Sample G completions per prompt, score them, and assemble the train batch."""
        cfg, g = self.cfg, self.cfg.grpo
        samples, batch, prompts = prepared
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), self.step)
        out = self.generate(self.state.trainable, self.state.frozen, prompts, key)
        tokens, mask = to_host(out["tokens"]), to_host(out["mask"])
        t1 = time.perf_counter()
        completions = self.tokenizer.batch_decode([row[m.astype(bool)] for row, m in zip(tokens, mask)])
        rewards, per_fn = score(completions, columns_for(samples, batch, g.num_generations), self.reward_fns)
        device_advantages, group_std = group_advantages(jnp.asarray(rewards), g.num_generations,
                                                        g.algorithm().advantage_estimator)
        advantages = np.asarray(device_advantages)  # host value: every process passes the same global array
        t2 = time.perf_counter()
        train_batch = {"prompts": prompts, "tokens": out["tokens"], "mask": out["mask"], "advantages": advantages}
        if g.beta > 0:
            train_batch["ref_logprobs"] = self.logprobs(self.state.reference, self.state.frozen, prompts,
                                                        out["tokens"], out["mask"])
        if g.num_iterations > 1:
            train_batch["old_logprobs"] = out["logprobs"]
        lengths = mask.sum(1)
        metrics = {"completion_length": float(lengths.mean()),
                   **{f"rewards/{name}": float(v.mean()) for name, v in per_fn.items()},
                   "reward": float(rewards.mean()),
                   "reward_std": float(np.asarray(group_std).mean()), "time/sample": t1 - t0, "time/score": t2 - t1,
                   "tokens_per_second": float(lengths.sum()) / max(t1 - t0, 1e-9)}
        if self.rollouts is not None:
            self.rollouts.write(self.step + 1, [s.problem for s in samples], completions, per_fn,  # type: ignore[arg-type]  # metrics' step
                                extra={"solution": [s.solution for s in samples for _ in range(g.num_generations)],
                                       "advantage": advantages.tolist()})
        return train_batch, metrics

    def dispatch(self, prepared) -> tuple[dict[str, float], dict[str, jax.Array]]:
        train_batch, metrics = self.rollout(prepared)
        for _ in range(self.cfg.grpo.num_iterations):
            self.state, step_metrics = self.step_fn(self.state, train_batch)  # dispatched asynchronously
        return metrics, step_metrics

    def finish_metrics(self, metrics: dict[str, float]) -> None:
        metrics["time/train"] = metrics["time/step"] - metrics["time/sample"] - metrics["time/score"]

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.3f}", "kl": f"{metrics.get('kl', 0.0):.4f}"}

    def close(self) -> None:
        super().close()
        if self.rollouts is not None:
            self.rollouts.close()
