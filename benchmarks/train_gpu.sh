#!/usr/bin/env bash
# The issue-5 experiment on one GPU: mha, mla, mla-o x 2 seeds, pretrain on WikiText-2,
# fine-tune on SST-2, then `svd-probe compare`. Sized for about 8 minutes of wall time on an H100.
#
# Run from the repo root, with the data copied to .carry/data/{wikitext-2,SST-2,vocab}:
#     mkdir -p .carry/data && cp -r ../shared/data/{wikitext-2,SST-2,vocab} .carry/data/
#     PYTHONPATH=. OUT=/tmp/out bash benchmarks/train_gpu.sh
# (device tool: carry [".carry"], command "PYTHONPATH=. bash benchmarks/train_gpu.sh")
#
# Back in $OUT (8 files at most, <= 16 MiB each):
#     results.json       every run's metrics.json, in one list
#     compare.txt        the `svd-probe compare` table (and its --json rows)
#     train_logs.txt     all train.log files plus each run's stdout/stderr
#     env.txt            nvidia-smi, versions, the recipe
#     checkpoint/        config.json + model.safetensors of one run (mla-o, seed 0), attention
#                        tensors only (the full float32 model, 52 MB, is over the 16 MiB limit):
#                        enough for `svd-probe analyze $OUT/checkpoint`.
#
# If a run is cut off (RUN_TIMEOUT, or the call's limit), run the script again on the same, still
# warm machine: runs/ is git-ignored, so it stays, and every run resumes from its last checkpoint
# (every 250 steps). Runs that already finished (metrics.json) are skipped.
#
# Recipe (override any of these from the environment). Throughput assumption, conservative:
# with all 6 runs sharing the GPU, each gets >= ~1,000 pretraining samples/s (an eager 256-wide
# 6-layer encoder alone does several thousand), so 1,500 steps x 128 = 192k samples take
# <= ~200 s per run; fine-tuning (short sentences) and evaluation add well under a minute.
set -uo pipefail

PRETRAIN_STEPS=${PRETRAIN_STEPS:-1500}
BATCH_SIZE=${BATCH_SIZE:-128}
LR=${LR:-1e-3}
FINETUNE_STEPS=${FINETUNE_STEPS:-1500}
FINETUNE_BATCH_SIZE=${FINETUNE_BATCH_SIZE:-32}
FINETUNE_LR=${FINETUNE_LR:-1e-4}
SEEDS=${SEEDS:-"0 1"}
VARIANTS=${VARIANTS:-"mha mla mla-o"}
PARALLEL=${PARALLEL:-6}          # runs at once on the one GPU (6 = all; 1 = one after another)
COMPILE=${COMPILE:-0}            # 1: --compile (adds ~1 min of compilation per run)
RUN_TIMEOUT=${RUN_TIMEOUT:-470}  # seconds per run, so the script ends inside a 10-minute call
DATA=${DATA:-.carry/data}
RUNS=${RUNS:-runs/gpu}
OUT=${OUT:-$RUNS/out}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}           # cpu + SIZE=tiny for a smoke test of this script
SIZE=${SIZE:-small}

export PYTHONUNBUFFERED=1
# Six processes share 16 cores: without a cap each would start 16 OpenMP threads for its
# CPU-side masking, and oversubscription slows every one of them down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT" "$RUNS"
for f in "$DATA/wikitext-2/wiki.train.tokens" "$DATA/SST-2/train.tsv" "$DATA/vocab/bert-base-uncased-vocab.txt"; do
    [ -f "$f" ] || { echo "missing $f: copy ../shared/data/{wikitext-2,SST-2,vocab} into $DATA/" >&2; exit 2; }
done

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
    echo "SIZE=$SIZE DEVICE=$DEVICE PRETRAIN_STEPS=$PRETRAIN_STEPS BATCH_SIZE=$BATCH_SIZE LR=$LR FINETUNE_STEPS=$FINETUNE_STEPS FINETUNE_BATCH_SIZE=$FINETUNE_BATCH_SIZE FINETUNE_LR=$FINETUNE_LR SEEDS=$SEEDS VARIANTS=$VARIANTS PARALLEL=$PARALLEL COMPILE=$COMPILE"
} > "$OUT/env.txt" 2>&1

compile_flag=--no-compile
[ "$COMPILE" = 1 ] && compile_flag=--compile

start=$(date +%s)
pids=()
for seed in $SEEDS; do
    for v in $VARIANTS; do
        dir="$RUNS/$v-seed$seed"
        if [ -f "$dir/metrics.json" ]; then echo "$dir finished earlier: kept" | tee -a "$OUT/env.txt"; continue; fi
        cmd=(timeout "$RUN_TIMEOUT" "$PY" -m svd_probe.cli train --variant "$v" --seed "$seed" --device "$DEVICE" --size "$SIZE"
             --tokenizer "$DATA/vocab/bert-base-uncased-vocab.txt" --data-dir "$DATA/wikitext-2" --sst2-dir "$DATA/SST-2"
             --pretrain-steps "$PRETRAIN_STEPS" --batch-size "$BATCH_SIZE" --lr "$LR"
             --finetune-steps "$FINETUNE_STEPS" --finetune-batch-size "$FINETUNE_BATCH_SIZE" --finetune-lr "$FINETUNE_LR"
             --log-every 100 --checkpoint-every 250 --no-progress $compile_flag --out "$dir")
        echo "${cmd[*]}" >> "$OUT/env.txt"
        # Beside the run folder, not in it: train refuses a non-empty folder that holds no checkpoint.
        mkdir -p "$RUNS/stdout"
        "${cmd[@]}" > "$RUNS/stdout/$v-seed$seed.txt" 2>&1 &
        pids+=($!)
        # Throttle to PARALLEL runs at once.
        while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 2; done
    done
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=$((fail + 1)); done
echo "all runs ended after $(( $(date +%s) - start )) s, $fail failed" | tee -a "$OUT/env.txt"

# Collect: metrics, comparison, logs, one checkpoint.
$PY - "$RUNS" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
runs = sorted(Path(sys.argv[1]).glob("*/metrics.json"))
rows = [dict(json.loads(p.read_text()), run=p.parent.name) for p in runs]
Path(sys.argv[2]).write_text(json.dumps(rows, indent=2) + "\n")
print(f"{len(rows)} runs in {sys.argv[2]}")
EOF
{
    COLUMNS=200 $PY -m svd_probe.cli compare "$RUNS"
    COLUMNS=200 $PY -m svd_probe.cli compare "$RUNS" --json
} > "$OUT/compare.txt" 2>&1
cat "$OUT/compare.txt" | head -20
for d in "$RUNS"/*/; do
    echo "===== $d"
    cat "$d/train.log" 2>/dev/null
    echo "----- stdout/stderr"
    tail -n 40 "$RUNS/stdout/$(basename "$d").txt" 2>/dev/null
done > "$OUT/train_logs.txt"

keep="$RUNS/mla-o-seed0"
if [ -f "$keep/model.safetensors" ]; then
    mkdir -p "$OUT/checkpoint"
    cp "$keep/config.json" "$OUT/checkpoint/config.json"
    $PY - "$keep/model.safetensors" "$OUT/checkpoint/model.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
keep = {k: v for k, v in t.items() if ".attn" in k or ".attn_norm." in k}
save_file(keep, sys.argv[2], metadata={"format": "pt", "note": "attention tensors only"})
print(f"kept {len(keep)} of {len(t)} tensors in {sys.argv[2]}")
EOF
fi
ls -la "$OUT" "$OUT/checkpoint" 2>/dev/null
exit $(( fail > 0 ))
