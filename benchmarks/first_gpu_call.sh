#!/usr/bin/env bash
# The one device call to make first when a session may get a single machine start (the last three
# sessions got none): the most needed part of each open GPU measurement, in about 9.2 minutes
# (every step is bounded by its own timeout: 290 s, then 260 s). Issue 11 item 6 first (the CUDA
# test of the hand-written kernels, train_speed --kernels all,torch for mha, mla and mla-o, the
# kernels alone), then issue 12 item 1 (band-device's phases with stage spans, band-hybrid over
# HTTP). The full forms, for a second call on the warm machine, are kernels_gpu_call.sh and
# http_gap_gpu_call.sh. Six files come back under $OUT: kernels.log, ts-all.json,
# bench_train_kernels.json, http_gap.log, e2e-bd.json, e2e-bh.json.
#     bash benchmarks/first_gpu_call.sh     # device tool: timeout_s 600
set -u
HERE=$(dirname "$0")
SHORT=1 bash "$HERE/kernels_gpu_call.sh" | tail -n 40
SHORT=1 bash "$HERE/http_gap_gpu_call.sh" | tail -n 60
