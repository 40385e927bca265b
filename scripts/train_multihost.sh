#!/usr/bin/env bash
# Generic multi-host launch: run this same command on every host (or process), one process per host / GPU.
#   COORDINATOR=host0:1234 NUM_PROCESSES=4 PROCESS_ID=<0..3> scripts/train_multihost.sh rec_3b model.hf_model=...
# All processes build the same global prompt batch; the mesh spans every device of every process.
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port (process 0's address)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID (0-based)}"
export COORDINATOR NUM_PROCESSES PROCESS_ID
recipe=${1:?usage: $0 RECIPE [section.key=value ...]}; shift
exec vlmr1 train "$recipe" train.distributed=true "$@"
