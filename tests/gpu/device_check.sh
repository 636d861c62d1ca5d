#!/bin/bash
# Every GPU check as one script, for a machine with CUDA, run from the project root:
#
#     bash tests/gpu/device_check.sh          # logs and figures under $OUT (default /tmp/gpu-check)
#
# The phases add up to 570 s: one call of a 600-second runner.
#
# Uses the machine's own python3 with torch and triton (PYTHON=... to pick another); needs no package of
# the project's server side (Ray, Redis, NIXL): the GPU tests and benchmarks import only torch, triton,
# safetensors, numpy, tqdm, prometheus_client and pytest. Each phase has its own time limit, so one that
# hangs still leaves the others' results; the phases are ordered by what matters most.
set -u
out=${OUT:-/tmp/gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels, not the interpreter

phase() {  # phase NAME SECONDS COMMAND...: run, log to $out/NAME.log, note the exit code
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name exit $rc" | tee -a "$out/summary.txt"
    tail -n 15 "$out/$name.log"
}

: > "$out/summary.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$out/versions.txt"
phase tests 240 "$py" -m pytest -q -p no:cacheprovider tests/gpu tests/kernels tests/model/test_fp8_resident.py
phase gpu_decode 90 "$py" -m bench.gpu_decode --preset small --reps 10
phase gpu_quick 60 "$py" -m bench.gpu --quick
phase gpu 180 "$py" -m bench.gpu --reps 5
