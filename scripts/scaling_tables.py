"""Regenerate docs/scaling.md's fit tables: `vlmr1 plan` for the REC recipe at each model size, target and trainable
mode, one fresh process per plan (each simulates its own device count), JSON kept per plan so reruns only fill gaps.

    python scripts/scaling_tables.py                        # run missing plans, print the markdown
    python scripts/scaling_tables.py --write docs/scaling.md  # ... and replace the tables section there
    python scripts/scaling_tables.py --models 3b --targets v5p-8,8xh100 --timeout 1800
    python scripts/scaling_tables.py --no-run --write docs/scaling.md   # only re-render what is measured

A plan that has not been measured (not run yet, or over --timeout) is listed as "to regenerate".
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
MODELS = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b", "32b": "qwen2.5-vl-32b", "72b": "qwen2.5-vl-72b"}
TARGETS = {"v5p-8": (4, "v5p"), "v5p-64": (32, "v5p"), "8xh100": (8, "h100"), "8x910b": (8, "910b")}
MODES = {
    "full": ("rec_3b", []),
    "lora": ("rec_3b_lora", []),
    "freeze_vision": ("rec_3b", ["train.trainable=freeze_vision"]),
}
BEGIN, END = "<!-- scaling-tables:begin -->", "<!-- scaling-tables:end -->"


def plan_path(out: Path, model: str, target: str, mode: str) -> Path:
    return out / f"{model}_{target}_{mode}.json"


def run_plan(out: Path, model: str, target: str, mode: str, timeout: float) -> str:
    """Run one `vlmr1 plan`; returns "ok", "timeout" or "error"."""
    devices, kind = TARGETS[target]
    recipe, overrides = MODES[mode]
    path = plan_path(out, model, target, mode)
    cmd = [
        sys.executable,
        "-m",
        "vlmr1_jax.cli",
        "plan",
        recipe,
        f"model.preset={MODELS[model]}",
        *overrides,
        "--devices",
        str(devices),
        "--device-kind",
        kind,
        "--json",
        str(path),
    ]
    print(f"[{model} {target} {mode}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return "timeout"
    if result.returncode not in (0, 3):  # 3: measured, does not fit
        print(result.stderr[-2000:], file=sys.stderr)
        return "error"
    return "ok"


def row(data: dict | None, model: str, target: str, mode: str) -> str:
    label = f"| {model} | {mode} | {target} |"
    if data is None:
        return label + " to regenerate | | | | | |"
    largest = next(p for p in data["programs"] if p["name"] == data["largest_program"])
    compile_s = sum(p["lower_seconds"] + p["compile_seconds"] for p in data["programs"])
    verdict = "**fits**" if data["fits"] else "no"
    return (
        f"{label} {data['persistent_bytes'] / GIB:.1f} | {data['largest_program']} "
        f"{largest['extra_bytes'] / GIB:.1f} | {data['peak_bytes'] / GIB:.1f} | "
        f"{data['budget_bytes'] / GIB:.1f} | {verdict} | {compile_s:.0f} |"
    )


def markdown(out: Path, models: list[str], targets: list[str], modes: list[str]) -> str:
    lines = [
        "| model | trainable | target | state GiB/dev | largest program, extra GiB/dev | peak GiB/dev | "
        "budget GiB (90%) | fits | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for mode in modes:
            for target in targets:
                path = plan_path(out, model, target, mode)
                lines.append(row(json.loads(path.read_text()) if path.is_file() else None, model, target, mode))
    return "\n".join(lines)


def write_section(doc: Path, table: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} section to replace")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    doc.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--out", default=str(ROOT / "runs" / "scaling"), help="folder for the per-plan JSON")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per plan before it is skipped")
    parser.add_argument("--rerun", action="store_true", help="re-measure plans that already have a JSON")
    parser.add_argument("--no-run", action="store_true", help="only render the JSON already there")
    parser.add_argument("--write", help="replace the tables section of this markdown file (docs/scaling.md)")
    args = parser.parse_args()
    pick = lambda text: [x for x in text.split(",") if x]
    models, targets, modes = pick(args.models), pick(args.targets), pick(args.modes)
    for name, values, known in (("models", models, MODELS), ("targets", targets, TARGETS), ("modes", modes, MODES)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {', '.join(known)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_run:
        for model in models:
            for mode in modes:
                for target in targets:
                    if args.rerun or not plan_path(out, model, target, mode).is_file():
                        status = run_plan(out, model, target, mode, args.timeout)
                        print(f"[{model} {target} {mode}] {status}", file=sys.stderr, flush=True)
    table = markdown(out, models, targets, modes)
    print(table)
    if args.write:
        write_section(Path(args.write), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
