"""InternVL2.5 / InternVL3 (Qwen2.x language models): InternViT, pixel shuffle, MLP projector, 448-px tiles."""
