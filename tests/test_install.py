"""qmoe installed from a wheel, not editable, beside transformers and Hugging Face's `kernels` package.

The wheel must put nothing at the top level but `qmoe` (kernels/, codec/ and workers/ install as qmoe.kernels,
qmoe.codec and qmoe.workers), so installing qmoe never overwrites another distribution's files and uninstalling it
never deletes them. The fresh virtual environment reuses this environment's packages (torch, transformers, HF's
`kernels`, ray) through a .pth line, read after its own site-packages, so nothing large is installed again; the
commands run from a directory outside the checkout, so the checkout is not on sys.path."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")


def _run(cmd, cwd, env=None, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: rc {r.returncode}\n{(r.stdout + r.stderr)[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    src = tmp_path_factory.mktemp("src") / "qmoe"
    skip = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".whl")

    def ignore(d, names):  # the checkout's measurement folders (not qmoe/bench, the benchmarks' package)
        top = {"out", "bench"} if Path(d) == ROOT else set()
        return set(skip(d, names)) | (top & set(names))
    shutil.copytree(ROOT, src, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(src)], cwd=dist)
    (whl,) = dist.glob("qmoe-*.whl")
    return whl


def test_wheel_installs_only_under_qmoe(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"qmoe", next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    for module in ("kernels/__init__.py", "kernels/module.py", "codec/__init__.py", "codec/container.py",
                   "workers/__init__.py", "workers/local_ray.py", "assets/corpus.txt.zst"):
        assert f"qmoe/{module}" in names, module


def test_wheel_beside_transformers_kernels(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
                .strip())
    # This environment's packages, after the fresh one's own: qmoe comes from the wheel, everything else from here.
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_parent_env.pth").write_text("\n".join(sorted(here)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import kernels, qmoe, qmoe.kernels.module, qmoe.codec.container, qmoe.workers.local_ray, sys\n"
             "import transformers.integrations.hub_kernels\n"
             "from kernels import CUDAProperties\n"  # Hugging Face's kernels, the name that used to be shadowed
             f"assert not any(p and p.startswith({str(ROOT)!r}) for p in sys.path), sys.path\n"
             "print(qmoe.__file__, qmoe.kernels.module.__file__, kernels.__file__)")
    out = _run([str(py), "-c", probe], cwd=work, env=env)
    ours, mod, theirs = out.split()
    assert ours.startswith(str(site)) and mod.startswith(str(site / "qmoe" / "kernels"))
    assert not theirs.startswith(str(site)) and not theirs.startswith(str(ROOT))

    out_dir = work / "out"
    _run([str(py), "-m", "qmoe.compress", "--model", "default", "--out", str(out_dir), "--train-samples", "16",
          "--val-samples", "4"], cwd=work, env=env)
    assert json.loads((out_dir / "manifest.json").read_text())["complete"]

    _run([sys.executable, "-m", "pip", "--python", str(py), "uninstall", "-y", "-q", "qmoe"], cwd=tmp_path)
    # numba's on-disk cache (__pycache__/*.nbi, *.nbc) is written at run time and stays, as for any numba package.
    assert not list((site / "qmoe").rglob("*.py"))
    _run([str(py), "-c", "import transformers.integrations.hub_kernels; from kernels import CUDAProperties"],
         cwd=work, env=env)
