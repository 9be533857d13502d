#!/usr/bin/env bash
# Submit a compression job to a Ray head's job server, from the repository root, with the cluster's token.
# Usage: cluster/submit.sh --model default --out /abs/path/out --workers 2 [other qmoe.compress flags]
# --out should be an absolute path on the head node. The job runs the qmoe installed on the head (and its workers the
# qmoe installed on each node): no source is uploaded, so a job never mixes an uploaded copy with an installed one.
#
# Where: $RAY_API if set, else the head cluster/start-head.sh started from $QMOE_RAY_DIR (default
# /tmp/qmoe-ray-$(id -u); its head.env), else http://127.0.0.1:8265. Token: $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH
# if set, else that head's, else Ray's default ~/.ray/auth_token. The token travels in the request's Authorization
# header: to a head on another machine, only through an SSH tunnel (`ray dashboard cluster/gpu-cluster.yaml`) or
# a TLS proxy, never over the open network.
set -euo pipefail
dir="${QMOE_RAY_DIR:-/tmp/qmoe-ray-$(id -u)}"
api="${RAY_API:-}"
if [ -f "$dir/head.env" ]; then
    [ -n "$api" ] || api="$(sed -n 's/^RAY_API_SERVER_ADDRESS=//p' "$dir/head.env")"
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        token_path="$(sed -n 's/^RAY_AUTH_TOKEN_PATH=//p' "$dir/head.env")"
        if [ -n "$token_path" ]; then export RAY_AUTH_TOKEN_PATH="$token_path"; fi
    fi
fi
# RAY_API_SERVER_ADDRESS: Ray lets it (then RAY_ADDRESS, e.g. left over from a job) override --address.
export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS="${api:-http://127.0.0.1:8265}"
exec ray job submit --address "$RAY_API_SERVER_ADDRESS" \
    --runtime-env "$(dirname "$0")/runtime_env.yaml" -- python -m qmoe.compress "$@"
