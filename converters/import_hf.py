"""`vlmr1 import-hf`'s library side: an HF Qwen2.5-VL folder written as an import checkpoint of ours, streamed one
tensor at a time (the checkpoint `vlmr1_jax.train.restore` loads and `vlmr1 export` re-exports)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from converters.release import make_temp_sibling, move_into_place, write_weights
from vlmr1_jax.config import ModelConfig, RunConfig, TrainConfig, to_dict
from vlmr1_jax.models.family import family_of
from vlmr1_jax.models.hf_weights import folder_tensors, read_config
from vlmr1_jax.train.checkpoint import save_meta
from vlmr1_jax.train.restore import CHECKPOINTS, PARAMS
from vlmr1_jax.train.setup import dtype_of


def import_hf(model_dir: str | os.PathLike, out: str | os.PathLike, param_dtype: str = "float32") -> Path:
    """Write the HF Qwen2.5-VL folder `model_dir` as an import checkpoint of ours (`<out>/checkpoints/0`, kind
    "import"): its parameters only, in `param_dtype`, whose run config points at `model_dir` for the tokenizer.

    Streams one tensor at a time (read, cast, checksum, write), so peak host memory is about 2.5x the largest
    tensor plus a constant, whatever the model size. Names and shapes are checked against the config before
    anything is written; the folder appears in one rename when complete.
    """
    model_dir = Path(model_dir).absolute()
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder")
    dtype_of(param_dtype, "param_dtype")
    cfg = read_config(model_dir)
    tensors = folder_tensors(model_dir, cfg)  # names and shapes checked from the headers
    run = RunConfig(
        model=ModelConfig(preset=None, hf_model=str(model_dir), dtype=param_dtype, param_dtype=param_dtype),
        train=TrainConfig(output_dir=str(out), trainable="full"),
    )
    meta = {
        "run_config": to_dict(run),
        "model_config": dataclasses.asdict(cfg),
        "step": 0,
        "kind": "import",
        "source": str(model_dir),
    }
    tmp = make_temp_sibling(out)
    try:
        params = save_meta(tmp / CHECKPOINTS, 0, meta) / PARAMS
        params.mkdir()
        write_weights(tensors, cfg, params, param_dtype, checksums=True)
        (params / "config.json").write_text(json.dumps(family_of(cfg).to_hf_config(cfg, param_dtype), indent=2) + "\n")
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
