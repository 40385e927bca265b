"""`vlmr1 train`: the GRPO loop. data -> grouped sampling -> rewards (host) -> advantages -> jitted step.

One optimizer step takes `data.prompts_per_step` prompts x `grpo.num_generations` samples. Every process builds
the same global prompt batch (images are small next to generation), so the loop is identical on one CPU and on a
pod; only the jitted sampler and step are sharded. With `num_iterations` > 1 each rollout is reused for that many
updates, with the sampler's log-probs as the old policy (they equal the forward's to ~1e-6).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from vlmr1_jax.config import RunConfig, to_dict
from vlmr1_jax.data.pipeline import epoch_of, make_prompt_iterator
from vlmr1_jax.processing.batch import PromptBatch, encode_prompts
from vlmr1_jax.rewards import get_reward
from vlmr1_jax.rl.grpo import group_advantages
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids
from vlmr1_jax.rl.step import current_model, init_train_state, make_grpo_step, make_logprob_fn, make_optimizer
from vlmr1_jax.train.checkpoint import Checkpointer, abstract_like
from vlmr1_jax.train.metrics import MetricsWriter, RolloutLog, mean_metrics
from vlmr1_jax.train.setup import (build_model, columns_for, load_samples, load_tokenizer, resolve_max_steps, run_dir,
                                   on_mesh, setup_mesh, to_device, to_host)

log = logging.getLogger(__name__)


def score(completions: list[str], columns: dict[str, list[Any]],
          reward_fns: dict[str, Callable]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each reward function's scores, and their sum per completion (VLM-R1: unit weights)."""
    per_fn = {name: np.asarray(fn(completions, **columns), np.float32) for name, fn in reward_fns.items()}
    return np.sum(list(per_fn.values()), axis=0), per_fn


