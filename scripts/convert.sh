#!/usr/bin/env bash
# Weights in and out:
#   scripts/convert.sh check  /ckpt/Qwen2.5-VL-3B-Instruct           # our JAX port vs transformers on it
#   scripts/convert.sh export runs/rec_3b/checkpoints release/ hf    # HF release folder (bf16)
#   scripts/convert.sh export runs/rec_3b/checkpoints release-310p/ ascend-310p
set -euo pipefail
case "${1:-}" in
  check)  vlmr1 check-parity --hf-model "${2:?HF folder}" ;;
  export) vlmr1 export "${2:?checkpoint or HF folder}" --out "${3:?output folder}" --target "${4:-hf}"
          vlmr1 check-export "$3" --target "${4:-hf}" ;;
  *) echo "usage: $0 check HF_DIR | export SOURCE OUT [hf|ascend-a2|ascend-310p]" >&2; exit 2 ;;
esac
