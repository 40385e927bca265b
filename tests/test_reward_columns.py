"""What reaches a reward: every jsonl field, the derived columns and VLM-R1's prompt conversation; per-reward options
from the recipe, checked before anything loads; the run's tokenizer for rewards that count tokens; and the metric
names, `rewards/<function name>`. The end-to-end test runs a user reward by path through `vlmr1 train`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.helpers.runs import TINY_RUN, jsonl, make_run_inputs, worker_env
from vlmr1_jax.cli import main
from vlmr1_jax.data.jsonl import RESERVED_KEYS, DataError, load_jsonl_datasets
from vlmr1_jax.models.qwen2_5_vl.processor import QwenProcessor
from vlmr1_jax.processing.tokenizer import QWEN2_5_DIR, qwen2_5_tokenizer
from vlmr1_jax.rewards import get_reward, reward_functions
from vlmr1_jax.rl.rollout import Scored
from vlmr1_jax.train.setup import columns_for

# VLM-R1's Qwen "rec" question template, written out here as the reference (not imported from our prompts).
REC_TEMPLATE = (
    "{Question} First output the thinking process in <think> </think> tags and then output the final answer in "
    "<answer> </answer> tags. Output the final answer in JSON format."
)
# VLM-R1's metric names: `rewards/<reward function __name__>` for its registry's functions.
VLMR1_METRICS = {
    "accuracy": "rewards/accuracy_reward",
    "format": "rewards/format_reward",
    "length": "rewards/cosine_rewards",
    "repetition": "rewards/repetition_rewards",
    "rec_iou": "rewards/iou_reward",
    "rec_format": "rewards/format_reward_rec",
}


def vlmr1_prompt(problem: str, num_images: int) -> list[dict]:
    """VLM-R1's `prompt` column for a sample (images first, then the templated problem)."""
    content = [{"type": "image", "text": None}] * num_images + [
        {"type": "text", "text": REC_TEMPLATE.format(Question=problem)}
    ]
    return [{"role": "user", "content": content}]


def cosine(length: int, max_len: int) -> float:
    """VLM-R1's cosine length reward on its "correct" branch (1.0 at length 0, 0.5 at max_len)."""
    return 0.5 + 0.5 * (1.0 + math.cos(length * math.pi / max_len)) / 2


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def line(sample_id, question: str, answer: str, **extra) -> dict:
    return {
        "id": sample_id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        **extra,
    }


# ---------------------------------------------------------------- columns


def test_columns_carry_every_jsonl_field_and_the_prompts(tmp_path):
    records = [
        line(1, "Where is the cat?", "<answer>[1, 2, 3, 4]</answer>", difficulty="hard", meta={"src": "a", "n": [1]}),
        line("b", "How many?", "3", accu_reward_method="mcq", meta=None),
    ]
    samples, _ = load_jsonl_datasets(str(write_lines(tmp_path / "d.jsonl", records)), str(tmp_path))
    batch = types.SimpleNamespace(image_grids=((), ()))  # text-only: no grids
    cols = columns_for(samples, batch, 3, QwenProcessor(), "rec")  # type: ignore[arg-type]
    assert all(len(values) == 6 for values in cols.values())
    assert cols["difficulty"] == ["hard"] * 3 + [None] * 3  # a field the second line lacks is None there
    assert cols["meta"] == [{"src": "a", "n": [1]}] * 3 + [None] * 3
    assert cols["id"] == [1] * 3 + ["b"] * 3
    assert cols["accu_reward_method"] == ["default"] * 3 + ["mcq"] * 3
    assert cols["problem"] == ["Where is the cat?"] * 3 + ["How many?"] * 3
    assert cols["solution"] == ["<answer> [1, 2, 3, 4] </answer>"] * 3 + ["<answer> 3 </answer>"] * 3
    assert (
        cols["image_path"] == [[]] * 6 and cols["image_grid_thw"] == [[]] * 6 and cols["model_image_size"] == [[]] * 6
    )
    assert cols["prompts"] == [vlmr1_prompt("Where is the cat?", 0)] * 3 + [vlmr1_prompt("How many?", 0)] * 3
    assert "conversations" not in cols and "image" not in cols  # consumed by the loader, as in VLM-R1
    # Every column the trainer derives is a reserved jsonl key (a new derived column must be added there too).
    derived = set(cols) - {"difficulty", "meta", "id", "accu_reward_method"}
    assert derived == set(RESERVED_KEYS) - {"completions"}


@pytest.mark.parametrize("key", RESERVED_KEYS)
def test_jsonl_key_naming_a_derived_column_is_refused(tmp_path, key):
    path = write_lines(tmp_path / "d.jsonl", [line(1, "q", "a"), line(2, "q", "a", **{key: "mine"})])
    with pytest.raises(DataError) as info:
        load_jsonl_datasets(str(path), str(tmp_path))
    error = info.value
    assert (error.kind, error.line, error.field) == ("reserved_key", 2, key)
    assert "rename the key" in str(error)


