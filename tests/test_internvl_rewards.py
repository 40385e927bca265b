"""InternVL's REC rewards: `rec_format_plain` (VLM-R1's InternVL `format_reward_rec`) against its regex, `rec_iou`
unscaled for a family without a resized frame, and the family's reward variants in `reward_functions`."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from vlmr1_jax.models.internvl.processor import INTERNVL_PROCESSOR
from vlmr1_jax.models.qwen2_5_vl.processor import QwenProcessor
from vlmr1_jax.rewards import REWARDS, get_reward, reward_functions
from vlmr1_jax.rewards.rec import has_plain_rec_format

# VLM-R1's InternVL format regex, as its module writes it (the reference for the linear-time check).
PLAIN_REC_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?\[\d+,\s*\d+,\s*\d+,\s*\d+\].*?</answer>", re.DOTALL)
PIECES = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "[1, 2, 3, 4]",
    "[12,3,4",
    "]",
    "[",
    "5,",
    " ",
    "\n",
    "x",
    "{",
    "}",
]
MATCHING = ["<think>a</think>\n<answer>[1, 2,3,4]</answer>", "pre <think></think><answer>b [10,20, 30,\n40] c</answer>"]


@st.composite
def near_matches(draw) -> str:
    """A matching string, then up to 3 random splices of the pieces."""
    text = draw(st.sampled_from(MATCHING))
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 12)))
        text = text[:start] + draw(st.sampled_from([*PIECES, ""])) + text[end:]
    return text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("<think>a</think><answer>[1, 2, 30, 40]</answer>", 1.0),  # no braces needed
        ('<think>a</think> <answer>{"bbox": [1,2,3,4]}</answer> post', 1.0),  # braces allowed, text outside too
        ("<think>a</think><answer>[1.5, 2, 30, 40]</answer>", 0.0),  # integers only
        ("<think>a</think><answer>[-1, 2, 30, 40]</answer>", 0.0),
        ("<think>a</think><answer>[1, 2, 30, 40]", 0.0),  # unclosed answer
        ("<answer>[1, 2, 30, 40]</answer>", 0.0),  # no think
        ("<think>a</think>x<answer>[1, 2, 3, 4]</answer>", 0.0),  # text between think and answer
        ("<think>a</think><answer>none</answer> [1, 2, 3, 4] </answer>", 1.0),  # the lazy .*? crosses </answer>
    ],
)
def test_plain_rec_format(content, expected):
    assert get_reward("rec_format_plain")([content]) == [expected]
    assert bool(PLAIN_REC_RE.search(content)) == bool(expected)


@given(st.one_of(st.lists(st.sampled_from(PIECES), max_size=14).map("".join), near_matches()))
@settings(max_examples=1500, deadline=None)
def test_linear_plain_format_agrees_with_the_regex(text):
    for candidate in (text, "<think>" + text, "<think>" + text + "</answer>"):
        assert has_plain_rec_format(candidate) == bool(PLAIN_REC_RE.search(candidate))


def reference_iou(a, b):
    """VLM-R1's IoU (+-1 pixel convention), from its definition."""
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2] - 1, b[2] - 1), min(a[3] - 1, b[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_rec_iou_is_unscaled_for_internvl(tmp_path):
    """InternVL's processor has no model frame: the box is compared as written, whatever the image's size."""
    path = tmp_path / "img.png"
    Image.new("RGB", (640, 480)).save(path)
    frames = [[INTERNVL_PROCESSOR.model_frame(g)] for g in [(7,)] * 2]
    contents = ["<think>.</think><answer>[100, 100, 300, 250]</answer>", "<answer>[0,0,10,10]</answer>"]
    got = get_reward("rec_iou")(
        contents,
        solution=["<answer> [120, 90, 310, 260] </answer>"] * 2,
        model_image_size=frames,
        image_path=[[str(path)]] * 2,
    )
    assert got == pytest.approx([reference_iou((100, 100, 300, 250), (120, 90, 310, 260)), 0.0])


def test_family_reward_variants_replace_the_recipe_names():
    assert set(INTERNVL_PROCESSOR.reward_variants.values()) <= set(REWARDS)
    names, options = ["rec_iou", "rec_format"], {"rec_iou": {"rescale": False}}
    internvl = reward_functions(names, options, variants=INTERNVL_PROCESSOR.reward_variants)
    qwen = reward_functions(names, options, variants=QwenProcessor.reward_variants)
    assert list(internvl) == ["iou_reward", "format_reward_rec_plain"]
    assert list(qwen) == ["iou_reward", "format_reward_rec"]
    plain = "<think>a</think><answer>[1, 2, 3, 4]</answer>"
    assert internvl["format_reward_rec_plain"]([plain]) == [1.0] and qwen["format_reward_rec"]([plain]) == [0.0]
    # options stay keyed by the recipe's name, and are checked against the variant
    bad = {"rec_format": {"rescale": True}}
    with pytest.raises(ValueError, match=r"reward_options\.rec_format: reward 'rec_format' has no option 'rescale'"):
        reward_functions(names, bad, variants=INTERNVL_PROCESSOR.reward_variants)
