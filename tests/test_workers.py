"""Compression on real Ray clusters: a local multi-node cluster (ray.cluster_utils.Cluster) for the pool's output,
a killed worker and a removed node; the CLI's own local Ray for --resume after the driver is killed and for
SIGTERM; a node that does not share the output directory (its own mount namespace) for the up-front check."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
from ray.cluster_utils import Cluster  # noqa: E402

from qmoe.compression.compressor import CompressConfig, compress_model  # noqa: E402
from qmoe.data import DataSpec
from qmoe.workers.ray_executor import RayExecutor, check_shared_dir  # noqa: E402

SPEC = DataSpec(train_samples=16, val_samples=4, seed=0)
ROOT = Path(__file__).resolve().parents[1]
CMD = ["--train-samples", "16", "--val-samples", "4"]


def _expert_bytes(d: Path) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted((d / "experts").rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "o"
    compress_model(tiny_ckpt, out, CompressConfig(), SPEC, progress=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with 2 CPUs and three worker nodes of 1 CPU, on 127.0.0.1, with token authentication (a fresh token)
    and a temp dir of its own; the machine-wide "current cluster" file Ray's test cluster writes is not written."""
    import secrets
    import tempfile

    from qmoe.workers.local_ray import _refresh_auth_config

    root = Path(tempfile.mkdtemp(prefix="qw-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    _refresh_auth_config()
    mp = pytest.MonkeyPatch()
    mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    node = dict(node_ip_address="127.0.0.1", temp_dir=str(root / "r"), include_dashboard=False)
    # The head declares one GPU (Ray's fake resource: nothing runs on it) for the fractional-GPU pool.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "object_store_memory": 150 << 20,
                                                      **node})
    nodes = [c.add_node(num_cpus=1, object_store_memory=100 << 20, **node) for _ in range(3)]
    ray.init(address=c.address)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        mp.undo()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        _refresh_auth_config()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_pool_output_equals_single_process(cluster, tiny_ckpt, reference, tmp_path):
    s = compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None,
                       executor=RayExecutor(2))
    assert _expert_bytes(tmp_path / "o") == _expert_bytes(reference)
    r = json.loads((reference / "summary.json").read_text())
    assert (s["val_loss_before"], s["val_loss_after"]) == (r["val_loss_before"], r["val_loss_after"])
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["complete"]
    workers = s["peak_anon_bytes"]["workers"]
    assert len(workers) == 2 and all(v > 50 << 20 for v in workers.values())  # both actors did steps
    assert s["executor"]["object_store_spilled_bytes"] == 0


@pytest.mark.parametrize("name,bits,per_layer", [("deepseek_v3", 0, False), ("gpt_oss", 0, False),
                                                ("qwen3_moe", 2.5, False), ("qwen3_moe", 3.0, True)])
def test_a_family_on_the_pool_equals_single_process(cluster, tmp_path, name, bits, per_layer):
    """A DeepSeek-V3 checkpoint (MLA, shared expert, group-limited top-3, experts on their layer's tokens), a
    gpt-oss one (fused experts read one at a time, biases, clamped SwiGLU) and a Qwen3-MoE one under a bit budget
    (each matrix's grid chosen; or per layer, a GGUF's mix of k-quants chosen from every group's estimates) on two
    actors: the bytes and losses of one process."""
    from test_family_compress import SPEC as FAMILY_SPEC, _save

    shape = dict(hidden_size=256, moe_intermediate_size=256) if per_layer else \
        dict(hidden_size=128, moe_intermediate_size=192) if bits else {}
    src = _save(name, tmp_path, **shape)
    cfg = CompressConfig(group_size=4, bits=bits, per_layer=per_layer,
                         **({"grids": ("q2_k", "q3_k")} if per_layer else {}))  # two k-quants: a mix at 3 bits
    a = compress_model(src, tmp_path / "a", cfg, FAMILY_SPEC, progress=lambda *_: None)
    b = compress_model(src, tmp_path / "b", cfg, FAMILY_SPEC, progress=lambda *_: None, executor=RayExecutor(2))
    assert _expert_bytes(tmp_path / "a") == _expert_bytes(tmp_path / "b") and _expert_bytes(tmp_path / "a")
    assert (tmp_path / "a" / "dense.safetensors").read_bytes() == (tmp_path / "b" / "dense.safetensors").read_bytes()
    assert (a["val_loss_before"], a["val_loss_after"]) == (b["val_loss_before"], b["val_loss_after"])
    assert a["experts_layer_tokens"] == b["experts_layer_tokens"]
    assert len(b["peak_anon_bytes"]["workers"]) == 2


