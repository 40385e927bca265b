"""The run machinery GRPO and SFT share: set-up, resume, the step loop with host/device overlap, logging, saving.

The base draws each optimizer step's samples, `optim.grad_accum` micro-batches of them, and encodes their prompts
(`draw`: a sample whose images or prompt fail is skipped and replaced by the next one with `data.on_error=skip`, or
stops the run naming its file and line); a subclass says how to turn a micro-batch into a prepared one (`prepare`,
host work) and how to run its `updates_per_rollout` optimizer steps on them (`dispatch`, returning host metrics and
each update's device metrics without waiting for them). A step is an optimizer step: `train.max_steps`, checkpoints
and metrics rows count them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Protocol, Self

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from vlmr1_jax.config import RunConfig, to_dict
from vlmr1_jax.data.jsonl import DataError, Sample
from vlmr1_jax.data.pipeline import epoch_of, make_sample_iterator
from vlmr1_jax.data.split import split_validation
from vlmr1_jax.models.family import processor_of
from vlmr1_jax.models.processor import PromptBatch, max_pixels_or_default
from vlmr1_jax.processing.batch import (
    EncodedPrompt,
    build_prompt_batch,
    encode_prompt_text,
    load_prompt_images,
)
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rl.state import current_model, init_train_state, make_optimizer
from vlmr1_jax.train.checkpoint import Checkpointer, CorruptCheckpoint, abstract_like, committed_steps, read_meta
from vlmr1_jax.train.compiles import compilations
from vlmr1_jax.train.identity import check_resume
from vlmr1_jax.train.metrics import MetricsWriter, mean_metrics
from vlmr1_jax.train.profile import StepProfile
from vlmr1_jax.train.restore import imported_params
from vlmr1_jax.train.setup import (
    build_model,
    check_model_config,
    frozen_dtype_of,
    load_samples,
    load_tokenizer,
    on_mesh,
    resolve_max_steps,
    run_dir,
    setup_mesh,
)
from vlmr1_jax.train.validate import Validation

log = logging.getLogger(__name__)


class PhaseHook(Protocol):
    """What the step loop calls after each rollout phase: `Validation`, or a caller's own evaluation."""

    def after_phase(self, first: int, step: int, last: bool, state: Any) -> dict[str, float]: ...


class TrainingDiverged(ValueError):
    """Too many consecutive steps with a non-finite loss or gradient (their updates were skipped)."""


@dataclasses.dataclass
class RunParts:
    """What a trainer is built from: the device mesh, the tokenizer, the loaded samples and the policy (already on
    the mesh). `build_parts` makes them from a recipe; tests and other front ends may build their own."""

    mesh: Mesh
    tokenizer: Tokenizer
    samples: list[Sample]
    model: Any
    imported: Path | None = None  # the import checkpoint (vlmr1 import-hf) the model was loaded from, if any


def build_parts(cfg: RunConfig) -> RunParts:
    """The mesh, tokenizer, samples and policy of a recipe. The policy comes from the run folder's import
    checkpoint when that is its newest step (parameters only, read one tensor at a time onto the mesh), else from
    `model.hf_model` or a preset; a training checkpoint is restored later, by the trainer, over this model."""
    check_model_config(cfg)  # before any data or weights are read
    mesh = setup_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    samples = load_samples(cfg)
    checkpoints = run_dir(cfg) / "checkpoints"
    steps = committed_steps(checkpoints)
    imported = None
    if steps:
        with contextlib.suppress(CorruptCheckpoint):  # an unreadable newest step: the trainer falls back
            imported = imported_params(checkpoints, steps[-1])
    source = (
        cfg
        if imported is None
        else dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_model=str(imported)))
    )
    return RunParts(mesh, tokenizer, samples, build_model(source, tokenizer, mesh), imported)


