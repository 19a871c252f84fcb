"""Eigenvalues of symmetric tridiagonal matrices by Sturm-count bisection, on the GPU.

`tridiagonal_eigvalsh(d, e)` is the last step of the band solver's stage 2 (band.py): the CPU
worker reduces a band to tridiagonal form (LAPACK dsytrd_sb2st) and hands back its diagonal d and
off-diagonal e; this module finds the n eigenvalues on the device. LAPACK's dsterf (Pal-Walker-
Kahan QL/QR) is part of stage 2's CPU time at n = 7168 (0.55 of 1.89 s on one core of the dev VM,
0.37-0.40 of 2.8-3.0 s on the H200 host; on 16 busy worker processes, moving it here took
band-hybrid from 0.685 to 0.510 s a layer: benchmarks/README.md "Stage 2's tridiagonal on the
GPU"), and stage 2's CPU time is what bounds the band route on a GPU host; bisection has n
independent problems (one per eigenvalue index), the shape a GPU wants: 0.04-0.046 s for one
7168 tridiagonal on an H200.

Why hand-written: no library in reach finds the eigenvalues of a tridiagonal matrix on a GPU
(torch.linalg has no tridiagonal routine; cuSOLVER's stedc is not exposed by torch, CuPy or JAX),
and the recurrence is a sequential loop over n, which torch ops cannot express without n kernel
launches per iteration. So it is one Triton kernel.

The method is LAPACK's dstebz/dlaebz: for a shift x, the Sturm sequence
    q_0 = d_0 - x,   q_j = d_j - x - e_{j-1}^2 / q_{j-1}    (|q| < pivmin replaced by -pivmin)
has as many q_j <= 0 as T has eigenvalues below x, and that count is backward stable: it is
exact for a matrix within a few ulps of T, so each eigenvalue comes out within about
n·eps·||T|| of the truth, as dsterf's do (Demmel, Applied Numerical Linear Algebra, §5.3.4).
Lane k of the kernel brackets eigenvalue k (ascending) in [lo, hi) from T's Gershgorin interval
and shrinks it four-fold an iteration by counting at three points at once (three independent
recurrences, so each thread has work while one division waits), until the bracket is below
eps·||T||.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["available", "tridiagonal_eigvalsh", "tridiagonal_eigvalsh_numpy"]

_BLOCK = 64
_UNROLL = 8


@functools.cache
def _kernel():  # noqa: ANN202 - a triton.JITFunction
    import triton
    import triton.language as tl

    @triton.jit
    def sturm_bisect(
        d_ptr, e2_ptr, lo_ptr, hi_ptr, piv_ptr, out_ptr, n, iters, BLOCK: tl.constexpr, UNROLL: tl.constexpr
    ):
        row = tl.program_id(1)
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        kf = k.to(tl.float64)
        d_row = d_ptr + row * n
        e_row = e2_ptr + row * n  # e2 has n entries a row (the last one 0, never read)
        pivmin = tl.load(piv_ptr + row)
        lo = tl.zeros([BLOCK], dtype=tl.float64) + tl.load(lo_ptr + row)
        hi = tl.zeros([BLOCK], dtype=tl.float64) + tl.load(hi_ptr + row)
        for _ in range(iters):
            w = (hi - lo) * 0.25
            x1 = lo + w
            x2 = lo + 2.0 * w
            x3 = hi - w
            d0 = tl.load(d_row)
            q1 = d0 - x1
            q2 = d0 - x2
            q3 = d0 - x3
            q1 = tl.where(tl.abs(q1) < pivmin, -pivmin, q1)
            q2 = tl.where(tl.abs(q2) < pivmin, -pivmin, q2)
            q3 = tl.where(tl.abs(q3) < pivmin, -pivmin, q3)
            c1 = (q1 <= 0.0).to(tl.float64)
            c2 = (q2 <= 0.0).to(tl.float64)
            c3 = (q3 <= 0.0).to(tl.float64)
            # j = 1 .. n-1 in chunks of UNROLL; the last chunk's j >= n are masked (`live`) and change nothing
            for j0 in range(1, n, UNROLL):
                for u in tl.static_range(UNROLL):
                    j = j0 + u
                    live = j < n
                    dj = tl.load(d_row + j, mask=live, other=0.0)
                    ej = tl.load(e_row + j - 1, mask=live, other=0.0)
                    t1 = dj - x1 - ej / q1
                    t2 = dj - x2 - ej / q2
                    t3 = dj - x3 - ej / q3
                    t1 = tl.where(tl.abs(t1) < pivmin, -pivmin, t1)
                    t2 = tl.where(tl.abs(t2) < pivmin, -pivmin, t2)
                    t3 = tl.where(tl.abs(t3) < pivmin, -pivmin, t3)
                    q1 = tl.where(live, t1, q1)
                    q2 = tl.where(live, t2, q2)
                    q3 = tl.where(live, t3, q3)
                    c1 += tl.where(live & (t1 <= 0.0), 1.0, 0.0)
                    c2 += tl.where(live & (t2 <= 0.0), 1.0, 0.0)
                    c3 += tl.where(live & (t3 <= 0.0), 1.0, 0.0)
            # eigenvalue k lies below x where more than k eigenvalues do
            b1 = c1 > kf
            b2 = c2 > kf
            b3 = c3 > kf
            new_hi = tl.where(b1, x1, tl.where(b2, x2, tl.where(b3, x3, hi)))
            new_lo = tl.where(b1, lo, tl.where(b2, x1, tl.where(b3, x2, x3)))
            lo = new_lo
            hi = new_hi
        tl.store(out_ptr + row * n + k, 0.5 * (lo + hi), mask=k < n)

    return sturm_bisect


@functools.cache
def available() -> bool:
    """Whether the Triton kernel can run here (Triton importable; a CUDA device, or Triton's
    interpreter when TRITON_INTERPRET=1, which the CPU tests use)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not here
        return False
    return True


