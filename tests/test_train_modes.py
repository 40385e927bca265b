"""Every training mode run end to end through the GRPO trainer (tiny model, 1-2 steps each), each asserting what the
mode must change and what it must not: LoRA, frozen vision, text-only and mixed image/text batches, beta = 0,
num_iterations > 1, gradient accumulation, and the loss presets / advantage estimators on one shared rollout.

The runs share one synthetic REC data set and compact tokenizer; identical seeds give every run the same initial
model and, before its first update, the same first rollout (the rollout log shows it), so the loss presets are
compared on the same completions and advantages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from tests.helpers.cli import run_cli
from tests.helpers.params import host_params
from tests.helpers.runs import TINY_RUN, jsonl, make_run_inputs, read_state
from vlmr1_jax.config import load_config
from vlmr1_jax.models.layers import LoRAParam
from vlmr1_jax.rl.rollout import Rollout
from vlmr1_jax.train.base import build_parts
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.metrics import read_metrics

G = 4  # TINY_RUN's grpo.num_generations
# Completion lengths forced on the 2 x G rows of the first rollout (max_new_tokens is 4): the aggregations weigh
# tokens differently only when completions differ in length, which a random tiny model's samples rarely do.
LENGTHS = np.array([1, 2, 3, 4] * 2)
# TINY_RUN with a reward that spreads with completion length (its own path), so advantages are of order 1.
RUN = (*TINY_RUN, "grpo.reward_funcs=[tests.test_train_modes:decoded_length,rec_format]")


def decoded_length(completions: list[str], **columns: Any) -> list[float]:
    """Reward: characters of the decoded completion."""
    return [float(len(c)) for c in completions]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The shared run inputs: recipe overrides (data, tokenizer), the folder, and the jsonl variants."""

    folder: Path
    overrides: list[str]
    text_only: Path  # 4 samples, no image in any
    mixed: Path  # 4 samples: 2 with an image, 2 without


@dataclasses.dataclass
class Run:
    """A finished run: its trainer, every variable before and after (by dotted path), its logs."""

    trainer: GRPOTrainer
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]

    def moved(self) -> set[str]:
        """Paths of the variables the run changed."""
        return {path for path, value in self.after.items() if not np.array_equal(value, self.before[path])}

    @property
    def out(self) -> Path:
        return self.trainer.out


def without_image(item: dict[str, Any]) -> dict[str, Any]:
    """A VLM-R1 jsonl record as a text-only sample: no `image` key, no `<image>` placeholder."""
    turns = [dict(turn, value=turn["value"].replace("<image>", "")) for turn in item["conversations"]]
    return {**{k: v for k, v in item.items() if k != "image"}, "conversations": turns}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    folder = tmp_path_factory.mktemp("modes")
    overrides = make_run_inputs(folder)
    records = [json.loads(line) for line in Path(overrides[0].split("=", 1)[1]).read_text().splitlines()]
    text_only, mixed = folder / "text_only.jsonl", folder / "mixed.jsonl"
    text_only.write_text("".join(json.dumps(without_image(r)) + "\n" for r in records[:4]))
    mixed_records = [records[0], without_image(records[1]), records[2], without_image(records[3])]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in mixed_records))
    return Inputs(folder, overrides, text_only, mixed)


def with_lengths(generate: Callable, lengths: np.ndarray, eos_id: int, pad_id: int) -> Callable:
    """`generate` whose completions are cut to `lengths` tokens (the last one an EOS where it is shorter than the
    sampled row): the sampled tokens, log-probs and mask before the cut are kept."""

    def run(*args: Any) -> Rollout:
        sampled = generate(*args)
        tokens, logprobs = np.array(sampled.tokens), np.array(sampled.logprobs)
        steps = tokens.shape[1]
        mask = (np.arange(steps)[None] < lengths[:, None]).astype(np.int32)
        short = np.flatnonzero(lengths < steps)
        tokens = np.where(mask == 1, tokens, pad_id)
        tokens[short, lengths[short] - 1] = eos_id
        put = lambda x, like: jax.device_put(x.astype(like.dtype), like.sharding)
        return Rollout(put(tokens, sampled.tokens), put(logprobs * mask, sampled.logprobs), put(mask, sampled.mask))

    return run


# Jitted sampler and log-prob programs by (model graph, sampling settings, group size): a run reuses an earlier
# run's instead of tracing its own (most of a warm run's time); jit still retraces for a new state structure.
PROGRAMS: dict[tuple[Any, ...], tuple[Callable, Callable]] = {}


