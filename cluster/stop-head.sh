#!/usr/bin/env bash
# Stop the Ray head that cluster/start-head.sh started from $QMOE_RAY_DIR (default /tmp/qmoe-ray-$(id -u)), and
# nothing else: SIGTERM to its `ray start --block` process, which stops the head's own processes, then SIGKILL
# after 60 s. Unlike `ray stop`, other Rays on the machine (other users', tests', other heads) are left alone.
set -euo pipefail
dir="${QMOE_RAY_DIR:-/tmp/qmoe-ray-$(id -u)}"
if [ ! -f "$dir/head.pid" ]; then
    echo "no head.pid in $dir: no head started from there" >&2
    exit 1
fi
pid="$(cat "$dir/head.pid")"
if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "the head (pid $pid) did not stop within 60 s of SIGTERM: SIGKILL (its reaper stops the rest)" >&2
        kill -KILL "$pid"
    fi
fi
rm -f "$dir/head.pid" "$dir/head.env"
echo "stopped the head started from $dir"
