#!/usr/bin/env bash
# The GPU figures of this product, for any session lent a GPU (under 8 minutes); results land in $OUT.
#
# The GPU host has torch, onnxruntime and transformers but no registry and none of the serving dependencies, so
# they travel as wheels: run `make gpu-wheels` here once (they land in the git-ignored .whl/), then run this script
# there with the device tool: command `bash scripts/gpu_check.sh`, carry [".whl"]. Optional steps run on their own
# (each takes minutes): `bash scripts/gpu_check.sh --steps auto` (r=auto under a load ramp) or `--steps compile`
# (torch.compile against eager on AST-base).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
export PYTHONUNBUFFERED=1
timeout "${GPU_CHECK_TIMEOUT_S:-470}" python3 scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