def test_two_workers_share_one_gpu(cluster, tiny_ckpt, reference, tmp_path):
    """--gpus-per-worker 0.5: two actors on the cluster's one (fake) GPU give the bytes of a single process. Both
    ran steps, so both held their share at once (an actor holds its resources for life: two whole-GPU actors could
    not both be placed); a third would need 1.5 GPUs and is refused before any work."""
    s = compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None,
                       executor=RayExecutor(2, gpus_per_worker=0.5))
    assert _expert_bytes(tmp_path / "o") == _expert_bytes(reference)
    assert len(s["peak_anon_bytes"]["workers"]) == 2 and s["executor"]["gpus_per_worker"] == 0.5
    with pytest.raises(ValueError, match="needs 1.5 GPU slots; the Ray cluster has 1"):
        compress_model(tiny_ckpt, tmp_path / "o3", CompressConfig(), SPEC, progress=lambda *_: None,
                       executor=RayExecutor(3, gpus_per_worker=0.5))


def test_a_killed_worker_is_replaced_and_its_task_retried(cluster, tiny_ckpt, reference, tmp_path):
    marker = tmp_path / "kill-once"
    marker.write_text("")  # the first expert step to see it deletes it and kills its own process
    compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None,
                   executor=RayExecutor(2), fail_marker=str(marker))
    assert not marker.exists()  # a worker did die
    assert _expert_bytes(tmp_path / "o") == _expert_bytes(reference)


def test_a_removed_node_does_not_change_the_output(cluster, tiny_ckpt, reference, tmp_path):
    """A worker node is removed once the first group is recorded; its actor restarts on another node and the
    output is unchanged."""
    c, nodes = cluster
    out = tmp_path / "o"
    errors = []

    def run():
        try:
            compress_model(tiny_ckpt, out, CompressConfig(group_size=1), SPEC, progress=lambda *_: None,
                           executor=RayExecutor(3))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and not _groups_done(out):
        time.sleep(0.05)
    removed_mid_run = not json.loads((out / "manifest.json").read_text())["complete"]
    c.remove_node(nodes[0], allow_graceful=False)
    t.join(timeout=600)
    assert not t.is_alive() and not errors, errors
    assert removed_mid_run
    ref = tmp_path / "ref"
    compress_model(tiny_ckpt, ref, CompressConfig(group_size=1), SPEC, progress=lambda *_: None)
    assert _expert_bytes(out) == _expert_bytes(ref)
    nodes[0] = c.add_node(num_cpus=1, object_store_memory=100 << 20, node_ip_address="127.0.0.1")


def _groups_done(out: Path) -> bool:
    mf = out / "manifest.json"
    try:
        return bool(json.loads(mf.read_text())["groups"])
    except (OSError, ValueError, KeyError):
        return False


