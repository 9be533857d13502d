"""The README's cluster path, for real: `cluster/start-head.sh` starts a head (dashboard and job server on
127.0.0.1:8265), `cluster/submit.sh` runs `ray job submit ... -- python -m qmoe.compress` against it."""
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def head():
    if not (_port_free(6379) and _port_free(8265)):
        pytest.skip("a Ray head (or something else) already uses 127.0.0.1:6379/8265")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    r = subprocess.run(["bash", str(ROOT / "cluster" / "start-head.sh"), "--num-cpus", "3"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    yield env
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_compresses(head, tiny_ckpt, tmp_path):
    out = tmp_path / "job-out"
    r = subprocess.run(["bash", str(ROOT / "cluster" / "submit.sh"), "--model", str(tiny_ckpt), "--out", str(out),
                        "--workers", "2", "--train-samples", "16", "--val-samples", "4"],
                       env=head, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["blocks_done"]) == 6  # tiny_ckpt: 3 + 3 sparse blocks
