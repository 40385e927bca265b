"""Generated vllm-ascend scripts: pinned images, the flags each card needs, shell / Python syntax, and
`vlmr1 deploy ascend` refusing a release of the wrong dtype; an NPU run behind the `npu` marker."""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import subprocess
import warnings
from pathlib import Path

import pytest

from converters.release import export_hf_folder
from ports import cli as ports_cli
from ports.ascend.scripts import PLATFORMS, DeploySpec, render_scripts
from test_export import PROMPT, make_release_source
from test_torch_runtime import require_npu

A2 = DeploySpec(PLATFORMS["a2"], "/data/releases/rec 3b", "bfloat16", "rec-3b", PLATFORMS["a2"].image)
DUO = DeploySpec(PLATFORMS["310p"], "/data/releases/rec-3b-fp16", "float16", "rec-3b-fp16",
                 PLATFORMS["310p"].image, max_model_len=8192, devices=(0, 1))


def serve_args(script: str) -> list[str]:
    """The argument list of the `exec vllm serve ...` command of serve.sh."""
    command = script[script.index("exec vllm serve"):].replace("\\\n", " ")
    return shlex.split(command.splitlines()[0])


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def llm_kwargs(source: str) -> dict:
    """Keyword arguments of the `LLM(...)` call in offline_inference.py, evaluated as literals."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "LLM":
            return {kw.arg: (ast.literal_eval(kw.value) if kw.arg != "model" else None) for kw in node.keywords}
    raise AssertionError("no LLM(...) call")


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ascend")
    source = make_release_source(root / "source", seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        duo = export_hf_folder(source, root / "rec-fp16", target="ascend-310p")
    return {"310p": duo, "a2": export_hf_folder(source, root / "rec-bf16", target="ascend-a2")}


def test_310p_scripts_use_float16_eager_and_custom_ops():
    scripts = render_scripts(DUO)
    args = serve_args(scripts["serve.sh"])
    assert args[:3] == ["exec", "vllm", "serve"] and args[3] == "/models/rec-3b-fp16"
    assert flag(args, "--dtype") == "float16" and "--enforce-eager" in args
    assert json.loads(flag(args, "--compilation-config")) == {"custom_ops": ["none", "+rms_norm",
                                                                              "+rotary_embedding"]}
    assert flag(args, "--max-model-len") == "8192" and flag(args, "--tensor-parallel-size") == "2"
    assert flag(args, "--served-model-name") == "rec-3b-fp16"
    docker = scripts["docker_run.sh"]
    assert 'IMAGE="${IMAGE:-quay.io/ascend/vllm-ascend:v0.10.0rc1-310p}"' in docker
    for device in ("/dev/davinci0", "/dev/davinci1", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"):
        assert f"--device {device} \\" in docker
    assert "--device /dev/davinci2" not in docker
    kwargs = llm_kwargs(scripts["offline_inference.py"])
    assert kwargs["dtype"] == "float16" and kwargs["enforce_eager"] is True and kwargs["max_model_len"] == 8192
    assert kwargs["compilation_config"] == {"custom_ops": ["none", "+rms_norm", "+rotary_embedding"]}
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["limit_mm_per_prompt"] == {"image": 10}


def test_a2_scripts_use_bfloat16_and_the_pinned_image():
    scripts = render_scripts(A2)
    args = serve_args(scripts["serve.sh"])
    assert flag(args, "--dtype") == "bfloat16" and flag(args, "--max-model-len") == "16384"
    assert "--enforce-eager" not in args and "--compilation-config" not in args
    assert flag(args, "--tensor-parallel-size") == "1" and flag(args, "--host") == "0.0.0.0"
    docker = scripts["docker_run.sh"]
    assert 'IMAGE="${IMAGE:-quay.io/ascend/vllm-ascend:v0.13.0}"' in docker
    assert 'MODEL_DIR="${MODEL_DIR:-/data/releases/rec 3b}"' in docker
    for mount in ("/usr/local/dcmi", "/usr/local/bin/npu-smi", "/usr/local/Ascend/driver/lib64/",
                  "/usr/local/Ascend/driver/version.info", "/etc/ascend_install.info", "/root/.cache"):
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
    with pytest.raises(ValueError, match="quotes"):
        DeploySpec(PLATFORMS["a2"], '/m/"x"', "bfloat16", "m", PLATFORMS["a2"].image)


def test_deploy_command(releases, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ports_cli.register(parser.add_subparsers(dest="command"))
    run = lambda *argv: (lambda a: a.func(a))(parser.parse_args(list(argv)))  # noqa: E731
    out = tmp_path / "deploy"
    assert run("deploy", "ascend", "--model", str(releases["310p"]), "--target", "310p", "--out", str(out),
               "--port", "9000") == 0
    assert "docker_run.sh" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["docker_run.sh", "offline_inference.py", "query.sh",
                                                     "serve.sh"]
    assert all(os.access(out / n, os.X_OK) for n in ("docker_run.sh", "serve.sh", "query.sh"))
    docker = (out / "docker_run.sh").read_text()
    assert f'MODEL_DIR="${{MODEL_DIR:-{releases["310p"]}}}"' in docker and 'PORT="${PORT:-9000}"' in docker
    assert flag(serve_args((out / "serve.sh").read_text()), "--served-model-name") == "rec-fp16"
    # A bf16 release is refused for the 300I Duo, naming the problem; existing scripts are not replaced.
    assert run("deploy", "ascend", "--model", str(releases["a2"]), "--target", "310p", "--out",
               str(tmp_path / "x")) == 1
    err = capsys.readouterr().err
    assert "torch_dtype 'bfloat16' is not allowed for target ascend-310p" in err and "--target ascend-310p" in err
    assert not (tmp_path / "x").exists()
    assert run("deploy", "ascend", "--model", str(releases["310p"]), "--target", "310p", "--out", str(out)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run("deploy", "ascend", "--model", str(releases["a2"]), "--target", "a2", "--out", str(out),
               "--overwrite", "--devices", "2", "3") == 0
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

