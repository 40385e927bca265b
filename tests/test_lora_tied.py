"""LoRA on a tied LM head (Qwen2.5-VL-3B ties it), against PEFT 0.21 on transformers: VLM-R1's target list makes PEFT
wrap the tied `lm_head` Linear (its weight is the embedding table) and leave `embed_tokens` alone. Our adapter export
loads with `PeftModel.from_pretrained` onto the tied base and reproduces our logits; our merged export equals PEFT's
`merge_and_unload()`, which adds the head's delta to the shared table, so the token embeddings move too."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from tests.helpers.cli import run_cli
from tests.helpers.hf_models import load_hf
from tests.helpers.params import host_params
from tests.helpers.peft import hf_logits, jax_logits, random_adapters
from tests.helpers.prompts import completions, device_prompts, train_prompts
from tests.helpers.qwen_parity import make_inputs
from tests.helpers.release import make_release_source
from tests.helpers.train import optimizer, save_trainer_checkpoint
from vlmr1_jax.config import GRPOConfig, LoRAConfig, ModelConfig, RunConfig, TrainConfig
from vlmr1_jax.models.hf_weights import iter_hf_tensors, load_hf_model, read_config
from vlmr1_jax.models.layers import LoRAParam, TiedHead
from vlmr1_jax.models.qwen2_5_vl.params import canonical_hf_name, flat_paths, is_stacked, to_hf_name
from vlmr1_jax.rl.lora import apply_lora, merge_lora
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import init_train_state
from vlmr1_jax.rl.step import make_grpo_step
from vlmr1_jax.train.plan import analytic_param_counts

RANK, ALPHA, DROPOUT = 4, 8.0, 0.05
HEAD_A, HEAD_B = "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"
EMBED = "model.embed_tokens.weight"


def vlm_r1_targets(hf_model) -> list[str]:
    """VLM-R1's `target_modules`: every nn.Linear whose name has no vision keyword, `embed_tokens` removed."""
    return [
        n
        for n, m in hf_model.named_modules()
        if isinstance(m, torch.nn.Linear) and "visual" not in n and "embed_tokens" not in n
    ]


def test_tied_head_gets_the_adapter_peft_gives_it(tiny_hf_tied_dir):
    """PEFT, given VLM-R1's list on the tied model, wraps the linears we adapt, lm_head included, and leaves the
    input embedding a plain Embedding; our tree gets no adapter on the table and no head kernel."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    hf = load_hf(tiny_hf_tied_dir)
    peft_model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=vlm_r1_targets(hf)))
    wrapped = {canonical_hf_name(n) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert "lm_head" in wrapped
    assert type(peft_model.get_input_embeddings()) is torch.nn.Embedding
    assert peft_model.base_model.model.lm_head.base_layer.weight is peft_model.get_input_embeddings().weight

    model = load_hf_model(tiny_hf_tied_dir)
    assert model.cfg.text.tie_word_embeddings and isinstance(model.text.lm_head, TiedHead)
    names = apply_lora(model, RANK, ALPHA)
    layers = range(model.cfg.text.num_hidden_layers)
    ours = {
        to_hf_name(n + ".kernel", i if is_stacked(n + ".kernel") else None).removesuffix(".weight")
        for n in names
        for i in layers
    }
    assert ours == wrapped
    params = flat_paths(nnx.state(model))
    assert {p for p in params if p.startswith("text.lm_head")} == {"text.lm_head.lora_a", "text.lm_head.lora_b"}
    assert isinstance(params["text.embed"], nnx.Param)  # the table: one plain parameter, no head kernel beside it
    adapters = sum(v[...].size for v in flat_paths(nnx.state(model, LoRAParam)).values())
    assert analytic_param_counts(model.cfg, lora_rank=RANK)["lora"] == adapters


def test_tied_head_adapter_trains(tiny_hf_tied_dir):
    """A LoRA GRPO step (adapter dropout on, log-probs taken in chunks through the tied head) moves the head's
    adapter and nothing of the base; the head's gradient is the one PEFT's wrapped Linear would get."""
    model = load_hf_model(tiny_hf_tied_dir)
    model.text.logits_chunk = 2  # several log-prob chunks, each with its own head dropout mask
    apply_lora(model, RANK, ALPHA, dropout=DROPOUT)
    batch, _ = train_prompts(model.cfg)
    tx, schedule = optimizer()
    graphdef, state = init_train_state(model, "lora", tx, with_reference=False)
    frozen = host_params(state.frozen)
    step = make_grpo_step(graphdef, GRPOConfig(num_generations=2, beta=0.0), tx, schedule, seed=1)
    tokens, mask = completions(len(batch.input_ids) * 2)
    advantages = np.random.default_rng(5).standard_normal(len(tokens))
    example = TrainExample(
        device_prompts(batch), jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(advantages, jnp.float32)
    )
    state, metrics = step(state, example)
    assert np.isfinite(float(metrics["loss"]))
    head_b = np.asarray(nnx.merge(graphdef, state.trainable, state.frozen).text.lm_head.lora_b[...])
    assert np.abs(head_b).max() > 0  # B starts at zero: only a gradient through the tied head moves it
    after = host_params(state.frozen)
    assert after.keys() == frozen.keys() and all(np.array_equal(after[k], frozen[k]) for k in frozen)


@pytest.fixture(scope="module")
def tied_lora_run(tmp_path_factory):
    """A trainer-built LoRA checkpoint of a tied model with random non-zero adapters, the head's included."""
    source = make_release_source(tmp_path_factory.mktemp("tied_source") / "source", tied=True, seed=17)
    cfg = RunConfig(
        model=ModelConfig(hf_model=str(source)),
        lora=LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT),
        train=TrainConfig(trainable="lora", max_steps=4),
    )
    run = tmp_path_factory.mktemp("tied_lora_run")
    model = save_trainer_checkpoint(run, cfg, "grpo", step=4, adjust=random_adapters)
    assert model.cfg.text.tie_word_embeddings
    return source, run, model


