#!/usr/bin/env bash
# The benchmarks of one device call, each under its own time limit so that one that runs long
# cannot cost the others: training throughput (train_speed.py), one attention layer
# (bench_attention.py), and analyze end to end (bench_e2e.py, LAYERS layers).
#     PYTHONPATH=. bash benchmarks/gpu_benchmarks.sh        # $OUT set by the device tool
set -u
OUT=${OUT:-/tmp/out}
LAYERS=${LAYERS:-16}
export PYTHONPATH=.
nvidia-smi -L > "$OUT/bench-env.txt" 2>&1
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' >> "$OUT/bench-env.txt" 2>&1
date -u >> "$OUT/bench-env.txt"
timeout 215 python3 benchmarks/train_speed.py --budget 200 --json "$OUT/train_speed.json" > "$OUT/train_speed.log" 2>&1
echo "train_speed rc=$?" >> "$OUT/bench-env.txt"
timeout 75 python3 benchmarks/bench_attention.py --budget 60 --json "$OUT/bench_attention.json" > "$OUT/bench_attention.log" 2>&1
echo "bench_attention rc=$?" >> "$OUT/bench-env.txt"
timeout 175 python3 benchmarks/bench_e2e.py --layers "$LAYERS" --device cuda --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
echo "bench_e2e rc=$?" >> "$OUT/bench-env.txt"
date -u >> "$OUT/bench-env.txt"
cat "$OUT/bench-env.txt"
