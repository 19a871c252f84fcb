#!/usr/bin/env bash
# One device call of the lab experiment (see lab_gpu.py): a 20-step sanity run of each objective
# first, on the code as it is; if either fails, the experiment runs on the package carried in
# .carry/old (the commit the previous call ran), so a call is never spent on a new bug alone.
set -u
D=$PWD/.carry/data
OUT=${OUT:-/tmp/out}
common=(--size small --device cuda --pretrain-steps 20 --batch-size 256 --no-progress --overwrite
        --tokenizer "$D/vocab/bert-base-uncased-vocab.txt" --data-dir "$D/wikitext-2")
PYTHONPATH=. timeout 100 python3 -m svd_probe.cli train --variant mla-o --objective clm "${common[@]}" --out /tmp/sanity-clm > "$OUT/sanity.txt" 2>&1 &
PYTHONPATH=. timeout 100 python3 -m svd_probe.cli train --variant mha "${common[@]}" --sst2-dir "$D/SST-2" --finetune-steps 20 --out /tmp/sanity-mlm >> "$OUT/sanity.txt" 2>&1 &
wait
if [ -f /tmp/sanity-clm/metrics.json ] && [ -f /tmp/sanity-mlm/metrics.json ]; then
    echo "sanity passed: this commit" | tee -a "$OUT/sanity.txt"
    PYTHONPATH=. python3 benchmarks/lab_gpu.py --out "$OUT" "$@"
else
    echo "sanity FAILED: running the carried package .carry/old" | tee -a "$OUT/sanity.txt"
    cd .carry/old && python3 ../../benchmarks/lab_gpu.py --data "$D" --runs ../../runs/lab --out "$OUT" "$@"
fi
