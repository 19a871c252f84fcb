"""Symmetric band → tridiagonal by bulge chasing, on the GPU: stage 2 of the band solver without the CPU.

`band_to_tridiagonal(ab)` takes a batch of lower bands (LAPACK storage, [k, b + 1, n], as
`band.band_on_device` gives them) and returns the diagonal and off-diagonal of an orthogonally
similar tridiagonal, whose eigenvalues `sturm.tridiagonal_eigvalsh` then finds on the device.

Why hand-written: the band solver's stage 2 (LAPACK dsytrd_sb2st on CPU worker processes, 2.5 s
a problem on one core of the H200 host, 0.34 s with 16 processes) bounds it at about 0.55 s a
DeepSeek-V3 layer (benchmarks/README.md, "The reader process"), and no library in reach chases
bulges on a GPU (cuSOLVER, CuPy, JAX and torch reduce dense matrices straight to tridiagonal).

The method is the one-column-a-sweep Householder schedule of LAPACK's dsb2st kernels (Bischof,
Lang and Sun's bulge chasing). Sweep k annihilates column k below its subdiagonal with one
reflector on rows k+1 .. k+b, which fills a b × b block below the band (the bulge). The next
reflector annihilates the bulge's first column only, on rows k+1+b .. k+2b, and so on down the
matrix in steps of b. What it leaves of each bulge lies in the columns that the next sweeps'
reflectors annihilate, so after sweep n-3 the matrix is tridiagonal. Each reflector H = I - τvvᵀ
touches three b × b blocks of the lower triangle (rows r0 .. r0+b, the reflector's): the block
left of the diagonal that holds the column being annihilated (L ← H·L), the diagonal block
(S ← H·S·H) and the block below it (B ← B·H, the next bulge). Bulges reach 2b - 1 below the
diagonal, so the band is held 2b + 1 diagonals wide while the chase runs.

Within a sweep each reflector depends on the one before, so one program chasing a whole band is
latency-bound: 1.87 s at n = 7168, b = 32 on an H200 (2026-12-03, benchmarks/README.md). But a
sweep's reflector t only needs the sweep before to be LAG reflectors ahead, so `slots` programs
chase one band at once, program p taking sweeps p, p + slots, ..., each spinning on an
acquire-load of its predecessor's progress flag (released after each reflector) before it
starts the next. The batch's bands run side by side as well (grid [slots, bands]).
On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1), one program at a
time, which the tests use; tests/test_band.py replays the many-program schedule in numpy.
The solver "band-device" (`band.eigvalsh_band_device`) uses it.
"""

from __future__ import annotations

import functools
import threading

import torch

from svd_probe.spectra import stagelog

__all__ = ["band_to_tridiagonal"]


