"""`vlmr1 export`'s library side: a release folder from an HF folder (re-export) or from one of our checkpoints
(merged LoRA, or the base plus a PEFT adapter)."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from converters.peft import export_peft_adapter
from converters.release import export_hf_folder, export_release
from vlmr1_jax.config import RunConfig
from vlmr1_jax.filenames import CONFIG_FILE
from vlmr1_jax.train.restore import (
    checkpoint_meta,
    find_checkpoint,
    imported_params,
    load_checkpoint,
    restore_for_export,
    run_config_from_dict,
)

ADAPTER_DIR = "adapter"  # `--lora adapter`: the PEFT adapter folder inside the release


def _checkpoint_card(meta: dict, run: RunConfig) -> dict:
    """Model-card fields a training checkpoint knows: base model, data files, rewards, steps."""
    card = {"steps": meta.get("step")}
    if run.model.hf_model:
        card["base_model"] = Path(run.model.hf_model).name
    if run.data.data_file_paths:
        card["datasets"] = [Path(p).stem for p in run.data.data_file_paths.split(":")]
    if meta.get("kind") == "grpo":
        card["rewards"] = list(run.grpo.reward_funcs)
    return card


def export_checkpoint(
    source: Path,
    out: str,
    *,
    lora: str | None = None,
    step: int | None = None,
    tokenizer_dir: str | None = None,
    card: dict | None = None,
    **options,
) -> Path:
    """Export one of our checkpoints. LoRA runs are merged by default (`lora="merge"`); with `lora="adapter"` the
    release holds the base weights (adapters left out) and `OUT/adapter` the PEFT adapter. An import checkpoint
    is streamed from its files (one tensor on the host); a training checkpoint is restored whole first."""
    meta = checkpoint_meta(source, step)
    run = run_config_from_dict(meta["run_config"])
    base = run.model.hf_model if run.model.hf_model and Path(run.model.hf_model).is_dir() else None
    card = {**_checkpoint_card(meta, run), **(card or {})}
    params_dir = imported_params(source, step) if meta["kind"] == "import" and lora != "adapter" else None
    if params_dir is not None:
        return export_hf_folder(
            params_dir,
            out,
            base_model_dir=base,
            card=card,
            tokenizer_dir=tokenizer_dir or run.model.tokenizer,
            **options,
        )
    if lora == "adapter":
        if run.train.trainable != "lora":
            raise ValueError(
                f"{source}: --lora adapter needs a LoRA run, but train.trainable is {run.train.trainable!r}"
            )
        model, _, run_tokenizer = load_checkpoint(source, step)
        params, cfg = nnx.state(model, nnx.Param), model.cfg  # the base: LoRAParams are not Params
    else:
        params, cfg, run_tokenizer = restore_for_export(source, step)
    release = export_release(
        params, cfg, out, tokenizer_dir=tokenizer_dir or run_tokenizer, base_model_dir=base, card=card, **options
    )
    if lora == "adapter":
        export_peft_adapter(
            model,
            cfg,
            release / ADAPTER_DIR,
            run.lora.rank,
            run.lora.alpha,
            run.lora.dropout,
            base_model_name_or_path=str(release),
        )
    return release


def export_source(source: Path, out: str, *, lora: str | None = None, step: int | None = None, **options) -> Path:
    """Export SOURCE: an HF folder (re-export / dtype conversion) or one of our training checkpoints (a run
    folder, its `checkpoints` folder or a step folder)."""
    if (source / CONFIG_FILE).is_file():
        if lora is not None or step is not None:
            raise ValueError(f"{source}: --lora and --step apply to training checkpoints, not HF folders")
        return export_hf_folder(source, out, **options)
    if find_checkpoint(source) is not None:
        return export_checkpoint(source, out, lora=lora, step=step, **options)
    raise ValueError(
        f"{source}: neither an HF Qwen2.5-VL folder (no config.json) nor a vlmr1-jax checkpoint "
        f"(no checkpoints/<step>/)"
    )
