"""Generated vllm-ascend scripts: pinned images, the flags each card needs, shell / Python syntax, and
`vlmr1 deploy ascend` refusing a release of the wrong dtype; an NPU run behind the `npu` marker."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import warnings
from pathlib import Path

import pytest

from converters.release import export_hf_folder
from ports.ascend.scripts import PLATFORMS, DeploySpec, render_scripts
from tests.helpers.cli import run_cli
from tests.helpers.npu import require_npu
from tests.helpers.release import PROMPT

A2 = DeploySpec(PLATFORMS["a2"], "/data/releases/rec 3b", "bfloat16", "rec-3b", PLATFORMS["a2"].image)
DUO = DeploySpec(
    PLATFORMS["310p"],
    "/data/releases/rec-3b-fp16",
    "float16",
    "rec-3b-fp16",
    PLATFORMS["310p"].image,
    max_model_len=8192,
    devices=(0, 1),
)


def serve_args(script: str) -> list[str]:
    """The argument list of the `exec vllm serve ...` command of serve.sh."""
    command = script[script.index("exec vllm serve") :].replace("\\\n", " ")
    return shlex.split(command.splitlines()[0])


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def docker_args(script: str, tmp_path: Path, **env: str) -> list[str]:
    """The arguments docker_run.sh passes to `docker`, from running it with a stub `docker` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "docker").write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$ARGS_FILE"\n')
    (bin_dir / "docker").chmod(0o755)
    (tmp_path / "docker_run.sh").write_text(script)
    args_file = tmp_path / "docker_args"
    result = subprocess.run(
        ["bash", str(tmp_path / "docker_run.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_FILE": str(args_file), **env},
    )
    assert result.returncode == 0, result.stderr
    return args_file.read_text().split("\0")[:-1]


def llm_kwargs(source: str) -> dict:
    """Keyword arguments of the `LLM(...)` call in offline_inference.py, evaluated as literals."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "LLM":
            return {kw.arg: (ast.literal_eval(kw.value) if kw.arg != "model" else None) for kw in node.keywords}
    raise AssertionError("no LLM(...) call")


@pytest.fixture(scope="module")
def releases(release_source, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ascend")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        duo = export_hf_folder(release_source, root / "rec-fp16", target="ascend-310p")
    return {"310p": duo, "a2": export_hf_folder(release_source, root / "rec-bf16", target="ascend-a2")}


def test_310p_scripts_use_float16_eager_and_custom_ops(tmp_path):
    scripts = render_scripts(DUO)
    args = serve_args(scripts["serve.sh"])
    assert args[:3] == ["exec", "vllm", "serve"] and args[3] == "/models/rec-3b-fp16"
    assert flag(args, "--dtype") == "float16" and "--enforce-eager" in args
    assert json.loads(flag(args, "--compilation-config")) == {"custom_ops": ["none", "+rms_norm", "+rotary_embedding"]}
    assert flag(args, "--max-model-len") == "8192" and flag(args, "--tensor-parallel-size") == "2"
    assert flag(args, "--served-model-name") == "rec-3b-fp16"
    docker = scripts["docker_run.sh"]
    assert docker_args(docker, tmp_path)[-3:] == [
        "quay.io/ascend/vllm-ascend:v0.10.0rc1-310p",
        "bash",
        "/deploy/serve.sh",
    ]
    for device in ("/dev/davinci0", "/dev/davinci1", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"):
        assert f"--device {device} \\" in docker
    assert "--device /dev/davinci2" not in docker
    kwargs = llm_kwargs(scripts["offline_inference.py"])
    assert kwargs["dtype"] == "float16" and kwargs["enforce_eager"] is True and kwargs["max_model_len"] == 8192
    assert kwargs["compilation_config"] == {"custom_ops": ["none", "+rms_norm", "+rotary_embedding"]}
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["limit_mm_per_prompt"] == {"image": 10}


def test_a2_scripts_use_bfloat16_and_the_pinned_image(tmp_path):
    scripts = render_scripts(A2)
    args = serve_args(scripts["serve.sh"])
    assert flag(args, "--dtype") == "bfloat16" and flag(args, "--max-model-len") == "16384"
    assert "--enforce-eager" not in args and "--compilation-config" not in args
    assert flag(args, "--tensor-parallel-size") == "1" and flag(args, "--host") == "0.0.0.0"
    docker = scripts["docker_run.sh"]
    args = docker_args(docker, tmp_path)
    assert args[-3] == "quay.io/ascend/vllm-ascend:v0.13.0" and "/data/releases/rec 3b:/models/rec-3b:ro" in args
    # IMAGE / MODEL_DIR / PORT in the environment override the defaults
    args = docker_args(docker, tmp_path, IMAGE="my/image:1", MODEL_DIR="/other", PORT="9001")
    assert args[-3] == "my/image:1" and "/other:/models/rec-3b:ro" in args and "9001:9001" in args
    for mount in (
        "/usr/local/dcmi",
        "/usr/local/bin/npu-smi",
        "/usr/local/Ascend/driver/lib64/",
        "/usr/local/Ascend/driver/version.info",
        "/etc/ascend_install.info",
        "/root/.cache",
    ):
        assert f"-v {mount}:{mount} \\" in docker
    for env in ("PYTORCH_NPU_ALLOC_CONF=max_split_size_mb:256", "HCCL_OP_EXPANSION_MODE=AIV"):
        assert f"-e {env} \\" in docker
    assert '-v "$MODEL_DIR":/models/rec-3b:ro' in docker and '-p "$PORT":"$PORT"' in docker
    assert 'export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-max_split_size_mb:256}"' in scripts["serve.sh"]
    kwargs = llm_kwargs(scripts["offline_inference.py"])
    assert kwargs["dtype"] == "bfloat16" and kwargs["enforce_eager"] is False
    assert "compilation_config" not in kwargs


@pytest.mark.parametrize("spec", [A2, DUO], ids=["a2", "310p"])
def test_scripts_parse_and_never_trust_remote_code(spec, tmp_path):
    scripts = render_scripts(spec)
    for name, text in scripts.items():
        assert "--trust-remote-code" not in text.replace("No --trust-remote-code", ""), name
        assert "trust_remote_code" not in text, name
        path = tmp_path / name
        path.write_text(text)
        if name.endswith(".sh"):
            assert text.startswith("#!/usr/bin/env bash\n")
            result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert result.returncode == 0, (name, result.stderr)
        else:
            compile(text, name, "exec")


def test_spec_validation():
    with pytest.raises(ValueError, match="float16, not bfloat16"):
        DeploySpec(PLATFORMS["310p"], "/m", "bfloat16", "m", PLATFORMS["310p"].image)
    with pytest.raises(ValueError, match="served model name"):
        DeploySpec(PLATFORMS["a2"], "/m", "bfloat16", "my model", PLATFORMS["a2"].image)
    for image in ("x$(touch pwned)", "x`id`", 'x"', "x y", "x\nrm -rf /", "x;id", "", "-x", "x:"):
        with pytest.raises(ValueError, match=r"image .* is not a container image reference"):
            DeploySpec(PLATFORMS["a2"], "/m", "bfloat16", "m", image)
    for image in ("ubuntu", "localhost:5000/team/vllm-ascend:v0.10.0rc1", "quay.io/a/b@sha256:" + "0" * 64):
        assert DeploySpec(PLATFORMS["a2"], "/m", "bfloat16", "m", image).image == image


def test_any_model_folder_reaches_docker_verbatim(tmp_path):
    """Shell syntax in the model folder is passed on as text (shlex.quote), never run."""
    marker = tmp_path / "pwned"
    folder = f"/data/$(touch {marker}) `touch {marker}` \"q\" 'a' }} \\ $HOME\nline2"
    spec = DeploySpec(PLATFORMS["a2"], folder, "bfloat16", "m", PLATFORMS["a2"].image)
    assert f"{folder}:/models/m:ro" in docker_args(render_scripts(spec)["docker_run.sh"], tmp_path)
    assert not marker.exists()


def test_deploy_command(releases, tmp_path, capsys):
    out = tmp_path / "deploy"
    assert (
        run_cli(
            "deploy",
            "ascend",
            "--model",
            str(releases["310p"]),
            "--target",
            "310p",
            "--out",
            str(out),
            "--port",
            "9000",
        )
        == 0
    )
    assert "docker_run.sh" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["docker_run.sh", "offline_inference.py", "query.sh", "serve.sh"]
    assert all(os.access(out / n, os.X_OK) for n in ("docker_run.sh", "serve.sh", "query.sh"))
    args = docker_args((out / "docker_run.sh").read_text(), tmp_path / "run")
    assert f"{releases['310p']}:/models/rec-fp16:ro" in args and "9000:9000" in args
    assert flag(serve_args((out / "serve.sh").read_text()), "--served-model-name") == "rec-fp16"
    # A bf16 release is refused for the 300I Duo, naming the problem; existing scripts are not replaced.
    assert (
        run_cli("deploy", "ascend", "--model", str(releases["a2"]), "--target", "310p", "--out", str(tmp_path / "x"))
        == 1
    )
    err = capsys.readouterr().err
    assert "torch_dtype 'bfloat16' is not allowed for target ascend-310p" in err and "--target ascend-310p" in err
    assert not (tmp_path / "x").exists()
    assert run_cli("deploy", "ascend", "--model", str(releases["310p"]), "--target", "310p", "--out", str(out)) == 1
    assert "--overwrite" in capsys.readouterr().err
    # an image that is not an image reference (here: command substitution) is refused, nothing written
    assert (
        run_cli(
            "deploy",
            "ascend",
            "--model",
            str(releases["310p"]),
            "--target",
            "310p",
            "--out",
            str(tmp_path / "y"),
            "--image",
            "x$(touch pwned)",
        )
        == 1
    )
    assert "image 'x$(touch pwned)' is not a container image reference" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert (
        run_cli(
            "deploy",
            "ascend",
            "--model",
            str(releases["a2"]),
            "--target",
            "a2",
            "--out",
            str(out),
            "--overwrite",
            "--devices",
            "2",
            "3",
        )
        == 0
    )
    args = serve_args((out / "serve.sh").read_text())
    assert flag(args, "--dtype") == "bfloat16" and flag(args, "--tensor-parallel-size") == "2"
    assert "--device /dev/davinci3 \\" in (out / "docker_run.sh").read_text()


@pytest.mark.npu
def test_a2_release_generates_on_npu(releases):
    """On an Ascend host: the bf16 A2 release runs through the torch bridge on the NPU."""
    require_npu()
    from ports.torch_runtime import TorchRuntime

    runtime = TorchRuntime.load(releases["a2"], device="npu")
    assert runtime.device == "npu" and str(runtime.model.dtype) == "torch.bfloat16"
    assert len(runtime.generate_ids([], PROMPT, max_new_tokens=3)) >= 1
