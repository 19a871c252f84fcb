#!/usr/bin/env bash
# band-hybrid's "chase-free" rule (stage 2 on the GPU's bulge kernel when no other chase runs,
# else on a CPU worker) against the default rule, end to end on one machine, in one device call
# of about 4 minutes; first the CUDA tests of the kernel and of the rule.
#     bash benchmarks/chase_free_gpu_call.sh     # $OUT set by the device tool
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/chase-free.log"
{ nvidia-smi -L; date -u; } > "$L" 2>&1
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_band.py -k "bulge or chase" >> "$L" 2>&1
echo "pytest rc=$?" >> "$L"
timeout 110 python3 benchmarks/bench_e2e.py --device cuda --solver band-hybrid --hybrid-rule chase-free \
    --phases compute analyze-http --json "$OUT/e2e-chase-free.json" >> "$L" 2>&1
echo "chase-free rc=$?" >> "$L"
timeout 70 python3 benchmarks/bench_e2e.py --device cuda --phases analyze-http \
    --json "$OUT/e2e-auto.json" >> "$L" 2>&1
echo "auto rc=$?" >> "$L"
date -u >> "$L"
cat "$L"
