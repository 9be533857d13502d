"""bench/gpu/pack.py and unpack.py: archives cut into call folders and put back together, byte for byte."""
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import pack  # noqa: E402


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_pack_split_and_unpack_round_trip(tmp_path):
    """Two archives cut over three call folders of 300 bytes; the stage holding every part gives back the trees,
    pruned as pack prunes; one part short is refused in one line, naming the archive and the bytes there."""
    rnd = random.Random(0)
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/blob.bin": bytes(rnd.getrandbits(8) for _ in range(500)),
             "pkg/tests/test_a.py": b"", "pkg/a.pyi": b"", "pkg-1.0.data/purelib/extra.py": b"y = 2\n",
             "pkg-1.0.data/scripts/tool": b"#!/bin/sh\n"}
    site = tmp_path / "site"
    pack.install(_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", files), site)
    pack.prune(site)
    assert sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()) == \
        ["extra.py", "pkg/__init__.py", "pkg/blob.bin"]
    other = tmp_path / "other"
    (other / "o").mkdir(parents=True)
    (other / "o" / "m.py").write_bytes(b"z = 3\n" * 50)
    blobs = {"base": pack.archive(site), "ray": pack.archive(other)}
    assert pack.archive(site) == blobs["base"]  # the same tree, the same bytes
    calls = pack.split(blobs, 300)
    assert all(sum(p["size"] for p in c) <= 300 for c in calls) and len(calls) >= 3
    pack.write_calls(tmp_path / "gpu", blobs, calls, {"python": "3", "budget": 300,
                                                      "wheels": {n: [n] for n in blobs}})
    stage = tmp_path / "stage"
    for d in sorted((tmp_path / "gpu").iterdir(), key=lambda d: int(d.name))[:-1]:  # all but the last call's
        shutil.copytree(d, stage, dirs_exist_ok=True)
    unpack = [sys.executable, str(ROOT / "bench" / "gpu" / "unpack.py"), str(stage), str(tmp_path / "t")]
    r = subprocess.run(unpack + ["ray"], capture_output=True, text=True)
    assert r.returncode == 3 and "incomplete" in r.stderr and "ray (" in r.stderr and len(r.stderr.splitlines()) == 1
    assert "bytes here" in r.stderr
    shutil.copytree(tmp_path / "gpu" / str(len(calls)), stage, dirs_exist_ok=True)
    first_ray = min(stage.glob("ray.tar.xz.*"), key=lambda p: int(p.suffix[1:]))
    kept = first_ray.read_bytes()
    first_ray.unlink()  # the rest is all there, but not from offset 0
    r = subprocess.run(unpack + ["ray"], capture_output=True, text=True)
    assert r.returncode == 3 and "where 0 was expected" in r.stderr, r.stderr
    first_ray.write_bytes(kept)
    r = subprocess.run(unpack + ["base", "ray"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    t = tmp_path / "t"
    assert (t / "pkg" / "blob.bin").read_bytes() == files["pkg/blob.bin"]
    assert (t / "extra.py").read_bytes() == b"y = 2\n" and (t / "o" / "m.py").read_bytes() == b"z = 3\n" * 50
