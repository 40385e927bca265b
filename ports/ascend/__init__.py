"""Ascend deployment: launch scripts for vllm-ascend images (Atlas 800T A2 in bf16, Atlas 300I Duo / 310P in fp16)."""