def train(inputs: Inputs, name: str, *overrides: str, lengths: np.ndarray | None = None, share: bool = True) -> Run:
    """`vlmr1 train demo_tiny` (RUN, 1 step unless overridden) in this process, on `inputs` plus
    `overrides`; `lengths` forces the completion lengths of every rollout; `share`: reuse PROGRAMS."""
    cfg = load_config(
        "demo_tiny",
        [*inputs.overrides, *RUN, "train.max_steps=1", f"train.output_dir={inputs.folder / name}", *overrides],
    )
    parts = build_parts(cfg)
    before = host_params(parts.model)
    trainer = GRPOTrainer(cfg, parts, progress=False)
    if share:
        key = (trainer.graphdef, cfg.sampling, cfg.grpo.num_generations)
        trainer.generate, trainer.logprobs = PROGRAMS.setdefault(key, (trainer.generate, trainer.logprobs))
    if lengths is not None:
        tokenizer = trainer.tokenizer
        trainer.generate = with_lengths(trainer.generate, lengths, tokenizer.eos_ids[0], tokenizer.pad_id)
    trainer.train()
    return Run(
        trainer,
        before,
        host_params(trainer.model()),
        read_metrics(trainer.out),
        jsonl(trainer.out / "rollouts.jsonl"),
    )


@pytest.fixture(scope="module")
def grpo(inputs) -> Run:
    """The reference run: full parameters, beta 0.04, `grpo` loss, one step on the LENGTHS rollout."""
    return train(inputs, "grpo", lengths=LENGTHS)


@contextlib.contextmanager
def vision_rows() -> Iterator[list[int]]:
    """The row counts of the pixel batches the vision tower is traced with while the block runs (each jitted program
    of a run that runs the tower traces it: sampler, reference log-probs, train step)."""
    from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL

    rows: list[int] = []
    encode = Qwen25VL.encode_vision

    def traced(self, inputs):
        rows.append(int(inputs["pixel_values"].shape[0]))
        return encode(self, inputs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Qwen25VL, "encode_vision", traced)
        yield rows


def visual(paths: set[str]) -> set[str]:
    return {p for p in paths if p.startswith("visual.")}


def decoder(paths: set[str]) -> set[str]:
    return {p for p in paths if p.startswith("text.")}


# ---------------------------------------------------------------- what is trained


def test_full_training_moves_vision_and_decoder(grpo):
    """The contrast for the modes below: on this data one full-parameter step moves both the tower and the decoder."""
    assert visual(grpo.moved()) and decoder(grpo.moved())


def test_lora_moves_only_the_adapters(inputs):
    run = train(inputs, "lora", "train.trainable=lora")
    adapters = {p for p in run.before if p.endswith((".lora_a", ".lora_b"))}
    assert adapters, "LoRA attached no adapters"
    trainable = jax.tree.leaves(run.trainer.state.trainable, is_leaf=lambda x: isinstance(x, LoRAParam))
    assert trainable and all(isinstance(v, LoRAParam) for v in trainable)
    moved = run.moved()
    assert moved <= adapters, f"base parameters moved under LoRA: {sorted(moved - adapters)[:5]}"
    assert any(p.endswith(".lora_b") for p in moved), "no adapter moved"


def test_frozen_vision_moves_no_visual_parameter(inputs, grpo):
    run = train(inputs, "freeze_vision", "train.trainable=freeze_vision", lengths=LENGTHS)
    assert run.rollouts == grpo.rollouts  # the same step as the full run, whose tower moved
    assert not visual(run.moved())
    assert decoder(run.moved())


# ---------------------------------------------------------------- text-only and mixed batches


@pytest.fixture(scope="module")
def text_only(inputs) -> tuple[Run, list[int]]:
    """A run on text-only samples, and the vision rows it traced."""
    with vision_rows() as rows:
        run = train(inputs, "text_only", f"data.data_file_paths={inputs.text_only}", share=False)
    return run, rows


def test_text_only_batch_trains_the_decoder_only(text_only):
    run, _ = text_only
    assert [r["step"] for r in run.metrics] == [1]
    assert decoder(run.moved()) and not visual(run.moved())


def test_text_only_batch_does_no_vision_compute(text_only):
    _, rows = text_only
    assert sum(rows) == 0, f"the vision tower ran on {rows} pixel rows for a batch without images"


def test_mixed_image_text_batch(inputs):
    with vision_rows() as rows:
        run = train(inputs, "mixed", f"data.data_file_paths={inputs.mixed}", "data.prompts_per_step=4", share=False)
    assert len({r["prompt_index"] for r in run.rollouts}) == 4  # all 4 samples, 2 with an image, in one batch
    assert rows and min(rows) > 0  # the spy sees vision compute when there is some
    assert visual(run.moved()) and decoder(run.moved())


# ---------------------------------------------------------------- beta = 0


def test_beta_zero_builds_no_reference(inputs, grpo, capsys):
    """Through `vlmr1 train`: no reference in the saved state, no `kl` in the metrics or the summary line (the
    progress bar shows kl 0)."""
    out = inputs.folder / "beta0"
    argv = [*inputs.overrides, *RUN, "train.max_steps=1", f"train.output_dir={out}", "grpo.beta=0"]
    assert run_cli("train", "demo_tiny", *argv, "--no-progress") == 0
    summary = dict(item.split("=", 1) for item in capsys.readouterr().out.strip().splitlines()[-1].split())
    assert "loss" in summary and "kl" not in summary
    assert all("kl" not in record for record in read_metrics(out))
    assert not any(key.startswith("['reference']") for key in read_state(out / "checkpoints" / "1" / "state"))
    # the contrast: with beta > 0 the same run keeps a reference and logs kl
    assert grpo.trainer.state.reference is not None
    assert "kl" in grpo.metrics[-1]
    assert any(key.startswith("['reference']") for key in read_state(grpo.out / "checkpoints" / "1" / "state"))


