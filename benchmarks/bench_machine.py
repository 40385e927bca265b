"""The machine's limits, measured with torch: fp32 and bf16 matmul peak (2048^3) and memory read bandwidth.

The other benchmarks measure these in the same run, so a floor (bytes / bandwidth, FLOPs / peak) and the times it
bounds come from the same load on the same machine.

    python -m benchmarks.bench_machine [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import record, set_torch_threads

MATMUL_N = 2048
READ_BYTES = 512 * 2**20  # well past every cache


def best_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up: a peak is what the machine can do, not its average."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_limits(repeats: int = 5) -> dict[str, float]:
    """fp32 / bf16 matmul GFLOP/s and memory read GB/s (a sum over a 512 MiB fp32 array)."""
    import torch

    set_torch_threads()
    limits = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
        b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
        seconds = best_seconds(lambda a=a, b=b: torch.mm(a, b), repeats)
        limits[f"{name}_matmul_gflops"] = round(2 * MATMUL_N**3 / seconds / 1e9, 1)
    data = torch.ones(READ_BYTES // 4, dtype=torch.float32)
    limits["read_gb_per_s"] = round(READ_BYTES / best_seconds(lambda: data.sum(), repeats) / 1e9, 2)
    return limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    record("machine", machine_limits(args.repeats))


if __name__ == "__main__":
    main()
