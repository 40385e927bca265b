"""The benchmark table: the newest result of each benchmark and config in benchmarks/results/*.jsonl as markdown,
printed and written to benchmarks/results/table.md (what docs/benchmarks.md shows).

    python -m benchmarks.table
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.common import RESULTS


def newest() -> dict[tuple[str, str], dict[str, Any]]:
    """{(benchmark, config): its last recorded line}."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(RESULTS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                found[entry["benchmark"], entry.get("config", "-")] = entry
    return found


def table(results: dict[tuple[str, str], dict[str, Any]]) -> str:
    rows = ["| config | what | ours | baseline | ratio (baseline / ours) |", "|---|---|---|---|---|"]
    for (bench, config), r in sorted(results.items()):
        if bench == "machine":
            rows.append(
                f"| - | machine (torch) | fp32 {r['fp32_matmul_gflops']} GFLOP/s, bf16 {r['bf16_matmul_gflops']} "
                f"GFLOP/s, read {r['read_gb_per_s']} GB/s | | |"
            )
        elif bench == "sampler":
            o = r["ours"]
            for mode, label in (("hf_repeat", "rows repeated G times"), ("hf_nrs", "num_return_sequences=G")):
                h = r[mode]
                rows.append(
                    f"| {config} | sampler vs HF generate, {label} | {o['seconds']} s, {o['tokens_per_s']} tok/s | "
                    f"{h['seconds']} s, {h['tokens_per_s']} tok/s | **{h['seconds'] / o['seconds']:.2f}x** |"
                )
            lim = r["limits"]
            rows.append(
                f"| {config} | decode step; floor {r['floor_ms']} ms = max({r['floor_bytes_mb']} MB at "
                f"{lim['read_gb_per_s']} GB/s, {r['floor_gflop']} GFLOP at {lim['fp32_matmul_gflops']} GFLOP/s; bf16 "
                f"{lim['bf16_matmul_gflops']} GFLOP/s), same run | {o['decode_step_ms']} ms = "
                f"{o['decode_vs_floor']}x floor | HF {r['hf_repeat']['decode_step_ms']} ms = "
                f"{r['hf_repeat']['decode_vs_floor']}x floor | |"
            )
            if "decode_matmuls_only_ms" in r:  # lines written before these were measured lack them
                m, b = r["decode_matmuls_only_ms"], r["ours_bf16"]
                rows.append(
                    f"| {config} | decode step: its matrix products alone (same rows) | XLA fp32 {m['xla']} ms, "
                    f"bf16 {m.get('xla_bf16', '-')} ms | torch fp32 {m['torch']} ms | |"
                )
                rows.append(
                    f"| {config} | our sampler computing in bf16 | {b['seconds']} s, decode step "
                    f"{b['decode_step_ms']} ms | fp32 {o['seconds']} s | {o['seconds'] / b['seconds']:.2f}x |"
                )
        elif bench == "step":
            o, t = r["ours"], r["trl"]
            rows.append(
                f"| {config} | GRPO step vs TRL GRPOTrainer | {o['step']} s (sample {o['sample']}, reference "
                f"{o['reference']}, train {o['train']}) | {t['step']} s | **{r['speedup']:.2f}x** |"
            )
            rows.append(
                f"| {config} | first step (compile) | {o['first_step']} s (fresh process: cold cache "
                f"{o['first_step_cold_cache_process']} s, warm cache {o['first_step_warm_cache_process']} s) | "
                f"{t['first_step']} s | {t['first_step'] / o['first_step']:.2f}x |"
            )
            if "ours_bf16" in r:  # lines written before the bf16 run was added lack it
                b = r["ours_bf16"]
                rows.append(
                    f"| {config} | our GRPO step computing in bf16 vs fp32 | {b['step']} s (sample {b['sample']}, "
                    f"reference {b['reference']}) | fp32 {o['step']} s | **{r['bf16_speedup']:.2f}x** |"
                )
        elif bench == "scaling":
            groups = r["groups"]
            cells = ", ".join(
                f"G={g}: {v['step']} s ({v['sample']} + {v['reference']} + {v['train']})" for g, v in groups.items()
            )
            rows.append(f"| {config} | step at G (sample + reference + train) | {cells} | | |")
    loads = sorted({tuple(r["load_average"]) for r in results.values()})
    dates = sorted(r["date"] for r in results.values())
    any_result = next(iter(results.values()), {})
    header = (
        f"Measured {dates[0]} .. {dates[-1]} on {any_result.get('machine', '?')}; load averages (1, 5, 15 min) "
        f"{', '.join(map(str, loads))}; {json.dumps(any_result.get('versions', {}))}\n\n"
        if results
        else ""
    )
    return header + "\n".join(rows) + "\n"


def main() -> None:
    text = table(newest())
    (RESULTS / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