# ---------------------------------------------------------------- iterations and accumulation


@pytest.fixture(scope="module")
def iterations(inputs) -> Run:
    """num_iterations 2 at a learning rate that moves the policy visibly between the two passes."""
    return train(inputs, "mu2", "grpo.num_iterations=2", "train.max_steps=2", "optim.learning_rate=1e-2")


def test_num_iterations_two_runs(iterations):
    assert iterations.trainer.step == 2
    assert [r["step"] for r in iterations.metrics] == [1, 2]
    assert decoder(iterations.moved()) and visual(iterations.moved())


def test_grad_accum_two_runs(inputs):
    run = train(inputs, "accum2", "optim.grad_accum=2", "train.max_steps=2")
    assert run.trainer.step == 2
    assert [r["step"] for r in run.metrics] == [1, 2]
    assert decoder(run.moved()) and visual(run.moved())


# ---------------------------------------------------------------- loss presets and advantage estimators


def rollout_arrays(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Step 1's rewards (sum over the reward functions) and advantages, in row order."""
    rows = [r for r in run.rollouts if r["step"] == 1]
    rewards = np.array([sum(r["rewards"].values()) for r in rows], np.float64)
    return rewards, np.array([r["advantage"] for r in rows], np.float64)


def first_loss(run: Run) -> float:
    return float(run.metrics[0]["loss"])


def test_grpo_loss_on_policy_is_minus_mean_advantage(grpo):
    """On-policy (ratio 1, reference = policy) each token's loss is -A: the per-sequence mean is -A whatever the
    length, so `grpo` gives -mean(A) = 0 on the LENGTHS rollout."""
    _, advantages = rollout_arrays(grpo)
    assert np.ptp(advantages) > 0.1, "the rollout must have non-zero advantages"
    assert abs(first_loss(grpo) - (-advantages.mean())) < 1e-6
    assert abs(grpo.metrics[0]["kl"]) < 1e-6


# (preset, its step-1 loss on-policy from advantages A [B] and completion lengths L [B] of T = 4 new tokens)
PRESET_LOSSES = {
    "dapo": lambda a, lengths, steps: -(a * lengths).sum() / lengths.sum(),  # token_mean
    "dr_grpo": lambda a, lengths, steps: -(a * lengths).sum() / (len(a) * steps),  # token_sum_norm
    "gspo": lambda a, lengths, steps: -a.mean(),  # one ratio per sequence, 1 on-policy: the grpo value
}


@pytest.mark.parametrize("preset", sorted(PRESET_LOSSES))
def test_loss_preset_on_the_same_rollout(inputs, grpo, preset):
    run = train(inputs, preset, f"grpo.loss={preset}", lengths=LENGTHS)
    assert run.rollouts == grpo.rollouts, "not the reference run's rollout"
    _, advantages = rollout_arrays(run)
    want = PRESET_LOSSES[preset](advantages, LENGTHS.astype(np.float64), 4)
    np.testing.assert_allclose(first_loss(run), want, rtol=1e-5, atol=1e-6)
    if preset != "gspo":  # the token aggregations must differ from grpo's sequence mean on unequal lengths
        assert abs(first_loss(run) - first_loss(grpo)) > 1e-3
    assert decoder(run.moved())


def test_gspo_differs_from_grpo_off_policy(inputs, iterations):
    """num_iterations 2: optimizer steps 1 and 2 are two passes over one rollout. The first is on-policy (gspo's
    sequence ratio and grpo's token ratios are all 1: the same loss); the second is off-policy, where they differ."""
    run = train(
        inputs, "gspo_mu2", "grpo.loss=gspo", "grpo.num_iterations=2", "train.max_steps=2", "optim.learning_rate=1e-2"
    )
    assert [r for r in run.rollouts if r["step"] == 1] == [r for r in iterations.rollouts if r["step"] == 1]
    (gspo_first, gspo_second), (grpo_first, grpo_second) = (
        [float(m["loss"]) for m in r.metrics] for r in (run, iterations)
    )
    assert gspo_first == pytest.approx(grpo_first, abs=1e-6)
    assert abs(gspo_second - grpo_second) > 1e-4


def test_rloo_advantages_on_the_same_rollout(inputs, grpo):
    run = train(inputs, "rloo", "grpo.advantage_estimator=rloo", lengths=LENGTHS)
    assert [r["completion"] for r in run.rollouts] == [r["completion"] for r in grpo.rollouts]
    rewards, advantages = rollout_arrays(run)
    grouped = rewards.reshape(-1, G)
    leave_one_out = grouped - (grouped.sum(1, keepdims=True) - grouped) / (G - 1)
    np.testing.assert_allclose(advantages, leave_one_out.reshape(-1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(advantages, rollout_arrays(grpo)[1], atol=1e-3)
    assert decoder(run.moved())