def _bounds(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per row: the Gershgorin interval widened as dstebz widens it, pivmin, and the iterations
    that bring a bracket of that width under eps·||T||. On the host, from the host's copy of the
    tridiagonal, so that the device is never waited for."""
    eps = np.finfo(np.float64).eps
    safemin = np.finfo(np.float64).tiny
    n = d.shape[-1]
    ae = np.abs(e)
    r = np.zeros_like(d)
    r[:, :-1] += ae
    r[:, 1:] += ae
    gl = (d - r).min(-1)
    gu = (d + r).max(-1)
    pivmin = safemin * np.maximum((e * e).max(-1), 1.0)  # n > 1 here (the caller returns earlier)
    tnorm = np.maximum(np.abs(gl), np.abs(gu))
    fudge = 2.1
    gl = gl - fudge * tnorm * eps * n - fudge * 2 * pivmin
    gu = gu + fudge * tnorm * eps * n + fudge * 2 * pivmin
    # each iteration quarters the bracket; stop at 2·eps·||T|| (dstebz's default absolute tolerance)
    width = float((gu - gl).max())
    tol = 2 * eps * max(float(tnorm.max()), safemin)
    iters = max(1, math.ceil(math.log(max(width / tol, 1.0), 4)) + 1)
    return gl, gu, pivmin, iters


def tridiagonal_eigvalsh(d, e, device: torch.device | str | None = None) -> torch.Tensor:  # noqa: ANN001
    """Eigenvalues, ascending, of each symmetric tridiagonal matrix of the batch: diagonals d
    [k, n], off-diagonals e [k, n-1] (float64 numpy arrays or tensors), on `device` (default:
    d's, or the CPU for numpy input), a CUDA device or the CPU under TRITON_INTERPRET=1. Returns
    float64 [k, n] there. From numpy input the host never waits for the device (the band solver's
    case: its workers hand back numpy arrays); a tensor on the device is first copied to the host
    for the bracket's bounds."""
    if device is None:
        device = d.device if isinstance(d, torch.Tensor) else torch.device("cpu")
    d_np = (d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)).astype(np.float64)
    e_np = (e.detach().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)).astype(np.float64)
    if d_np.ndim != 2 or e_np.shape != (d_np.shape[0], max(d_np.shape[1] - 1, 0)):
        raise ValueError(
            f"tridiagonal_eigvalsh needs d [k, n] and e [k, n-1], got {tuple(d_np.shape)} and {tuple(e_np.shape)}"
        )
    k, n = d_np.shape
    if k == 0 or n <= 1:
        return torch.from_numpy(d_np.copy()).to(device)
    gl, gu, pivmin, iters = _bounds(d_np, e_np)
    e2 = np.zeros_like(d_np)
    e2[:, : n - 1] = e_np * e_np
    # one host → device copy of everything the kernel reads
    packed = torch.from_numpy(np.concatenate([d_np.ravel(), e2.ravel(), gl, gu, pivmin])).to(device)
    dt, e2t = packed[: k * n].view(k, n), packed[k * n : 2 * k * n].view(k, n)
    glt, gut, pt = packed[2 * k * n :].view(3, k).unbind(0)
    out = torch.empty((k, n), dtype=torch.float64, device=device)
    grid = (-(-n // _BLOCK), k)
    _kernel()[grid](dt, e2t, glt, gut, pt, out, n, iters, BLOCK=_BLOCK, UNROLL=_UNROLL, num_warps=2)
    return out


def tridiagonal_eigvalsh_numpy(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The same eigenvalues by LAPACK dsterf (scipy), for the CPU and as the tests' reference."""
    import scipy.linalg

    return scipy.linalg.eigvalsh_tridiagonal(d, e, lapack_driver="sterf")
