#!/usr/bin/env bash
# Ran once at commit b5874de (benchmarks/README.md, "band-device as the default"); its --chase-group
# option (and the grouped launches) went afterwards, so it is a record and does not run as is.
# Open measurement 1 (eighth session's next step): where band-device's compute time goes
# (`bench_e2e.py --stages`: host spans of each solver stage), and whether chases that threads
# bring at once sharing one launch (`--chase-group on`, the default) beat one launch each, end to
# end on one machine against the default solver (band-hybrid), in one device call of about 6-8
# minutes; first the CUDA tests of the kernel.
#     bash benchmarks/chase_group_gpu_call.sh     # $OUT set by the device tool
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/chase-group.log"
{ nvidia-smi -L; date -u; git log -1 --format=%h 2>/dev/null; } > "$L" 2>&1
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_band.py -k "cuda" >> "$L" 2>&1
echo "pytest rc=$?" >> "$L"
E="python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --stages"
timeout 130 $E --solver band-device --phases read-http compute analyze-local --json "$OUT/e2e-bd-group.json" >> "$L" 2>&1
echo "band-device grouped rc=$?" >> "$L"
timeout 70 $E --solver band-device --chase-group off --phases compute --json "$OUT/e2e-bd-nogroup.json" >> "$L" 2>&1
echo "band-device one launch each rc=$?" >> "$L"
timeout 110 $E --phases compute analyze-local --json "$OUT/e2e-auto.json" >> "$L" 2>&1
echo "auto rc=$?" >> "$L"
timeout 70 $E --solver band-device --inflight 16 --phases compute --json "$OUT/e2e-bd-16.json" >> "$L" 2>&1
echo "band-device 16 in flight rc=$?" >> "$L"
timeout 60 $E --solver band-device --phases analyze-http --json "$OUT/e2e-bd-http.json" >> "$L" 2>&1
echo "band-device http rc=$?" >> "$L"
date -u >> "$L"
cat "$L"
