"""Ray clusters that qmoe starts are reachable from this machine only, and only with their token (issue 11, item 9):
the local Ray of `qmoe.workers.local_ray` and the head of `cluster/start-head.sh`. Every listening socket of every
process of the cluster is listed (psutil) and must be on loopback; clients without the token, or with a wrong one,
are refused by the GCS and by the HTTP servers (job server, dashboard agent)."""
import ipaddress
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


def _listening(procs) -> dict[str, set[str]]:
    """{process name (pid): {ip:port listening}} for the processes still running."""
    out = {}
    for p in procs:
        try:
            socks = {f"{c.laddr.ip}:{c.laddr.port}" for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
            out[f"{p.name()} ({p.pid})"] = socks
        except psutil.NoSuchProcess:
            continue
    return out


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is IPv4 loopback too


def _cluster_processes(temp_dir: Path, roots) -> list:
    """The roots, their descendants, and any process naming the cluster's directory on its command line."""
    procs = {p.pid: p for r in roots for p in [r] + r.children(recursive=True)}
    for p in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(p.info["cmdline"] or []):
            procs.setdefault(p.pid, p)
    return list(procs.values())


def _assert_loopback_only(procs, must_listen: set[int]):
    listening = _listening(procs)
    ports = {int(a.rsplit(":", 1)[1]) for socks in listening.values() for a in socks}
    assert must_listen <= ports, f"expected listeners on {must_listen}, found {listening}"
    exposed = {name: sorted(a for a in socks if not _is_loopback(a)) for name, socks in listening.items()}
    assert not any(exposed.values()), f"listening on a non-loopback address: {exposed}"
    # Not vacuous: the GCS, raylet and agents were all there and listening.
    names = " ".join(listening)
    for expected in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"):
        assert expected in names, f"no {expected} among {sorted(listening)}"


@ray.remote
class _Echo:
    def pid(self):
        return os.getpid()


@ray.remote
def _pid():
    return os.getpid()


def test_local_ray_listens_on_loopback_only_and_stops_only_itself(ray_head):
    from conftest import head_processes
    from qmoe.workers.local_ray import start_local_ray

    others = head_processes(ray_head[1])  # another Ray on this machine: it must survive our shutdown
    handle = start_local_ray(num_cpus=2)
    try:
        assert stat.S_IMODE(handle.temp_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(handle.token_path.stat().st_mode) == 0o600
        assert os.environ["RAY_AUTH_MODE"] == "token"
        # Workers and an actor start (each listens on a port of its own).
        actor = _Echo.remote()
        pids = ray.get([actor.pid.remote()] + [_pid.remote() for _ in range(2)])
        procs = _cluster_processes(handle.temp_dir, [psutil.Process()])
        assert set(pids) <= {p.pid for p in procs}
        gcs_port = int(handle.address.rsplit(":", 1)[1])
        _assert_loopback_only(procs, {gcs_port})
        del actor
    finally:
        ours = [p for p in _cluster_processes(handle.temp_dir, []) if p.pid != os.getpid()]
        handle.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=30)
    assert not alive, f"still running after shutdown: {alive}"
    assert not handle.temp_dir.exists() and "RAY_AUTH_MODE" not in os.environ and not ray.is_initialized()
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in others)


def test_head_listens_on_loopback_only(ray_head):
    from conftest import head_processes

    _, head_dir, ports = ray_head
    _assert_loopback_only(_cluster_processes(head_dir, head_processes(head_dir)), set(ports.values()))


_GCS_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    keys = GcsClient(address=sys.argv[1]).internal_kv_keys(b"", None, timeout=10)
    print("ACCEPTED", len(keys))
except Exception as e:
    print("REFUSED", type(e).__name__, e)
"""


def _probe_gcs(address: str, auth: dict, home: Path) -> str:
    """What a fresh process gets from the GCS at `address` with these auth variables (and an empty HOME, so no
    ~/.ray/auth_token of this machine's user is picked up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(auth, HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    r = subprocess.run([sys.executable, "-c", _GCS_PROBE, address], env=env, capture_output=True, text=True,
                       timeout=120)
    return r.stdout.strip()


def _http_status(url: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


WRONG = "0" * 64
NO_TOKEN = "REFUSED AuthenticationError RPC error: InvalidAuthToken: Authentication token is missing or incorrect"


def test_local_ray_refuses_clients_without_its_token(local_ray, tmp_path):
    right = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(local_ray.token_path)}
    assert _probe_gcs(local_ray.address, right, tmp_path).startswith("ACCEPTED")  # the probe can get in
    assert _probe_gcs(local_ray.address, {}, tmp_path).startswith(NO_TOKEN)
    assert _probe_gcs(local_ray.address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": WRONG},
                      tmp_path).startswith(NO_TOKEN)
    # The dashboard agent's HTTP server (its job routes run commands): 401 without a token, 403 with a wrong one.
    agent = f"http://127.0.0.1:{local_ray.dashboard_agent_port}/api/job_agent/jobs/x"
    assert _http_status(agent, None) == (401, "Unauthorized: Missing authentication token")
    assert _http_status(agent, WRONG) == (403, "Forbidden: Invalid authentication token")
    assert _http_status(agent, local_ray.token_path.read_text())[0] not in (401, 403)


def test_head_refuses_clients_and_jobs_without_its_token(ray_head, tmp_path):
    env, head_dir, ports = ray_head
    token_path = head_dir / "auth_token"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    address = f"127.0.0.1:{ports['gcs']}"
    right = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    assert _probe_gcs(address, right, tmp_path).startswith("ACCEPTED")
    assert _probe_gcs(address, {}, tmp_path).startswith(NO_TOKEN)
    assert _probe_gcs(address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": WRONG}, tmp_path).startswith(NO_TOKEN)
    api = f"http://127.0.0.1:{ports['dashboard']}"
    assert _http_status(f"{api}/api/jobs/", None) == (401, "Unauthorized: Missing authentication token")
    assert _http_status(f"{api}/api/jobs/", WRONG) == (403, "Forbidden: Invalid authentication token")
    assert _http_status(f"{api}/api/jobs/", token_path.read_text()) == (200, "")
    # `ray job submit` without the token: refused before anything runs.
    marker = tmp_path / "ran"
    clean = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    r = subprocess.run(["ray", "job", "submit", "--address", api, "--", "touch", str(marker)],
                       env=dict(clean, HOME=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert not marker.exists()
