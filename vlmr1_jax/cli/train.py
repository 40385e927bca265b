"""`vlmr1 train` (GRPO) and `vlmr1 sft`: a recipe (YAML path or packaged name) plus `section.key=value` overrides.

Running again on an output folder that holds checkpoints resumes exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlmr1_jax.config import load_config
from vlmr1_jax.rewards import reward_functions
from vlmr1_jax.train.profile import StepProfile, parse_steps


def _run(kind: str):
    def run(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        cfg = load_config(args.config, args.overrides)
        window = parse_steps(args.profile_steps)  # a bad window fails before the model is built
        if kind == "grpo":
            reward_functions(cfg.grpo.reward_funcs, cfg.grpo.reward_options)  # a bad reward or option fails here
            from vlmr1_jax.train.loop import GRPOTrainer as Trainer
        else:
            from vlmr1_jax.train.sft import SFTTrainer as Trainer  # type: ignore[assignment]
        trainer = Trainer.from_config(cfg, progress=not args.no_progress, resume_anyway=args.resume_anyway)
        if args.profile:
            trainer.profile = StepProfile(Path(args.profile), *window)
        if trainer.step >= trainer.max_steps:
            print(
                f"error: the run in {cfg.train.output_dir} already finished at step {trainer.step} (max steps "
                f"{trainer.max_steps}); raise train.max_steps to continue it, or start a new run with "
                f"train.output_dir=NEW_FOLDER",
                file=sys.stderr,
            )
            trainer.close()
            return 1
        summary = trainer.train()
        print(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        if trainer.stopped_by is not None:
            print(
                f"stopped by {trainer.stopped_by} after step {trainer.step}, checkpoint saved; run the same "
                f"command again to resume",
                file=sys.stderr,
            )
            return 130 if trainer.stopped_by == "SIGINT" else 0
        return 0

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, kind, text in (("train", "grpo", "GRPO training"), ("sft", "sft", "supervised fine-tuning")):
        p = subparsers.add_parser(name, help=f"{text} from a recipe", description=__doc__)
        p.add_argument("config", help="recipe: a YAML path or a packaged name (vlmr1_jax/configs/*.yaml)")
        p.add_argument(
            "overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10 optim.learning_rate=1e-5"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument(
            "--resume-anyway",
            action="store_true",
            help="resume the run in train.output_dir even though its stored configuration differs",
        )
        p.add_argument(
            "--profile",
            metavar="DIR",
            help="write a jax.profiler trace of the steps --profile-steps to DIR (TensorBoard / Perfetto)",
        )
        p.add_argument(
            "--profile-steps",
            default="2:3",
            metavar="N:M",
            help="first and last step to trace, counted from 1 (default 2:3: after step 1 compiled)",
        )
        p.set_defaults(func=_run(kind))
