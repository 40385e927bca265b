"""The model-family seam: a second family, a tiny Qwen2.5-VL variant registered under another name and reached only
through `ModelFamily`, trains one GRPO step, exports a release that names its own architecture, and loads back
as itself. Nothing outside models/ knows its name."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from converters.check import check_export
from converters.export import export_checkpoint
from tests.helpers.runs import TINY_RUN, make_run_inputs
from vlmr1_jax.config import load_config
from vlmr1_jax.models.family import ModelFamily, family_for_hf_config, get_family, register_family
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.processor import QwenProcessor
from vlmr1_jax.train.loop import GRPOTrainer

NAME, ARCHITECTURE = "fake_vl", "FakeVLForConditionalGeneration"


class FakeVL(Qwen25VL):
    """The variant's model class: Qwen2.5-VL's computation under another type, so its use is visible. Its vision
    arrays carry the fake processor's names, so code that read Qwen2.5-VL's names from a batch would fail."""

    def encode_vision(self, inputs):
        return super().encode_vision({key.removeprefix(PREFIX): value for key, value in inputs.items()})


PREFIX = "fake_"


class FakeProcessor(QwenProcessor):
    """Qwen2.5-VL's processor with the vision arrays renamed: only the family's own model reads them."""

    def build_prompt_batch(self, prompt_ids, images, cfg, *, pad_id, length=None):
        batch = super().build_prompt_batch(prompt_ids, images, cfg, pad_id=pad_id, length=length)
        return dataclasses.replace(batch, vision={PREFIX + key: value for key, value in batch.vision.items()})


def _fake_family() -> ModelFamily:
    qwen = get_family("qwen2_5_vl")

    def to_hf_config(cfg, torch_dtype: str = "bfloat16") -> dict:
        return {**qwen.to_hf_config(cfg, torch_dtype), "architectures": [ARCHITECTURE], "model_type": NAME}

    return ModelFamily(
        name=NAME,
        architectures=(ARCHITECTURE,),
        config_from_dict=qwen.config_from_dict,
        from_hf_config=lambda raw: dataclasses.replace(
            qwen.from_hf_config({**raw, "model_type": "qwen2_5_vl"}), family=NAME
        ),
        to_hf_config=to_hf_config,
        get_preset=lambda name: dataclasses.replace(qwen.get_preset(name), family=NAME),
        with_overrides=qwen.with_overrides,
        model_class=FakeVL,
        layout=qwen.layout,
        processor=FakeProcessor(),
    )


@pytest.fixture(scope="module")
def fake_family() -> ModelFamily:
    try:
        return get_family(NAME)
    except ValueError:
        return register_family(_fake_family())


@pytest.mark.slow
def test_a_second_family_trains_exports_and_loads_back(fake_family, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(
        "demo_tiny",
        [*make_run_inputs(tmp_path), *TINY_RUN, "train.max_steps=1", f"model.family={NAME}", f"train.output_dir={run}"],
    )
    trainer = GRPOTrainer.from_config(cfg, progress=False)
    metrics = trainer.train()
    trained = trainer.model()
    assert type(trained) is FakeVL and trained.cfg.family == NAME and np.isfinite(metrics["loss"])
    drawn = trainer.draw()
    assert drawn is not None and drawn[1].vision and all(key.startswith(PREFIX) for key in drawn[1].vision)

    release = export_checkpoint(run, str(tmp_path / "release"), dtype="float32")
    config = json.loads((release / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert family_for_hf_config(config) is fake_family
    assert check_export(release, "hf") == []
    loaded = load_hf_model(release)
    assert type(loaded) is FakeVL and loaded.cfg.family == NAME
    want, got = nnx.state(trained, nnx.Param), nnx.state(loaded, nnx.Param)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_unknown_family_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model.family='nope': unknown model family; choose one of \[.*qwen2_5_vl"):
        get_family("nope")
    with pytest.raises(ValueError, match=r"architectures \['LlamaForCausalLM'\] is not a model family"):
        family_for_hf_config({"architectures": ["LlamaForCausalLM"]})
