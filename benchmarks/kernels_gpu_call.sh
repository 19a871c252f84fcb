#!/usr/bin/env bash
# The training step's hand-written kernels (svd_probe/train/kernels.py) on one GPU, in one device
# call of about 6 minutes, the most needed first (each step writes its files as it goes, so a call
# cut at its limit keeps what ran): the kernels' CUDA test (a MaskedLM step against the torch
# path); the whole stepgraph step of mha, mla and mla-o with every fast path and with none; the
# kernels alone against the torch code they replace (bench_train_kernels.py); then mha with all
# fast paths but one, each in turn.
#     bash benchmarks/kernels_gpu_call.sh     # $OUT set by the device tool
# SHORT=1 stops after bench_train_kernels.py (about 4.8 minutes): first_gpu_call.sh's form.
set -u
OUT=${OUT:-/tmp/out}
SHORT=${SHORT:-0}
export PYTHONPATH=.
L="$OUT/kernels.log"
{ nvidia-smi -L; date -u; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
quiet() { grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes"; }
timeout 60 python3 -m pytest -q -s -p no:cacheprovider tests/test_train_kernels.py -k cuda >> "$L" 2>&1
echo "pytest rc=$? $(date -u +%T)" >> "$L"
TS="python3 benchmarks/train_speed.py --modes stepgraph --profile"
timeout 170 $TS --variants mha,mla,mla-o --kernels all,torch --budget 160 --json "$OUT/ts-all.json" 2>&1 | quiet >> "$L"
echo "train_speed all/torch rc=${PIPESTATUS[0]} $(date -u +%T)" >> "$L"
timeout 60 python3 benchmarks/bench_train_kernels.py --json "$OUT/bench_train_kernels.json" >> "$L" 2>&1
echo "bench_train_kernels rc=$? $(date -u +%T)" >> "$L"
if [ "$SHORT" = 1 ]; then cat "$L"; exit 0; fi
timeout 120 $TS --variants mha --kernels all,-attention,-swiglu,-pad-vocab --budget 110 --json "$OUT/ts-mha-each.json" 2>&1 | quiet >> "$L"
echo "train_speed mha each rc=${PIPESTATUS[0]} $(date -u +%T)" >> "$L"
cat "$L"
