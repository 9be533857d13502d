"""What the GPU machine's image lacks, packed to travel with the device tool's calls:

    python bench/gpu/pack.py [--python 3.12] [--wheels DIR] [--out .gpu]

The image (Python 3.12, torch, numba-cuda, triton; no Ray, no zstandard, and a numpy 2.5 that numba-cuda 0.30
does not import with) gets two xz archives of installed trees, made from the wheels of this environment's
versions for the image's Python:
- base: numpy (2.4), zstandard;
- ray: Ray (and jsonschema, which it imports, with its dependencies) with only what a head, a raylet and
  workers need (no Java jars, libraries such as RLlib, Tune, Serve, Data, Train, no dashboard web client, no
  copies of packages the image has: aiohttp and its kin, psutil, colorama).
Every ELF file but those auditwheel vendored is stripped of symbols, and tests are left out. A call sends the
working tree (tracked files and untracked ones git does not ignore) plus the paths it carries, 64 MiB in all; Ray
alone is more than the tree leaves, so the archives are cut into parts that fill .gpu/1, .gpu/2, ... in order (base
first), each under that budget. Each call carries one part folder; `bench/gpu/run.sh` copies it into .gpu-stage
(git-ignored, so a warm machine keeps it between calls) and `bench/gpu/unpack.py` puts an archive together once all
its parts are there (docs/gpu.md).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
CARRY_LIMIT = 64 * MIB  # the device tool's limit on the working tree plus carried paths, a call
MARGIN = int(1.5 * MIB)  # for the working tree's growth after packing
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Normalized names, as wheels spell them. jsonschema: Ray imports it at `import ray`; the image lacks it.
ARCHIVES = {"base": ("numpy", "zstandard"),
            "ray": ("ray", "jsonschema", "jsonschema_specifications", "referencing", "rpds_py")}
# Paths left out, relative to the installed tree.
PRUNE = ("ray/jars", "ray/rllib", "ray/data", "ray/serve", "ray/train", "ray/tune", "ray/llm", "ray/dashboard/client",
         "ray/_private/runtime_env/agent/thirdparty_files", "ray/thirdparty_files", "numpy/_core/include",
         "numpy/_core/lib", "numpy/f2py", "numpy/_pyinstaller")
PRUNE_NAMES = ("tests",)  # directories of this name anywhere
PRUNE_SUFFIXES = (".map", ".pyi", ".pxd")


def download(names: list[str], python: str, dest: Path) -> list[Path]:
    """This environment's version of each package, as a wheel for `python` on x86-64 Linux."""
    for n in names:
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", *plat, "-d", str(dest),
                        f"{n}=={version(n)}"], check=True)
    return sorted(dest.glob("*.whl"))


def install(wheel: Path, site: Path) -> None:
    """A wheel's files into `site` as pip lays them out (purelib / platlib data merged, scripts left out)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if info.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            if info.external_attr >> 16 & 0o111:
                target.chmod(0o755)


def prune(site: Path) -> None:
    for rel in PRUNE:
        shutil.rmtree(site / rel, ignore_errors=True)
    for d in sorted(p for p in site.rglob("*") if p.is_dir() and p.name in PRUNE_NAMES):
        shutil.rmtree(d, ignore_errors=True)
    for f in [p for p in site.rglob("*") if p.is_file() and p.suffix in PRUNE_SUFFIXES]:
        f.unlink()
    # Not the libraries auditwheel vendored (*.libs): patchelf rewrote them, and strip breaks their load commands.
    for f in [p for p in site.rglob("*") if p.is_file() and not p.is_symlink()
              and not any(d.endswith(".libs") for d in p.relative_to(site).parts)]:
        with open(f, "rb") as fh:
            elf = fh.read(4) == b"\x7fELF"
        if elf:
            subprocess.run(["strip", "--strip-unneeded", str(f)], check=True)


def archive(site: Path) -> bytes:
    """A tar of `site` (sorted, no owners or times: the same tree gives the same bytes), xz with the x86 filter
    and a dictionary that spans Ray's binaries, which share much of their code."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for p in sorted(site.rglob("*")):
            info = t.gettarinfo(str(p), p.relative_to(site).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if p.is_file():
                with open(p, "rb") as fh:
                    t.addfile(info, fh)
            else:
                t.addfile(info)
    filters = [{"id": lzma.FILTER_X86},
               {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 192 * MIB}]
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, filters=filters)


