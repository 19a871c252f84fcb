#!/usr/bin/env bash
# A record: run once, on an H100 in the eighteenth session (2026-12-07, benchmarks/README.md,
# "The pipeline's two settings, and analyze beside compute"). Both settings were slower and are
# gone since (bench_e2e.py has no --big-grams or --grouped-heads now); trace_gpu_call.sh is next.
# Seventeenth session, one device call of at most 10 minutes (issues 11 and 12):
# 1. On an H200 only, open measurement 2: the training step under the default kernels against the
#    torch code (train_speed.py --modes stepgraph --kernels triton,torch,all --ablation).
#    On an H100: mha alone, triton against all (the SwiGLU kernel retested in the whole step).
# 2. Open measurement 1: band-device's compute with --stages --sync-debug (the synchronizing CUDA
#    calls by thread and call site), with the big Grams formed on the caller's stream (today's)
#    and, new, on the solve workers' (--big-grams solver) with each layer's thin factors and
#    per-head σ in one call per shape (--grouped-heads).
# 3. band-device's compute with 1 and 2 chase launches at once (--chase-launches) and either
#    place for the Grams, while the call has time; then analyze over HTTP and from the folder.
# BUDGET=S: the seconds the call may take (default 580); SKIP_TRAIN=1: step 1 left out on an
# H100, and on an H200 mha alone.
#     bash benchmarks/launches_gpu_call.sh     # device tool: timeout_s 600
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
T0=$(date +%s)
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - T0) )); }
L="$OUT/launches.log"
{ nvidia-smi -L; date -u; nproc; lscpu | grep -i "model name\|numa node(s)"; git log --oneline -1;
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
if nvidia-smi -L | grep -q H200; then
  if [ "${SKIP_TRAIN:-0}" = 1 ]; then  # a short call: mha alone
    timeout 110 python3 benchmarks/train_speed.py --modes stepgraph --variants mha \
        --kernels triton,torch --budget 100 --json "$OUT/ts.json" 2>&1 \
        | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
  else
    timeout 230 python3 benchmarks/train_speed.py --modes stepgraph --profile --variants mha,mla,mla-o \
        --kernels triton,torch --ablation --budget 215 --json "$OUT/ts.json" 2>&1 \
        | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
  fi
elif [ "${SKIP_TRAIN:-0}" = 1 ]; then
  echo "train_speed skipped (SKIP_TRAIN=1)" >> "$L"
else
  timeout 110 python3 benchmarks/train_speed.py --modes stepgraph --variants mha \
      --kernels triton,all --budget 100 --json "$OUT/ts.json" 2>&1 \
      | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
fi
echo "train_speed rc=${PIPESTATUS[0]} $(date -u +%T) left $(left)s" >> "$L"
e2e() {  # NAME LAUNCHES GRAMS FLAGS PHASES... (each run only while the call has time for it)
  local name=$1 n=$2 g=$3 flags=$4; shift 4
  local need=$(( 45 * $# + 10 ))
  if [ "$(left)" -lt "$need" ]; then echo "skip $name: left $(left)s" >> "$L"; return; fi
  timeout $(( $(left) - 5 )) python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --solver band-device \
      --stages $flags --chase-launches "$n" --big-grams "$g" --phases "$@" --json "$OUT/$name.json" >> "$L" 2>&1
  echo "$name rc=$? $(date -u +%T) left $(left)s" >> "$L"
}
e2e sync-c 1 caller --sync-debug compute
e2e sync-n 1 solver "--sync-debug --grouped-heads" compute
e2e n1 1 solver --grouped-heads compute compute
e2e c1 1 caller "" compute
e2e n2 2 solver --grouped-heads compute compute
e2e n2-analyze 2 solver --grouped-heads analyze-http analyze-local
tail -c 60000 "$L"
