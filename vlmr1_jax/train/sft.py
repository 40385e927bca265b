"""`vlmr1 sft`: supervised fine-tuning on the same jsonl (cross-entropy on the answer tokens), with the GRPO step
machinery. It is VLM-R1's comparison baseline and the demo's warm start; the result is saved as an HF folder that
`model.hf_model` (and transformers) can load.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from vlmr1_jax.config import RunConfig, to_dict
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.data.pipeline import epoch_of, make_prompt_iterator
from vlmr1_jax.processing.batch import encode_prompts
from vlmr1_jax.rl.step import current_model, init_train_state, make_optimizer, make_sft_step
from vlmr1_jax.train.checkpoint import Checkpointer, abstract_like
from vlmr1_jax.train.metrics import MetricsWriter, mean_metrics
from vlmr1_jax.train.setup import (build_model, load_samples, load_tokenizer, on_mesh, resolve_max_steps, run_dir,
                                   setup_mesh, to_device)

log = logging.getLogger(__name__)
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
            raise ValueError(f"{sample.source}:{sample.line}: answer needs {len(ids)} tokens > "
                             f"sft.max_target_length={length}")
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return tokens, mask


class SFTTrainer:
    def __init__(self, cfg: RunConfig, *, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.mesh = setup_mesh(cfg)
        self.tokenizer = load_tokenizer(cfg)
        self.samples = load_samples(cfg)
        self.max_steps = resolve_max_steps(cfg, len(self.samples))
        model = build_model(cfg, self.tokenizer, self.mesh)
        self.model_cfg = model.cfg
        self.optimizer, self.schedule = make_optimizer(cfg.optim, self.max_steps)
        self.graphdef, state = init_train_state(model, cfg.train.trainable, self.optimizer, with_reference=False)
        self.state = on_mesh(state, self.mesh)
        self.step_fn = make_sft_step(self.graphdef, self.optimizer, self.schedule, cfg.optim.grad_accum,
                                     seed=cfg.train.seed)
        self.data = make_prompt_iterator(self.samples, cfg.data.prompts_per_step, cfg.data.seed,
                                         num_epochs=cfg.data.num_epochs)
        self.out = run_dir(cfg)
        self.checkpoints = Checkpointer(self.out / "checkpoints", cfg.train.save_every, cfg.train.keep_checkpoints)
        self.metrics = MetricsWriter(self.out, process_index=jax.process_index())
        self.step = 0
        if self.checkpoints.latest_step() is not None:
            self.state, _ = self.checkpoints.restore(abstract_like(self.state), self.data)
            self.step = int(self.state.step)

    def batch(self, samples: Sequence[Sample]) -> dict[str, Any]:
        cfg = self.cfg
        prompts = encode_prompts([s.problem for s in samples], [s.image_paths for s in samples], self.tokenizer,
                                 self.model_cfg, task_type=cfg.data.task_type, min_pixels=cfg.data.min_pixels,
                                 max_pixels=cfg.data.max_pixels, length=cfg.data.max_prompt_length)
        tokens, mask = target_ids(samples, self.tokenizer, cfg.sft.target_template, cfg.sft.max_target_length)
        arrays = to_device({"tokens": tokens, "mask": mask}, self.mesh, {"tokens": 0, "mask": 0})
        return {"prompts": to_device(prompts, self.mesh), **arrays}

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        bar = tqdm(total=self.max_steps, initial=self.step, desc="sft", disable=not self.progress,
                   dynamic_ncols=True)
        batch = self.batch(next(self.data)) if self.step < self.max_steps else None
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            self.state, metrics = self.step_fn(self.state, batch)  # dispatched asynchronously
            self.step += 1
            # Save before the iterator moves on, then build the next batch while the devices train.
            self.checkpoints.save(self.step, self.state, self.data, meta=self.meta())
            if self.step < self.max_steps:
                batch = self.batch(next(self.data))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics.update({"epoch": epoch_of(self.step, len(self.samples), cfg.data.prompts_per_step),
                            "time/step": time.perf_counter() - t0})
            window.append(metrics)
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                last = mean_metrics(window)
                window = []
                self.metrics.write(self.step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            bar.update(1)
        bar.close()
        self.checkpoints.save(self.step, self.state, self.data, meta=self.meta(), force=True)
        self.checkpoints.wait()
        self.checkpoints.close()
        self.metrics.close()
        return last

    def meta(self) -> dict[str, Any]:
        return {"run_config": to_dict(self.cfg), "model_config": dataclasses.asdict(self.model_cfg),
                "step": self.step, "kind": "sft"}

    def model(self):
        return current_model(self.graphdef, self.state)


def save_hf_folder(model, out_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """The trained model as a float32 HF release folder (weights, config, tokenizer) that `model.hf_model` and
    transformers can load."""
    from flax import nnx

    from converters.release import export_release

    return export_release(nnx.split(model)[1], model.cfg, out_dir, target="hf", dtype="fp32",
                          tokenizer_dir=tokenizer_dir, overwrite=True)
