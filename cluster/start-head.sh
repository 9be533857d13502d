#!/usr/bin/env bash
# Start a Ray head on this machine: GCS on 127.0.0.1:6379, dashboard and job server on http://127.0.0.1:8265
# (bound to localhost only). Extra arguments go to `ray start` (e.g. --num-cpus 4, --num-gpus 1).
# Stop it with `ray stop`.
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # a localhost-only head; see README for clusters
exec ray start --head --node-ip-address 127.0.0.1 --port 6379 \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port 8265 "$@"
