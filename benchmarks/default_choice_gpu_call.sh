#!/usr/bin/env bash
# Ran once at commit b5874de (benchmarks/README.md, "band-device as the default"); its --chase-group
# option (and the grouped launches) went afterwards, so it is a record and does not run as is.
# Whether band-device (stage 2 as the bulge kernel) should be analyze's default on CUDA: repeated
# compute phases with chases grouped and one launch each, interleaved, then analyze over HTTP
# and from a folder with band-device and with today's default (band-hybrid) on the same machine,
# in one device call of about 7 minutes. No --stages: the user's path, no spans recorded.
#     bash benchmarks/default_choice_gpu_call.sh     # $OUT set by the device tool
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/default-choice.log"
{ nvidia-smi -L; date -u; git log -1 --format=%h 2>/dev/null; } > "$L" 2>&1
E="python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62"
BD="--solver band-device"
run() { local name=$1; shift; echo "== $name" >> "$L"; timeout "$@" >> "$L" 2>&1; echo "$name rc=$?" >> "$L"; }
run bd-group-1 70 $E $BD --phases read-http compute --json "$OUT/bd-group-1.json"
run bd-off-1 50 $E $BD --chase-group off --phases compute --json "$OUT/bd-off-1.json"
run bd-group-2 50 $E $BD --phases compute --json "$OUT/bd-group-2.json"
run bd-off-2 50 $E $BD --chase-group off --phases compute --json "$OUT/bd-off-2.json"
run bd-http 90 $E $BD --phases analyze-http analyze-local --json "$OUT/bd-analyze.json"
run auto-http 100 $E --phases compute analyze-http --json "$OUT/auto-analyze.json"
run bd-off-http 45 $E $BD --chase-group off --phases analyze-http --json "$OUT/bd-off-http.json"
date -u >> "$L"
cat "$L"
