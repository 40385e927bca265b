"""VLM-R1's InternVL prompts: the `internvl2_5` conversation template, one question template, and InternVL's REC
answer format.

VLM-R1 builds InternVL prompts with the model's own conversation template, not the tokenizer's chat template: a
system turn (InternVL's default message unless the conversation starts with one), then the turns as
`<|im_start|>{role}\\n{text}<|im_end|>\\n`, and an open assistant turn. Each image of a turn becomes `<image>\\n` before
its text, which the processor expands to `<img>` + `<IMG_CONTEXT>` x (256 per tile) + `</img>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# InternVL's `internvl2_5` conversation template (InternVL2.5 and InternVL3 releases name it in config.json).
SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}"
ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
SEPARATOR = "<|im_end|>\n"
EOS_TOKEN = SEPARATOR.strip()  # VLM-R1 stops InternVL's generation on the separator's token

IMAGE_START, IMAGE_END, IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# The tokens InternVL adds to its Qwen2.x tokenizer, in their release order (ids 151665.. after Qwen2.5's).
ADDED_TOKENS = (IMAGE_START, IMAGE_END, IMAGE_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
# tokenizer_config.json entries transformers' native InternVLProcessor reads (its tokenizer's named image tokens).
TOKENIZER_CONFIG = {
    "extra_special_tokens": {
        "start_image_token": IMAGE_START,
        "end_image_token": IMAGE_END,
        "context_image_token": IMAGE_CONTEXT,
        "video_token": "<video>",
    }
}

# InternVL's only question template in VLM-R1 (every task type); a string containing "{Question}" is a custom one.
QUESTION_TEMPLATE = (
    "{Question} First output the thinking process in <think> </think> tags and then output the final "
    "answer in <answer> </answer> tags."
)

# VLM-R1's InternVL REC evaluation: the default template, greedy, 1024 new tokens, the first plain int box of the
# first answer, no rescale (InternVL's REC boxes are not in resized pixels).
EVAL_MAX_NEW_TOKENS = 1024
_INT_BOX = re.compile(r"\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]")


def question_template(task_type: str | None) -> str:
    """InternVL's template for any task type, or `task_type` itself when it contains "{Question}"."""
    return task_type if task_type and "{Question}" in task_type else QUESTION_TEMPLATE


def build_messages(problem: str, num_images: int, task_type: str | None) -> list[dict[str, Any]]:
    """VLM-R1's prompt: one user turn, `num_images` image entries first, then the templated problem text."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    content: list[dict[str, Any]] = [{"type": "image", "text": None} for _ in range(num_images)]
    content.append({"type": "text", "text": question_template(task_type).format(Question=problem)})
    return [{"role": "user", "content": content}]


def _turn_text(content: str | Sequence[Mapping[str, Any]], image: str) -> str:
    """A turn's text: a string as is; a content list with `image` per image entry and its texts, in order."""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        kind = item.get("type")
        if kind == "image":
            parts.append(image)
        elif kind == "text":
            parts.append(item.get("text") or "")
        else:
            raise ValueError(f"prompt content: unsupported entry type {kind!r} (expected 'image' or 'text')")
    return "".join(parts)


def render_conversation(messages: Sequence[Mapping[str, Any]], image: str = "<image>\n") -> str:
    """`messages` through the `internvl2_5` template, as VLM-R1's InternVL `prepare_prompt` does.

    A leading system turn replaces the default system message; the other turns alternate user / assistant by
    position (their `role` is not read), and an odd count gets an open assistant turn. Each image entry becomes
    `image`.
    """
    if not messages:
        raise ValueError("prompt: no messages")
    system = SYSTEM_MESSAGE
    turns = list(messages)
    if turns[0].get("role") == "system":
        first = turns.pop(0)["content"]
        system = first if isinstance(first, str) else first[0]["text"]
    texts = [_turn_text(turn["content"], image) for turn in turns]
    if len(texts) % 2:
        texts.append("")
    prompt = SYSTEM_TEMPLATE.format(system_message=system) + SEPARATOR
    for i, text in enumerate(texts):
        role = ROLES[i % 2]
        prompt += role + text + SEPARATOR if text else role
    return prompt


def render_prompt(problem: str, num_images: int, task_type: str | None) -> str:
    """The prompt text the policy sees, each image as `<img><IMG_CONTEXT></img>\\n` (one context token, which the
    processor expands to the image's tile tokens)."""
    placeholder = IMAGE_START + IMAGE_CONTEXT + IMAGE_END + "\n"
    return render_conversation(build_messages(problem, num_images, task_type), image=placeholder)


def extract_rec_box(completion: str) -> list[float]:
    """VLM-R1's InternVL REC evaluation parse: the first `<answer>...</answer>` (found in linear time), then its
    first `[int, int, int, int]`; [0, 0, 0, 0] when absent."""
    start = completion.find("<answer>")
    end = completion.find("</answer>", start + len("<answer>")) if start >= 0 else -1
    match = _INT_BOX.search(completion, start + len("<answer>"), end) if end >= 0 else None
    return [float(v) for v in match.groups()] if match else [0.0, 0.0, 0.0, 0.0]
