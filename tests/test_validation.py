"""The validation split (`data.val_split_ratio`) and evaluation during training (`train.eval_every`): which samples
are held out, the config errors, the `eval/*` metrics at the right steps (checked against `vlmr1 eval rec`'s
greedy decoder), their plot, no duplicates after a resume, and training bit-identical with or without evaluation."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs, reproducible
from vlmr1_jax.config import load_config
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.data.split import split_validation
from vlmr1_jax.eval.rec import GreedyDecoder, score_rec
from vlmr1_jax.rewards import reward_functions
from vlmr1_jax.train.compiles import compilations
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.metrics import METRICS_FILE, read_metrics
from vlmr1_jax.train.plot import PANELS, _panel_metrics, plot_run

STEPS, EVAL_EVERY, RATIO = 3, 2, 0.25  # 16 samples: 4 held out; evaluations after steps 2 and 3 (the last)


def samples(n: int) -> list[Sample]:
    return [Sample(i, f"p{i}", "<answer> [1, 2, 3, 4] </answer>", (), "default", "d.jsonl", i + 1) for i in range(n)]


@pytest.mark.parametrize("n, ratio, seed", [(10, 0.25, 42), (16, 0.25, 0), (7, 0.5, 3), (100, 0.05, 42)])
def test_split_holds_out_ceil_ratio_of_a_seeded_permutation(n, ratio, seed):
    data = samples(n)
    train, val = split_validation(data, ratio, seed)
    # datasets' train_test_split(test_size=ratio, seed=seed), from its formula: the first ceil(ratio * n) rows of
    # default_rng(seed).permutation(n) are the test split.
    expected = set(np.random.default_rng(seed).permutation(n)[: math.ceil(ratio * n)].tolist())
    assert {s.id for s in val} == expected
    assert {s.id for s in train} == set(range(n)) - expected
    assert [s.id for s in train] == sorted(s.id for s in train) and [s.id for s in val] == sorted(expected)
    assert split_validation(data, ratio, seed) == (train, val)  # deterministic
    assert {s.id for s in split_validation(data, ratio, seed + 1)[1]} != expected  # the seed decides


def test_no_split_at_ratio_zero():
    data = samples(5)
    assert split_validation(data, 0.0, 42) == (data, [])


@pytest.mark.parametrize("ratio", [1.0, -0.1, math.nan])
def test_split_refuses_a_ratio_outside_0_1(ratio):
    with pytest.raises(ValueError, match=r"data\.val_split_ratio"):
        split_validation(samples(10), ratio, 0)


def test_split_refuses_to_leave_no_training_sample():
    with pytest.raises(ValueError, match=r"data\.val_split_ratio=0\.95 holds out 10 of the 10 samples"):
        split_validation(samples(10), 0.95, 0)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["data.val_split_ratio=1"], "data.val_split_ratio"),
        (["data.val_split_ratio=-0.5"], "data.val_split_ratio"),
        (["data.val_split_ratio=.nan"], "data.val_split_ratio"),
        (["data.val_split_ratio=0.1", "train.eval_every=-1"], "train.eval_every"),
        (["train.eval_every=5"], "train.eval_every"),  # nothing to evaluate on
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}=")):
        load_config("demo_tiny", overrides)


def run_config(inputs: list[str], run: Path, *extra: str):
    return load_config(
        "demo_tiny",
        [*inputs, *TINY_RUN, f"train.max_steps={STEPS}", "train.save_every=2", f"train.output_dir={run}", *extra],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3-step run with evaluation (and its metrics as first logged) and without."""
    tmp = tmp_path_factory.mktemp("validation")
    inputs = make_run_inputs(tmp)
    split = f"data.val_split_ratio={RATIO}"
    plain = GRPOTrainer.from_config(run_config(inputs, tmp / "plain", split), progress=False)
    plain.train()
    evaluated = GRPOTrainer.from_config(
        run_config(inputs, tmp / "eval", split, f"train.eval_every={EVAL_EVERY}"), progress=False
    )
    evaluated.train()
    return plain, evaluated, read_metrics(tmp / "eval")


def metrics_at(records, prefix):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(prefix)} for r in records}


@pytest.mark.slow
def test_held_out_samples_never_reach_training(runs):
    plain, evaluated, _ = runs
    assert plain.validation is None
    assert len(evaluated.samples) == 12 and len(evaluated.validation.samples) == 4  # of the 16 samples
    assert {s.id for s in evaluated.samples}.isdisjoint(s.id for s in evaluated.validation.samples)
    assert [s.id for s in evaluated.samples] == [s.id for s in plain.samples]  # the split does not need eval on


