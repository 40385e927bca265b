"""Qwen2.5-VL's analytic costs for `vlmr1 plan`: parameter counts and FLOPs from the config alone, as this
implementation computes (an independent check of the compiled programs' counts)."""

from __future__ import annotations

from typing import Any

from vlmr1_jax.models.processor import PromptBatch


def param_counts(cfg: Any, lora_rank: int = 0) -> dict[str, int]:
    """Parameter counts from the config alone: text, vision, and LoRA adapters (rank r on every text linear and the
    LM head)."""
    t, v = cfg.text, cfg.vision
    d, hd, heads, kv = t.hidden_size, t.head_dim, t.num_attention_heads, t.num_key_value_heads
    linears = [
        (d, heads * hd),
        (d, kv * hd),
        (d, kv * hd),
        (heads * hd, d),
        (d, t.intermediate_size),
        (d, t.intermediate_size),
        (t.intermediate_size, d),
    ]
    layer = sum(i * o for i, o in linears) + (heads + 2 * kv) * hd + 2 * d  # + q/k/v biases, two norms
    text = t.vocab_size * d + t.num_hidden_layers * layer + d + (0 if t.tie_word_embeddings else d * t.vocab_size)
    targets = t.num_hidden_layers * linears + [(d, t.vocab_size)]  # the LM head is adapted, tied or not
    lora = sum(lora_rank * (i + o) for i, o in targets) if lora_rank else 0
    hv, iv, wide = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
    block = 2 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + (2 * (hv * iv + iv) + iv * hv + hv)
    vision = (
        v.patch_dim * hv + v.depth * block + hv + (wide * wide + wide) + (wide * v.out_hidden_size + v.out_hidden_size)
    )
    return {"text": text, "vision": vision, "lora": lora, "total": text + vision + lora}


def _text_matmul_params(cfg: Any, lora_rank: int) -> int:
    """Multiply-accumulates per token through the decoder layers (no embedding, no LM head)."""
    t = cfg.text
    d, hd, heads, kv, inter = (
        t.hidden_size,
        t.head_dim,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.intermediate_size,
    )
    linears = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, inter), (d, inter), (inter, d)]
    return t.num_hidden_layers * sum(i * o + lora_rank * (i + o) for i, o in linears)


def flops(
    cfg: Any,
    batch: PromptBatch,
    *,
    samples: int,
    new_tokens: int,
    trainable: str,
    remat: str,
    lora_rank: int,
) -> dict[str, float]:
    """Global FLOPs of each program as this implementation computes them: 2 * MACs of every matmul, attention
    over the whole cache (L + T slots, masked, as our dense attention does), the vision tower on its padded
    window slots, logits only where the program takes them. The train step is forward + backward: the backward
    costs two forwards for trained weights (input and weight gradients), one where only the input gradient is
    needed (LoRA's frozen base), none for a frozen vision tower; `model.remat=full` recomputes the decoder once."""
    t, v = cfg.text, cfg.vision
    (prompts, prompt_len), vision_slots = batch.input_ids.shape, batch.vision["pixel_values"].shape[0]
    frame_slots = batch.vision["frame_index"].shape[1]
    rows, context = prompts * samples, prompt_len + new_tokens
    text_mm = _text_matmul_params(cfg, lora_rank if trainable == "lora" else 0)
    attn_per_query = 4 * t.num_hidden_layers * context * t.num_attention_heads * t.head_dim
    head = 2 * t.hidden_size * t.vocab_size
    hv, wide = v.hidden_size, v.hidden_size * v.merge_unit
    block_mm = hv * 3 * hv + hv * hv + 3 * hv * v.intermediate_size
    full_blocks = len([i for i in v.fullatt_block_indexes if i < v.depth])
    vision = (
        2 * vision_slots * (v.patch_dim * hv + v.depth * block_mm)
        + 4 * vision_slots * hv * (v.window_patches * (v.depth - full_blocks) + frame_slots * full_blocks)
        + 2 * (vision_slots // v.merge_unit) * (wide * wide + wide * v.out_hidden_size)
    )

    def decoder(tokens: int) -> float:
        return 2 * tokens * text_mm + tokens * attn_per_query

    text = decoder(prompts * prompt_len) + decoder(rows * new_tokens)
    sampler = vision + text + head * (prompts + rows * new_tokens)
    forward_text = text + head * (prompts + rows * (new_tokens - 1))
    reference = vision + forward_text
    backward_text = {"full": 2.0, "freeze_vision": 2.0, "lora": 1.0}[trainable]
    backward_vision = 2.0 if trainable == "full" else 0.0
    recompute = 1.0 if remat == "full" else 0.0
    step = vision * (1 + backward_vision) + forward_text * (1 + backward_text + recompute)
    return {"sampler": sampler, "reference": reference, "grpo_step": step}
