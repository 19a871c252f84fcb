#!/usr/bin/env bash
# Issue 12's end-to-end figures (benchmarks/README.md) in one device call of at most 10 minutes:
# analyze end to end with its default reader (every phase; on CUDA the reader process), then
# with the thread reader (reading and analyze over HTTP), then py-spy --gil on analyze over HTTP
# with the default reader, summarized.
#     PYTHONPATH=. bash benchmarks/e2e_gpu_call.sh     # $OUT set by the device tool
# py-spy is one static binary: copy it into .carry/bin/ and carry that folder; without it the
# last step is skipped.
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
C=/tmp/svdp-bench-e2e-62
L="$OUT/e2e-call.log"
{ nvidia-smi -L; date -u; git log --oneline -1; } > "$L" 2>&1
timeout 230 python3 benchmarks/bench_e2e.py --device cuda --ckpt "$C" \
    --phases read-http compute analyze-local analyze-http --json "$OUT/e2e-auto.json" >> "$L" 2>&1
echo "auto rc=$?" >> "$L"
timeout 120 python3 benchmarks/bench_e2e.py --device cuda --ckpt "$C" --reader thread \
    --phases read-http analyze-http --json "$OUT/e2e-thread.json" >> "$L" 2>&1
echo "thread rc=$?" >> "$L"
if [ -x .carry/bin/py-spy ]; then
    timeout 100 .carry/bin/py-spy record --gil --nonblocking --subprocesses -r 50 -f raw -o "$OUT/gil.txt" -- \
        python3 benchmarks/bench_e2e.py --device cuda --ckpt "$C" --phases analyze-http --json "$OUT/e2e-gil.json" >> "$L" 2>&1
    python3 benchmarks/gil_profile.py "$OUT/gil.txt" >> "$L" 2>&1
    gzip -9 "$OUT/gil.txt"
fi
date -u >> "$L"
cat "$L"
