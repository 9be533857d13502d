"""Atomic file writes (temp file in the same directory, fsync, rename), shared by the codec and qmoe's outputs.
Here rather than in qmoe/ because the codec must not import torch."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path | str, write) -> None:
    """write(tmp_path) fills a temp file; it replaces `path` only once complete and on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # some writers create 0600 temp files; outputs are ordinary files
        os.replace(tmp, path)
    except OSError as e:
        if e.filename:
            raise
        # A writer's error often names no file (ENOSPC from write()): name the one being written.
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()
