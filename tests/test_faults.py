"""Faults and bad input, each done for real: overlapping directories, a resume with other settings, bad arguments,
a write killed mid-way, a read-only directory and a full disk (private mount namespaces), corrupt and edited files.
Every failure is one line naming the file, before any work where it can be."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qmoe import compress as compress_cli
from qmoe import report
from qmoe.checkpoint import CheckpointError
from qmoe.format.directory import load_compressed
from qmoe.compression.compressor import compress_model
from qmoe.data import DataSpec

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--train-samples", "8", "--val-samples", "2", "--method", "rtn"]


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = compress_cli.main([*argv])
    return rc, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def done(tiny_ckpt, tmp_path_factory):
    """A complete compressed directory (RTN, few samples)."""
    out = tmp_path_factory.mktemp("faults") / "o"
    assert compress_cli.main(["--model", str(tiny_ckpt), "--out", str(out), *ARGS]) == 0
    return out


def test_overwrite_never_touches_the_model_directory(tiny_ckpt, tmp_path, capsys):
    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    before = sorted(p.name for p in model.iterdir())
    link = tmp_path / "link"
    link.symlink_to(model)
    for out, word in ((model, "is"), (model / "sub", "lies inside"), (tmp_path, "contains"), (link, "is")):
        rc, err = _cli(capsys, "--model", str(model), "--out", str(out), "--overwrite", *ARGS)
        assert rc == 2 and f"{word} the model directory" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in model.iterdir()) == before


def test_overwrite_replaces_only_what_qmoe_wrote(tiny_ckpt, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(mine), "--overwrite", *ARGS)
    assert rc == 2 and "is not a qmoe output" in err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_resume_with_other_data_settings_is_refused(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import qmoe.compression.steps as steps

    out = tmp_path / "o"

    def fail(*a, **k):
        raise CheckpointError("x", "y", "simulated failure")

    real = steps.Worker.experts
    calls = {"n": 0}

    def second_fails(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            fail()
        return real(self, *a, **k)

    monkeypatch.setattr(steps.Worker, "experts", second_fails)
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), *ARGS)
    assert rc == 2 and "simulated failure" in err
    monkeypatch.setattr(steps.Worker, "experts", real)
    for flag, value, key in (("--train-samples", "9", "train_samples"), ("--seed", "3", "data_seed"),
                             ("--val-samples", "3", "val_samples")):
        argv = [*ARGS[:0], "--model", str(tiny_ckpt), "--out", str(out), *ARGS, flag, value, "--resume"]
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and f"used {key} = " in err and f"this run {key} = " in err and "--overwrite" in err, err
    calib = tmp_path / "c.txt"
    calib.write_text("some text " * 5000)
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), *ARGS, "--calib", str(calib), "--resume")
    assert rc == 2 and "used calib = 'embedded corpus'" in err
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), *ARGS, "--resume")
    assert rc == 0, err


@pytest.mark.parametrize("argv,message", [
    (["--train-samples", "0"], "--train-samples must be >= 1"),
    (["--train-samples", "-4"], "--train-samples must be >= 1"),
    (["--val-samples", "-1"], "--val-samples must be >= 0"),
    (["--group-size", "0"], "group_size must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--gpus-per-worker", "0.5"], "--gpus-per-worker needs --workers N"),
    (["--workers", "1", "--gpus-per-worker", "1.5"], "--gpus-per-worker must be in (0, 1]"),
    (["--chunk-samples", "0"], "chunk_samples must be >= 1"),
    (["--threads", "0"], "threads must be >= 1"),
    (["--gptq-batch", "0"], "--gptq-batch must be >= 1"),
])
def test_bad_arguments_are_refused_before_any_work(tiny_ckpt, tmp_path, capsys, argv, message):
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), *ARGS, *argv)
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_no_validation_samples_and_the_method_of_each_expert(tiny_ckpt, tmp_path):
    s = compress_model(tiny_ckpt, tmp_path / "o", compress_cli.CompressConfig(min_tokens=1000),
                       DataSpec(train_samples=8, val_samples=0), progress=lambda *_: None)
    assert s["val_loss_before"] is None and s["val_loss_after"] is None
    # Every expert has fewer than 1000 calibration tokens: each is said to be round-to-nearest, with its reason.
    for b in s["blocks"]:
        assert b["methods"] == ["rtn"] * len(b["tokens_per_expert"]) and len(b["fallback"]) == len(b["methods"])


def _kill_mid_write(path: Path) -> None:
    """A process that writes `path` atomically and is killed (SIGKILL) half way: its temp file stays behind."""
    code = ("import sys, time; from qmoe.codec.atomic import atomic_write\n"
            "def w(tmp):\n    f = open(tmp, 'wb'); f.write(b'x' * 100000); f.flush(); print('half', flush=True); "
            "time.sleep(60)\n"
            f"atomic_write({str(path)!r}, w)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "half"
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_temp_files_of_a_killed_write_are_not_counted_and_are_cleaned(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import qmoe.compression.steps as steps

    out = tmp_path / "o"
    real = steps.Worker.experts
    calls = {"n": 0}

    def third_fails(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise CheckpointError("x", None, "simulated failure")
        return real(self, *a, **k)

    monkeypatch.setattr(steps.Worker, "experts", third_fails)
    assert _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), *ARGS)[0] == 2
    monkeypatch.setattr(steps.Worker, "experts", real)
    _kill_mid_write(out / "experts" / "decoder.block.0" / "00000-00003.safetensors")
    _kill_mid_write(out / "dense.safetensors")
    temps = list(out.rglob(".*.tmp-*"))
    assert len(temps) == 2
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), *ARGS, "--resume")
    assert rc == 0, err
    assert not list(out.rglob(".*.tmp-*"))
    s = json.loads((out / "summary.json").read_text())
    files = [f for f in out.rglob("*") if f.is_file() and f.name not in ("summary.json", "manifest.json")]
    assert s["bytes_compressed"] == sum(f.stat().st_size for f in files)
    _kill_mid_write(out / "experts" / "x.safetensors")
    assert _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), *ARGS, "--overwrite")[0] == 0
    assert not list(out.rglob(".*.tmp-*"))


def test_a_wrong_shape_in_a_bin_shard_fails_before_any_output(tiny_mixed_bin, tmp_path, capsys):
    d = shutil.copytree(tiny_mixed_bin, tmp_path / "ckpt")
    shard = sorted(d.glob("pytorch_model-*.bin"))[-1]
    sd = torch.load(shard, weights_only=True)
    name = next(k for k in sd if ".mlp.experts." in k)
    sd[name] = sd[name][:, :-1].clone()
    torch.save(sd, shard)
    rc, err = _cli(capsys, "--model", str(d), "--out", str(tmp_path / "o"), *ARGS)
    assert rc == 2 and shard.name in err and name in err and "shape" in err, err
    assert not (tmp_path / "o").exists()


def test_a_missing_router_is_named(tiny_ckpt, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "decoder.block.1.layer.2.mlp.router.classifier.weight"
    shard = d / index["weight_map"].pop(name)
    sd = load_file(shard)
    del sd[name]
    save_file(sd, shard)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = _cli(capsys, "--model", str(d), "--out", str(tmp_path / "o"), *ARGS)
    assert rc == 2 and name in err and "missing" in err, err


def _in_namespace(setup: str, argv: list[str]) -> subprocess.CompletedProcess:
    """The compress CLI in a private mount namespace prepared by `setup` (shell): a real read-only directory or a
    real full disk, for root too."""
    env = dict(os.environ)
    cmd = " ".join([setup, "&&", sys.executable, "-m", "qmoe.compress", *argv])
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd], env=env,
                              capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("no unshare here")


@pytest.mark.parametrize("setup,message", [
    ("mount --bind {d} {d} && mount -o remount,bind,ro {d}", "Read-only file system"),  # a read-only directory
    ("mount -t tmpfs -o size=96k tmpfs {d}", "No space left on device"),  # a disk that fills mid-write
])
def test_an_output_directory_that_cannot_be_written(tiny_ckpt, tmp_path, setup, message):
    d = tmp_path / "d"
    d.mkdir()
    r = _in_namespace(setup.format(d=d), ["--model", str(tiny_ckpt), "--out", str(d / "o"), *ARGS])
    if "mount:" in r.stderr:
        pytest.skip(f"mounts not allowed here: {r.stderr.strip()}")
    err = r.stderr.strip()
    assert r.returncode == 2 and message in err and str(d / "o") in err and len(err.splitlines()) == 1, err


def test_calibration_files_that_are_not_text(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), *ARGS, "--calib", str(bad))
    assert rc == 2 and str(bad) in err and "not UTF-8" in err
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "fine"}\n{"text": 5}\n')
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), *ARGS, "--calib", str(jl))
    assert rc == 2 and f"{jl}:2" in err and "not a string" in err
    assert not (tmp_path / "o").exists()


def test_a_broken_manifest_is_named(done, tmp_path, capsys, tiny_ckpt):
    d = shutil.copytree(done, tmp_path / "d")
    (d / "manifest.json").write_text('{"complete": tr')
    with pytest.raises(CheckpointError, match="manifest.json.*not valid JSON"):
        load_compressed(d)
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(d), *ARGS, "--resume")
    assert rc == 2 and "manifest.json" in err


def _rewrite_manifest(d: Path, edit) -> None:
    """Edit the manifest and give it a consistent checksum of itself, as a careful forger would."""
    from qmoe.format.directory import _self_sha256

    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    m["sha256"] = _self_sha256(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_every_file_is_covered_by_a_checksum_every_reader_checks(done, tmp_path):
    # An edited manifest (one checksum changed by hand) is refused by its own checksum.
    d = shutil.copytree(done, tmp_path / "a")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["config.json"]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="manifest.json.*edited or is corrupt"):
        load_compressed(d)
    # A changed dense file with the manifest rewritten around it: config.json's record of it still catches it.
    d = shutil.copytree(done, tmp_path / "b")
    dense = d / "dense.safetensors"
    data = bytearray(dense.read_bytes())
    data[-3] ^= 0x40
    dense.write_bytes(bytes(data))
    sha = hashlib.sha256(bytes(data)).hexdigest()
    _rewrite_manifest(d, lambda m: m["files"]["dense.safetensors"].update(sha256=sha))
    with pytest.raises(CheckpointError, match="dense.safetensors.*config.json"):
        load_compressed(d)
    # report checks every file too, with --no-measure.
    d = shutil.copytree(done, tmp_path / "c")
    f = next((d / "experts").rglob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-2] ^= 0x01
    f.write_bytes(bytes(data))
    assert report.main([str(d), "--no-measure", "--out", str(tmp_path / "rep")]) == 2
    assert not (tmp_path / "rep").exists()


def test_one_writer_per_output_directory(tiny_ckpt, tmp_path, capsys):
    """While a live process holds the output's lock, a second run (--overwrite or --resume) is refused in one line
    naming it, and nothing in the directory is touched; once the holder is gone (SIGKILL: no cleanup), the next
    run takes the lock over, says so, and removes it when done."""
    from qmoe.compression.outdir import LOCK

    out = tmp_path / "o"
    assert compress_cli.main(["--model", str(tiny_ckpt), "--out", str(out), *ARGS]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = ("import sys, time; from qmoe.compression.outdir import OutputLock; OutputLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flag in ("--overwrite", "--resume"):
            rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), *ARGS, flag)
            assert rc == 2 and f"pid {holder.pid} on" in err and len(err.splitlines()) == 1, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK} == before
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).exists()  # a killed holder leaves its lock file, but no lock
    assert compress_cli.main(["--model", str(tiny_ckpt), "--out", str(out), *ARGS, "--overwrite"]) == 0
    assert f"took over the lock of a run that is no longer running (pid {holder.pid} on" in capsys.readouterr().out
    assert not (out / LOCK).exists()


def test_ctrl_c_that_torch_turns_into_another_error_is_still_an_interruption(tiny_ckpt, tmp_path, monkeypatch,
                                                                             capsys):
    """A KeyboardInterrupt raised while torch calls back into Python can come out as another error (seen once in the
    suite: ValueError "could not determine the shape of object type 'torch.storage.UntypedStorage'", rc 2): after a
    Ctrl-C, compress still says it was interrupted and what was saved, rc 130; without one, the same error is a
    one-line error, rc 2. The SIGINT handler is put back after the run."""
    from qmoe import compress as cli

    def interrupted_inside_torch(*args, **kwargs):
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    def bad(*args, **kwargs):
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    argv = ["--model", str(tiny_ckpt), "--out", str(tmp_path / "o")]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it (not ignored)
    try:
        monkeypatch.setattr(cli, "compress_model", interrupted_inside_torch)
        assert cli.main(argv) == 130
        assert capsys.readouterr().err.startswith("interrupted: ")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        monkeypatch.setattr(cli, "compress_model", bad)
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.startswith("error: could not determine")
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_says_what_was_saved_in_one_line(tiny_ckpt, tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit status 130, no traceback, one line saying what the directory keeps and how to
    continue, the lock released; --resume then finishes the run."""
    from qmoe.compression.outdir import LOCK

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "qmoe.compress", "--model", str(tiny_ckpt), "--out", str(out),
           "--train-samples", "32", "--val-samples", "2"]
    # SIGINT as a terminal's Ctrl-C delivers it: a suite started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt (the run went on to rc 0).
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # the first block's line: a block is finished and recorded
        if line.startswith("[1] "):
            break
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=120)
    err = p.stderr.read().strip()
    assert rc == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"interrupted: {out} keeps ") and "--resume" in err, err
    assert not (out / LOCK).exists()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and json.loads((out / "manifest.json").read_text())["complete"], r.stderr[-2000:]


def test_out_of_gpu_memory_is_one_line_naming_the_settings(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A GPU out of memory in a group step (raised here where GPTQ would raise it): one line naming --gptq-batch
    and --max-memory and what the directory keeps, exit 2, the lock released."""
    from qmoe.compression import steps
    from qmoe.compression.outdir import LOCK

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    monkeypatch.setattr(steps, "quantize_experts", oom)
    out = tmp_path / "o"
    rc, err = _cli(capsys, "--model", str(tiny_ckpt), "--out", str(out), "--train-samples", "8", "--val-samples", "2")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB" in err
    assert "--gptq-batch" in err and "--max-memory" in err and f"{out} has no finished expert group" in err
    assert not (out / LOCK).exists()
