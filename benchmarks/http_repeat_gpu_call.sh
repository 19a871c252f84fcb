#!/usr/bin/env bash
# Is band-device over HTTP still erratic (tenth session: 33 to over 50 s in five runs)? Issue 12
# item 1 over HTTP, in one device call of about 7 minutes: band-device's compute phase, then
# analyze over HTTP four times and from the folder once, on one machine; band-device with two chase
# launches at once; then (issue 11 item 6) mha with all the training step's kernels but one, each
# in turn. 62 layers, built in /tmp/ck62. Each phase prints its own line into http_repeat.log.
#     bash benchmarks/http_repeat_gpu_call.sh     # device tool: timeout_s 600
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/http_repeat.log"
{ nvidia-smi -L; date -u; nproc; } > "$L" 2>&1
E="python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62"
timeout 230 $E --solver band-device --phases compute analyze-http analyze-http analyze-http analyze-http analyze-local --json "$OUT/e2e-bd-repeat.json" >> "$L" 2>&1
echo "band-device repeat rc=$? $(date -u +%T)" >> "$L"
timeout 110 $E --solver band-device --chase-launches 2 --phases compute analyze-http --json "$OUT/e2e-bd-2launch.json" >> "$L" 2>&1
echo "band-device 2 launches rc=$? $(date -u +%T)" >> "$L"
TS="python3 benchmarks/train_speed.py --modes stepgraph --profile"
timeout 150 $TS --variants mha --kernels all,-attention,-swiglu,-pad-vocab,torch --budget 140 --json "$OUT/ts-mha-each.json" 2>&1 | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
echo "train_speed mha each rc=${PIPESTATUS[0]} $(date -u +%T)" >> "$L"
cat "$L"
