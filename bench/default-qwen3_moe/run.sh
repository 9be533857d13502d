#!/usr/bin/env bash
# The embedded Qwen3-MoE default compressed with each scheme and method (default settings: 512 calibration and
# 256 validation windows of 256 bytes); each run's summary.json is kept here as <scheme>-<method>.json.
# Usage: [SCHEMES="int4 ..."] bash bench/default-qwen3_moe/run.sh [WORK_DIR]   (outputs deleted after their summary is copied)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-out/bench-default-qwen3_moe}
for scheme in ${SCHEMES:-ternary ternary-g256 int2 int4 int4-sym}; do
  for method in gptq rtn; do
    python -m qmoe.compress --model default-qwen3_moe --out "$work/$scheme-$method" --scheme "$scheme" \
      --method "$method" --overwrite
    cp "$work/$scheme-$method/summary.json" "$here/$scheme-$method.json"
    rm -rf "${work:?}/$scheme-$method"
  done
done
