"""The run machinery GRPO and SFT share: set-up, resume, the step loop with host/device overlap, logging, saving.

A subclass says how to turn samples into a prepared batch (`prepare`, host work) and how to run one optimizer step
on it (`dispatch`, returning host metrics and the step's device metrics without waiting for them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from typing import Any

import jax
from tqdm import tqdm

from vlmr1_jax.config import RunConfig, to_dict
from vlmr1_jax.data.pipeline import epoch_of, make_prompt_iterator
from vlmr1_jax.processing.batch import PromptBatch, encode_prompts
from vlmr1_jax.rl.state import current_model, init_train_state, make_optimizer
from vlmr1_jax.train.checkpoint import Checkpointer, abstract_like, read_meta
from vlmr1_jax.train.identity import check_resume
from vlmr1_jax.train.metrics import MetricsWriter, mean_metrics
from vlmr1_jax.train.restore import imported_params
from vlmr1_jax.train.setup import (build_model, check_model_config, frozen_dtype_of, load_samples, load_tokenizer,
                                   on_mesh, resolve_max_steps, run_dir, setup_mesh)

log = logging.getLogger(__name__)


class TrainingDiverged(ValueError):
    """Too many consecutive steps with a non-finite loss or gradient (their updates were skipped)."""


class Trainer:
    kind = "base"

    def __init__(self, cfg: RunConfig, *, progress: bool = True, with_reference: bool = False,
                 updates_per_step: int = 1, resume_anyway: bool = False):
        check_model_config(cfg)  # before any data or weights are read
        self.cfg = cfg
        self.progress = progress
        self.updates_per_step = updates_per_step
        self.mesh = setup_mesh(cfg)
        self.tokenizer = load_tokenizer(cfg)
        self.samples = load_samples(cfg)
        self.max_steps = resolve_max_steps(cfg, len(self.samples))
        self.out = run_dir(cfg)
        self.checkpoints = Checkpointer(self.out / "checkpoints", cfg.train.save_every, cfg.train.keep_checkpoints)
        latest = self.checkpoints.latest_step()
        # An import checkpoint (vlmr1 import-hf) holds parameters only: the model is loaded from it, one tensor at
        # a time onto the mesh, and the optimizer state and reference are created here, as for an HF folder.
        imported = imported_params(self.checkpoints.directory, latest) if latest is not None else None
        source = cfg if imported is None else dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, hf_model=str(imported)))
        model = build_model(source, self.tokenizer, self.mesh)
        self.model_cfg = model.cfg
        self.optimizer, self.schedule = make_optimizer(cfg.optim, self.max_steps * updates_per_step)
        self.graphdef, state = init_train_state(model, cfg.train.trainable, self.optimizer, with_reference,
                                                frozen_dtype_of(cfg.model))
        self.state = on_mesh(state, self.mesh)
        self.data = make_prompt_iterator(self.samples, cfg.data.prompts_per_step, cfg.data.seed,
                                         num_epochs=cfg.data.num_epochs)
        self.metrics = MetricsWriter(self.out, process_index=jax.process_index())
        self.step = 0
        self.nonfinite_streak = 0
        self.closed = False
        self.stopped_by: str | None = None
        if imported is not None:
            log.info("starting from the imported parameters in %s", imported)
        elif latest is not None:
            if not resume_anyway:
                meta = read_meta(self.checkpoints.directory, latest)
                check_resume(meta.get("run_config", {}), to_dict(cfg), self.kind, meta.get("kind", "?"),
                             str(self.checkpoints.directory))
            self.state, _ = self.checkpoints.restore(abstract_like(self.state), self.data)
            self.step = int(self.state.step) // updates_per_step
            log.info("resumed from step %d in %s", self.step, self.checkpoints.directory)

    def encode(self, samples) -> PromptBatch:
        """VLM-R1 prompts for `samples`, images loaded and laid out for the tower."""
        data = self.cfg.data
        return encode_prompts([s.problem for s in samples], [s.image_paths for s in samples], self.tokenizer,
                              self.model_cfg, task_type=data.task_type, min_pixels=data.min_pixels,
                              max_pixels=data.max_pixels, length=data.max_prompt_length)

    def prepare(self, samples) -> Any:
        raise NotImplementedError

    def dispatch(self, prepared) -> tuple[dict[str, float], dict[str, jax.Array]]:
        """Run one optimizer step on `prepared`: (host metrics, device metrics still in flight)."""
        raise NotImplementedError

    def finish_metrics(self, metrics: dict[str, float]) -> None:
        """Derive per-step metrics once the step's time is known (in place)."""

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.4f}"}

    def train(self) -> dict[str, float]:
        """Run to `max_steps` (from the resumed step); activations follow the mesh's logical rules. On any failure
        the checkpoint being written is allowed to commit before the error propagates. SIGTERM (preemption) and
        SIGINT (Ctrl-C) finish the current step, save it and return early; `stopped_by` names the signal."""
        try:
            with jax.set_mesh(self.mesh), self._stop_on_signals():
                return self._train()
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """Turn SIGTERM / SIGINT into a request to stop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self.stopped_by is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stopped_by = signal.Signals(signum).name
            log.warning("%s: finishing step %d, saving, then stopping", self.stopped_by, self.step + 1)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train(self) -> dict[str, float]:
        cfg = self.cfg
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        bar = tqdm(total=self.max_steps, initial=self.step, desc=self.kind, disable=not self.progress,
                   dynamic_ncols=True)
        prepared = self.prepare(next(self.data)) if self.step < self.max_steps else None
        while self.step < self.max_steps:
            start = time.perf_counter()
            metrics, pending = self.dispatch(prepared)
            self.step += 1
            # Save before the iterator moves on, then prepare the next batch while the devices train.
            self.checkpoints.save(self.step, self.state, self.data, meta=self.meta())
            if self.step < self.max_steps:
                prepared = self.prepare(next(self.data))
            metrics.update({k: float(v) for k, v in jax.device_get(pending).items()})
            self._check_finite(metrics)
            metrics["time/step"] = time.perf_counter() - start
            self.finish_metrics(metrics)
            metrics["epoch"] = epoch_of(self.step, len(self.samples), cfg.data.prompts_per_step)
            window.append(metrics)
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                last = mean_metrics(window)
                window = []
                self.metrics.write(self.step, last)
                bar.set_postfix(self.progress_postfix(last))
            bar.update(1)
            if self.stopped_by is not None:
                if window:
                    last = mean_metrics(window)
                    self.metrics.write(self.step, last)
                break
        bar.close()
        self.checkpoints.save(self.step, self.state, self.data, meta=self.meta(), force=True)
        self.close()
        return last

    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Count consecutive skipped (non-finite) steps; stop the run once `train.max_nonfinite_steps` are reached."""
        self.nonfinite_streak = self.nonfinite_streak + 1 if metrics.get("nonfinite", 0.0) > 0 else 0
        if self.nonfinite_streak:
            log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped", self.step,
                        metrics.get("loss"))
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise TrainingDiverged(
                f"{limit} steps in a row (up to step {self.step}) had a non-finite loss or gradient; their updates "
                f"were skipped, so the parameters are those of step {self.step - limit}. Lower "
                f"optim.learning_rate (now {self.cfg.optim.learning_rate:g}) or check the data, then resume "
                f"(train.max_nonfinite_steps sets this limit)")

    def close(self) -> None:
        """Let an in-flight checkpoint commit, then release the checkpointer and metric writers (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.checkpoints.wait()
        finally:
            self.checkpoints.close()
            self.metrics.close()

    def meta(self) -> dict[str, Any]:
        return {"run_config": to_dict(self.cfg), "model_config": dataclasses.asdict(self.model_cfg),
                "step": self.step, "kind": self.kind}

    def model(self):
        return current_model(self.graphdef, self.state)
