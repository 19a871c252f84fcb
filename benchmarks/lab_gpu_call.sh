#!/usr/bin/env bash
# One device call of the lab experiment (see lab_gpu.py): a 20-step compiled sanity run of each
# objective first (it also fills the shared inductor cache); if either fails, the experiment runs
# eager (what round 2 ran), so a call is never spent on a new bug of the compiled path alone.
# The arguments go to lab_gpu.py; --compile is added when the sanity runs pass.
#   OUT=/tmp/out bash benchmarks/lab_gpu_call.sh --grid clm:0-4 --grid mlm:3-4 --then '' \
#       --steps 640 --batch-size 256 --parallel 4 --deadline-s 480
set -u
D=$PWD/.carry/data
OUT=${OUT:-/tmp/out}
common=(--size small --device cuda --pretrain-steps 20 --batch-size 256 --no-progress --overwrite --compile
        --tokenizer "$D/vocab/bert-base-uncased-vocab.txt" --data-dir "$D/wikitext-2")
PYTHONPATH=. timeout 100 python3 -m svd_probe.cli train --variant mla-o --objective clm "${common[@]}" --out /tmp/sanity-clm > "$OUT/sanity.txt" 2>&1 &
PYTHONPATH=. timeout 100 python3 -m svd_probe.cli train --variant mha "${common[@]}" --sst2-dir "$D/SST-2" --finetune-steps 20 --out /tmp/sanity-mlm >> "$OUT/sanity.txt" 2>&1 &
wait
if [ -f /tmp/sanity-clm/metrics.json ] && [ -f /tmp/sanity-mlm/metrics.json ]; then
    echo "sanity passed: compiled" | tee -a "$OUT/sanity.txt"
    PYTHONPATH=. python3 benchmarks/lab_gpu.py --out "$OUT" --compile "$@"
else
    echo "sanity FAILED under --compile: running eager" | tee -a "$OUT/sanity.txt"
    PYTHONPATH=. python3 benchmarks/lab_gpu.py --out "$OUT" "$@"
fi
