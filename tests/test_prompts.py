"""Qwen2.5-VL's prompts (models/qwen2_5_vl/prompts.py) against the exact strings VLM-R1 builds (typed by hand
from its templates)."""

from __future__ import annotations

import pytest

from vlmr1_jax.models.qwen2_5_vl.prompts import QUESTION_TEMPLATES, build_messages, question_template, render_prompt
from vlmr1_jax.processing.tokenizer import qwen2_5_tokenizer

SPEC_TEMPLATES = {
    "rec": "{Question} First output the thinking process in <think> </think> tags and then output the final answer "
    "in <answer> </answer> tags. Output the final answer in JSON format.",
    "ic": "{Question} First thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think><answer> json format answer here "
    "</answer>",
    "odLength": "First thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>" + "\n" + "{Question}",
    "default": "{Question} First output the thinking process in <think> </think> tags and then output the final "
    "answer in <answer> </answer> tags.",
}
REC_PROBLEM = "Please provide the bounding box coordinates of the region this sentence describes: the red circle."


def test_templates_are_the_spec_strings():
    assert QUESTION_TEMPLATES == SPEC_TEMPLATES
    for task in ("rec", "ic", "odLength"):
        assert question_template(task) == SPEC_TEMPLATES[task]
    for task in ("gui", "math", None, "default", "anything"):
        assert question_template(task) == SPEC_TEMPLATES["default"]


def test_build_messages_puts_images_first_and_has_no_system_turn():
    messages = build_messages("Compare {a} and {b}.", 2, "rec")
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image", "text": None},
                {"type": "image", "text": None},
                {
                    "type": "text",
                    "text": "Compare {a} and {b}. First output the thinking process in <think> </think> tags and "
                    "then output the final answer in <answer> </answer> tags. Output the final answer "
                    "in JSON format.",
                },
            ],
        }
    ]
    assert build_messages("q", 0, None)[0]["content"] == [
        {"type": "text", "text": SPEC_TEMPLATES["default"].replace("{Question}", "q")}
    ]
    with pytest.raises(ValueError, match="num_images"):
        build_messages("q", -1, "rec")


def test_render_prompt_single_image_rec():
    # VLM-R1: the Qwen default system turn, one vision block per image, then the templated question.
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>" + REC_PROBLEM + " First output the thinking process "
        "in <think> </think> tags and then output the final answer in <answer> </answer> tags. Output the "
        "final answer in JSON format.<|im_end|>\n<|im_start|>assistant\n"
    )
    tokenizer = qwen2_5_tokenizer()
    prompt = render_prompt(tokenizer, REC_PROBLEM, 1, "rec")
    assert prompt == expected
    assert tokenizer.encode(prompt).count(tokenizer.image_pad_id) == 1


def test_render_prompt_od_length_and_multi_image():
    tokenizer = qwen2_5_tokenizer()
    prompt = render_prompt(tokenizer, "Detect the cats.", 3, "odLength")
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * 3
    assert prompt.endswith(
        "<|im_start|>user\n" + vision + "First thinks about the reasoning process in the mind"
        " and then provides the user with the answer. The reasoning process and answer are "
        "enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
        "<think> reasoning process here </think><answer> answer here </answer>\nDetect the cats."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.encode(prompt).count(tokenizer.image_pad_id) == 3
    text_only = render_prompt(tokenizer, "1+1?", 0, "math")
    assert "<|vision_start|>" not in text_only and "1+1? First output" in text_only