# ---------------------------------------------------------------- options


def test_options_are_bound():
    length = {"count": "bytes", "max_len": 4, "vlmr1_compat": True}
    fns = reward_functions(["rec_iou", "length"], {"rec_iou": {"rescale": False}, "length": length})
    # rescale=False needs neither model_image_size nor image_path (the default would); IoU of a box and its half.
    box, half = "<answer>[0, 0, 10, 10]</answer>", "<answer> [0, 0, 10, 5] </answer>"
    assert fns["iou_reward"]([box], solution=[half]) == [0.5]
    assert fns["cosine_rewards"](["abcdefgh"]) == [pytest.approx(cosine(2, 4))]  # 8 bytes / 4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"length": {"cout": "tokens"}}, r"grpo\.reward_options\.length: reward 'length' has no option 'cout'"),
        ({"length": {"count": "words"}}, r"count='words': expected Literal\['tokens', 'bytes'\]"),
        ({"rec_iou": {"rescale": "flase"}}, r"rescale='flase': expected bool"),
        ({"length": {"max_len": 1.5}}, r"max_len=1\.5: expected int"),
        ({"length": {"tokenizer": "qwen"}}, r"length\.tokenizer: the trainer passes the run's tokenizer"),
        ({"lenght": {"count": "tokens"}}, r"options for 'lenght', which grpo\.reward_funcs"),
        ({"length": "tokens"}, r"grpo\.reward_options\.length: expected a mapping"),
    ],
)
def test_bad_options_name_the_reward_and_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        reward_functions(["length", "rec_iou"], options)


