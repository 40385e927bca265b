"""LoRA exports (converters.peft, `vlmr1 export --lora merge|adapter`) against PEFT 0.21 on transformers: the adapter
folder loads with `PeftModel.from_pretrained` onto the exported base and reproduces our JAX LoRA logits, and the
merged release equals PEFT's own `merge_and_unload()`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flax import nnx

from converters.peft import target_modules_regex
from tests.helpers.cli import run_cli
from tests.helpers.hf_models import load_hf
from tests.helpers.peft import hf_logits, jax_logits, random_adapters
from tests.helpers.qwen_parity import make_inputs
from tests.helpers.train import save_trainer_checkpoint
from vlmr1_jax.config import LoRAConfig, ModelConfig, RunConfig, TrainConfig
from vlmr1_jax.models.hf_weights import iter_hf_tensors, read_config
from vlmr1_jax.models.qwen2_5_vl.params import hf_module_name
from vlmr1_jax.rl.lora import merge_lora

RANK, ALPHA, DROPOUT = 4, 8.0, 0.05
LANGUAGE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_module_names_and_target_regex():
    """Our Dense paths -> transformers >= 4.52 module names; the regex takes every language linear and lm_head,
    and no vision module (whose MLP is also gate/up/down_proj)."""
    assert hf_module_name("text.layers.attn.q", 3) == "model.language_model.layers.3.self_attn.q_proj"
    assert hf_module_name("text.layers.mlp.down", 0) == "model.language_model.layers.0.mlp.down_proj"
    assert hf_module_name("text.lm_head") == "lm_head"
    regex = target_modules_regex(
        [f"model.language_model.layers.0.self_attn.{n}" for n in LANGUAGE[:4]]
        + [f"model.language_model.layers.0.mlp.{n}" for n in LANGUAGE[4:]]
        + ["lm_head"],
        ["visual"],
    )
    for name in (
        "model.language_model.layers.11.self_attn.q_proj",
        "model.language_model.layers.0.mlp.up_proj",
        "model.layers.2.mlp.down_proj",
        "lm_head",
    ):
        assert re.fullmatch(regex, name), name
    for name in (
        "model.visual.blocks.0.mlp.gate_proj",
        "visual.blocks.3.mlp.down_proj",
        "model.visual.blocks.0.attn.qkv",
        "model.language_model.embed_tokens",
        "model.language_model.layers.0.self_attn",
        "model.language_model.layers.0.mlp.up_proj.lora_A",
    ):
        assert not re.fullmatch(regex, name), name


@pytest.fixture(scope="module")
def lora_run(release_source, tmp_path_factory):
    """A trainer-built LoRA GRPO checkpoint (reference kept) with random non-zero adapters, lm_head included."""
    cfg = RunConfig(
        model=ModelConfig(hf_model=str(release_source)),
        lora=LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT),
        train=TrainConfig(trainable="lora", max_steps=4),
    )
    run = tmp_path_factory.mktemp("lora_run")
    model = save_trainer_checkpoint(run, cfg, "grpo", step=4, adjust=random_adapters)
    return release_source, run, model


def test_peft_adapter_and_merged_export_match_peft(lora_run, tmp_path, capsys):
    from peft import PeftModel

    source, run, model = lora_run
    base_dir, merged_dir = tmp_path / "base", tmp_path / "merged"
    assert run_cli("export", run, "--out", base_dir, "--dtype", "fp32", "--lora", "adapter") == 0
    assert f"PEFT adapter in {base_dir / 'adapter'}" in capsys.readouterr().out
    assert run_cli("export", run, "--out", merged_dir, "--dtype", "fp32") == 0  # merge is the default

    # The base release is the model without the LoRA delta: the HF source, bit for bit.
    base, expected = dict(iter_hf_tensors(base_dir)), dict(iter_hf_tensors(source))
    assert base.keys() == expected.keys() and all(np.array_equal(base[k], expected[k]) for k in expected)
    config = json.loads((base_dir / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["task_type"], config["peft_type"]) == (
        RANK,
        ALPHA,
        DROPOUT,
        "CAUSAL_LM",
        "LORA",
    )

    cfg = read_config(base_dir)
    inputs = make_inputs(cfg, [(1, 4, 6), (1, 4, 4)], batch=2, steps=1, seed=3)
    valid = inputs.batch.attention_mask.astype(bool)

    peft_model = PeftModel.from_pretrained(load_hf(base_dir), base_dir / "adapter").eval()
    adapted = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert len(adapted) == 2 * 7 + 1 and not [n for n in adapted if "visual" in n] and adapted[0].endswith(".lm_head")
    peft_out = hf_logits(peft_model, inputs)
    merged_out = hf_logits(load_hf(merged_dir), inputs)
    merged = nnx.clone(model)
    merge_lora(merged)
    ours_merged = jax_logits(merged, inputs)
    scale = np.abs(peft_out[valid]).max()
    assert scale > 0.1
    # Our merged export (transformers) == PEFT's own merge of the adapter folder == our merged JAX model.
    np.testing.assert_allclose(merged_out[valid], hf_logits(peft_model.merge_and_unload(), inputs)[valid], atol=1e-4)
    np.testing.assert_allclose(ours_merged[valid], peft_out[valid], atol=1e-4)
    # The adapters change the output (the comparison is not between two copies of the base).
    assert np.abs(hf_logits(load_hf(base_dir), inputs)[valid] - peft_out[valid]).max() > 1e-2

    # Our unmerged LoRA forward (lm_head adapter included) against the adapter-loaded PEFT model.
    peft_model = PeftModel.from_pretrained(load_hf(base_dir), base_dir / "adapter").eval()
    np.testing.assert_allclose(jax_logits(model, inputs)[valid], hf_logits(peft_model, inputs)[valid], atol=1e-4)
