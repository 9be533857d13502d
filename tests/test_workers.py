"""Compression on a real local Ray cluster (ray.cluster_utils.Cluster, several nodes, some declaring a GPU so the
GPU scheduling path is taken without a GPU): output byte-identical to the single-process run, a killed worker, a
removed node, and --resume after the driver is killed."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from qmoe.compressor import CompressConfig, DataSpec, compress_model  # noqa: E402

SPEC = DataSpec(train_samples=16, val_samples=4, seed=0)
ROOT = Path(__file__).resolve().parents[1]


def _expert_bytes(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((d / "experts").iterdir())}


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "o"
    compress_model(tiny_ckpt, out, CompressConfig(), SPEC, progress=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A head with 2 CPUs and three worker nodes of 1 CPU; two of them declare one GPU each."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                      "object_store_memory": 150 << 20})
    nodes = [c.add_node(num_cpus=1, num_gpus=g, object_store_memory=100 << 20) for g in (1, 1, 0)]
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_pool_output_equals_single_process(cluster, tiny_ckpt, reference, tmp_path):
    assert ray.cluster_resources()["GPU"] == 2  # the pool asks for GPUs: one worker per GPU node
    s = compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None, workers=2)
    assert _expert_bytes(tmp_path / "o") == _expert_bytes(reference)
    assert s["val_loss_after"] == json.loads((reference / "summary.json").read_text())["val_loss_after"]
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["complete"]


def test_a_killed_worker_is_replaced_and_its_task_retried(cluster, tiny_ckpt, reference, tmp_path):
    marker = tmp_path / "kill-once"
    marker.write_text("")  # the first expert task to see it deletes it and kills its own process
    compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(group_size=2), SPEC, progress=lambda *_: None,
                   workers=2, fail_marker=str(marker))
    assert not marker.exists()  # a worker did die
    assert _expert_bytes(tmp_path / "o") == _expert_bytes(reference)


def test_a_removed_node_does_not_change_the_output(cluster, tiny_ckpt, reference, tmp_path):
    """A GPU node is removed once the first block is recorded; its worker (if it held one) restarts on the other GPU
    node, lost objects are rebuilt from their tasks, and the output is unchanged."""
    c, nodes = cluster
    out = tmp_path / "o"
    errors = []

    def run():
        try:
            compress_model(tiny_ckpt, out, CompressConfig(group_size=1), SPEC, progress=lambda *_: None, workers=1)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.05)
    removed_mid_run = not json.loads((out / "manifest.json").read_text())["complete"]
    c.remove_node(nodes[0], allow_graceful=False)
    t.join(timeout=600)
    assert not t.is_alive() and not errors, errors
    assert removed_mid_run
    assert _expert_bytes(out) == _expert_bytes(reference)
    nodes[0] = c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 << 20)  # back for other tests


def test_resume_after_the_driver_is_killed(tiny_ckpt, reference, tmp_path):
    """The driver (with its own local Ray) is killed after its first block; --resume in a new driver finishes the
    run, byte-identical."""
    out = tmp_path / "o"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "qmoe.compress", "--model", str(tiny_ckpt), "--out", str(out), "--workers", "1",
           "--train-samples", "16", "--val-samples", "4"]
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and p.poll() is None:
            mf = out / "manifest.json"
            if mf.exists() and json.loads(mf.read_text())["blocks_done"]:
                break
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started
        p.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["blocks_done"]
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout + r.stderr
    assert _expert_bytes(out) == _expert_bytes(reference)
