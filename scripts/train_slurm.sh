#!/usr/bin/env bash
# Slurm GPU cluster: one task per GPU; jax.distributed.initialize() reads the SLURM_* variables.
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 scripts/train_slurm.sh rec_3b model.hf_model=...
#SBATCH --job-name=vlmr1-grpo
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail
recipe=${1:?usage: sbatch $0 RECIPE [section.key=value ...]}; shift
srun .venv/bin/vlmr1 train "$recipe" train.distributed=true "$@"
