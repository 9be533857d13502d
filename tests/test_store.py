"""Atomic writes: a write that fails leaves the old file as it was and no temp file behind."""
import pytest

from qmoe.codec.atomic import atomic_write
from qmoe.store import atomic_write_json


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"complete": True})
    before = target.read_bytes()

    def crash(tmp):
        tmp.write_text('{"complete": fal')  # half written
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"