def tree_bytes() -> int:
    """What a call sends besides its carried paths: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    return sum((ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file())


def split(blobs: dict[str, bytes], budget: int) -> list[list[dict]]:
    """Cut the archives, in order, into the parts of call folders that each hold at most `budget` bytes."""
    calls, room = [[]], budget
    for name, data in blobs.items():
        at = 0
        while at < len(data):
            if room == 0:
                calls.append([])
                room = budget
            n = min(room, len(data) - at)
            calls[-1].append({"archive": name, "offset": at, "size": n})
            at, room = at + n, room - n
    return calls


def write_calls(out: Path, blobs: dict[str, bytes], calls: list[list[dict]], info: dict) -> None:
    """out/1, out/2, ...: each call's parts (NAME.tar.xz.OFFSET) and the same pack.json (each archive's size and
    sha256, and `info`: the target Python, the budget, the wheels of each archive)."""
    manifest = {"python": info["python"], "budget": info["budget"], "calls": len(calls),
                "archives": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "wheels": info["wheels"][n]}
                             for n, b in blobs.items()}}
    for k, parts in enumerate(calls, 1):
        d = out / str(k)
        d.mkdir(parents=True)
        for part in parts:
            o = part["offset"]
            (d / f"{part['archive']}.tar.xz.{o}").write_bytes(blobs[part["archive"]][o:o + part["size"]])
        (d / "pack.json").write_text(json.dumps(manifest, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="3.12", help="the GPU image's Python (default 3.12)")
    p.add_argument("--wheels", type=Path, help="a folder of the wheels already downloaded (default: download)")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--budget", type=int, default=None,
                   help="bytes a call folder may hold (default: 64 MiB less the working tree, less 1.5 MiB)")
    a = p.parse_args(argv)
    budget = a.budget or CARRY_LIMIT - tree_bytes() - MARGIN
    if budget < MIB:
        raise SystemExit(f"pack: the working tree leaves {budget / MIB:.2f} MiB a call (64 MiB less the tree, less "
                         f"{MARGIN / MIB:g} MiB): too little to carry anything")
    with tempfile.TemporaryDirectory(prefix="qmoe-pack-") as tmp:
        wheels = sorted(a.wheels.glob("*.whl")) if a.wheels else \
            download([n for ns in ARCHIVES.values() for n in ns], a.python, Path(tmp) / "w")
        tag = "cp" + a.python.replace(".", "")
        blobs, contents = {}, {}
        for name, pkgs in ARCHIVES.items():
            mine = [w for w in wheels if w.name.split("-")[0].lower() in pkgs
                    and (f"-{tag}-" in w.name or w.name.endswith("-py3-none-any.whl"))]
            if sorted(w.name.split("-")[0].lower() for w in mine) != sorted(pkgs):
                raise SystemExit(f"pack: {name} needs {tag} wheels of {', '.join(pkgs)}; found "
                                 f"{[w.name for w in mine]}")
            site = Path(tmp) / name
            for w in mine:
                install(w, site)
            prune(site)
            blobs[name] = archive(site)
            contents[name] = [w.name for w in mine]
            print(f"{name}: {len(blobs[name]) / MIB:.1f} MiB ({', '.join(contents[name])})")
    calls = split(blobs, budget)
    if any(p["archive"] == "base" for c in calls[1:] for p in c):
        raise SystemExit(f"pack: the base archive ({len(blobs['base']) / MIB:.2f} MiB) does not fit the first call's "
                         f"{budget / MIB:.2f} MiB, and the infer call carries only that one")
    shutil.rmtree(a.out, ignore_errors=True)
    write_calls(a.out, blobs, calls, {"python": a.python, "budget": budget, "wheels": contents})
    for k, parts in enumerate(calls, 1):
        where = ", ".join(f"{x['archive']}@{x['offset']}" for x in parts)
        print(f"{a.out / str(k)}: {sum(x['size'] for x in parts) / MIB:.2f} MiB of {budget / MIB:.2f} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
