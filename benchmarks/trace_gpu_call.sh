#!/usr/bin/env bash
# One device call of at most 10 minutes (issues 11 and 12), benchmarks/README.md "Open
# measurements":
# 1. Row 1: band-device's compute of the 62-layer checkpoint as a kernel timeline
#    (bench_e2e.py --trace 8: each stream's busy time, the time no kernel ran, the top kernels and
#    the top CPU ops by thread, over layers 27-34), then compute with --stages and untraced, to
#    set the traced run beside its neighbours.
# 2. Row 2, on an H200 only: the training step under the default kernels against the torch code
#    (train_speed.py --modes stepgraph --kernels triton,torch --ablation); mha alone with
#    SKIP_TRAIN=1.
# BUDGET=S: the seconds the call may take (default 580); TRACE_N, TRACE_S: the trace's layers
# (default 2) and its limit (300 s); ANALYZE=1: analyze over HTTP and from the folder beside
# compute in place of the --stages runs.
#     bash benchmarks/trace_gpu_call.sh     # device tool: timeout_s 600
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=. PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - T0) )); }
L="$OUT/trace.log"
{ nvidia-smi -L; date -u; nproc; git log --oneline -1;
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
B="python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --solver band-device"
# 2026-12-08 on an H100: --trace 8 ran past 150 s and said nothing. Now TRACE_N layers (default
# 2), each step of the trace's end logged as it happens (SVD_PROBE_TRACE_LOG), and more time.
SVD_PROBE_TRACE_LOG="$OUT/trace-steps.log" timeout ${TRACE_S:-300} $B --phases compute \
    --trace ${TRACE_N:-2} --json "$OUT/trace.json" >> "$L" 2>&1
echo "trace rc=$? $(date -u +%T) left $(left)s" >> "$L"
pkill -f "bench_e2e.py --phase" ; sleep 2  # a phase left running by the timeout
if [ "${ANALYZE:-0}" = 1 ]; then  # item 1 of issue 12: analyze beside compute, same call
  timeout $(( $(left) - 15 )) $B --phases compute analyze-http analyze-local compute analyze-local \
      analyze-http --json "$OUT/phases.json" >> "$L" 2>&1
  echo "phases rc=$? $(date -u +%T) left $(left)s" >> "$L"
else
  timeout 100 $B --stages --phases compute compute --json "$OUT/stages.json" >> "$L" 2>&1
  echo "stages rc=$? $(date -u +%T) left $(left)s" >> "$L"
fi
if nvidia-smi -L | grep -q H200 && [ "$(left)" -gt 130 ]; then
  if [ "${SKIP_TRAIN:-0}" = 1 ]; then V=mha; A=""; else V=mha,mla,mla-o; A=--ablation; fi
  timeout $(( $(left) - 10 )) python3 benchmarks/train_speed.py --modes stepgraph --variants $V \
      --kernels triton,torch $A --budget $(( $(left) - 25 )) --json "$OUT/ts.json" 2>&1 \
      | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
  echo "train_speed rc=${PIPESTATUS[0]} $(date -u +%T) left $(left)s" >> "$L"
fi
tail -c 60000 "$L"
