"""Render docker_run.sh, serve.sh, offline_inference.py and query.sh for serving a release with vllm-ascend.

Images and flags are the pinned ones (docs/facts.md: vllm-ascend): A2 on `vllm-ascend:v0.13.0` in bfloat16 (the last
line whose docs list Qwen2.5-VL with BF16; VLM-R1 itself used v0.10.0rc1, pass `image=` to pin that); 300I Duo
on `v0.10.0rc1-310p`, float16 only, eager mode only, with the 310P custom-op compilation config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"
SCRIPTS = {"docker_run.sh": True, "serve.sh": True, "offline_inference.py": False, "query.sh": True}  # executable?
CONTAINER_MODELS = "/models"
COMMON_ENV = (
    ("PYTORCH_NPU_ALLOC_CONF", "max_split_size_mb:256"),
    ("TASK_QUEUE_ENABLE", "1"),
    ("OMP_NUM_THREADS", "1"),
    ("OMP_PROC_BIND", "false"),
)
# A container image reference as docker parses it: [registry[:port]/]name[/name...][:tag][@algorithm:hex]
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(
    rf"(?:{_HOST}(?:\.{_HOST})*(?::[0-9]+)?/)?{_NAME}(?:/{_NAME})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


@dataclasses.dataclass(frozen=True)
class Platform:
    """One Ascend card family and the vllm-ascend image and flags that serve Qwen2.5-VL on it."""

    name: str
    title: str
    image: str
    dtypes: tuple[str, ...]  # torch dtypes the card runs (config.json torch_dtype)
    export_target: str  # `vlmr1 export --target` that produces a matching release
    enforce_eager: bool
    compilation_config: dict[str, Any] | None
    env: tuple[tuple[str, str], ...]


PLATFORMS: dict[str, Platform] = {
    "a2": Platform(
        name="a2",
        title="Atlas 800T A2 (Ascend 910B)",
        image="quay.io/ascend/vllm-ascend:v0.13.0",
        dtypes=("bfloat16", "float32"),
        export_target="ascend-a2",
        enforce_eager=False,
        compilation_config=None,
        env=COMMON_ENV + (("HCCL_OP_EXPANSION_MODE", "AIV"), ("VLLM_USE_V1", "1")),
    ),
    "310p": Platform(
        name="310p",
        title="Atlas 300I Duo (Ascend 310P)",
        image="quay.io/ascend/vllm-ascend:v0.10.0rc1-310p",
        dtypes=("float16",),
        export_target="ascend-310p",
        enforce_eager=True,
        compilation_config={"custom_ops": ["none", "+rms_norm", "+rotary_embedding"]},
        env=COMMON_ENV,
    ),
}


@dataclasses.dataclass(frozen=True)
class DeploySpec:
    """What the scripts serve and how."""

    platform: Platform
    model_dir: str  # the exported release on the host
    dtype: str  # torch dtype passed as --dtype
    served_model_name: str
    image: str
    max_model_len: int = 16384  # VLM-R1's value; the config's 128000 does not fit the KV cache
    port: int = 8000
    devices: tuple[int, ...] = (0,)
    max_images: int = 10

    def __post_init__(self) -> None:
        if self.dtype not in self.platform.dtypes:
            raise ValueError(
                f"{self.platform.title} runs {', '.join(self.platform.dtypes)}, not {self.dtype}; "
                f"export with `vlmr1 export --target {self.platform.export_target}`"
            )
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.served_model_name):
            raise ValueError(f"served model name {self.served_model_name!r}: use letters, digits, '.', '_', '-'")
        if not IMAGE_REFERENCE.fullmatch(self.image):
            raise ValueError(
                f"image {self.image!r} is not a container image reference such as "
                f"{self.platform.image} ([registry/]name[:tag][@sha256:digest])"
            )
        if not self.devices or self.max_model_len < 1 or not 0 < self.port < 65536:
            raise ValueError("need at least one device, a positive --max-model-len and a valid port")


def spec_for_release(
    model_dir: str | os.PathLike,
    platform: str,
    *,
    image: str | None = None,
    served_model_name: str | None = None,
    **options: Any,
) -> DeploySpec:
    """A DeploySpec for an exported release folder: --dtype from its config.json torch_dtype."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown Ascend platform {platform!r}; known: {sorted(PLATFORMS)}")
    folder = Path(model_dir).absolute()
    config_path = folder / "config.json"
    try:
        dtype = json.loads(config_path.read_text())["torch_dtype"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{config_path}: cannot read torch_dtype ({e})") from e
    p = PLATFORMS[platform]
    name = served_model_name or re.sub(r"[^A-Za-z0-9._-]", "-", folder.name)
    return DeploySpec(
        platform=p, model_dir=str(folder), dtype=dtype, served_model_name=name, image=image or p.image, **options
    )


def render_scripts(spec: DeploySpec) -> dict[str, str]:
    """File name -> text of every script; strings go into shell code through the `shell_quote` filter."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["shell_quote"] = shlex.quote
    p = spec.platform
    context = {
        "platform": p,
        "image": spec.image,
        "model_dir": spec.model_dir,
        "port": spec.port,
        "devices": list(spec.devices),
        "served_model_name": spec.served_model_name,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "tensor_parallel_size": len(spec.devices),
        "enforce_eager": p.enforce_eager,
        "max_images": spec.max_images,
        "env": p.env,
        "compilation_config": json.dumps(p.compilation_config) if p.compilation_config else "",
        "container": f"vllm-ascend-{spec.served_model_name}".lower(),
        "container_model_dir": f"{CONTAINER_MODELS}/{spec.served_model_name}",
        "dtype_note": (
            "float16 and --enforce-eager: the 310P series runs only eager mode and float16 (some ATB ops "
            "have no bf16 there)."
            if p.name == "310p"
            else f"{spec.dtype} on {p.title}."
        ),
    }
    return {name: env.get_template(f"{name}.j2").render(**context) for name in SCRIPTS}


def write_scripts(spec: DeploySpec, out_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Write the scripts into `out_dir` (shell scripts executable); refuses to replace files unless `overwrite`."""
    out = Path(out_dir)
    rendered = render_scripts(spec)
    clash = [name for name in rendered if (out / name).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{out}: {', '.join(clash)} already exist; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in rendered.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        if SCRIPTS[name]:
            path.chmod(0o755)
        paths.append(path)
    return paths
