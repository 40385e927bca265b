"""REC IoU reward with the resized-frame rescale, cosine length and repetition."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from vlmr1_jax.models.qwen2_5_vl.processor import QwenProcessor
from vlmr1_jax.rewards import get_reward
from vlmr1_jax.rewards.common import RewardInputError
from vlmr1_jax.rewards.length import byte_length, cosine_rewards, cosine_score, repetition_score
from vlmr1_jax.rewards.rec import iou_reward


@pytest.fixture(scope="module")
def image_640x480(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "img.png"
    Image.new("RGB", (640, 480)).save(path)
    return str(path)


GRID = [1, 24, 32]  # the model saw 448 x 336 (w x h): the box scales by 640/448 in x and 480/336 in y
FRAME = [list(QwenProcessor().model_frame(GRID))]  # the trainer's model_image_size column for that image


def test_qwen_frame_is_the_grid_in_14_px_patches():
    """VLM-R1's Qwen rescale reads the frame as image_grid_thw[1:] * 14 pixels."""
    assert FRAME == [[336, 448]]


@pytest.mark.parametrize(
    "content, truth, expected",
    [
        ("<answer>[0, 0, 224, 168]</answer>", [0, 0, 320, 240], 1.0),  # 224*640/448 = 320, 168*480/336 = 240
        ("<answer>[0, 0, 224, 168]</answer>", [0, 0, 640, 480], 0.25),
        ('<think>a</think><answer>{"bbox_2d": [0,0,224,168]}</answer>', [0, 0, 320, 240], 1.0),
        ("<answer>[0, 0, 224, 168]</answer><answer>[0, 0, 448, 336]</answer>", [0, 0, 320, 240], 1.0),  # first answer
        ("<answer>no box</answer> [0, 0, 224, 168]", [0, 0, 320, 240], 0.0),  # box outside the answer
        ("<answer>[0.0, 0, 224, 168]</answer>", [0, 0, 320, 240], 0.0),  # floats do not match
        ("<answer>[-10, 0, 224, 168]</answer>", [0, 0, 320, 240], 0.0),  # nor negatives
        ("[0, 0, 224, 168]", [0, 0, 320, 240], 0.0),  # no answer tag
        ("<answer>[" + "9" * 5000 + ", 0, 1, 1]</answer>", [0, 0, 320, 240], 0.0),  # beyond int()'s digit limit
    ],
)
def test_rec_iou_rescaled(image_640x480, content, truth, expected):
    got = iou_reward(
        [content], solution=[f"<answer> {truth} </answer>"], model_image_size=[FRAME], image_path=[[image_640x480]]
    )
    assert got == [pytest.approx(expected)]


def test_rec_iou_without_rescale_and_grid_forms(image_640x480):
    solution = ["<answer> [0, 0, 320, 240] </answer>"]
    assert iou_reward(["<answer>[0, 0, 320, 240]</answer>"], solution=solution, rescale=False) == [1.0]
    # a bare [h, w] per sample is read like [[h, w]]; a None frame (a family that does not rescale) leaves the box
    assert iou_reward(
        ["<answer>[0, 0, 224, 168]</answer>"],
        solution=solution,
        model_image_size=[[336, 448]],
        image_path=[[image_640x480]],
    ) == [pytest.approx(1.0)]
    assert iou_reward(
        ["<answer>[0, 0, 320, 240]</answer>"],
        solution=solution,
        model_image_size=[[None]],
        image_path=[[image_640x480]],
    ) == [pytest.approx(1.0)]


def test_rec_iou_data_errors_are_clear(image_640x480, tmp_path):
    ok = {"model_image_size": [FRAME], "image_path": [[image_640x480]]}
    with pytest.raises(RewardInputError, match="model_image_size"):
        iou_reward(["x"], solution=["<answer> [0, 0, 1, 1] </answer>"])
    with pytest.raises(RewardInputError, match="solution"):
        iou_reward(["x"], solution=["<answer> [0, 0, 1] </answer>"], **ok)
    with pytest.raises(RewardInputError, match=r"sample 0 \(id=7\): image_path"):
        iou_reward(
            ["x"],
            solution=["<answer> [0, 0, 1, 1] </answer>"],
            model_image_size=[FRAME],
            image_path=[[str(tmp_path / "missing.png")]],
            id=[7],
        )


@pytest.mark.parametrize(
    "length, correct, expected",
    [
        (0, True, 1.0),
        (512, True, 0.75),
        (1024, True, 0.5),
        (2048, True, 1.0),  # periodic: not clamped
        (0, False, -0.5),
        (512, False, -0.25),
        (1024, False, 0.0),
        (256, True, 1.0 - 0.25 * (1 - math.cos(math.pi / 4))),
    ],
)
def test_cosine_score(length, correct, expected):
    assert cosine_score(length, correct) == pytest.approx(expected)


CAT_BLOCK = '```json\n[{"bbox_2d": [0, 0, 100, 100], "label": "cat"}]\n```'


def test_cosine_rewards_correctness_and_lengths():
    right, wrong = f"<answer>{CAT_BLOCK}</answer>", "<answer>None</answer>"
    solution = [f"<answer> {CAT_BLOCK} </answer>"] * 2
    words = lambda text: 512  # a length_fn
    assert cosine_rewards([right, wrong], solution=solution, length_fn=words) == pytest.approx([0.75, -0.25])
    # VLM-R1's bug: every completion is "correct"
    assert cosine_rewards([right, wrong], solution=solution, length_fn=words, vlmr1_compat=True) == pytest.approx(
        [0.75, 0.75]
    )
    assert cosine_rewards([wrong], length_fn=words, vlmr1_compat=True) == pytest.approx([0.75])  # no solution needed

    class FakeTokenizer:
        def encode(self, text):
            return list(range(1024))

    assert get_reward("length", tokenizer=FakeTokenizer())([right], solution=solution[:1]) == pytest.approx([0.5])
    assert byte_length("") == 0 and byte_length("abcd") == 1 and byte_length("abcde") == 2 and byte_length("é") == 1


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", 0.0),
        ("one two three four five", 0.0),  # fewer than 6 words
        ("a a a a a a a", -(1 - 1 / 2)),  # two 6-grams, one distinct
        ("A b c d e f a B c d e f", -(1 - 6 / 7)),  # lowercased: 7 grams, 6 distinct
        (
            '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}, '
            '{"bbox_2d": [5, 6, 7, 8], "label": "a"}]\n```',
            -(1 - 2 / 3),
        ),
        # broken JSON (no closing bracket) is repaired
        ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}\n```', -0.5),
        # a bare box array outside fences
        ('boxes: [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}] done', -0.5),
        ('```json\n[{"x": 1}, 5, "s"]\n```', 0.0),  # a list without box entries
        ("```json\n{}\n``` w w w w w w w", -(1 - 4 / 5)),  # not a list: 6-grams of all 10 words, 5 grams, 4 distinct
    ],
)
def test_repetition_table(content, expected):
    assert repetition_score(content) == pytest.approx(expected)
    assert get_reward("repetition")([content]) == [pytest.approx(expected)]
