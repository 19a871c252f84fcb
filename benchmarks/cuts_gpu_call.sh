#!/usr/bin/env bash
# The attention kernels' cuts (kernels.AttentionCut), in one device call of about 7 minutes: the
# kernels' CUDA test; bench_train_kernels.py --cuts (the forward and backward alone under a grid
# of cuts, each checked against float32 torch code), which writes the fastest correct cut; then
# train_speed.py's stepgraph (`svd-probe train --compile`'s step) for mha, mla and mla-o under
# the default cut and that one, interleaved in one process, with mla-o's two-matmul output
# (--ablation) and --profile.
#     bash benchmarks/cuts_gpu_call.sh     # device tool: timeout_s 600
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/cuts.log"
{ nvidia-smi -L; date -u; nproc; lscpu | grep "Model name"; git log --oneline -1;
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
timeout 90 python3 -m pytest -q -s -p no:cacheprovider tests/test_train_kernels.py -k cuda >> "$L" 2>&1
echo "pytest rc=$? $(date -u +%T)" >> "$L"
timeout 200 python3 benchmarks/bench_train_kernels.py --cuts --best-cut /tmp/best.json \
    --json "$OUT/cuts.json" >> "$L" 2>&1
echo "bench_train_kernels rc=$? $(date -u +%T)" >> "$L"
[ -s /tmp/best.json ] || echo '{}' > /tmp/best.json
timeout 250 python3 benchmarks/train_speed.py --modes stepgraph --profile --variants mha,mla,mla-o \
    --kernels triton --cuts /tmp/best.json --ablation --budget 230 --json "$OUT/ts-cuts.json" 2>&1 \
    | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
echo "train_speed rc=${PIPESTATUS[0]} $(date -u +%T)" >> "$L"
cat "$L"
