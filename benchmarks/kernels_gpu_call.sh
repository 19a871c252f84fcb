#!/usr/bin/env bash
# The training step's hand-written kernels (svd_probe/train/kernels.py) on one GPU, in one device
# call of about 7 minutes: their CUDA test (a whole MaskedLM step against the torch path), the
# kernels alone against the torch code they replace (bench_train_kernels.py), then the whole
# stepgraph step: mha with every fast path, none, and all but one; mla and mla-o with all and none.
#     bash benchmarks/kernels_gpu_call.sh     # $OUT set by the device tool
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/kernels.log"
{ nvidia-smi -L; date -u; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_train_kernels.py >> "$L" 2>&1
echo "pytest rc=$?" >> "$L"
timeout 90 python3 benchmarks/bench_train_kernels.py --json "$OUT/bench_train_kernels.json" >> "$L" 2>&1
echo "bench_train_kernels rc=$?" >> "$L"
TS="python3 benchmarks/train_speed.py --modes stepgraph --profile"
timeout 200 $TS --variants mha --kernels all,torch,-attention,-swiglu,-pad-vocab --budget 190 --json "$OUT/ts-mha.json" 2>&1 | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
echo "train_speed mha rc=$?" >> "$L"
timeout 150 $TS --variants mla,mla-o --kernels all,torch --budget 140 --json "$OUT/ts-mla.json" 2>&1 | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
echo "train_speed mla rc=$?" >> "$L"
date -u >> "$L"
cat "$L"
