#!/usr/bin/env bash
# The GPU checks of a session with a lent GPU, in one call of under 10 minutes, from the repository root:
#   bash bench/gpu/run.sh WHEELS OUT [DEVICE]
# WHEELS: a folder of wheels the GPU machine's image lacks (for its Python): zstandard, and numpy 2.4 (numba-cuda
# 0.30 does not import with numpy 2.5). They and qmoe itself (built from this tree, no dependencies) go to a
# folder of their own on PYTHONPATH: nothing of the image is changed. OUT: where the logs and JSON go.
# DEVICE: cuda (default), or cpu to rehearse the same steps on a machine without a GPU (no kernel table; the wheels
# are not installed: the machine's own environment is used).
# Steps: the c2048-shaped model for the end-to-end table is made in the background (synth + RTN compress) while the
# GPU tests run (correctness only, nothing timed), then, with the GPU otherwise idle, the kernel table and the
# end-to-end table. Each step has its own time limit; one that fails does not stop the next.
set -uo pipefail
wheels=${1:?usage: run.sh WHEELS OUT [DEVICE]}
out=${2:?usage: run.sh WHEELS OUT [DEVICE]}
device=${3:-cuda}
mkdir -p "$out"
work=$(mktemp -d -t qmoe-gpu.XXXXXX)
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -d ' ' | tr 'A-Z' 'a-z' | sed 's/nvidia//')
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$wheels"/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$work/site" . \
        || exit 1
    export PYTHONPATH="$work/site"
else
    card=cpu
fi
stamp "qmoe from $(python3 -c 'import qmoe, os; print(os.path.dirname(qmoe.__file__))')"

experts=${QMOE_GPU_EXPERTS:-64}  # experts per block of the end-to-end model (fewer only to rehearse)
model="$work/c2048-shaped-1x$experts"
( timeout 300 python3 -m qmoe.synth --out "$work/synth" --blocks 1 --experts "$experts" \
  && timeout 300 python3 -m qmoe.compress --model "$work/synth" --out "$model" --method rtn --device "$device" \
       --train-samples 16 --val-samples 64 --threads 8 \
  && rm -rf "$work/synth" && cp "$model/summary.json" "$out/compress-rtn-$device-summary.json" ) \
    > "$out/build.log" 2>&1 &
build=$!

if [ "$device" = cuda ]; then
    stamp "GPU tests"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_infer.py \
        -k "cuda and not simulator and not ptx" 2>&1 | tail -40 > "$out/tests.log"
    tail -3 "$out/tests.log"
fi
stamp "waiting for the model"
wait $build; rc=$?
tail -3 "$out/build.log"
stamp "model built: rc $rc"

if [ "$device" = cuda ]; then
    stamp "kernel table"
    timeout 130 python3 -m qmoe.bench kernels --device cuda --no-end-to-end --repeats 15 \
        --json "$out/kernels-cuda-$card.json" > "$out/kernels.log" 2>&1
    stamp "kernel table: rc $?"
    tail -25 "$out/kernels.log"
fi
if [ "$rc" = 0 ]; then
    stamp "end-to-end table"
    timeout 150 python3 -m qmoe.bench infer --device "$device" --compressed "$model" --repeats 3 \
        --json "$out/infer-$device-$card.json" > "$out/infer.log" 2>&1
    stamp "end-to-end table: rc $?"
    tail -12 "$out/infer.log"
fi
rm -rf "$work"
stamp done
