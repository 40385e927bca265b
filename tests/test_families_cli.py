"""Every model family through every command by configuration alone: `vlmr1 train` (full, LoRA, frozen vision), `sft`,
`plan`, `export` + `check-export`, `import-hf`, `infer` on both backends, `eval rec` with the family's own protocol,
`check-parity` on a held-out config, and `demo --family` at a micro size.

Qwen2.5-VL's training modes, SFT and plan are tested in depth elsewhere, so those three run here for the other
families only; LoRA and frozen-vision GRPO run for InternVL alone (Qwen2-VL is Qwen2.5-VL's model with another vision
tower, which both modes leave untrained: what they train is Qwen2.5-VL's code, tests/test_train_modes.py), and
`check-parity` too (Qwen2.5-VL's and Qwen2-VL's run on held-out configs in tests/test_parity.py and
tests/test_qwen2_vl.py). Each family gets one synthetic REC data set and one compact tokenizer (with the family's
own special tokens), one GRPO run from its tiny preset and one fp32 release of it (module-scoped), so the commands
run on real outputs of each other. The references are independent: transformers' forward (check-parity, `infer --backend
torch`), the release's own bytes (the import / export round trip), VLM-R1's evaluation settings per family.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from converters.peft import PEFT_PREFIX, adapter_weights, excluded_components, target_modules_regex
from converters.release import export_release
from tests.helpers.cli import run_cli
from tests.helpers.runs import jsonl
from vlmr1_jax.config import load_config
from vlmr1_jax.data.synthetic import corpus_strings, generate, image_folder
from vlmr1_jax.models.family import get_family, processor_of
from vlmr1_jax.models.layers import LoRALinear
from vlmr1_jax.models.processor import max_pixels_or_default
from vlmr1_jax.processing.tokenizer import Tokenizer, build_compact_tokenizer
from vlmr1_jax.rl.lora import apply_lora
from vlmr1_jax.train.setup import preset_config, tokenizer_token_ids

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "internvl")
# The families whose training modes, SFT and plan run here; Qwen2.5-VL's are tested in depth elsewhere
# (tests/test_train_modes.py, tests/test_plan.py).
NEW_FAMILIES = ("qwen2_vl", "internvl")
# The family whose LoRA / frozen-vision GRPO and `check-parity` run here: the others' run elsewhere (module docstring).
OWN_CODE_FAMILIES = ("internvl",)
# `vlmr1 eval rec`'s default per family, as VLM-R1 evaluates it: Qwen with test_rec_r1 ("rec" template, boxes
# rescaled from the resized image), InternVL with test_rec_r1_internvl (its default template, no rescale).
DEFAULT_PROTOCOL = {
    "qwen2_5_vl": ("r1", "rec", True),
    "qwen2_vl": ("r1", "rec", True),
    "internvl": ("internvl", "default", False),
}
# A short GRPO run: 2 prompts x 2 samples of 4 new tokens, with rewards that use the REC columns.
RUN = (
    "model.preset=tiny",
    "sampling.max_new_tokens=4",
    "grpo.reward_funcs=[length,rec_format]",
    "data.prompts_per_step=2",
    "grpo.num_generations=2",
    "train.log_every=1",
)


@dataclasses.dataclass(frozen=True)
class Inputs:
    family: str
    folder: Path
    data: str
    images: str
    tokenizer: Path
    overrides: tuple[str, ...]  # the recipe overrides every run of this family shares


@pytest.fixture(scope="module", params=FAMILIES)
def inputs(request, tmp_path_factory) -> Inputs:
    """8 synthetic REC samples and a 320-token compact tokenizer with the family's special tokens."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    data = generate(str(folder / "synth"), n=8, seed=0)
    processor = get_family(family).processor
    corpus = corpus_strings() + list(processor.question_templates.values())
    tokenizer = build_compact_tokenizer(corpus, vocab_size=320).with_special_tokens(
        processor.added_tokens, **processor.tokenizer_config
    )
    tokenizer.save(folder / "tokenizer")
    images = image_folder(str(folder / "synth"))
    overrides = (
        f"model.family={family}",
        f"model.tokenizer={folder / 'tokenizer'}",
        f"data.data_file_paths={data}",
        f"data.image_folders={images}",
        *RUN,
    )
    return Inputs(family, folder, data, images, folder / "tokenizer", overrides)


def train(inputs: Inputs, command: str, name: str, *extra: str, steps: int = 1) -> list[dict]:
    """`vlmr1 <command> demo_tiny` with the family's overrides; its metrics, one finite loss per step."""
    out = inputs.folder / name
    code = run_cli(
        command, "demo_tiny", *inputs.overrides, *extra, f"train.max_steps={steps}", f"train.output_dir={out}",
        "--no-progress",
    )  # fmt: skip
    assert code == 0
    metrics = jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics), metrics
    return metrics