@functools.cache
def _kernel():  # noqa: ANN202 - a triton.JITFunction
    import triton
    import triton.language as tl

    @triton.jit
    def bulge_chase(
        w_ptr,
        done_ptr,
        n,
        BS: tl.constexpr,
        WD: tl.constexpr,
        SLOTS: tl.constexpr,
        LAG: tl.constexpr,
        LOAD: tl.constexpr,
    ):
        band = tl.program_id(1)
        base = w_ptr + band * n * WD  # W[col, d] = A[col + d, col] at base + col·WD + d
        done = done_ptr + band * n  # done[k]: how many reflectors of sweep k are applied (2³⁰: all)
        for k0 in range(0, n - 2, SLOTS):
            k = k0 + tl.program_id(0)  # past n - 3 the loop below does nothing
            # Sweep k: the reflector of column k on rows k+1 .. k+BS, then one per bulge, on rows
            # r0 = j + BS .. j + 2·BS for the bulge's first column j = k+1, k+1+BS, ...
            j = k
            r0 = k + 1
            t = 0
            while r0 < n - 1:  # two rows or more: something to annihilate
                if SLOTS > 1:
                    if k > 0:  # sweep k-1 (another program's) must be LAG reflectors ahead
                        seen = tl.atomic_add(done + k - 1, 0, sem="acquire")
                        while seen < t + LAG:
                            seen = tl.atomic_add(done + k - 1, 0, sem="acquire")
                        tl.debug_barrier()
                i = tl.arange(0, BS)[:, None]
                c = tl.arange(0, BS)[None, :]
                ii = tl.arange(0, BS)
                r1 = tl.minimum(r0 + BS, n)
                m = r1 - r0  # rows of this reflector (fewer than BS at the end)
                # L = A[r0 : r1, j : r0], always below the diagonal: A[r, col] = W[col, r - col]
                dl = r0 + i - j - c
                ml = (i < m) & (c < r0 - j) & (dl < WD)
                pl = base + (j + c) * WD + dl
                lb = tl.load(pl, mask=ml, other=0.0, cache_modifier=LOAD)
                x = tl.sum(tl.where(c == 0, lb, 0.0), axis=1)
                alpha = tl.sum(tl.where(ii == 0, x, 0.0), axis=0)
                sigma = tl.sum(tl.where(ii > 0, x * x, 0.0), axis=0)
                has = sigma > 0.0
                norm = tl.sqrt(alpha * alpha + sigma)
                beta = tl.where(alpha >= 0.0, -norm, norm)
                denom = tl.where(has, alpha - beta, 1.0)
                v = tl.where(ii == 0, 1.0, x / denom)
                v = tl.where(ii < m, v, 0.0)
                tau = tl.where(has, (beta - alpha) / tl.where(has, beta, 1.0), 0.0)
                vl = tl.sum(v[:, None] * lb, axis=0)
                lb = lb - tau * v[:, None] * vl[None, :]
                first = tl.where(i == 0, beta, 0.0)
                lb = tl.where(c == 0, tl.where(has, first, lb), lb)
                # S = A[r0 : r1, r0 : r1], symmetric: its lower triangle is stored (and loaded: each
                # of its columns is contiguous), the upper one is its transpose
                low = i >= c
                ms = (i < m) & (c < m) & low
                ps = base + (r0 + c) * WD + tl.where(low, i - c, 0)
                sb = tl.load(ps, mask=ms, other=0.0, cache_modifier=LOAD)
                sb = tl.where(low, sb, tl.trans(sb))
                p = tau * tl.sum(sb * v[None, :], axis=1)
                pv = tl.sum(p * v, axis=0)
                w = p - 0.5 * tau * pv * v
                sb = sb - v[:, None] * w[None, :] - w[:, None] * v[None, :]
                # B = A[r1 : r1+BS, r0 : r1], below the diagonal block: the next bulge
                db = m + i - c
                mb = (r1 + i < n) & (c < m) & (db < WD)
                pb = base + (r0 + c) * WD + db
                bb = tl.load(pb, mask=mb, other=0.0, cache_modifier=LOAD)
                bv = tl.sum(bb * v[None, :], axis=1)
                bb = bb - tau * bv[:, None] * v[None, :]
                tl.store(pl, lb, mask=ml)
                tl.store(ps, sb, mask=ms)
                tl.store(pb, bb, mask=mb)
                tl.debug_barrier()  # the next reflector reads what this one wrote, from other threads
                t += 1
                if SLOTS > 1:  # after the barrier: every thread's stores come before the release
                    tl.atomic_xchg(done + k, t, sem="release")
                j = j + BS - tl.cast(j == k, tl.int32) * (BS - 1)  # k+1 after the first, then steps of BS
                r0 = j + BS
            if SLOTS > 1:
                if k < n - 2:
                    tl.atomic_xchg(done + k, 1 << 30, sem="release")  # more than any t + LAG

    return bulge_chase


# Sweep k+1's reflector t touches rows and columns that sweep k's reflectors t-2 .. t+2 touch (each
# spans three tiles of BS rows, one tile further down than the one before) and none that sweep k's
# reflector t+3 or later touches: so it may run once sweep k has applied t + LAG reflectors, and
# sweeps k, k+1, ... chase their bulges down the band at once, LAG tiles apart (the pipelined
# schedule of Haidar, Ltaief and Dongarra's bulge chasing). tests/test_band.py replays the schedule
# with this lag, bit for bit, and shows that a lag of 2 changes the result.
LAG = 3

# At most one multi-program launch at a time in this process: a program spins until the program
# of the sweep before it has gone ahead, so every program of a launch must be resident on the GPU
# at once. A launch holds at most one program an SM (`_sm_count`), and with this lock no other
# chase can hold SMs that its programs are waiting for (kernels of other work finish regardless).
#
# Tried and reverted (2026-12-03): the bands that several threads bring at once in one launch
# (group commit behind this lock, up to one program an SM). On two H200s it merged only 17-21 of
# 248 launches, and its compute phases of 62 layers took 29.1-31.7 s, twice more than about 32 s
# (cut at their limit), against 27.7-28.9 s with one launch each. The likely cause, not profiled:
# a launch that takes nearly every SM leaves the other threads' stage-1 kernels a few while its
# programs spin (benchmarks/README.md, "band-device as the default").
#
# `use_chase_launches(2)` lets two launches run at once, each held to half the SMs, so that both
# can be resident together (benchmarks/bench_e2e.py --chase-launches measures it; 1, one at a
# time, is the measured default).
_chase_launches = 1
_launch_lock = threading.BoundedSemaphore(_chase_launches)


