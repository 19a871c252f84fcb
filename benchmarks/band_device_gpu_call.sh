#!/usr/bin/env bash
# Open measurement 1 (benchmarks/README.md) in one device call of about 5 minutes: the band
# solver with its stage 2 on the GPU (`--solver band-device`, the bulge-chasing kernel of
# svd_probe/spectra/bulge.py). First the kernel's CUDA test (several programs a band give the
# one-program tridiagonal bit for bit), then the kernel alone on one 7168-wide band (1 to 64
# programs a band, 1 and 4 bands at once), then band-device end to end (every phase), then the
# default route's compute and analyze-local on the same machine.
#     bash benchmarks/band_device_gpu_call.sh     # $OUT set by the device tool
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
L="$OUT/band-device.log"
{ nvidia-smi -L; date -u; } > "$L" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_band.py -k "bulge" >> "$L" 2>&1
echo "pytest rc=$?" >> "$L"
timeout 120 python3 benchmarks/bench_band.py --device cuda --n 7168 --b 32 --no-eigvalsh \
    --json "$OUT/bulge.json" >> "$L" 2>&1
echo "bench_band rc=$?" >> "$L"
timeout 200 python3 benchmarks/bench_e2e.py --device cuda --solver band-device \
    --phases read-http compute analyze-local analyze-http --json "$OUT/e2e-band-device.json" >> "$L" 2>&1
echo "band-device rc=$?" >> "$L"
timeout 100 python3 benchmarks/bench_e2e.py --device cuda --phases compute analyze-local \
    --json "$OUT/e2e-auto.json" >> "$L" 2>&1
echo "auto rc=$?" >> "$L"
date -u >> "$L"
cat "$L"
