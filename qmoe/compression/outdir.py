"""The output directory's life: checked before any work, created, replaced only when qmoe wrote it, cleaned of
what a killed run left, and a resumed run's settings compared with the recorded ones.

qmoe deletes a directory only when its manifest.json says qmoe wrote it; it never writes inside the model
directory (or a directory that holds it), whatever the flags.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from qmoe.format import directory as C
from qmoe.checkpoint import CheckpointError

WORK = ".work"  # the activation files, under the output directory
LOCK = ".qmoe-lock"  # held by the run writing the directory (OutputLock)


class OutputLock:
    """One writer per output directory: an exclusive flock on OUT/.qmoe-lock for the run's life, the holder's pid,
    host and start time written in it. flock is released by the kernel when its process dies, however it dies, so a
    lock left by a killed run is taken over (and said so in one line); a live holder makes the second run fail
    with one line naming it, before it touches anything."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd: int | None = None
        self.made_dir = False  # the directory did not exist: release removes it if the run left it empty

    def acquire(self, progress=print) -> None:
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.read(fd, 4096))
                os.close(fd)
                raise FileExistsError(f"{self.path.parent}: another qmoe.compress is writing it ({holder}): wait for "
                                      "it to end or stop it; one run writes an output directory at a time") from None
            try:  # the holder before us may have removed the file between our open and our flock: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.read(fd, 4096)
        if previous.strip():
            progress(f"{self.path.parent}: took over the lock of a run that is no longer running "
                     f"({_holder(previous)})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            if self.made_dir and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


def _holder(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def check_out(out: Path, model_dir: Path) -> None:
    """--out must not overlap the model directory (after resolving symlinks) and must not be a file."""
    o, m = Path(out).resolve(), Path(model_dir).resolve()
    if o == m or m in o.parents or o in m.parents:
        where = "is" if o == m else ("lies inside" if m in o.parents else "contains")
        raise ValueError(f"--out {out} {where} the model directory {model_dir}: choose an output directory apart "
                         "from the model")
    if o.exists() and not o.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")


def prepare(out: Path, overwrite: bool, progress=print) -> None:
    """An empty output directory, writable. A non-empty one is replaced only if qmoe wrote it (its manifest) and
    --overwrite says so, or if it holds an unfinished run that finished nothing."""
    out = Path(out)
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise FileExistsError(f"{out}: exists, is not empty and is not a qmoe output (no manifest.json); qmoe only "
                                  "replaces directories it wrote: choose another --out or empty it yourself")
        try:
            m = C.Manifest.load(out).data
        except (CheckpointError, OSError):
            m = {"complete": False, "groups": {"?": 1}}  # unreadable: only --overwrite replaces it
        nothing_done = not m.get("complete") and not m.get("groups")
        if not (overwrite or nothing_done):
            state = "a complete" if m.get("complete") else "an unfinished"
            also = "" if m.get("complete") else " or --resume to continue it"
            raise FileExistsError(f"{out}: holds {state} qmoe run: pass --overwrite to replace it{also}")
        if nothing_done and not overwrite:
            progress(f"{out}: an unfinished run that finished no expert group; starting over")
        for p in out.iterdir():  # all but the lock this run holds
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".qmoe-write-test"
    probe.write_bytes(b"")  # a read-only directory fails here, before any work
    probe.unlink()


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what a killed run left: temp files of interrupted atomic writes (.NAME.tmp-PID) and the activation
    files. Returns the temp files removed."""
    out = Path(out)
    temps = [p for p in out.rglob(".*.tmp-*") if p.is_file()]
    for p in temps:
        p.unlink()
    shutil.rmtree(out / WORK, ignore_errors=True)
    return temps


def check_resume(out: Path, settings: dict) -> C.Manifest:
    """The manifest of the unfinished run in `out`, after checking that every recorded setting that can change an
    output byte equals this run's, and that every file it records is intact."""
    out = Path(out)
    mf = out / "manifest.json"
    if not mf.exists():
        raise FileNotFoundError(f"{mf}: nothing to resume (no manifest; start without --resume)")
    manifest = C.Manifest.load(out)
    if manifest.data.get("complete"):
        raise ValueError(f"{mf}: the run is complete; nothing to resume")
    if manifest.data.get("version") != C.VERSION:
        raise ValueError(f"{mf}: written by format version {manifest.data.get('version')}, this is {C.VERSION}: "
                         "start over with --overwrite")
    try:
        recorded = json.loads((out / "config.json").read_text())["qmoe"]["settings"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{out / 'config.json'}: no recorded settings ({e}): start over with --overwrite") from None
    for key in sorted(set(recorded) | set(settings)):
        if recorded.get(key) != settings.get(key):
            raise ValueError(f"{out}: the unfinished run used {key} = {recorded.get(key)!r}, this run {key} = "
                             f"{settings.get(key)!r}: resume with the same settings, or start over with --overwrite")
    C.verify_files(out, manifest.data)
    return manifest
