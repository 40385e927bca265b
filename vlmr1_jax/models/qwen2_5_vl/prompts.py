"""VLM-R1's Qwen prompts: the per-task question templates and the single user turn (images first, then text)."""

from __future__ import annotations

from typing import Any

from vlmr1_jax.models.processor import ChatTemplater

# Qwen2VLModule.get_question_template, verbatim (docs/facts.md: Prompts); other task types use "default".
QUESTION_TEMPLATES: dict[str, str] = {
    "rec": (
        "{Question} First output the thinking process in <think> </think> tags and then output the final "
        "answer in <answer> </answer> tags. Output the final answer in JSON format."
    ),
    "ic": (
        "{Question} First thinks about the reasoning process in the mind and then provides the user with the "
        "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think><answer> json format answer here "
        "</answer>"
    ),
    "odLength": (
        "First thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
        "\n{Question}"
    ),
    "default": (
        "{Question} First output the thinking process in <think> </think> tags and then output the final "
        "answer in <answer> </answer> tags."
    ),
}


def question_template(task_type: str | None) -> str:
    """The template for `task_type` ("rec", "ic", "odLength"); "default" for anything else (gui, math, None).
    A string containing "{Question}" is itself the template (a custom prompt)."""
    if task_type and "{Question}" in task_type:
        return task_type
    return QUESTION_TEMPLATES.get(task_type or "default", QUESTION_TEMPLATES["default"])


def build_messages(problem: str, num_images: int, task_type: str | None) -> list[dict[str, Any]]:
    """VLM-R1's prompt: one user turn, `num_images` image entries first, then the templated problem text.
    No system turn (the chat template adds Qwen's default one)."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    text = question_template(task_type).format(Question=problem)
    content = [{"type": "image", "text": None} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def render_prompt(tokenizer: ChatTemplater, problem: str, num_images: int, task_type: str | None) -> str:
    """The prompt string the policy sees: build_messages rendered with a generation prompt."""
    return tokenizer.apply_chat_template(build_messages(problem, num_images, task_type), add_generation_prompt=True)
