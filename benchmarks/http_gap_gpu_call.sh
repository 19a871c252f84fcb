#!/usr/bin/env bash
# Why analyze over HTTP stays behind analyze from a folder (issue 12 item 1; benchmarks/README.md
# "Open measurements" row 1), in one device call of about 6 minutes: every phase with band-device
# and the stage spans, then band-device with two chase launches at once, then band-hybrid (the
# default over HTTP) over HTTP with its spans. 62 layers, built in /tmp/ck62.
#     bash benchmarks/http_gap_gpu_call.sh     # $OUT set by the device tool
# SHORT=1 leaves out the two-launch step (about 4.3 minutes): first_gpu_call.sh's form.
set -u
OUT=${OUT:-/tmp/out}
SHORT=${SHORT:-0}
export PYTHONPATH=.
L="$OUT/http_gap.log"
{ nvidia-smi -L; date -u; nproc; } > "$L" 2>&1
E="python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62"
timeout 190 $E --solver band-device --stages --phases read-http compute analyze-local analyze-http --json "$OUT/e2e-bd.json" >> "$L" 2>&1
echo "band-device rc=$?" >> "$L"
if [ "$SHORT" != 1 ]; then
  timeout 110 $E --solver band-device --chase-launches 2 --phases compute analyze-http --json "$OUT/e2e-bd-2launch.json" >> "$L" 2>&1
  echo "band-device 2 launches rc=$?" >> "$L"
fi
timeout 70 $E --solver band-hybrid --stages --phases analyze-http --json "$OUT/e2e-bh.json" >> "$L" 2>&1
echo "band-hybrid rc=$?" >> "$L"
date -u >> "$L"
cat "$L"
