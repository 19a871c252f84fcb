#!/usr/bin/env bash
# analyze's default on CUDA (auto: band-device since 2026-12-03) end to end, every phase, then
# analyze over HTTP twice more (the second with 8 layers in flight), in one device call of about
# 5 minutes; first the CUDA tests of the band solvers and of the default.
#     bash benchmarks/default_gpu_call.sh     # $OUT set by the device tool
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/default.log"
{ nvidia-smi -L; date -u; git log -1 --format=%h 2>/dev/null; } > "$L" 2>&1
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_band.py tests/test_pipeline.py -k "cuda or pipeline_config" >> "$L" 2>&1
echo "pytest rc=$?" >> "$L"
E="python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62"
timeout 200 $E --phases read-http compute analyze-local analyze-http --json "$OUT/e2e-default.json" >> "$L" 2>&1
echo "default rc=$?" >> "$L"
timeout 70 $E --phases analyze-http --json "$OUT/e2e-default-http2.json" >> "$L" 2>&1
echo "default http again rc=$?" >> "$L"
timeout 60 $E --inflight 8 --phases analyze-http --json "$OUT/e2e-default-http-8.json" >> "$L" 2>&1
echo "default http, 8 in flight rc=$?" >> "$L"
date -u >> "$L"
cat "$L"
