#!/usr/bin/env bash
# Submit a compression job to the Ray head at $RAY_API (default http://127.0.0.1:8265), from the repository root.
# Usage: cluster/submit.sh --model default --out /abs/path/out --workers 2 [other qmoe.compress flags]
# --out should be an absolute path on the head node: the job runs in a temporary copy of the working directory.
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
cd "$(dirname "$0")/.."
exec ray job submit --address "${RAY_API:-http://127.0.0.1:8265}" --working-dir . \
    --runtime-env cluster/runtime_env.yaml -- python -m qmoe.compress "$@"
