#!/usr/bin/env bash
# TPU pod slice: the same command on all workers; jax.distributed.initialize() auto-detects the pod.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a scripts/train_tpu_pod.sh rec_3b model.hf_model=/gcs-fuse/Qwen2.5-VL-3B-Instruct
# Assumes the repository is checked out at the same path on every worker with `make install` done
# (pip install "jax[tpu]" replaces the CPU jaxlib there).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
recipe=${1:?usage: $0 RECIPE [section.key=value ...]}; shift
repo=${REPO_DIR:-$(pwd)}
args=$(printf ' %q' "$recipe" train.distributed=true "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command="cd $(printf %q "$repo") && .venv/bin/vlmr1 train$args"
