#!/bin/bash
# Everything the lent GPU machine measures, in one call (issue #25): the Triton kernels against
# torch (bench/RESULTS-kernels.md), then the whole CUDA check (bench/RESULTS-gpu.md: engine vs
# peft, the estimator for every method, NF4, bf16, and the real run against HF Trainer + peft).
# Run from the project's root through the device kit:
#   bash .device/run.sh bash bench/gpu_all.sh "$OUT"        (STUDIO_BENCH_COMMIT=<sha> stamps it)
# Each result file is written as soon as its part ends, so a call cut short returns what it measured.
set -u
out=${1:-bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 bench/triton_kernels.py --out "$out/RESULTS-kernels.md" > "$out/kernels.log" 2>&1
echo "triton_kernels: exit $?"
python3 bench/gpu_check.py --out "$out/RESULTS-gpu.md" > "$out/gpu.log" 2>&1
echo "gpu_check: exit $?"
grep -E "^(Failed|- )" "$out/RESULTS-gpu.md" | tail -n 12
