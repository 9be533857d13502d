"""Put together and install the archives of `bench/gpu/pack.py` from the parts in a staging folder:

    python3 bench/gpu/unpack.py STAGE TARGET NAME...

Each archive NAME (base, ray) is installed into TARGET when all its parts are in STAGE and their bytes match the
manifest's sha256; exit status 3, saying which parts are missing, when some are not (a call that brought the
other parts ran on a machine since given back). Standard library only: it runs before anything is installed.
"""
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path


def main(argv: list[str]) -> int:
    stage, target, names = Path(argv[0]), Path(argv[1]), argv[2:]
    if not (stage / "pack.json").is_file():
        print(f"unpack: no pack.json in {stage}: carry a folder made by bench/gpu/pack.py", file=sys.stderr)
        return 3
    m = json.loads((stage / "pack.json").read_text())
    missing = []
    for name in names:
        info = m["archives"][name]
        parts = sorted(stage.glob(f"{name}.tar.xz.*"), key=lambda p: int(p.suffix[1:]))
        data, gap = b"", None
        for p in parts:  # each part starts where the ones before it end
            if int(p.suffix[1:]) != len(data):
                gap = f"a part at offset {p.suffix[1:]} where {len(data)} was expected"
                break
            data += p.read_bytes()
        if gap or len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            have = ", ".join(p.suffix[1:] for p in parts) or "none"
            why = gap or ("bytes differ from the manifest's" if len(data) == info["size"] else
                          f"{len(data)} of {info['size']} bytes here")
            missing.append(f"{name} ({why}; parts at offsets {have})")
            continue
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as t:
            t.extractall(target, filter="data")
        print(f"unpack: {name} ({', '.join(info['wheels'])}) into {target}")
    if missing:
        print(f"unpack: incomplete in {stage}: {'; '.join(missing)}; each call folder of bench/gpu/pack.py must "
              "be carried once on the same warm machine", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
