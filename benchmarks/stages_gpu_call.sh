#!/usr/bin/env bash
# Open measurement 1b (issue 12 on H200s): where band-device's time goes on this machine, beside
# band-hybrid, in one device call of about 5 minutes. bench_e2e.py --stages (the band solvers'
# host spans per stage): band-device compute twice and from the folder once, band-hybrid compute
# once, on the 62-layer checkpoint (built once). lscpu first: the H100 and H200 machines may
# differ in their host CPUs, which run stage 2's scheduling and the chase launches.
#     bash benchmarks/stages_gpu_call.sh     # device tool: timeout_s 600
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/stages.log"
{ nvidia-smi -L; date -u; nproc; lscpu | grep -i "model name\|mhz\|numa node(s)\|thread(s) per core";
  free -g | head -2; } > "$L" 2>&1
timeout 200 python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --solver band-device --stages \
    --phases compute compute analyze-local --json "$OUT/e2e-bd-stages.json" >> "$L" 2>&1
echo "band-device rc=$? $(date -u +%T)" >> "$L"
timeout 100 python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --solver band-hybrid --stages \
    --phases compute --json "$OUT/e2e-bh-stages.json" >> "$L" 2>&1
echo "band-hybrid rc=$? $(date -u +%T)" >> "$L"
cat "$L"
