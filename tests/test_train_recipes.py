"""The gui_3b and ovd_3b recipes run end to end through `vlmr1 train` on synthetic data of their shape: the tiny
random model, 2 steps of 2 prompts x 2 samples. A user reward (by dotted path) records the columns the rewards get,
so the test sees what reached them: both GUI screenshots' grids, the recipe's accuracy method."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import run_cli
from tests.helpers.runs import jsonl
from vlmr1_jax.data import synthetic_gui, synthetic_ovd
from vlmr1_jax.data.synthetic import image_folder
from vlmr1_jax.models.qwen2_5_vl.prompts import QUESTION_TEMPLATES
from vlmr1_jax.processing.tokenizer import build_compact_tokenizer

STEPS, PROMPTS, GENERATIONS = 2, 2, 2
IMAGE_SIZE = 112  # 112 px / 14 px patches: each image's grid is [1, 8, 8]
PROBE = f"{__name__}:probe"
SEEN: list[dict[str, Any]] = []  # one entry per completion scored by `probe`


def probe(completions: list[str], **columns: Any) -> list[float]:
    """A user reward that records, per completion, the columns it was given; scores 0."""
    for k in range(len(completions)):
        SEEN.append({name: values[k] for name, values in columns.items()})
    return [0.0] * len(completions)


def run_recipe(tmp_path: Path, recipe: str, generate) -> tuple[list[dict], list[dict], list[dict]]:
    """Synthetic data and a compact tokenizer covering its text, then `vlmr1 train <recipe>` shrunk to seconds;
    returns (metrics, rollouts, probed columns)."""
    data = generate(str(tmp_path / "data"), 8, seed=0, image_size=IMAGE_SIZE)
    records = [json.loads(line) for line in Path(data).read_text().splitlines()]
    corpus = [turn["value"] for r in records for turn in r["conversations"]] + list(QUESTION_TEMPLATES.values())
    build_compact_tokenizer(corpus, vocab_size=320).save(tmp_path / "tokenizer")
    SEEN.clear()
    code = run_cli(
        "train",
        recipe,
        "model.preset=tiny",
        f"model.tokenizer={tmp_path / 'tokenizer'}",
        f"data.data_file_paths={data}",
        f"data.image_folders={image_folder(str(tmp_path / 'data'))}",
        f"data.prompts_per_step={PROMPTS}",
        f"grpo.num_generations={GENERATIONS}",
        f"grpo.reward_funcs=[accuracy,format,{PROBE}]",
        "sampling.max_new_tokens=8",
        f"train.max_steps={STEPS}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.rollout_log=true",
        "train.log_every=1",
        "--no-progress",
    )
    assert code == 0
    return jsonl(tmp_path / "run" / "metrics.jsonl"), jsonl(tmp_path / "run" / "rollouts.jsonl"), list(SEEN)


def check_rewards(metrics: list[dict], rollouts: list[dict]) -> None:
    """Every step logged; each reward function's score finite and in [0, 1] per completion and on average; the
    summed reward in [0, 3]."""
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert len(rollouts) == STEPS * PROMPTS * GENERATIONS
    for r in rollouts:
        assert len(r["rewards"]) == 3 and all(0.0 <= v <= 1.0 for v in r["rewards"].values()), r
    for m in metrics:
        per_function = {k: v for k, v in m.items() if k.startswith("rewards/")}
        assert len(per_function) == 3 and all(v is not None and 0.0 <= v <= 1.0 for v in per_function.values()), m
        assert m["reward"] is not None and 0.0 <= m["reward"] <= 3.0 and math.isfinite(m["loss"]), m


@pytest.mark.slow
def test_gui_recipe_both_screenshots_reach_the_reward(tmp_path):
    metrics, rollouts, seen = run_recipe(tmp_path, "gui_3b", synthetic_gui.generate)
    check_rewards(metrics, rollouts)
    assert len(seen) == STEPS * PROMPTS * GENERATIONS
    for row in seen:
        assert row["image_grid_thw"] == [[1, 8, 8], [1, 8, 8]], row["image_grid_thw"]
        before, after = row["image_path"]
        assert before.endswith("_before.png") and after.endswith("_after.png")
        assert row["accu_reward_method"] == "all_match"
        assert row["solution"] in {f"<answer> {a} </answer>" for a in synthetic_gui.ANSWERS}


@pytest.mark.slow
def test_ovd_recipe_scores_boxes_with_od_length(tmp_path):
    metrics, rollouts, seen = run_recipe(tmp_path, "ovd_3b", synthetic_ovd.generate)
    check_rewards(metrics, rollouts)
    assert all("kl" not in m for m in metrics)  # beta 0: no reference policy, no KL
    assert len(seen) == STEPS * PROMPTS * GENERATIONS
    for row in seen:
        assert row["image_grid_thw"] == [[1, 8, 8]] and len(row["image_path"]) == 1
        assert row["accu_reward_method"] == "odLength"
        assert row["solution"].startswith("<answer> ") and ("```json" in row["solution"] or "None" in row["solution"])
