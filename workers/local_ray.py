"""A Ray of this process's own: every listener on 127.0.0.1, token authentication on, its own temp dir and ports.

`ray.init()` with no address is not enough on a shared machine: it takes the machine's address even when given
127.0.0.1 (so its gRPC servers listen on every interface), and the dashboard agent (52365) and two metrics servers
(44217, 44227) use fixed ports that collide with another user's Ray. Here the head node is started directly with
node address 127.0.0.1 (the core servers then bind loopback only), every port picked free on 127.0.0.1, a temp dir
of its own (0700) and a fresh random token in it (RAY_AUTH_MODE=token; the token never goes to ~/.ray).
`LocalRay.shutdown()` stops exactly the processes this node started, nothing else on the machine. If this process
is killed instead, Ray's reaper kills the node's processes; the dashboard and runtime env agents follow once their
GCS client gives up (measured after a SIGKILL: all gone within 62 s).

    ray_handle = start_local_ray(num_cpus=4)
    try:
        ...  # ray.remote tasks and actors, as usual
    finally:
        ray_handle.shutdown()

`ray.init` exposes neither the bind address nor those ports, so this uses Ray internals, tested with Ray 2.60:
the head is a `ray._private.node.Node` built from `RayParams` (as `ray.init` and `ray.cluster_utils.Cluster`
build theirs), Ray's single-node switch (`ray_constants.ENABLE_RAY_CLUSTER`, env
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) is turned on while the node runs, and the auth settings Ray caches are reloaded
as Ray's own `ray.init` does when it turns token auth on.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Ports that Ray's child processes read from the environment at start (defaults 44227 and 44217: shared by every
# Ray on the machine otherwise).
_METRIC_PORT_VARS = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (held together while picked, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _set_cluster_mode(enabled: bool) -> bool:
    """Set Ray's multi-node mode for this process; returns the previous setting. Off is Ray's single-node mode
    (its default on macOS and Windows): 127.0.0.1 stays 127.0.0.1, where on Linux Ray replaces it by the machine's
    address everywhere (a node's address, the GCS address a driver connects to). Child processes read
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; this process has imported Ray already, so its copy of the
    constant is set here."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = enabled
    return before


def _refresh_auth_config() -> None:
    """Make this process's Ray read RAY_AUTH_MODE and the token again (both are cached once read)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class LocalRay:
    """A running local Ray started by `start_local_ray`; `shutdown()` stops it (idempotent)."""

    address: str  # GCS address, 127.0.0.1:port
    temp_dir: Path  # 0700 when start_local_ray made it; Ray's own files are in its subdirectory r/
    token_path: Path  # the cluster's token (0600, in temp_dir): what another client on this machine needs
    dashboard_agent_port: int  # the node's dashboard agent HTTP server (job routes; token required)
    _node: object = field(repr=False)
    _saved_env: dict = field(repr=False)
    _cluster_mode: bool = field(repr=False)  # Ray's multi-node mode before, restored at shutdown
    _own_dir: bool = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    def shutdown(self) -> None:
        """Disconnect this process and kill the node's processes (raylet and its workers, GCS, agents, reaper);
        restore the environment variables it set; remove the temp dir when `start_local_ray` made it."""
        if self._stopped:
            return
        self._stopped = True
        import ray

        try:
            ray.shutdown()
        finally:
            try:
                if self._node is not None:
                    self._node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            finally:
                _set_env(self._saved_env)
                _set_cluster_mode(self._cluster_mode)
                _refresh_auth_config()
                if self._own_dir:
                    shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRay":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_local_ray(num_cpus: int, temp_dir: str | None = None, **kw) -> LocalRay:
    """Start a single-node Ray for this process and connect to it.

    num_cpus: CPU slots of the node. temp_dir: an absolute directory for the token and (in r/) Ray's sessions,
    logs, sockets and spilled objects (kept at shutdown); default a new /tmp/qmoe-ray-* directory, 0700 (removed at
    shutdown); keep it short, Ray's Unix socket paths must stay under 108 bytes. kw: further node settings (`RayParams` fields: num_gpus,
    object_store_memory, resources, include_dashboard ...); the bind address, ports and temp dir are not
    overridable. Raises RuntimeError when this process is already connected to a Ray.
    """
    import ray
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    if ray.is_initialized():
        raise RuntimeError("this process is already connected to a Ray; start_local_ray starts its own")
    fixed = {"node_ip_address", "temp_dir", "gcs_server_port", "dashboard_host", "dashboard_port",
             "dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port",
             "ray_client_server_port", "node_manager_port", "object_manager_port", "min_worker_port",
             "max_worker_port", "worker_port_list"}
    if fixed & set(kw):
        raise ValueError(f"start_local_ray sets {sorted(fixed & set(kw))} itself")
    own_dir = temp_dir is None
    root = Path(tempfile.mkdtemp(prefix="qmoe-ray-", dir="/tmp") if own_dir else temp_dir)
    if not root.is_absolute():
        raise ValueError(f"temp_dir must be absolute, got {temp_dir!r}")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ray_dir = root / "r"  # Ray makes its temp dir world-writable (0777): inside root (0700), nobody else gets in
    token_path = root / "auth_token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))

    ports = _free_ports(7)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": str(token_path),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           **dict(zip(_METRIC_PORT_VARS, map(str, ports[5:7])))}
    saved = _set_env(env)  # the driver needs the token too; child processes inherit all of these
    cluster_mode = _set_cluster_mode(False)
    node = None
    try:
        _refresh_auth_config()
        params = RayParams(
            node_ip_address=LOOPBACK, num_cpus=num_cpus, temp_dir=str(ray_dir), gcs_server_port=ports[0],
            dashboard_host=LOOPBACK, dashboard_port=ports[1], include_dashboard=kw.pop("include_dashboard", False),
            dashboard_agent_listen_port=ports[2], metrics_agent_port=ports[3], metrics_export_port=ports[4],
            runtime_env_agent_port=None, node_manager_port=0, object_manager_port=0, min_worker_port=0,
            max_worker_port=0, **kw)
        params.update_if_absent(num_gpus=0)
        node = Node(params, head=True, shutdown_at_exit=False, spawn_reaper=True)
        ray.init(address=node.gcs_address, _temp_dir=str(ray_dir), log_to_driver=False)
    except BaseException:
        LocalRay("", root, token_path, ports[2], node, saved, cluster_mode, own_dir).shutdown()
        raise
    return LocalRay(node.gcs_address, root, token_path, ports[2], node, saved, cluster_mode, own_dir)


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) environment variables; returns their previous values, for _set_env to restore."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved
