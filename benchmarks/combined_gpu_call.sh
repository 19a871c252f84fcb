#!/usr/bin/env bash
# cuts_gpu_call.sh and stages_gpu_call.sh in one device call of at most 10 minutes, for when
# machines are scarce: the attention cuts (kernel-alone sweep, then the stepgraph under the
# default and the fastest cut, with the mla-o ablation), then band-device's stages (compute and
# from the folder) and band-hybrid's compute, each only while the call has time left for it.
#     bash benchmarks/combined_gpu_call.sh     # device tool: timeout_s 600
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
T0=$(date +%s)
left() { echo $(( 575 - ($(date +%s) - T0) )); }
L="$OUT/combined.log"
{ nvidia-smi -L; date -u; nproc; lscpu | grep -i "model name\|numa node(s)\|thread(s) per core"; git log --oneline -1;
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
timeout 170 python3 benchmarks/bench_train_kernels.py --cuts --best-cut /tmp/best.json \
    --json "$OUT/cuts.json" >> "$L" 2>&1
echo "bench_train_kernels rc=$? $(date -u +%T) left $(left)s" >> "$L"
[ -s /tmp/best.json ] || echo '{}' > /tmp/best.json
timeout 220 python3 benchmarks/train_speed.py --modes stepgraph --profile --variants mha,mla,mla-o \
    --kernels triton --cuts /tmp/best.json --ablation --budget 200 --json "$OUT/ts-cuts.json" 2>&1 \
    | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
echo "train_speed rc=${PIPESTATUS[0]} $(date -u +%T) left $(left)s" >> "$L"
if [ "$(left)" -gt 110 ]; then
  timeout $(( $(left) - 45 )) python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --solver band-device \
      --stages --phases compute analyze-local --json "$OUT/e2e-bd-stages.json" >> "$L" 2>&1
  echo "band-device rc=$? $(date -u +%T) left $(left)s" >> "$L"
fi
if [ "$(left)" -gt 50 ]; then
  timeout $(( $(left) - 5 )) python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --solver band-hybrid \
      --stages --phases compute --json "$OUT/e2e-bh-stages.json" >> "$L" 2>&1
  echo "band-hybrid rc=$? $(date -u +%T) left $(left)s" >> "$L"
fi
tail -c 60000 "$L"
