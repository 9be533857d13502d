#!/usr/bin/env bash
# A GPU session's checks, from the repository root, in two calls of the device tool on one warm machine (what the
# GPU image lacks, Ray above all, does not fit beside the working tree in one call: see bench/gpu/pack.py):
#   bash bench/gpu/run.sh OUT infer .gpu/1      GPU tests, the kernel table, the c2048-shaped end-to-end table
#   bash bench/gpu/run.sh OUT compress .gpu/2   seconds an expert in process and on Ray workers sharing the GPU
#   (bash bench/gpu/run.sh OUT stage .gpu/1     only copies the parts: for compress on a machine that lacks them)
# OUT: where the logs and JSON go. Each call copies the pack folders it names into .gpu-stage (git-ignored: a warm
# machine keeps it for the next call) and installs from there, with qmoe built from this tree, into a folder of
# its own on PYTHONPATH: nothing of the image is changed. The second call needs the first's parts still there;
# where the machine went back in between, it says which parts are missing and stops.
# QMOE_GPU_DEVICE=cpu rehearses the same steps on a machine without a GPU (no GPU tests, no kernel table; Ray
# workers without GPU shares) from a pack made for its Python (pack.py --python 3.11). QMOE_GPU_EXPERTS sets the
# experts per block of both c2048-shaped models (default 64; fewer only to rehearse).
# Each step has its own time limit; one that fails does not stop the next.
set -uo pipefail
out=${1:?usage: run.sh OUT infer|compress|stage [PACK_DIR...]}
part=${2:?usage: run.sh OUT infer|compress|stage [PACK_DIR...]}
shift 2
device=${QMOE_GPU_DEVICE:-cuda}
experts=${QMOE_GPU_EXPERTS:-64}
out=$(realpath -m "$out")
mkdir -p "$out" .gpu-stage
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
# Every step ends by the call's deadline, QMOE_GPU_SECONDS after the start (default 330 for infer and 290 for
# compress: the calls' timeout_s, 360 and 320, less 30 s for a stopped step to unwind: a benchmark stopping its
# Ray took 18 s in the rehearsal): cap N says min(N, the seconds left), at least 1.
[ "$part" = infer ] && secs=330 || secs=290
deadline=$(( t0 + ${QMOE_GPU_SECONDS:-$secs} ))
cap() { local left=$(( deadline - $(date +%s) )); [ "$left" -lt 1 ] && left=1; [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }

for d in "$@"; do
    # Parts of another pack (made again since the last call) are not mixed with these.
    if [ -f .gpu-stage/pack.json ] && ! cmp -s "$d/pack.json" .gpu-stage/pack.json; then rm -f .gpu-stage/*; fi
    cp "$d"/* .gpu-stage/ || exit 1
done
case $part in
    stage) echo "staged: $(ls .gpu-stage | tr '\n' ' ')"; exit 0 ;;
    infer) need=base ;;
    compress) need="base ray" ;;
    *) echo "run.sh: PART must be infer, compress or stage, got $part" >&2; exit 2 ;;
esac
work=$(mktemp -d -t qmoe-gpu.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 bench/gpu/unpack.py .gpu-stage "$work/site" $need || exit 3
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$work/site" . || exit 1
export PYTHONPATH="$work/site"
# Python runs from $work: from the repository root, its qmoe/ folder (the package without the codec/, kernels/ and
# workers/ it is installed with) would stand in for the installed qmoe, here and in Ray's workers.
repo=$(pwd)
cd "$work" || exit 1
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -d ' ' | tr 'A-Z' 'a-z' | sed 's/nvidia//')
else
    card=cpu
fi
stamp "qmoe from $(python3 -c 'import qmoe, os; print(os.path.dirname(qmoe.__file__))'), part $part on $device"
python3 - <<'VERSIONS'
import platform
from importlib.metadata import version, PackageNotFoundError
def v(n):
    try:
        return version(n)
    except PackageNotFoundError:
        return "absent"
print(f"python {platform.python_version()}", *(f"{n} {v(n)}" for n in ("torch", "numba", "numba-cuda", "llvmlite",
      "numpy", "triton", "ray", "zstandard", "transformers", "pytest-xdist")), sep="; ")
VERSIONS

if [ "$part" = infer ]; then
    # The c2048-shaped model for the end-to-end table is made in the background (synth + RTN compress) while the
    # GPU tests run (correctness only, nothing timed); then, with the GPU otherwise idle, the two tables.
    model="$work/c2048-shaped-1x$experts"
    # One `timeout` over the whole build, which ends its process group (every step) at 200 s before the deadline,
    # so the two tables (90 + 110 s) still have their time.
    export work experts device model out
    until_tables=$(( deadline - 200 - $(date +%s) ))
    [ "$until_tables" -lt 1 ] && until_tables=1
    timeout "$until_tables" bash -c '
        python3 -m qmoe.synth --out "$work/synth" --blocks 1 --experts "$experts" \
        && python3 -m qmoe.compress --model "$work/synth" --out "$model" --method rtn --device "$device" \
             --train-samples 16 --val-samples 64 --threads 8 \
        && rm -rf "$work/synth" && cp "$model/summary.json" "$out/compress-rtn-$device-summary.json"' \
        > "$out/build.log" 2>&1 &
    build=$!
    if [ "$device" = cuda ]; then
        stamp "GPU tests"
        # Compiling the kernels for each shape is most of their time: 8 processes (pytest-xdist, in the image).
        par=""
        python3 -c "import xdist" 2>/dev/null && par="-n 8"
        timeout "$(cap 100)" python3 -m pytest -q -p no:cacheprovider $par "$repo/tests/test_kernels.py" \
            "$repo/tests/test_infer.py" -k "cuda and not simulator and not ptx" 2>&1 | tail -40 > "$out/tests.log"
        tail -3 "$out/tests.log"
    fi
    stamp "waiting for the model"
    wait $build; rc=$?
    # Stopped: its steps unwind on their own after `timeout` returns; the tables wait for them (at most 25 s).
    for _ in $(seq 50); do kill -0 -- -$build 2>/dev/null || break; sleep 0.5; done
    [ "$rc" = 124 ] && echo "model not built by 200 s before the deadline: stopped" >> "$out/build.log"
    tail -3 "$out/build.log"
    stamp "model built: rc $rc"
    # The tables' output goes to run.log (the call's stdout): the files that come back stay under the tool's 8.
    if [ "$device" = cuda ]; then
        stamp "kernel table"
        timeout "$(cap 90)" python3 -m qmoe.bench kernels --device cuda --no-end-to-end --repeats 15 \
            --json "$out/kernels-cuda-$card.json" 2>&1
        stamp "kernel table: rc $?"
    fi
    if [ "$rc" = 0 ]; then
        stamp "end-to-end table"
        timeout "$(cap 110)" python3 -m qmoe.bench infer --device "$device" --compressed "$model" --repeats 3 \
            --json "$out/infer-$device-$card.json" 2>&1
        stamp "end-to-end table: rc $?"
    fi
else
    # Seconds an expert (GPTQ ternary, 128 calibration samples): in this process, then two Ray workers sharing
    # the GPU (one encodes on the host while the other quantizes), their bytes compared; Ray local to this run,
    # on 127.0.0.1 with token authentication. 8 torch threads a process (16 cores).
    runs=0,2x0.5
    [ "$device" = cuda ] || runs=0,2
    stamp "throughput: runs $runs"
    timeout "$(cap 300)" python3 -m qmoe.bench throughput --device "$device" --experts "$experts" --runs "$runs" \
        --threads 8 --train-samples 128 --json "$out/throughput-$device-$card.json" 2>&1
    stamp "throughput: rc $?"
fi
stamp done
