"""The README's cluster path, for real: `cluster/start-head.sh` starts a head (127.0.0.1 only, token auth, its own
directory and ports), `cluster/submit.sh` runs `ray job submit ... -- python -m qmoe.compress` against it with the
token, and `cluster/stop-head.sh` stops that head and nothing else (the `ray_head` fixture in conftest.py)."""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ray_job_submit_compresses(ray_head, tiny_ckpt, tmp_path):
    env, _, _ = ray_head
    out = tmp_path / "job-out"
    r = subprocess.run(["bash", str(ROOT / "cluster" / "submit.sh"), "--model", str(tiny_ckpt), "--out", str(out),
                        "--workers", "2", "--train-samples", "16", "--val-samples", "4"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["blocks_done"]) == 6  # tiny_ckpt: 3 + 3 sparse blocks
    # The same bytes as an in-process run with the same settings: the launch path changes nothing.
    from qmoe.compression.compressor import CompressConfig, compress_model
    from qmoe.data import DataSpec

    here = tmp_path / "in-process"
    compress_model(tiny_ckpt, here, CompressConfig(), DataSpec(train_samples=16, val_samples=4),
                   progress=lambda *_: None)
    files = sorted(f.relative_to(here) for f in (here / "experts").rglob("*.safetensors"))
    assert files == sorted(f.relative_to(out) for f in (out / "experts").rglob("*.safetensors"))
    for f in files:
        assert (here / f).read_bytes() == (out / f).read_bytes(), f
    assert json.loads((out / "summary.json").read_text())["val_loss_after"] == json.loads(
        (here / "summary.json").read_text())["val_loss_after"]


def test_stopping_a_head_leaves_other_rays_running(ray_head):
    """A second head from another directory, stopped by stop-head.sh: the first (the fixture's) keeps running."""
    import psutil

    from conftest import free_ports, head_processes

    env, first_dir, _ = ray_head
    first = head_processes(first_dir)
    second_dir = Path(tempfile.mkdtemp(prefix="qh-", dir="/tmp"))
    gcs, dashboard, client = free_ports(3)
    env2 = dict(env, QMOE_RAY_DIR=str(second_dir), QMOE_RAY_PORT=str(gcs), QMOE_DASHBOARD_PORT=str(dashboard),
                QMOE_CLIENT_PORT=str(client))
    stop = ["bash", str(ROOT / "cluster" / "stop-head.sh")]
    try:
        r = subprocess.run(["bash", str(ROOT / "cluster" / "start-head.sh"), "--num-cpus", "1"], env=env2,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        second = head_processes(second_dir)
        assert len(second) > 3 and not {p.pid for p in second} & {p.pid for p in first}
        r = subprocess.run(stop, env=env2, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        _, alive = psutil.wait_procs(second, timeout=30)
        assert not alive, f"second head's processes still running: {alive}"
    finally:
        if (second_dir / "head.pid").exists():
            subprocess.run(stop, env=env2, capture_output=True, timeout=120)
        shutil.rmtree(second_dir, ignore_errors=True)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in first)
    # And the first still serves: a job on it succeeds.
    r = subprocess.run(["ray", "job", "submit", "--", sys.executable, "-c", "print('ok')"],
                       env={**env, **_head_env(first_dir)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


def _head_env(head_dir: Path) -> dict:
    """The variables in head.env: what the `ray` CLI needs to reach that head with its token."""
    return dict(line.split("=", 1) for line in (head_dir / "head.env").read_text().splitlines() if "=" in line)
