#!/usr/bin/env bash
# Start a Ray head that only this machine can reach, with token authentication on.
#
# Every Ray process listens on 127.0.0.1 only (GCS, raylet, Ray Client server, dashboard and job server, agents,
# metrics); every request needs the cluster's token (RAY_AUTH_MODE=token). Ray treats `--node-ip-address
# 127.0.0.1` as "this machine's address" on Linux and then binds every interface, unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (single-node mode), set here.
#
# Usage: cluster/start-head.sh [ray start flags, e.g. --num-cpus 4 --num-gpus 1]
# Environment (all optional):
#   QMOE_RAY_DIR        the head's own directory (0700): head.pid, head.env, head.log, auth_token, and Ray's
#                       sessions and logs in r/ (default /tmp/qmoe-ray-$(id -u); keep it short: Ray's socket
#                       paths must fit 107 bytes)
#   QMOE_RAY_PORT       GCS port (default 6379); QMOE_DASHBOARD_PORT: dashboard and job server (default 8265);
#                       QMOE_CLIENT_PORT: Ray Client server (default 10001). Every other port is picked free.
#   RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN   the token to use; default $QMOE_RAY_DIR/auth_token, made if missing.
# Stop it with cluster/stop-head.sh (this head only). Never `ray stop`: it stops every Ray on the machine.
set -euo pipefail
dir="${QMOE_RAY_DIR:-/tmp/qmoe-ray-$(id -u)}"
case "$dir" in /*) ;; *) echo "QMOE_RAY_DIR must be an absolute path, got $dir" >&2; exit 2 ;; esac
if [ -f "$dir/head.pid" ] && kill -0 "$(cat "$dir/head.pid")" 2>/dev/null; then
    echo "a head started from $dir is already running (pid $(cat "$dir/head.pid")); cluster/stop-head.sh stops it" >&2
    exit 1
fi
mkdir -p -m 700 "$dir"
chmod 700 "$dir"

export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    export RAY_AUTH_TOKEN_PATH="$dir/auth_token"
    if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
        (umask 077 && python -c "import secrets; print(secrets.token_hex(32), end='')" > "$RAY_AUTH_TOKEN_PATH")
    fi
fi

# Free ports for everything Ray would otherwise put on fixed, machine-wide ports (52365, 44217, 44227) or that
# need fixing to be known: dashboard agent HTTP and gRPC, runtime env agent, metrics, and the two metric servers.
read -r agent_http agent_grpc runtime_env metrics dash_metrics autoscaler_metrics < <(python - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
export DASHBOARD_METRIC_PORT="$dash_metrics" AUTOSCALER_METRIC_PORT="$autoscaler_metrics"
port="${QMOE_RAY_PORT:-6379}" dashboard="${QMOE_DASHBOARD_PORT:-8265}" client="${QMOE_CLIENT_PORT:-10001}"

# --block keeps `ray start` as the parent of the head's processes: SIGTERM to it (stop-head.sh) stops exactly them.
# Ray makes its temp dir world-writable (0777): it gets a subdirectory of $dir (0700), so nobody else gets in.
nohup ray start --head --block --temp-dir "$dir/r" --node-ip-address 127.0.0.1 --port "$port" \
    --ray-client-server-port "$client" --include-dashboard true --dashboard-host 127.0.0.1 \
    --dashboard-port "$dashboard" --dashboard-agent-listen-port "$agent_http" \
    --dashboard-agent-grpc-port "$agent_grpc" --runtime-env-agent-port "$runtime_env" \
    --metrics-export-port "$metrics" "$@" > "$dir/head.log" 2>&1 < /dev/null &
echo $! > "$dir/head.pid"
# What a client on this machine needs (cluster/submit.sh reads it; `set -a; . head.env; set +a` gives a shell the
# `ray` CLI against this head): no secret in it, only where the token is.
cat > "$dir/head.env" <<EOF
RAY_ADDRESS=127.0.0.1:$port
RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard
RAY_AUTH_MODE=token
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
${RAY_AUTH_TOKEN_PATH:+RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}
EOF

# Ready when the job server answers an authenticated request.
python - "$dashboard" "$(cat "$dir/head.pid")" "$dir/head.log" <<'EOF'
import os, sys, time, urllib.request
port, pid, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
token = os.environ.get("RAY_AUTH_TOKEN") or open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/version", headers={"Authorization": f"Bearer {token}"})
deadline = time.time() + 180
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"ray start exited; its log ({log}) ends:\n" + open(log).read()[-3000:])
    try:
        with urllib.request.urlopen(req, timeout=5):
            sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(f"the head did not answer on 127.0.0.1:{port} within 180 s; see {log}")
EOF
echo "Ray head on 127.0.0.1:$port (dashboard and job server http://127.0.0.1:$dashboard), token auth on;"
echo "directory $dir (log head.log, client settings head.env); stop it with cluster/stop-head.sh"