def use_chase_launches(n: int) -> None:
    """Multi-program chase launches allowed at once in this process (before any solve starts)."""
    global _chase_launches, _launch_lock
    if n < 1:
        raise ValueError(f"chase launches at once must be ≥ 1, got {n}")
    _chase_launches, _launch_lock = n, threading.BoundedSemaphore(n)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _sleep_until_done(stream: torch.cuda.Stream) -> None:
    """Wait for `stream`'s work asleep (a blocking-sync event), not spinning as
    stream.synchronize() does: with a dozen solver threads waiting at once, spinning takes the
    cores that the reader process and the CPU workers need."""
    ev = torch.cuda.Event(blocking=True)
    ev.record(stream)
    ev.synchronize()


def default_slots(n: int, b: int, device: torch.device) -> int:
    """The programs that chase one band's bulges at once: 1 off CUDA (Triton's interpreter runs
    programs one after another, so a program waiting for another would wait forever); on CUDA
    about the number of sweeps in flight, n / (4·b) (sweep k has (n - k) / b reflectors and the
    next one starts LAG reflectors later), at most 32 and at most the SMs."""
    if device.type != "cuda":
        return 1
    return max(1, min(32, n // (4 * max(b, 1)), _sm_count(device)))


def band_to_tridiagonal(
    ab: torch.Tensor, num_warps: int = 4, slots: int | None = None, wait: bool = True
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The diagonal [k, n] and off-diagonal [k, n - 1] of tridiagonals orthogonally similar to the
    symmetric bands ab [k, b + 1, n] (lower storage: ab[:, i, j] = A[j + i, j]), float64 on ab's
    device (a CUDA device, or the CPU under TRITON_INTERPRET=1).

    `num_warps`: the warps of each program. Compiled for sm_90 at b = 32, 4 warps need 18 CTA
    barriers a reflector (the tiles' reductions cross warps) and 1 warp needs 4; on an H200 4
    warps chase a 7168-wide band in 1.87 s and 1 warp in 6.80 s (benchmarks/README.md).

    `slots`: the programs a band (None: `default_slots`); program p chases sweeps p, p + slots, ...,
    each sweep LAG reflectors behind the one before. The result is the same bit for bit for any
    number of slots. More than 1 only on CUDA.

    `wait`: with False, None at once (nothing done) if another thread's chase of several
    programs a band is running, rather than waiting for it (band-hybrid's "chase-free" rule)."""
    import triton

    if ab.ndim != 3:
        raise ValueError(f"band_to_tridiagonal needs a batch [k, b + 1, n], got {tuple(ab.shape)}")
    k, b1, n = (int(s) for s in ab.shape)
    b = b1 - 1
    bs = max(2, triton.next_power_of_2(max(b, 1)))  # the tile; a narrower band pads with zeros
    wd = 2 * bs + 1
    slots = default_slots(n, bs, ab.device) if slots is None else int(slots)
    if slots < 1 or (slots > 1 and ab.device.type != "cuda"):
        raise ValueError(f"band_to_tridiagonal: slots={slots} needs ≥ 1, and 1 off CUDA")
    # Column-major, unlike LAPACK's band storage: a column's 2b + 1 entries are contiguous, so
    # each column of a tile the kernel reads is one run of memory, not BS scattered lines.
    w = torch.zeros((k, n, wd), dtype=torch.float64, device=ab.device)
    w[:, :, :b1] = ab.to(torch.float64).transpose(1, 2)
    if n > 2 and k:
        kernel = _kernel()
        if slots == 1:
            kernel[(1, k)](w, w, n, BS=bs, WD=wd, SLOTS=1, LAG=LAG, LOAD="", num_warps=num_warps)
        else:
            done = torch.zeros((k, n), dtype=torch.int32, device=ab.device)
            sms = max(1, _sm_count(ab.device) // _chase_launches)  # the SMs one launch may hold
            slots = min(slots, sms)
            per = sms // slots  # bands a launch
            stream = torch.cuda.current_stream(ab.device)
            with stagelog.span("chase-wait-input"):
                _sleep_until_done(stream)  # this band's stage 1: outside the lock
            with stagelog.span("chase-wait-launch"):
                if not _launch_lock.acquire(blocking=wait):
                    return None
            try:
                with stagelog.span("chase"):
                    for c in range(0, k, per):
                        # Loads bypass L1 (".cg"): the tiles were last written by other SMs.
                        kernel[(slots, min(per, k - c))](
                            w[c:], done[c:], n, BS=bs, WD=wd, SLOTS=slots, LAG=LAG, LOAD=".cg", num_warps=num_warps
                        )
                    _sleep_until_done(stream)
            finally:
                _launch_lock.release()
    return w[:, :, 0].clone(), w[:, : max(n - 1, 0), 1].clone()
