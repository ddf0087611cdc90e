#!/usr/bin/env bash
# Everything that needs a GPU, as one script for a short lease on a CUDA machine.
#
# Steps run in priority order, each under its own time limit, so one slow step cannot take
# the others' results with it: the kernel check and timings (gpu_check.py), the cached vs
# online head step at ViT-B/16@512 (bench_cache.py), the kernel tests compiled plus the
# torchrun/NCCL/bf16 training test, training throughput at paper size (bench_train.py), and
# last the kernels against torch.compile of their references.
# Every step's output lands in $OUT (default ./gpu_results). Every step runs whatever the
# others did; a step that fails or runs out of time is remembered, and the script ends with
# exit status 1 and the list of failed steps ($OUT/failed_steps.txt), or 0 if all passed.
#
#   bash benchmarks/gpu_session.sh             # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_session.sh     # no GPU: the same flow at tiny sizes
#   COMPILE=0 bash benchmarks/gpu_session.sh   # without the torch.compile step
#
# Without an install of the project: wheels in .whl/ (open_clip_torch, ftfy, wcwidth) are
# installed to /tmp/site and the checkout goes on PYTHONPATH (cascade_clip/kernels is the
# committed link to kernels/; a copy that lost the link gets it back here).
set -u
OUT=${OUT:-gpu_results}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
if ! python3 -c "import cascade_clip.kernels" 2>/dev/null; then
    [ -e cascade_clip/kernels ] || ln -s ../kernels cascade_clip/kernels
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=()  # "NAME (exit N)" of every step that did not succeed
fail() {  # fail NAME RC: remember a failed step
    local why="exit $2"
    [ "$2" = 124 ] && why="timed out"
    failed+=("$1 ($why)")
}

: >"$OUT/device.txt"
if [ "$SMOKE" = 1 ]; then
    full=0 check_args=--cpu-smoke
    export TRITON_INTERPRET=1
else
    full=1 check_args=
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/device.txt" \
        || fail nvidia-smi $?
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    >>"$OUT/device.txt" 2>&1 || fail versions $?

step() {  # step NAME SECONDS COMMAND...: output to $OUT/NAME.txt, its tail to the console
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n "${TAIL:-30}" "$OUT/$name.txt"
    [ "$rc" = 0 ] || fail "$name" "$rc"
    return 0
}

pytest_bench=(python3 -m pytest -p no:cacheprovider -q --benchmark-enable --benchmark-columns=min,median,rounds)
step gpu_check 120 python3 benchmarks/gpu_check.py --no-compile $check_args
step bench_cache 110 env CASCADE_CLIP_BENCH_FULL=$full "${pytest_bench[@]}" benchmarks/bench_cache.py \
    -k "step or load_batch or encoder" --benchmark-json="$OUT/bench_cache.json"
step tests_gpu 200 python3 -m pytest -p no:cacheprovider -q tests/test_kernels.py tests/test_distributed.py
step bench_train 100 env CASCADE_CLIP_BENCH_FULL=$full "${pytest_bench[@]}" -s benchmarks/bench_train.py \
    --benchmark-json="$OUT/bench_train.json"
# Whole training, real input pipeline vs synthetic inputs vs the authors'-style fp32 eager
# recipe, GPU-busy fraction, loader images/s, projected paper wall times.
if [ "$SMOKE" = 1 ]; then tp_args=(--cpu-smoke --modes frozen); else tp_args=(--loader); fi
step train_throughput 240 python3 benchmarks/train_throughput.py "${tp_args[@]}" --out "$OUT/throughput"
# Last, as it is the slowest (Inductor compiles each case): torch.compile of the references.
if [ "$SMOKE" != 1 ] && [ "${COMPILE:-1}" != 0 ]; then
    step gpu_check_compile 120 python3 benchmarks/gpu_check.py
fi
cat "$OUT/device.txt"

if [ "${#failed[@]}" -gt 0 ]; then
    printf '%s\n' "${failed[@]}" >"$OUT/failed_steps.txt"
    echo "== FAILED: ${#failed[@]} step(s): ${failed[*]}" >&2
    exit 1
fi
rm -f "$OUT/failed_steps.txt"
echo "== all steps passed"