@pytest.mark.slow
def test_eval_metrics_at_every_n_steps_and_the_last(runs):
    records = runs[2]
    logged = {step: m for step, m in metrics_at(records, "eval/").items() if m}
    assert sorted(logged) == [2, 3]
    # rewards are named by function, as in training: `length` is cosine_rewards, `rec_format` format_reward_rec
    names = {"eval/cosine_rewards", "eval/format_reward_rec", "eval/reward", "eval/acc@0.5", "eval/mean_iou"}
    assert all(set(m) == names for m in logged.values())
    for m in logged.values():
        assert m["eval/reward"] == pytest.approx(m["eval/cosine_rewards"] + m["eval/format_reward_rec"])
        assert 0 <= m["eval/acc@0.5"] <= 1 and 0 <= m["eval/mean_iou"] <= 1


@pytest.mark.slow
def test_eval_metrics_match_vlmr1_eval_rec_decoding(runs):
    """The last step's eval/* values equal greedy decoding of the held-out samples by `vlmr1 eval rec`'s decoder
    with the final policy, scored by the reward functions and `score_rec`."""
    _, evaluated, records = runs
    validation, cfg = evaluated.validation, evaluated.cfg
    decoder = GreedyDecoder(
        evaluated.model(),
        evaluated.tokenizer,
        cfg.data.task_type,
        min_pixels=cfg.data.min_pixels,
        max_pixels=cfg.data.max_pixels,
        batch_size=cfg.data.prompts_per_step,
        max_new_tokens=cfg.sampling.max_new_tokens,
        prompt_length=validation.length,
    )
    held_out = validation.samples
    completions, frames = decoder(held_out)
    columns = {
        "solution": [s.solution for s in held_out],
        "accu_reward_method": [s.accu_reward_method for s in held_out],
        "image_path": [list(s.image_paths) for s in held_out],
        "problem": [s.problem for s in held_out],
        "id": [s.id for s in held_out],
        "model_image_size": frames,
    }
    last = metrics_at(records, "eval/")[STEPS]
    rewards = reward_functions(cfg.grpo.reward_funcs, cfg.grpo.reward_options, evaluated.tokenizer)
    for name, fn in rewards.items():
        assert last[f"eval/{name}"] == pytest.approx(np.mean(fn(completions, **columns)), abs=1e-6)
    summary, _ = score_rec(held_out, completions, frames)
    assert last["eval/acc@0.5"] == pytest.approx(summary["accuracy"] / 100)
    assert last["eval/mean_iou"] == pytest.approx(summary["mean_iou"])


@pytest.mark.slow
def test_evaluation_compiles_once_and_reads_only_the_state(runs):
    _, evaluated, records = runs
    before = compilations()
    with jax.set_mesh(evaluated.mesh):  # as the trainer runs it
        again = evaluated.validation.run(evaluated.state)
    assert compilations() == before  # the decoder compiled at the first evaluation is reused
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == metrics_at(records, "eval/")[STEPS]


@pytest.mark.slow
def test_training_is_bit_identical_with_and_without_evaluation(runs):
    plain, evaluated, records = runs
    for a, b in zip(jax.tree.leaves(plain.state), jax.tree.leaves(evaluated.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert plain.data.get_state() == evaluated.data.get_state()

    def training(rows):
        return [{k: v for k, v in reproducible(r).items() if not k.startswith("eval/")} for r in rows]

    assert training(read_metrics(plain.out)) == training(records)


@pytest.mark.slow
def test_plot_draws_the_eval_metrics(runs, tmp_path):
    _, evaluated, records = runs
    paths = plot_run(evaluated.out, tmp_path)
    assert tmp_path / "eval.png" in paths and (tmp_path / "eval.png").stat().st_size > 0
    (wanted,) = [w for stem, _, _, w in PANELS if stem == "eval"]
    assert _panel_metrics(records, wanted) == [
        "eval/reward",
        "eval/acc@0.5",
        "eval/cosine_rewards",
        "eval/format_reward_rec",
        "eval/mean_iou",
    ]


@pytest.mark.slow
def test_resumed_run_logs_each_evaluation_once(runs):
    """A life that logged step 3 (with its evaluation) but died before step 3's checkpoint committed: the next
    life resumes from step 2, drops the stale record and logs step 3 and its evaluation again, once."""
    _, evaluated, first = runs
    run = evaluated.out
    shutil.rmtree(run / "checkpoints" / str(STEPS))
    resumed = GRPOTrainer.from_config(evaluated.cfg, progress=False)  # the same command again
    assert resumed.step == 2
    resumed.train()
    lines = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert [reproducible(r) for r in lines] == [reproducible(r) for r in first]
