"""`make test-scale`: the streaming converters on a full-size Qwen2.5-VL-3B, each step's peak host memory checked.

A random 3B (the `qwen2.5-vl-3b` preset, 3.75B parameters) is written as an HF bf16 checkpoint (7.5 GB, 4 shards)
into a temporary folder, then `vlmr1 import-hf` (fp32 parameters, 15 GB), `vlmr1 export HF_DIR --target
ascend-310p`, `vlmr1 export CHECKPOINT --target ascend-310p` and `vlmr1 check-export` run one after another, each
in its own process, and the folder is deleted. Each step must stay within

    baseline RSS (the process after imports) + K x the largest tensor (at the wider of its two dtypes) + SLACK

K = 3: a conversion holds one tensor as read, its cast copy and a boolean finiteness mask (at most 2.25x the
largest tensor at the wider dtype); SLACK is a fixed allowance for allocator arenas, thread pools and the
tokenizer that check_export loads. Whole-model conversions need 1.8x to 6x the checkpoint and fail the bound.

Needs about 40 GB of free disk and 8 GB of free memory; not part of CI (`make test` only runs the same checks on
a 330 MB model, tests/test_streaming.py). Usage: `python scripts/test_scale.py [--workdir DIR] [--keep]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

K = 3
SLACK = 256 * 2**20
MEASURE = "--measure"  # argv[1] of the measured child process


@dataclasses.dataclass(frozen=True)
class Measured:
    """One measured command: wall time, RSS after imports, peak RSS (bytes), exit status, output."""

    seconds: float
    baseline: int
    peak: int
    returncode: int
    output: str

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def random_tensors(cfg, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor of `cfg` in release order: N(0, 0.02), norm weights around 1."""
    from vlmr1_jax.models.qwen2_5_vl.params import expected_hf_shapes

    rng = np.random.default_rng(seed)
    for name, shape in expected_hf_shapes(cfg).items():
        value = rng.standard_normal(shape, dtype=np.float32)
        value *= 0.2 if "norm" in name or "ln_q" in name else 0.02
        if "norm" in name or "ln_q" in name:
            value += 1.0
        yield name, value


def random_hf_checkpoint(
    cfg, folder: Path, dtype: str = "bf16", max_shard_size: int | str = "2GB", seed: int = 0
) -> Path:
    """An HF Qwen2.5-VL folder of `cfg` with random weights (config.json + safetensors shards), written one
    tensor at a time; no tokenizer (exports then ship the vendored Qwen2.5 one)."""
    from converters.release import write_weights
    from vlmr1_jax.dtypes import canonical_dtype
    from vlmr1_jax.models.qwen2_5_vl.config import to_hf_config

    folder.mkdir(parents=True, exist_ok=True)
    write_weights(random_tensors(cfg, seed), cfg, folder, dtype, max_shard_size)
    (folder / "config.json").write_text(json.dumps(to_hf_config(cfg, canonical_dtype(dtype)), indent=2))
    return folder


def largest_tensor_bytes(cfg, itemsize: int) -> int:
    """Bytes of the largest tensor of `cfg` at `itemsize` bytes per value."""
    from vlmr1_jax.models.qwen2_5_vl.params import expected_hf_shapes

    return max(int(np.prod(shape, dtype=np.int64)) for shape in expected_hf_shapes(cfg).values()) * itemsize


def bound(cfg, itemsize: int, slack: int = SLACK) -> int:
    """Allowed growth over the baseline for a conversion whose wider dtype has `itemsize` bytes."""
    return K * largest_tensor_bytes(cfg, itemsize) + slack


def run_measured(argv: list[str], timeout: float = 3600) -> Measured:
    """Run `vlmr1 ARGV` in a fresh process that reports its RSS after imports and its peak RSS (VmHWM)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), MEASURE, *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"baseline"')]
    if not lines:
        raise RuntimeError(f"vlmr1 {' '.join(map(str, argv))} died (exit {proc.returncode}):\n{output[-3000:]}")
    report = json.loads(lines[-1])
    return Measured(seconds, report["baseline"], report["peak"], proc.returncode, output)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _measured_child(argv: list[str]) -> int:
    """The child of `run_measured`: import what the CLI needs, note the RSS, run the command, report."""
    import jax

    from vlmr1_jax.cli import build_parser

    # every module a conversion uses is loaded before the baseline
    for name in ("converters.check", "converters.release", "vlmr1_jax.processing.tokenizer", "vlmr1_jax.train.restore"):
        importlib.import_module(name)

    args = build_parser().parse_args(argv)
    jax.devices()
    baseline = _status_bytes("VmRSS")
    code = int(args.func(args) or 0)
    print(json.dumps({"baseline": baseline, "peak": _status_bytes("VmHWM")}), flush=True)
    return code


def _free_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs"), help="where the temporary folder goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    from vlmr1_jax.models.qwen2_5_vl.config import PRESETS

    cfg = PRESETS["qwen2.5-vl-3b"]
    gib = 2**30
    free_memory = _free_bytes("MemAvailable")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(args.workdir).free
    print(f"memory available {free_memory / gib:.1f} GiB, disk free {free_disk / gib:.1f} GiB in {args.workdir}")
    if free_memory < 8 * gib or free_disk < 40 * gib:
        print("test-scale needs 8 GiB of available memory and 40 GiB of free disk", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="test-scale-", dir=args.workdir))
    rows: list[tuple[str, Measured, int]] = []
    try:
        start = time.perf_counter()
        source = random_hf_checkpoint(cfg, work / "hf-bf16")
        size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        print(
            f"wrote a random 3B checkpoint: {size / 1e9:.2f} GB in {len(list(source.glob('*.safetensors')))} "
            f"shards, {time.perf_counter() - start:.0f} s"
        )
        steps = [
            ("import-hf (bf16 -> fp32)", ["import-hf", "--model", source, "--out", work / "imported"], 4),
            (
                "export HF folder -> 310p fp16",
                ["export", source, "--out", work / "release-hf", "--target", "ascend-310p"],
                2,
            ),
            (
                "export import ckpt -> 310p fp16",
                ["export", work / "imported", "--out", work / "release", "--target", "ascend-310p"],
                4,
            ),
            ("check-export", ["check-export", work / "release", "--target", "ascend-310p"], 2),
        ]
        for label, argv, itemsize in steps:
            measured = run_measured(argv)
            rows.append((label, measured, bound(cfg, itemsize)))
            print(
                f"{label}: exit {measured.returncode}, {measured.seconds:.0f} s, peak {measured.peak / gib:.2f} GiB",
                flush=True,
            )
            if measured.returncode != 0:
                print(measured.output[-3000:], file=sys.stderr)
                break
            if label.startswith("export HF"):
                shutil.rmtree(work / "release-hf")  # disk: keep one release at a time
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ncheckpoint {size / 1e9:.2f} GB (bf16); bound = baseline + {K} x largest tensor + {SLACK // 2**20} MiB")
    print("| step | seconds | baseline RSS | peak RSS | growth | allowed growth | ok |\n|---|---|---|---|---|---|---|")
    failed = False
    for label, m, allowed in rows:
        ok = m.returncode == 0 and m.growth <= allowed
        failed |= not ok
        print(
            f"| {label} | {m.seconds:.0f} | {m.baseline / gib:.2f} GiB | {m.peak / gib:.2f} GiB | "
            f"{m.growth / gib:.2f} GiB | {allowed / gib:.2f} GiB | {'yes' if ok else 'NO'} |"
        )
    return 1 if failed or len(rows) < 4 else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == MEASURE:
        sys.exit(_measured_child(sys.argv[2:]))
    sys.exit(main())
