"""Benchmark: the two stages of the band eigensolver (svd_probe/spectra/band.py) on one matrix.

    PYTHONPATH=. python benchmarks/bench_band.py --device cpu --n 2048,7168 --b 32,64
    PYTHONPATH=. python benchmarks/bench_band.py --device cuda --n 7168 --b 16,32,64,128   # H200: ~1 min

For each n and b: stage 1 (`to_band`: dense → band on the device, the band copied to the host;
"host": how long the host takes to queue it, which is all of it if stage 1 is launch-bound),
stage 2 (`band_eigvals`: LAPACK on one CPU thread; on CUDA also `bulge.band_to_tridiagonal`, the
Triton kernel, for batches of `--bulge` copies), and torch.linalg.eigvalsh of the same matrix
for scale (cuSOLVER syevd on CUDA), with the largest eigenvalue difference between the two
relative to |λ|max. The matrix is a float64 Gram X·Xᵀ of a Gaussian X [n, 2n] (as the stacked O
and VO Grams are) where forming it is cheap (CUDA), else a symmetric Gaussian one (`--gram`
forces the Gram). `--parallel` also times stage 2 of one copy per core at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from svd_probe.spectra import band as B


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", default="2048,7168")
    ap.add_argument("--b", default="32,64")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gram", action="store_true", help="a Gram X·Xᵀ also on CPU (slow to form there)")
    ap.add_argument("--parallel", action="store_true", help="stage 2 of one problem per core at once")
    ap.add_argument("--no-eigvalsh", action="store_true", help="skip torch.linalg.eigvalsh (slow on CPU)")
    ap.add_argument(
        "--bulge",
        default="1,4",
        help="CUDA: stage 2 on the device (bulge.band_to_tridiagonal) for batches of this many copies of the band ('' skips)",
    )
    ap.add_argument("--bulge-warps", default="4", help="CUDA: the warps of each bulge-chasing program, each timed")
    ap.add_argument(
        "--bulge-slots", default="1,8,16,32,64", help="CUDA: the programs chasing one band at once, each timed"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    print(f"# stage 2: {B.stage2_name()}; cores {B.cores()}; torch threads {torch.get_num_threads()}", flush=True)
    for n in (int(x) for x in args.n.split(",")):
        if device.type == "cuda" or args.gram:
            x = torch.randn(n, 2 * n, dtype=torch.float64, device=device)
            a = x @ x.mT
            del x
        else:
            r = torch.randn(n, n, dtype=torch.float64, device=device)
            a = r + r.mT
            del r
        ref = None
        if not args.no_eigvalsh:
            timed(lambda a=a: torch.linalg.eigvalsh(a[:256, :256]), device, 1)  # warm-up
            t_ref, ref = timed(lambda a=a: torch.linalg.eigvalsh(a), device, args.repeats)
            print(f"n={n}: torch.linalg.eigvalsh {t_ref:.3f} s", flush=True)
            rows.append({"n": n, "what": "torch.linalg.eigvalsh", "s": t_ref})
            ref = ref.cpu().numpy()
        for b in (int(x) for x in args.b.split(",")):
            B.to_band(a[: 4 * b, : 4 * b], b)  # warm-up: geqrf and solver handles
            t1, ab = timed(lambda b=b, a=a: B.to_band(a, b), device, args.repeats)
            # the host's share of stage 1: until every kernel is queued (≈ t1: launch-bound or a sync)
            t_host, _ = timed(lambda b=b, a=a: B.band_on_device(a, b), torch.device("cpu"), 1)
            sync(device)
            t2, lam = timed(lambda ab=ab: B.band_eigvals(ab), torch.device("cpu"), args.repeats)
            err = float(np.abs(lam - ref).max() / np.abs(ref).max()) if ref is not None else None
            row = {"n": n, "b": b, "stage1_s": t1, "stage1_host_s": t_host, "stage2_s": t2, "max_err_rel": err}
            if args.parallel:
                p = B.cores()
                with ThreadPoolExecutor(p) as ex:
                    tp, _ = timed(lambda ab=ab: list(ex.map(B.band_eigvals, [ab] * p)), torch.device("cpu"), 1)
                row.update(parallel_problems=p, stage2_parallel_s=tp, stage2_amortized_s=tp / p)
            if device.type == "cuda" and args.bulge:
                from svd_probe.spectra import bulge, sturm

                abd = torch.from_numpy(ab).to(device)
                first = None
                for nw in (int(x) for x in args.bulge_warps.split(",")):
                    for slots in (int(x) for x in args.bulge_slots.split(",")):
                        # warm-up: Triton compiles the kernel for these warps and slots
                        bulge.band_to_tridiagonal(abd[None, :, : 4 * b].contiguous(), num_warps=nw, slots=slots)
                        for k in (int(x) for x in args.bulge.split(",")):
                            batch = abd.expand(k, -1, -1).contiguous()
                            tk, (d, e_) = timed(
                                lambda batch=batch, nw=nw, s=slots: bulge.band_to_tridiagonal(batch, nw, s), device, 1
                            )
                            first = (d[0], e_[0]) if first is None else first
                            same = bool(torch.equal(d[0], first[0]) and torch.equal(e_[0], first[1]))
                            lam_k = sturm.tridiagonal_eigvalsh(d[:1], e_[:1]).cpu().numpy()[0]
                            err_k = float(np.abs(lam_k - lam).max() / np.abs(lam).max())
                            row[f"bulge_{k}x{nw}w{slots}s_s"] = tk
                            row[f"bulge_{k}x{nw}w{slots}s_same"] = same
                            print(
                                f"n={n} b={b}: stage 2 on the device, {k} band(s) at once, {nw} warps, {slots} "
                                f"programs a band: {tk:.3f} s ({tk / k:.3f} a band), eigenvalues against stage 2 on "
                                f"the CPU {err_k:.1e}·|λ|max, tridiagonal {'equal to' if same else 'NOT EQUAL to'} "
                                "the first's",
                                flush=True,
                            )
            rows.append(row)
            e = f", err {err:.1e}·|λ|max" if err is not None else ""
            par = (
                f", stage 2 ×{row['parallel_problems']} at once {row['stage2_parallel_s']:.3f} s"
                if args.parallel
                else ""
            )
            print(f"n={n} b={b}: stage 1 {t1:.3f} s (host {t_host:.3f}), stage 2 {t2:.3f} s{e}{par}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "stage2": B.stage2_name(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
