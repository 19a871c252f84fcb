#!/usr/bin/env bash
# After the self-check fix (its inputs were made under `torch.device("meta")` when `svd-probe train`
# first counted parameters there, so every kernel failed its check and training ran the torch
# code): one device call of about 7 minutes. The kernels' CUDA test; `svd-probe train --compile`
# as its user runs it, one run at a time, mha with the default kernels and with --kernels torch,
# each run's warnings kept apart; bench_e2e.py with analyze's defaults (band-device from the
# folder, band-hybrid over HTTP), compute, HTTP three times, the folder once; then train_speed.py for mla and mla-o (the fused and the two-matmul output) in the
# stepgraph under the default kernels.
# SHORT=1: the CUDA test and the two mha runs only (about 2.5 minutes).
#     bash benchmarks/selfcheck_gpu_call.sh     # device tool: timeout_s 600, carry .carry
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
D=$PWD/.carry/data
L="$OUT/selfcheck.log"
{ nvidia-smi -L; date -u; nproc; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$L" 2>&1
timeout 60 python3 -m pytest -q -s -p no:cacheprovider tests/test_train_kernels.py -k cuda >> "$L" 2>&1
echo "pytest rc=$? $(date -u +%T)" >> "$L"
common=(--size small --device cuda --pretrain-steps 600 --batch-size 256 --no-progress --compile --json
        --tokenizer "$D/vocab/bert-base-uncased-vocab.txt" --data-dir "$D/wikitext-2")
for run in mha:triton mha:torch; do
  v=${run%%:*}; k=${run##*:}
  timeout 75 python3 -m svd_probe.cli train "${common[@]}" --variant $v --kernels $k --out /tmp/run-$v-$k \
    > "$OUT/train-$v-$k.json" 2> "/tmp/train-$v-$k.err"
  rc=$?
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in m.items() if not isinstance(v, (list, dict))})" "$OUT/train-$v-$k.json" $run >> "$L" 2>&1
  echo "train $run rc=$rc warnings: $(grep -c 'does not work' /tmp/train-$v-$k.err) $(grep 'does not work' /tmp/train-$v-$k.err | head -2) $(date -u +%T)" >> "$L"
done
if [ "${SHORT:-0}" != 1 ]; then
  timeout 190 python3 benchmarks/bench_e2e.py --device cuda --ckpt /tmp/ck62 --phases compute analyze-http analyze-http analyze-http analyze-local --json "$OUT/e2e.json" >> "$L" 2>&1
  echo "bench_e2e rc=$? $(date -u +%T)" >> "$L"
  timeout 170 python3 benchmarks/train_speed.py --modes stepgraph --profile --variants mla,mla-o --ablation --kernels triton --budget 160 --json "$OUT/ts-ablation.json" 2>&1 | grep -v "^E1\|^  \|AUTOTUNE\|^strides\|^dtypes" >> "$L"
  echo "train_speed rc=${PIPESTATUS[0]} $(date -u +%T)" >> "$L"
fi
cat "$L"