class GRPOTrainer:
    """Holds the compiled functions and the state of one run; `train()` runs to `train.max_steps`."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.mesh = setup_mesh(cfg)
        self.tokenizer = load_tokenizer(cfg)
        self.samples = load_samples(cfg)
        self.max_steps = resolve_max_steps(cfg, len(self.samples))
        model = build_model(cfg, self.tokenizer, self.mesh)
        self.model_cfg = model.cfg
        g = cfg.grpo
        if g.num_generations < 2:
            raise ValueError("grpo.num_generations must be >= 2 (advantages need a group)")
        self.optimizer, self.schedule = make_optimizer(cfg.optim, self.max_steps * g.num_iterations)
        self.graphdef, state = init_train_state(model, cfg.train.trainable, self.optimizer, with_reference=g.beta > 0)
        self.state = on_mesh(state, self.mesh)
        self.reward_fns = {name: get_reward(name) for name in g.reward_funcs}
        banned = default_banned_ids(self.model_cfg)
        self.sampler = Sampler(cfg.sampling, eos_ids=self.tokenizer.eos_ids, pad_id=self.tokenizer.pad_id,
                               banned_ids=banned)
        graphdef, sampler = self.graphdef, self.sampler
        self.generate = jax.jit(lambda tr, fr, prompts, key: sampler.generate(
            nnx.merge(graphdef, tr, fr), prompts, key, g.num_generations))
        self.logprobs = make_logprob_fn(self.graphdef, g.num_generations)
        self.step_fn = make_grpo_step(self.graphdef, g, self.optimizer, self.schedule, cfg.optim.grad_accum,
                                      seed=cfg.train.seed)
        self.data = make_prompt_iterator(self.samples, cfg.data.prompts_per_step, cfg.data.seed,
                                         num_epochs=cfg.data.num_epochs)
        self.out = run_dir(cfg)
        self.checkpoints = Checkpointer(self.out / "checkpoints", cfg.train.save_every, cfg.train.keep_checkpoints)
        self.metrics = MetricsWriter(self.out, process_index=jax.process_index())
        # Every process holds the same global rollouts: one copy, from process 0.
        self.rollouts = RolloutLog(self.out) if cfg.train.rollout_log and jax.process_index() == 0 else None
        self.step = 0
        self._resume()

    def _resume(self) -> None:
        latest = self.checkpoints.latest_step()
        if latest is None:
            return
        self.state, _ = self.checkpoints.restore(abstract_like(self.state), self.data)
        self.step = int(self.state.step) // self.cfg.grpo.num_iterations
        log.info("resumed from step %d in %s", self.step, self.checkpoints.directory)

    def prepare(self, samples) -> tuple[list, PromptBatch, dict[str, jax.Array]]:
        """Host work for the next prompts (images, tokens, vision plan) and their transfer to the devices."""
        cfg = self.cfg
        batch = encode_prompts([s.problem for s in samples], [s.image_paths for s in samples], self.tokenizer,
                               self.model_cfg, task_type=cfg.data.task_type, min_pixels=cfg.data.min_pixels,
                               max_pixels=cfg.data.max_pixels, length=cfg.data.max_prompt_length)
        return samples, batch, to_device(batch, self.mesh)

    def rollout(self, prepared) -> tuple[dict[str, Any], dict[str, float], list[str]]:
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
        advantages, group_std = group_advantages(jnp.asarray(rewards), g.num_generations, g.scale_rewards)
        advantages = np.asarray(advantages)  # host value: every process passes the same global array
        t2 = time.perf_counter()
        train_batch = {"prompts": prompts, "tokens": out["tokens"], "mask": out["mask"], "advantages": advantages}
        if g.beta > 0:
            train_batch["ref_logprobs"] = self.logprobs(self.state.reference, self.state.frozen, prompts,
                                                        out["tokens"], out["mask"])
        if g.num_iterations > 1:
            train_batch["old_logprobs"] = out["logprobs"]
        lengths = mask.sum(1)
        metrics = {"completion_length": float(lengths.mean()),
                   **{f"rewards/{name}": float(v.mean()) for name, v in per_fn.items()}, "reward": float(rewards.mean()),
                   "reward_std": float(np.asarray(group_std).mean()), "time/sample": t1 - t0, "time/score": t2 - t1,
                   "tokens_per_second": float(lengths.sum()) / max(t1 - t0, 1e-9)}
        if self.rollouts is not None:
            self.rollouts.write(self.step + 1, [s.problem for s in samples], completions, per_fn,  # metrics' step
                                extra={"solution": [s.solution for s in samples for _ in range(g.num_generations)],
                                       "advantage": np.asarray(advantages).tolist()})
        return train_batch, metrics, completions

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        bar = tqdm(total=self.max_steps, initial=self.step, desc="grpo", disable=not self.progress,
                   dynamic_ncols=True)
        prepared = self.prepare(next(self.data)) if self.step < self.max_steps else None
        while self.step < self.max_steps:
            train_batch, metrics, _ = self.rollout(prepared)
            t0 = time.perf_counter()
            for _ in range(cfg.grpo.num_iterations):
                self.state, step_metrics = self.step_fn(self.state, train_batch)  # dispatched asynchronously
            self.step += 1
            # Save before the iterator moves on, then prepare the next prompts while the devices train.
            self.checkpoints.save(self.step, self.state, self.data, meta=self.meta())
            if self.step < self.max_steps:
                prepared = self.prepare(next(self.data))
            step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            metrics.update(step_metrics, **{"time/train": time.perf_counter() - t0})
            metrics["epoch"] = epoch_of(self.step, len(self.samples), cfg.data.prompts_per_step)
            window.append(metrics)
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                last = mean_metrics(window)
                window = []
                self.metrics.write(self.step, last)
                bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last.get('kl', 0.0):.4f}")
            bar.update(1)
        bar.close()
        self.checkpoints.save(self.step, self.state, self.data, meta=self.meta(), force=True)
        self.close()
        return last

    def close(self) -> None:
        self.checkpoints.wait()
        self.checkpoints.close()
        self.metrics.close()
        if self.rollouts is not None:
            self.rollouts.close()

    def meta(self) -> dict[str, Any]:
        return {"run_config": to_dict(self.cfg), "model_config": dataclasses.asdict(self.model_cfg),
                "step": self.step, "kind": "grpo"}

    def model(self):
        return current_model(self.graphdef, self.state)
