import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Every Ray the tests start is single-node on 127.0.0.1: without this, Ray (on Linux) replaces 127.0.0.1 by the
# machine's address, for a node's own address and for the address a driver connects to, and binds every interface.
# Set before any test module imports Ray (Ray reads it once, at import).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[1]

# `python -m pytest` puts the checkout's root first on sys.path, where the folders kernels/ and workers/ would stand
# in for Hugging Face's `kernels` (which transformers imports) and PyPI's `workers`. qmoe itself is imported as
# installed (qmoe.kernels, qmoe.codec, qmoe.workers), so the root is taken off the path before any test imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import make_hf_model, save_checkpoint  # noqa: E402


SIM_TEST = "test_cuda_kernel_in_simulator"


def pytest_collection_finish(session):
    """Start the CUDA simulator check (a subprocess of several minutes, one core) as soon as it is collected, so it
    runs beside the rest of the suite instead of after it; its test waits for it and checks its output."""
    if any(item.name == SIM_TEST for item in session.items):
        log = tempfile.NamedTemporaryFile(prefix="qmoe-sim-", suffix=".log", delete=False)
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cuda_sim_check.py")], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        session.config.stash[SIM_KEY] = (proc, Path(log.name))


def pytest_unconfigure(config):
    proc, log = config.stash.get(SIM_KEY, (None, None))
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)


SIM_KEY = pytest.StashKey[tuple]()


@pytest.fixture
def simulator_run(request) -> tuple[int, str]:
    """(exit status, output) of the CUDA simulator check started at collection."""
    proc, log = request.config.stash[SIM_KEY]
    rc = proc.wait(timeout=900)
    return rc, log.read_text()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random all-sparse, untied Switch checkpoint saved by transformers as sharded safetensors."""
    return save_checkpoint(make_hf_model("all_sparse_untied"), tmp_path_factory.mktemp("tiny") / "ckpt", "sharded")


@pytest.fixture(scope="session")
def tiny_mixed_bin(tmp_path_factory) -> Path:
    """Dense and sparse blocks mixed, tied embeddings, torch .bin shards with an index."""
    return save_checkpoint(make_hf_model("mixed", seed=1), tmp_path_factory.mktemp("tinybin") / "ckpt", "bin")


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def head_processes(head_dir: Path) -> list:
    """psutil processes of the head cluster/start-head.sh started from head_dir: its `ray start --block` process
    and every descendant."""
    import psutil

    root = psutil.Process(int((head_dir / "head.pid").read_text()))
    return [root] + root.children(recursive=True)


@pytest.fixture(scope="session")
def ray_head():
    """A head started by cluster/start-head.sh in its own directory, on free ports, with its own token; stopped
    by cluster/stop-head.sh (only its own processes: other Rays on the machine are left alone).
    Yields (environment for the scripts and `ray` CLI, head directory, {"gcs", "dashboard", "client"} ports)."""
    import psutil

    head_dir = Path(tempfile.mkdtemp(prefix="qh-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard, client = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(QMOE_RAY_DIR=str(head_dir), QMOE_RAY_PORT=str(gcs), QMOE_DASHBOARD_PORT=str(dashboard),
               QMOE_CLIENT_PORT=str(client))
    r = subprocess.run(["bash", str(ROOT / "cluster" / "start-head.sh"), "--num-cpus", "3"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    procs = head_processes(head_dir)
    try:
        yield env, head_dir, {"gcs": gcs, "dashboard": dashboard, "client": client}
    finally:
        procs = [p for p in procs + head_processes(head_dir) if p.is_running()]
        r = subprocess.run(["bash", str(ROOT / "cluster" / "stop-head.sh")], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"head processes still running after stop-head.sh: {alive}"
        shutil.rmtree(head_dir, ignore_errors=True)


@pytest.fixture
def local_ray():
    """A Ray of this test process's own (qmoe.workers.local_ray): 127.0.0.1 only, token auth, own temp dir and ports;
    shut down after the test, stopping only its own processes."""
    from qmoe.workers.local_ray import start_local_ray

    handle = start_local_ray(num_cpus=2)
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture
def fail_reading(monkeypatch):
    """fail_reading(block, j, nth=1): a worker's nth read of expert j of `block` (in this process) raises
    CheckpointError("simulated read failure"); returns a function that puts the real reader back."""
    import qmoe.compression.steps as steps
    from qmoe.checkpoint import CheckpointError

    real = steps.Worker._expert

    def arm(block: str, j: int, nth: int = 1):
        reads = []

        def flaky(self, b, k):
            reads.append((b, k))
            if (b, k) == (block, j) and reads.count((b, k)) == nth:
                raise CheckpointError("x", b, "simulated read failure")
            return real(self, b, k)

        monkeypatch.setattr(steps.Worker, "_expert", flaky)
        return lambda: monkeypatch.setattr(steps.Worker, "_expert", real)
    return arm
