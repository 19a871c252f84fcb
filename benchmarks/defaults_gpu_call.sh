#!/usr/bin/env bash
# Two candidate defaults on one GPU, in one device call of about 7 minutes (a record: it ran on an
# H100 on 2026-12-07): `svd-probe train --kernels triton` (attention + pad-vocab, without the
# swiglu kernel; now the default) and `analyze --solver auto` = band-device over HTTP too (as the
# tree it ran on had it; reverted after an H200 scattered, benchmarks/README.md). The kernels' CUDA test; train_speed.py --kernels triton,torch for
# mha, mla and mla-o; `svd-probe train` as its user runs it, with the default kernels and with
# --kernels torch, side by side (MLM loss after 600 steps); then bench_e2e.py with analyze's
# defaults: compute, analyze over HTTP three times, from the folder once. 62 layers in /tmp/ck62.
#     bash benchmarks/defaults_gpu_call.sh     # device tool: timeout_s 600, carry .carry
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
D=$PWD/.carry/data
L="$OUT/defaults.log"
{ nvidia-smi -L; date -u; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
timeout 60 python3 -m pytest -q -s -p no:cacheprovider tests/test_train_kernels.py -k cuda >> "$L" 2>&1
echo "pytest rc=$? $(date -u +%T)" >> "$L"
timeout 150 python3 benchmarks/train_speed.py --modes stepgraph --profile --variants mha,mla,mla-o --kernels triton,torch --budget 140 --json "$OUT/ts-defaults.json" 2>&1 | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
echo "train_speed rc=${PIPESTATUS[0]} $(date -u +%T)" >> "$L"
common=(--variant mha --size small --device cuda --pretrain-steps 600 --batch-size 256 --no-progress --compile --json
        --tokenizer "$D/vocab/bert-base-uncased-vocab.txt" --data-dir "$D/wikitext-2")
for k in triton torch; do
  timeout 100 python3 -m svd_probe.cli train "${common[@]}" --kernels $k --out /tmp/run-$k > "$OUT/train-$k.json" 2>> "$L" &
done
wait
echo "train rc done $(date -u +%T)" >> "$L"
for k in triton torch; do
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in m.items() if not isinstance(v, (list, dict))})" "$OUT/train-$k.json" $k >> "$L" 2>&1
done
timeout 200 python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --phases compute analyze-http analyze-http analyze-http analyze-local --json "$OUT/e2e-defaults.json" >> "$L" 2>&1
echo "bench_e2e defaults rc=$? $(date -u +%T)" >> "$L"
cat "$L"