class Trainer:
    """The step loop over injected `RunParts`; `from_config` builds them from a recipe."""

    kind = "base"
    profile: StepProfile | None = None  # a trace of some steps (`vlmr1 train --profile DIR`)

    def __init__(
        self,
        cfg: RunConfig,
        parts: RunParts,
        *,
        progress: bool = True,
        with_reference: bool = False,
        updates_per_rollout: int = 1,
        resume_anyway: bool = False,
    ):
        # The family's image budget when the recipe leaves it unset, resolved here so the run's stored config (and
        # a resume's identity check) holds the number in effect.
        if cfg.data.max_pixels is None:
            budget = processor_of(parts.model.cfg).default_max_pixels
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_pixels=budget))
        self.cfg = cfg
        self.progress = progress
        self.updates_per_rollout = updates_per_rollout  # optimizer steps per drawn batch (GRPO's num_iterations)
        self.mesh, self.tokenizer = parts.mesh, parts.tokenizer
        # The held-out validation samples never enter the training stream.
        self.samples, held_out = split_validation(parts.samples, cfg.data.val_split_ratio, cfg.data.seed)
        self.max_steps = resolve_max_steps(cfg, len(self.samples), updates_per_rollout)
        self.out = run_dir(cfg)
        self.checkpoints = Checkpointer(self.out / "checkpoints", cfg.train.save_every, cfg.train.keep_checkpoints)
        latest = self.checkpoints.latest_step()
        model = parts.model
        self.model_cfg = model.cfg
        self.optimizer, self.schedule = make_optimizer(cfg.optim, self.max_steps)
        self.graphdef, state = init_train_state(
            model, cfg.train.trainable, self.optimizer, with_reference, frozen_dtype_of(cfg.model)
        )
        self.state = on_mesh(state, self.mesh)
        self.validation: PhaseHook | None = (
            Validation(
                cfg,
                held_out,
                encode=self.encode_one,
                tokenizer=self.tokenizer,
                model_cfg=self.model_cfg,
                graphdef=self.graphdef,
                mesh=self.mesh,
            )
            if cfg.train.eval_every
            else None
        )
        self.data = make_sample_iterator(
            self.samples, cfg.data.prompts_per_step, cfg.data.seed, num_epochs=cfg.data.num_epochs
        )
        self.skipped_samples = 0
        self.step = 0
        self.nonfinite_streak = 0
        self.closed = False
        self.stopped_by: str | None = None
        if parts.imported is not None:
            log.info("starting from the imported parameters in %s", parts.imported)
        elif latest is not None:
            self._resume(resume_anyway)
        self.metrics = MetricsWriter(self.out, process_index=jax.process_index(), resume_step=self.step)

    @classmethod
    def from_config(cls, cfg: RunConfig, **options: Any) -> Self:
        """A trainer for a recipe: its parts built by `build_parts`; `options` as for the constructor."""
        return cls(cfg, build_parts(cfg), **options)

    def _resume(self, resume_anyway: bool) -> None:
        """Restore the newest checkpoint that reads back intact; a corrupt one is moved aside (never deleted) with a
        warning naming it and the step resumed instead."""
        directory = self.checkpoints.directory
        corrupt: list[tuple[int, str]] = []
        for step in reversed(self.checkpoints.all_steps()):
            if corrupt and imported_params(directory, step) is not None:
                raise CorruptCheckpoint(
                    f"checkpoint step {corrupt[0][0]} is corrupt (moved to {corrupt[0][1]}); "
                    f"run the same command again to start over from the imported parameters"
                )
            try:
                if not resume_anyway:
                    meta = read_meta(directory, step)
                    check_resume(
                        meta.get("run_config", {}), to_dict(self.cfg), self.kind, meta.get("kind", "?"), str(directory)
                    )
                self.state, meta = self.checkpoints.restore(abstract_like(self.state), self.data, step=step)
            except CorruptCheckpoint as e:
                moved = self.checkpoints.quarantine(step)
                corrupt.append((step, str(moved)))
                log.warning("%s; moved it to %s", e, moved)
                continue
            self.step = int(self.state.step)
            self.skipped_samples = int(meta.get("skipped_samples", 0))
            if corrupt:
                log.warning(
                    "checkpoint step %s is corrupt; resuming from step %d instead (the steps after it run again)",
                    ", ".join(str(s) for s, _ in corrupt),
                    self.step,
                )
            log.info("resumed from step %d in %s", self.step, directory)
            return
        raise CorruptCheckpoint(
            f"every checkpoint in {directory} is corrupt (moved aside: "
            f"{', '.join(path for _, path in corrupt)}); start a new run with "
            f"train.output_dir=NEW_FOLDER"
        )

    def encode_one(self, sample: Sample) -> EncodedPrompt:
        """One sample's VLM-R1 prompt and images; a failure is a `DataError` naming its file, line and field."""
        data = self.cfg.data
        try:
            ids = encode_prompt_text(
                sample.problem, len(sample.image_paths), self.tokenizer, self.model_cfg, data.task_type
            )
        except (ValueError, OSError) as e:
            raise DataError("prompt", sample.source, sample.line, "problem", str(e)) from e
        try:
            processor = processor_of(self.model_cfg)
            images = load_prompt_images(
                sample.image_paths,
                processor,
                min_pixels=data.min_pixels,
                max_pixels=max_pixels_or_default(data.max_pixels, processor),
            )
        except (ValueError, OSError) as e:
            raise DataError("image", sample.source, sample.line, "image", str(e)) from e
        encoded = EncodedPrompt(ids, images)
        length = encoded.length(self.model_cfg)
        if data.max_prompt_length is not None and length > data.max_prompt_length:
            raise DataError(
                "too_long",
                sample.source,
                sample.line,
                "problem",
                f"the prompt is {length} tokens with its image tokens, over "
                f"data.max_prompt_length={data.max_prompt_length}",
            )
        return encoded

    def draw(self) -> tuple[list[Sample], PromptBatch] | None:
        """The next micro-batch (`data.prompts_per_step / optim.grad_accum` samples) whose prompts encode, and its
        batch; None when the data has run out. With `data.on_error=skip` a failing sample is logged, counted and
        replaced by the next one in the stream (whose position is checkpointed, so resume stays exact); else its
        `DataError` stops the run."""
        samples: list[Sample] = []
        encoded: list[EncodedPrompt] = []
        while len(samples) < self.cfg.data.prompts_per_step // self.cfg.optim.grad_accum:
            try:
                sample = next(self.data)
            except StopIteration:
                log.warning(
                    "the data ran out after %d skipped samples; stopping at step %d", self.skipped_samples, self.step
                )
                return None
            try:
                encoded.append(self.encode_one(sample))
            except DataError as e:
                if self.cfg.data.on_error != "skip":
                    raise
                self.skipped_samples += 1
                log.warning("skipped %s (data.on_error=skip; %d so far)", e, self.skipped_samples)
                continue
            samples.append(sample)
        batch = build_prompt_batch(
            encoded, self.model_cfg, pad_id=self.tokenizer.pad_id, length=self.cfg.data.max_prompt_length
        )
        return samples, batch

    def prepare(self, samples: list[Sample], batch: PromptBatch) -> Any:
        """Host work for the next step from its samples and encoded prompts (e.g. the transfer to the devices)."""
        raise NotImplementedError

    def _prepare_next(self) -> tuple[list[Any], int] | None:
        """The next `optim.grad_accum` prepared micro-batches and the count of samples skipped up to them (None when
        the data has run out)."""
        prepared = []
        for _ in range(self.cfg.optim.grad_accum):
            drawn = self.draw()
            if drawn is None:
                return None
            prepared.append(self.prepare(*drawn))
        return prepared, self.skipped_samples

    def dispatch(self, prepared: list[Any]) -> tuple[dict[str, float], list[dict[str, jax.Array]]]:
        """Run `updates_per_rollout` optimizer steps on the micro-batches `prepared`: (host metrics, each update's
        device metrics still in flight)."""
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
        compilations()  # start counting before the first step compiles
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        bar = tqdm(
            total=self.max_steps, initial=self.step, desc=self.kind, disable=not self.progress, dynamic_ncols=True
        )
        upcoming = self._prepare_next() if self.step < self.max_steps else None
        while upcoming is not None:
            start = time.perf_counter()
            prepared, skipped = upcoming
            if self.profile:
                self.profile.before(self.step + 1, self.step + self.updates_per_rollout)
            host, pending = self.dispatch(prepared)
            first = self.step
            self.step += len(pending)
            # Save before the iterator moves on, then prepare the next batch while the devices train.
            due = self.step // cfg.train.save_every > first // cfg.train.save_every  # a multiple was passed
            self.checkpoints.save(self.step, self.state, self.data, meta=self.meta(), force=due)
            upcoming = self._prepare_next() if self.step < self.max_steps else None
            updates = jax.device_get(pending)
            if self.profile:
                self.profile.after(self.step)
            # One row per optimizer step; the rollout's host metrics are shared, its times split evenly.
            share = 1 / len(updates)
            elapsed = time.perf_counter() - start
            # eval/* metrics (when due in this phase) close the logging window at its last step.
            evaluation = (
                self.validation.after_phase(first, self.step, upcoming is None, self.state) if self.validation else {}
            )
            for step, update in enumerate(updates, first + 1):
                metrics = {k: v * share if k.startswith("time/") else v for k, v in host.items()}
                metrics.update({k: float(v) for k, v in update.items()})
                self._check_finite(metrics, step)
                metrics["time/step"] = elapsed * share
                self.finish_metrics(metrics)
                metrics["epoch"] = (
                    epoch_of(step, len(self.samples), cfg.data.prompts_per_step) / self.updates_per_rollout
                )
                metrics["data/skipped"] = float(skipped)
                metrics["compilations"] = float(compilations())
                evaluated = step == self.step and bool(evaluation)
                if evaluated:
                    metrics.update(evaluation)
                window.append(metrics)
                if step % cfg.train.log_every == 0 or step == self.max_steps or evaluated:
                    last = mean_metrics(window)
                    window = []
                    self.metrics.write(step, last)
                    bar.set_postfix(self.progress_postfix(last))
            bar.update(len(updates))
            if self.stopped_by is not None:
                if window:
                    last = mean_metrics(window)
                    self.metrics.write(self.step, last)
                break
        bar.close()
        self.checkpoints.save(self.step, self.state, self.data, meta=self.meta(), force=True)
        self.close()
        return last

    def _check_finite(self, metrics: dict[str, float], step: int) -> None:
        """Count consecutive skipped (non-finite) steps; stop the run once `train.max_nonfinite_steps` are reached."""
        self.nonfinite_streak = self.nonfinite_streak + 1 if metrics.get("nonfinite", 0.0) > 0 else 0
        if self.nonfinite_streak:
            log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped", step, metrics.get("loss"))
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise TrainingDiverged(
                f"{limit} steps in a row (up to step {step}) had a non-finite loss or gradient; their updates "
                f"were skipped, so the parameters are those of step {step - limit}. Lower "
                f"optim.learning_rate (now {self.cfg.optim.learning_rate:g}) or check the data, then resume "
                f"(train.max_nonfinite_steps sets this limit)"
            )

    def close(self) -> None:
        """Let an in-flight checkpoint commit, then release the checkpointer and metric writers (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.profile:
            self.profile.stop()  # a run that ends inside the window still writes its trace
        try:
            self.checkpoints.wait()
        finally:
            self.checkpoints.close()
            self.metrics.close()

    def meta(self) -> dict[str, Any]:
        return {
            "run_config": to_dict(self.cfg),
            "model_config": dataclasses.asdict(self.model_cfg),
            "step": self.step,
            "kind": self.kind,
            "skipped_samples": self.skipped_samples,
        }

    def model(self):
        return current_model(self.graphdef, self.state)