@pytest.fixture(scope="module")
def trained(inputs) -> Path:
    """Two full GRPO steps from the family's tiny preset."""
    train(inputs, "train", "grpo", steps=2)
    return inputs.folder / "grpo"


@pytest.fixture(scope="module")
def release(inputs, trained) -> Path:
    """The GRPO run exported as an fp32 HF release folder (its tokenizer included)."""
    out = inputs.folder / "release"
    assert run_cli("export", trained, "--out", out, "--target", "hf", "--dtype", "fp32") == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("inputs", OWN_CODE_FAMILIES, indirect=True)
@pytest.mark.parametrize("mode", ["lora", "freeze_vision"])
def test_grpo_trains_lora_and_frozen_vision(inputs, mode):
    train(inputs, "train", mode, f"train.trainable={mode}")


@pytest.mark.slow
@pytest.mark.parametrize("inputs", NEW_FAMILIES, indirect=True)
def test_sft_step(inputs):
    train(inputs, "sft", "sft")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_every_linear_outside_the_vision_tower(family):
    """VLM-R1's LoRA targets: every Linear but the vision tower's (Qwen: outside `visual`; InternVL: outside
    `vision_model`, so its projector `mlp1` is adapted too), lm_head included."""
    fam = get_family(family)
    model = fam.model_class(fam.get_preset("tiny"), rngs=nnx.Rngs(0))
    linears = {".".join(map(str, path)) for path, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}
    adapted = set(apply_lora(model, rank=2, alpha=4.0))
    assert adapted == {name for name in linears if not name.startswith("visual.")}
    assert any(name.startswith("text.") and "head" in name for name in adapted), adapted
    assert any(name.startswith("visual.") for name in linears)  # the tower has linears: they stay unadapted
    outside = {name.split(".")[0] for name in adapted} - {"text"}
    assert outside == ({"projector"} if family == "internvl" else set()), outside


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_targets_exclude_the_vision_tower(family):
    """The exported adapter_config's `target_modules` takes every adapted module (InternVL's projector included) and
    none of the vision tower's linears, whose names the decoder's share (q/k/v_proj, gate/up/down_proj)."""
    fam = get_family(family)
    cfg = fam.get_preset("tiny")
    model = fam.model_class(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, rank=2, alpha=4.0)
    modules = sorted({key[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for key in adapter_weights(model, cfg)})
    regex = target_modules_regex(modules, excluded_components(modules, cfg))
    layout = fam.layout
    vision = [
        layout.hf_module_name(name, 0 if layout.is_stacked(name + ".kernel") else None)
        for path, m in nnx.iter_graph(model)
        if isinstance(m, LoRALinear) and (name := ".".join(map(str, path))).startswith("visual.")
    ]
    assert vision and modules
    assert [m for m in modules if not re.fullmatch(regex, m)] == []
    assert [m for m in vision if re.fullmatch(regex, m)] == []
    assert (family == "internvl") == any("projector" in m for m in modules)


def test_unset_image_budget_is_the_family_default():
    """data.max_pixels unset: Qwen's 12845056 pixels; InternVL's 12 tiles (VLM-R1's max_anyres_num), of the model's
    own tile size, which the processor also cuts."""
    assert load_config("demo_tiny").data.max_pixels is None
    qwen = get_family("qwen2_5_vl").get_preset("tiny")
    assert max_pixels_or_default(None, processor_of(qwen)) == 12845056
    assert max_pixels_or_default(1204224, processor_of(qwen)) == 1204224
    for preset, side in (("4b", 448), ("tiny", 56)):
        processor = processor_of(get_family("internvl").get_preset(preset))
        budget = max_pixels_or_default(None, processor)
        assert budget == 12 * side * side
        assert processor.image_grid(side * 3, side * 4, min_pixels=1, max_pixels=budget) == (13,)  # 4 x 3 + thumbnail
        pixels, grid = processor.preprocess_image(
            np.zeros((side, 2 * side, 3), np.uint8), min_pixels=1, max_pixels=budget
        )
        assert grid == (3,) and pixels.shape == (3, 3, side, side)


def test_a_tokenizer_without_the_family_tokens_is_one_clear_error(tmp_path):
    """An InternVL preset with a plain Qwen-style tokenizer: the missing token and the fix, not a KeyError."""
    build_compact_tokenizer(corpus_strings(), vocab_size=320).save(tmp_path)
    cfg = load_config("demo_tiny", ["model.family=internvl", f"model.tokenizer={tmp_path}"])
    with pytest.raises(ValueError, match=r"model.tokenizer: lacks the model's special token <IMG_CONTEXT>.*"):
        preset_config(cfg, Tokenizer.load(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("inputs", NEW_FAMILIES, indirect=True)
def test_plan(inputs, tmp_path):
    """`vlmr1 plan` compiles the family's programs; without a cost model it counts the abstract parameters."""
    report = tmp_path / "plan.json"
    code = run_cli(
        "plan", "demo_tiny", *inputs.overrides, "--devices", "8", "--device-kind", "h100", "--image-size", "112x112",
        "--json", report,
    )  # fmt: skip
    assert code == 0
    plan = json.loads(report.read_text())
    assert {p["name"] for p in plan["programs"]} == {"sampler", "reference", "grpo_step"} and plan["fits"]
    assert plan["params"] == plan["analytic_params"]["total"]


@pytest.mark.slow
def test_export_check_import_round_trip(inputs, trained, release):
    """The release passes `check-export`; `import-hf` of it, exported again, gives the same tensors byte for byte."""
    assert run_cli("check-export", release, "--target", "hf") == 0
    imported = inputs.folder / "imported"
    assert run_cli("import-hf", "--model", release, "--out", imported) == 0
    again = inputs.folder / "again"
    assert run_cli("export", imported, "--out", again, "--target", "hf", "--dtype", "fp32") == 0
    weights = sorted(p.name for p in release.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in again.glob("*.safetensors"))
    for name in weights:
        assert (release / name).read_bytes() == (again / name).read_bytes(), name
    assert json.loads((release / "config.json").read_text()) == json.loads((again / "config.json").read_text())


@pytest.mark.slow
def test_infer_backends_agree(inputs, release, capsys):
    """`vlmr1 infer` through transformers and through our model: the same greedy text."""
    image = next(Path(inputs.images).rglob("*.png"))
    texts = []
    for backend in ("torch", "jax"):
        code = run_cli(
            "infer", "--model", release, "--image", image, "--prompt", "the red circle", "--backend", backend,
            "--max-new-tokens", "6",
        )  # fmt: skip
        assert code == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1], texts


@pytest.mark.slow
def test_eval_rec_uses_the_family_protocol(inputs, release):
    """Without --protocol, `vlmr1 eval rec` evaluates as VLM-R1 does for the family; --protocol still overrides."""
    expected = DEFAULT_PROTOCOL[inputs.family]
    for protocol, out in ((None, "eval"), ("baseline", "eval_baseline")):
        extra = ["--protocol", protocol] if protocol else []
        code = run_cli(
            "eval", "rec", "--model", release, "--data", inputs.data, "--image-root", inputs.images, "--limit", "4",
            "--max-new-tokens", "4", "--out", inputs.folder / out, "--no-progress", *extra,
        )  # fmt: skip
        assert code == 0
        settings = json.loads((inputs.folder / out / "results.json").read_text())["settings"]
        if protocol is None:
            assert (settings["protocol"], settings["task_type"], settings["rescale"]) == expected
        else:
            assert settings["protocol"] == "baseline" and settings["rescale"]


@pytest.mark.slow
@pytest.mark.parametrize("inputs", OWN_CODE_FAMILIES, indirect=True)
def test_check_parity_on_a_held_out_config(inputs, tmp_path):
    """A config no other test uses (3 decoder layers, tied head), random weights, as an fp32 release: our logits
    and cached decode match transformers' (`vlmr1 check-parity`)."""
    family = get_family(inputs.family)
    tokenizer = Tokenizer.load(inputs.tokenizer)
    overrides = {
        **tokenizer_token_ids(tokenizer, family.processor),
        "text.vocab_size": -(-tokenizer.vocab_size // 64) * 64,
        "text.num_hidden_layers": 3,
        "text.tie_word_embeddings": True,
    }
    cfg = family.with_overrides(family.get_preset("tiny"), overrides)
    model = family.model_class(cfg, rngs=nnx.Rngs(7))
    folder = export_release(
        nnx.state(model), cfg, tmp_path / "held_out", target="hf", dtype="fp32", tokenizer_dir=inputs.tokenizer
    )
    assert run_cli("check-parity", "--hf-model", folder, "--images", "2", "--steps", "2") == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_demo_completes_for_the_family(family, tmp_path, capsys):
    """`vlmr1 demo --family F` at a micro size: SFT, export, GRPO and both evaluations run to the result line."""
    code = run_cli(
        "demo", "--family", family, "--out", tmp_path, "--n-train", "16", "--n-eval", "4", "--n-ood", "2",
        "--sft-steps", "2", "--grpo-steps", "1", "--sft-batch", "4", "--grpo-prompts", "2", "--generations", "2",
        "--no-progress",
    )  # fmt: skip
    assert code == 0
    assert "demo: iou_sft=" in capsys.readouterr().out
    assert json.loads((tmp_path / "sft" / "hf" / "config.json").read_text())["architectures"] == list(
        get_family(family).architectures[:1]
    )
