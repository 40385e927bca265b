#!/usr/bin/env bash
# Export for Ascend and write the vllm-ascend launch scripts (docs/deploy-ascend.md explains each step).
#   scripts/deploy_ascend.sh runs/rec_3b/checkpoints a2     # Atlas 800T A2, bf16
#   scripts/deploy_ascend.sh runs/rec_3b/checkpoints 310p   # Atlas 300I Duo, float16
set -euo pipefail
source=${1:?checkpoint or HF folder}; target=${2:?a2 or 310p}
release=${3:-release-ascend-$target}
vlmr1 export "$source" --out "$release" --target "ascend-$target"
vlmr1 check-export "$release" --target "ascend-$target"
vlmr1 deploy ascend --model "$release" --target "$target" --out "$release-deploy"
echo "next: copy $release and $release-deploy to the Ascend host, then run $release-deploy/docker_run.sh"