def test_an_output_directory_a_node_does_not_share_is_refused(cluster, tmp_path):
    """A node joined from its own mount namespace, where the output directory is another directory: the probe
    finds it before any work."""
    c, _ = cluster
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir()
    other.mkdir()
    check_shared_dir(str(out))  # every node of the cluster shares it
    # A node started the way the test cluster starts its nodes (ray's Node, loopback, the cluster's token), in a
    # process whose mount namespace puts `other` at `out`.
    node_py = ("import time; from ray._private.node import Node; from ray._private.parameter import RayParams; "
               f"Node(RayParams(node_ip_address='127.0.0.1', gcs_address='{c.address}', num_cpus=1, "
               f"temp_dir='{c.head_node.get_temp_dir_path()}', include_log_monitor=False, node_manager_port=0, "
               "min_worker_port=0, max_worker_port=0, object_store_memory=100 << 20, dashboard_agent_listen_port=None),"
               " head=False, shutdown_at_exit=True, spawn_reaper=True); time.sleep(3600)")
    script = f"mount --bind {other} {out} && exec {sys.executable} -c \"{node_py}\""
    try:
        p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        pytest.skip("no unshare on this machine")
    try:
        deadline = time.time() + 120
        n0 = len([n for n in ray.nodes() if n["Alive"]])
        while time.time() < deadline and len([n for n in ray.nodes() if n["Alive"]]) == n0 and p.poll() is None:
            time.sleep(0.2)
        if p.poll() is not None:
            pytest.skip("could not start a node in a private mount namespace here")
        with pytest.raises(ValueError, match="not the same directory on every node"):
            check_shared_dir(str(out))
        assert not list(out.glob(".probe-*")) and not list(other.glob(".probe-*"))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _cli(out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qmoe.compress", "--model", str(ckpt), "--out", str(out), *CMD, *extra]


def _env() -> dict:
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    return env


def test_resume_after_the_driver_is_killed(tiny_ckpt, reference, tmp_path):
    """The driver (with its own local Ray) is killed with SIGKILL after its first group; --resume in a new driver
    finishes the run, byte-identical."""
    out = tmp_path / "o"
    cmd = _cli(out, tiny_ckpt, "--workers", "1")
    p = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and p.poll() is None and not _groups_done(out):
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started
        p.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["groups"]
    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout + r.stderr
    assert _expert_bytes(out) == _expert_bytes(reference)


def test_sigterm_stops_the_local_ray_it_started(tiny_ckpt, tmp_path):
    """SIGTERM to a `--workers 1` run: it exits through its cleanup, and no process it started is left."""
    out = tmp_path / "o"
    p = subprocess.Popen(_cli(out, tiny_ckpt, "--workers", "1"), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    me = psutil.Process(p.pid)
    deadline = time.time() + 300
    children = []
    while time.time() < deadline and p.poll() is None and not _groups_done(out):
        children = me.children(recursive=True) or children
        time.sleep(0.05)
    children = me.children(recursive=True) or children
    assert children, "the run started no Ray processes"
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    err = p.stderr.read()
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped (signal 15): " in err and "--resume" in err and "Traceback" not in err, err[-2000:]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.cmdline()[:3] for c in alive]
    assert not json.loads((out / "manifest.json").read_text())["complete"]


def test_a_local_ray_declares_the_gpus_torch_sees(tiny_ckpt, reference, tmp_path):
    """`--workers 2 --gpus-per-worker 0.5` with no cluster: the local Ray it starts declares the GPUs torch sees
    (here one, torch's count faked; the work stays on the CPU), both half-GPU workers fit, and the bytes are the
    single process's. Where torch sees none, the run is refused in one line before any work."""
    args = [*CMD, "--model", str(tiny_ckpt), "--workers", "2", "--gpus-per-worker", "0.5"]
    fake = ("import sys, torch; torch.cuda.device_count = lambda: 1; from qmoe.compress import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", fake, *args, "--out", str(tmp_path / "o")], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["executor"]["gpus_per_worker"] == 0.5
    assert _expert_bytes(tmp_path / "o") == _expert_bytes(reference)
    r = subprocess.run([sys.executable, "-m", "qmoe.compress", *args, "--out", str(tmp_path / "n")], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "needs 1 GPU slots; the Ray cluster has 0" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "n" / "experts").exists()


def test_bench_throughput_runs_in_process_and_on_ray():
    """`qmoe.bench throughput` on small shapes: the in-process and 2-worker runs, their split, the same bytes."""
    from qmoe.bench import throughput

    r = throughput.run(3, "rtn", "cpu", "0,2", train_samples=8, val_samples=4,
                       shapes=dict(d_model=32, d_ff=64, num_heads=2, d_kv=16), progress=lambda *a: None)
    assert [(x["workers"], x["experts"]) for x in r["rows"]] == [(0, 6), (2, 6)]
    assert all(x["expert_files_identical_to_first_run"] for x in r["rows"])
    assert r["rows"][0]["val_loss_after"] == r["rows"][1]["val_loss_after"]
    for x in r["rows"]:
        assert 0 < x["split_seconds_an_expert"]["worker_encode_write"] and x["gpu_busy_percent"] is None
    assert len(r["rows"][1]["peak_anon_bytes"]["workers"]) == 2
    assert "| 2 Ray workers |" in throughput.format_table(r)
    with pytest.raises(ValueError, match="a share of a GPU needs Ray workers"):
        throughput.parse_runs("0x0.5")
    assert throughput.parse_runs("0,2,2x0.5") == [(0, None), (2, None), (2, 0.5)]


def test_bench_stopped_by_sigterm_removes_its_checkpoint(tmp_path):
    """`timeout` ends a benchmark with SIGTERM: it exits 143 and leaves no temporary checkpoint behind."""
    env = dict(_env(), TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "qmoe.bench", "throughput", "--experts", "1", "--runs", "0",
                          "--method", "rtn", "--train-samples", "8", "--val-samples", "4"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list(tmp_path.glob("bench-throughput-*/synth/*")):
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()[-2000:]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list(tmp_path.glob("bench-throughput-*"))