def test_unknown_option_fails_at_config_load(capsys):
    """`vlmr1 train` refuses it before reading data: demo_tiny's data file does not exist here, and the error is
    the option's, not the missing file's."""
    assert main(["train", "demo_tiny", "grpo.reward_funcs=[length]", "grpo.reward_options.length.cout=tokens"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: grpo.reward_options.length: reward 'length' has no option 'cout'"), err


def test_option_that_is_also_a_column_is_an_error():
    with pytest.raises(ValueError, match=r"option.* id are also data columns"):
        get_reward(f"{__name__}:echo_reward", id=3)(["a"], id=[1])


# ---------------------------------------------------------------- the tokenizer and the length reward


def test_length_counts_tokenizer_tokens():
    """`count: tokens` is VLM-R1's `len(tokenizer.encode(text))`; the reference count is transformers'."""
    hf = AutoTokenizer.from_pretrained(QWEN2_5_DIR)
    texts = ["", "<think>ok</think><answer>[1, 2, 3, 4]</answer>", "ünïcödé " * 7, "a" * 50]
    counts = [len(hf.encode(t)) for t in texts]
    assert counts != [-(-len(t.encode()) // 4) for t in texts]  # the byte estimate would give other lengths
    fns = reward_functions(["length"], {"length": {"vlmr1_compat": True, "max_len": 64}}, qwen2_5_tokenizer())
    np.testing.assert_allclose(fns["cosine_rewards"](texts), [cosine(n, 64) for n in counts], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="count='tokens' needs the tokenizer"):
        get_reward("length", vlmr1_compat=True)(["x"])


def test_tokenizer_reaches_only_rewards_that_declare_it():
    fns = reward_functions([f"{__name__}:echo_reward", f"{__name__}:wants_tokenizer"], {}, tokenizer="TOK")
    assert fns["wants_tokenizer"](["a", "b"]) == [3.0, 3.0]
    assert fns["echo_reward"](["a"]) == [0.0]  # its **columns would have taken a tokenizer: it must stay empty


def echo_reward(completions, *, id=None, **columns):
    assert not columns, columns
    return [0.0] * len(completions)


def wants_tokenizer(completions, *, tokenizer=None, **columns):
    return [float(len(tokenizer))] * len(completions)


def iou_reward(completions, **columns):
    """A user function with the name of a built-in one."""
    return [0.0] * len(completions)


# ---------------------------------------------------------------- metric names


def test_metric_names_are_the_function_names():
    fns = reward_functions(list(VLMR1_METRICS), {})
    assert [f"rewards/{name}" for name in fns] == list(VLMR1_METRICS.values())
    user = reward_functions([f"{__name__}:echo_reward"], {})
    assert list(user) == ["echo_reward"]
    rows = np.zeros(4, np.float32)
    scored = Scored([""] * 4, rows, {"iou_reward": rows + 0.5}, rows, rows[:2], np.ones(4), 1.0, 0.1)
    assert scored.metrics()["rewards/iou_reward"] == 0.5


def test_two_rewards_with_one_function_name_are_an_error():
    with pytest.raises(ValueError, match=r"'length' and 'length' both log as rewards/cosine_rewards"):
        reward_functions(["length", "length"], {})
    with pytest.raises(ValueError, match=r"'rec_iou' and '.*:iou_reward' both log as rewards/iou_reward"):
        reward_functions(["rec_iou", f"{__name__}:iou_reward"], {})


# ---------------------------------------------------------------- through `vlmr1 train`

PROBE = '''
import json


def probe(completions, *, out, prompts, **columns):
    """Record what the trainer passes; score 0."""
    with open(out, "a") as f:
        f.write(json.dumps({"completions": completions, "prompts": prompts, "columns": columns}) + "\\n")
    return [0.0] * len(completions)
'''


@pytest.mark.slow  # a 2-step `vlmr1 train` in a child process: 50 s on 2 busy cores (warm compile cache), 110 s cold
def test_user_reward_gets_every_column_through_vlmr1_train(tmp_path):
    inputs = make_run_inputs(tmp_path)
    data = Path(inputs[0].partition("=")[2])
    folder = inputs[1].partition("=")[2]
    raw = [json.loads(text) for text in data.read_text().splitlines()]
    for i, record in enumerate(raw):  # a field only some lines have
        if i % 3 == 0:
            record["difficulty"] = f"level{i}"
    write_lines(data, raw)
    by_id = {record["id"]: record for record in raw}
    (tmp_path / "user" / "probe_rewards.py").parent.mkdir()
    (tmp_path / "user" / "probe_rewards.py").write_text(textwrap.dedent(PROBE))
    received, run, max_len = tmp_path / "received.jsonl", tmp_path / "run", 8
    options = {
        "probe_rewards:probe": {"out": str(received)},
        # vlmr1_compat: every completion takes the "correct" branch, so the reward is cosine(tokens, max_len)
        "length": {"count": "tokens", "max_len": max_len, "vlmr1_compat": True},
    }
    env = worker_env(1)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "user"), env["PYTHONPATH"]])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmr1_jax.cli",
            "train",
            "demo_tiny",
            *inputs,
            *TINY_RUN,
            "grpo.reward_funcs=[probe_rewards:probe,length]",
            f"grpo.reward_options={json.dumps(options)}",
            "train.max_steps=2",
            f"train.output_dir={run}",
            "--no-progress",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    calls = jsonl(received)
    assert len(calls) == 2  # one call per step
    rows_seen = 0
    for call in calls:
        cols, n = call["columns"], len(call["completions"])
        assert n == 2 * 4 and all(len(values) == n for values in cols.values())
        ids = cols["id"]
        assert all(ids[g * 4 : g * 4 + 4] == [ids[g * 4]] * 4 for g in range(2))  # G consecutive rows per prompt
        for i, sample_id in enumerate(ids):
            record = by_id[sample_id]
            problem = record["conversations"][0]["value"].replace("<image>", "")
            assert cols["family"][i] == record["family"] and cols["objects"][i] == record["objects"]
            assert cols["problem"][i] == problem
            assert cols["solution"][i] == f"<answer> {record['conversations'][1]['value']} </answer>"
            assert cols["image_path"][i] == [os.path.join(folder, record["image"])]
            assert cols["image_grid_thw"][i] == [[1, 8, 8]]  # 112 px images: 112 / 14 patches a side
            assert cols["model_image_size"][i] == [[112, 112]]  # the frame the boxes are rescaled from
            assert cols["accu_reward_method"][i] == "default"
            assert call["prompts"][i] == vlmr1_prompt(problem, 1)
            if "difficulty" in cols:
                assert cols["difficulty"][i] == record.get("difficulty")
            rows_seen += 1
        if "difficulty" not in cols:
            assert not any("difficulty" in by_id[sample_id] for sample_id in ids)
    assert rows_seen == 16

    # The length reward counted tokenizer tokens (transformers' count of the same text is the reference).
    rollouts = jsonl(run / "rollouts.jsonl")
    assert [r["completion"] for r in rollouts] == [c for call in calls for c in call["completions"]]
    hf = AutoTokenizer.from_pretrained(inputs[2].partition("=")[2])
    counts = [len(hf.encode(r["completion"])) for r in rollouts]
    expected = [cosine(n, max_len) for n in counts]
    np.testing.assert_allclose([r["rewards"]["cosine_rewards"] for r in rollouts], expected, rtol=0, atol=1e-6)
    byte_counts = [-(-len(r["completion"].encode()) // 4) for r in rollouts]
    assert any(cosine(b, max_len) != pytest.approx(e, abs=1e-4) for b, e in zip(byte_counts, expected))

    records = jsonl(run / "metrics.jsonl")
    assert {name for name in records[-1] if name.startswith("rewards/")} == {
        "rewards/probe",
        "rewards/cosine_rewards",
    }