@pytest.mark.slow
def test_tied_adapter_and_merged_exports_match_peft(tied_lora_run, tmp_path, caplog):
    from peft import PeftModel

    source, run, model = tied_lora_run
    base_dir, merged_dir = tmp_path / "base", tmp_path / "merged"
    assert run_cli("export", run, "--out", base_dir, "--dtype", "fp32", "--lora", "adapter") == 0
    assert "tied head" not in caplog.text
    assert run_cli("export", run, "--out", merged_dir, "--dtype", "fp32") == 0
    assert "text.lm_head: the tied head's adapter is merged into the embedding table" in caplog.text

    # The base release is the tied source bit for bit (no lm_head.weight); the head adapter is keyed as PEFT's.
    base, expected = dict(iter_hf_tensors(base_dir)), dict(iter_hf_tensors(source))
    assert "lm_head.weight" not in base and base.keys() == expected.keys()
    assert all(np.array_equal(base[k], expected[k]) for k in expected)
    adapter = load_file(base_dir / "adapter" / "adapter_model.safetensors")
    cfg = read_config(base_dir)
    hidden, vocab = cfg.text.hidden_size, cfg.text.vocab_size
    assert adapter[HEAD_A].shape == (RANK, hidden) and adapter[HEAD_B].shape == (vocab, RANK)
    assert not [k for k in adapter if "embed" in k]

    inputs = make_inputs(cfg, [(1, 4, 6), (1, 4, 4)], batch=2, steps=1, seed=3)
    valid = inputs.batch.attention_mask.astype(bool)
    peft_model = PeftModel.from_pretrained(load_hf(base_dir), base_dir / "adapter").eval()
    assert len(peft_model.base_model.model.lm_head.lora_A) == 1  # the tied head is wrapped, its table shared
    assert peft_model.base_model.model.lm_head.base_layer.weight is peft_model.get_input_embeddings().weight
    peft_out = hf_logits(peft_model, inputs)
    ours = jax_logits(model, inputs)
    adapted_diff = np.abs(ours[valid] - peft_out[valid]).max()
    assert adapted_diff < 1e-4, adapted_diff
    no_head = nnx.clone(model)
    no_head.text.lm_head.lora_b[...] = jnp.zeros_like(no_head.text.lm_head.lora_b[...])
    assert np.abs(jax_logits(no_head, inputs)[valid] - peft_out[valid]).max() > 1e-2  # the head adapter counts

    # Merged: PEFT adds scale * B @ A to the shared table; the release stays tied, with the moved embedding.
    peft_merged = peft_model.merge_and_unload()
    assert peft_merged.config.tie_word_embeddings
    merged = dict(iter_hf_tensors(merged_dir))
    assert "lm_head.weight" not in merged and read_config(merged_dir).text.tie_word_embeddings
    formula = expected[EMBED] + (ALPHA / RANK) * adapter[HEAD_B] @ adapter[HEAD_A]
    np.testing.assert_allclose(merged[EMBED], formula, atol=1e-6)
    np.testing.assert_allclose(peft_merged.get_input_embeddings().weight.detach().numpy(), formula, atol=1e-6)
    peft_merged_out = hf_logits(peft_merged, inputs)
    merged_diff = np.abs(hf_logits(load_hf(merged_dir), inputs)[valid] - peft_merged_out[valid]).max()
    ours_merged = nnx.clone(model)
    merge_lora(ours_merged)
    jax_merged_diff = np.abs(jax_logits(ours_merged, inputs)[valid] - peft_merged_out[valid]).max()
    assert merged_diff < 1e-4 and jax_merged_diff < 1e-4, (merged_diff, jax_merged_diff)
    # ... which is not the adapted model: the embedding lookup moved with the head.
    merge_vs_adapted = np.abs(peft_merged_out[valid] - peft_out[valid]).max()
    assert merge_vs_adapted > 1e-3, merge_vs_adapted
    print(
        json.dumps(
            {
                "adapted_vs_peft": float(adapted_diff),
                "merged_release_vs_peft_merge": float(merged_diff),
                "jax_merged_vs_peft_merge": float(jax_merged_diff),
                "peft_merge_vs_adapted": float(merge_vs_adapted),
                "logit_scale": float(np.abs(peft_out[valid]).max()),
            }
        )
    )
