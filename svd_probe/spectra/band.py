"""Eigenvalues of symmetric float64 matrices in two stages: dense → band on the device, band → λ on the CPU.

`eigvalsh_band(x)` is the "band" entry of `svd_probe.spectra.solvers.SOLVERS` (the `Solver.eig`
contract: a batch [k, n, n] of float64 symmetric matrices → eigenvalues ascending [k, n] on x's
device).

Why hand-written: every eigensolver on offer (cuSOLVER syevd/syevj, CuPy, JAX QR/Jacobi/polar,
MAGMA's one-stage dsyevd) reduces the dense matrix straight to tridiagonal form, one Householder
reflector per column, and each column's symmetric matrix-vector product streams the whole
trailing matrix: at n = 7168 that is latency- and bandwidth-bound, 0.39 s per Gram on an H200
with the GPU far from busy (benchmarks/README.md, "Solver routes and layers in flight" and
"What bounds it"). A two-stage reduction does the O(n³) part as GEMMs instead: stage 1 (`to_band`,
LAPACK's sy2sb) reduces to a band of width b, panel by panel, each panel a QR and one rank-2b
update of the trailing matrix, all matmuls on the device; stage 2 (band → tridiagonal → λ) is
O(n²·b) and runs on the CPU. No library exposes this to us: cuSOLVER and CuPy have only syevd,
JAX only its QR/Jacobi/polar routes, and MAGMA's two-stage dsyevdx_2stage is not built into torch.

Stage 2 calls LAPACK through ctypes, because a ctypes call releases the GIL and
`scipy.linalg.eigvals_banded` does not (measured on a 2-core VM: a Python thread spinning
beside it ran 15-25x slower than beside `time.sleep`, and two threads took twice as long as one):
the point of the split is that the CPU works on the band of one problem while the GPU (driven
by other Python threads) reduces the next. The routine is LAPACK's dsbev_2stage (bulge
chasing, dsytrd_sb2st + dsterf) when the LAPACK behind scipy exports it (scipy's bundled
OpenBLAS does), else dsbevd (dsbtrd + dsterf), both reached through the function pointers that
`scipy.linalg.cython_lapack` publishes; `stage2_name()` says which one runs. The band solves of all
threads share one pool of one thread per core (`_pool`). With `hybrid=True` ("band-hybrid" in
SOLVERS), a problem that finds every core busy is solved by torch.linalg.eigvalsh on the
device instead, one at a time, so the GPU takes a share of the problems as well.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

# Stage 1 costs fewer launches per column with a wider band, stage 2 more CPU time per problem.
# dsbev_2stage at n = 7168 on one core of the 2-core dev VM: 2.5 s (b = 16), 2.4 (24),
# 2.0-2.2 (32), 2.2 (48), 2.7-3.2 (64), 3.6 (128), 8.9 (256), of which dsterf is ~1 s at any b
# (dsbevd, the older dsbtrd: 3.5 s at 64, 11 s at 128). The CPU is the pair's bottleneck on a
# GPU host (two problems a layer, 16 cores), so the band is at stage 2's minimum;
# benchmarks/bench_solvers.py (section band) and bench_band.py time stage 1 on the GPU at 32-64.
DEFAULT_BAND = 32


def _sym_lower(a: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle is a's (as eigvalsh(UPLO='L') reads it), a fresh copy."""
    low = torch.tril(a)
    return low + torch.tril(a, -1).mT


def _compact_wy(qr: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V (unit lower trapezoidal, m × k) and upper triangular T (k × k) with Q = I − V T Vᵀ = H_1 ⋯ H_k,
    from geqrf's packed output (m × c, k = min(m, c)) and tau.

    T = D·(I + S·D)⁻¹ with D = diag(tau), S = striu(VᵀV): LAPACK dlarft's column recurrence
    T = [[T₁, −tau·T₁V₁ᵀv], [0, tau]] solved at once, one GEMM and one unit-triangular solve
    instead of k dependent steps. No division by tau: a reflector with tau = 0 (the identity,
    when a column is already zero below the diagonal) gives a zero row of T.
    """
    k = tau.shape[0]
    v = torch.tril(qr[:, :k], -1)
    v.diagonal().fill_(1.0)
    unit = torch.triu(v.mT @ v, 1) * tau[None, :]
    unit.diagonal().fill_(1.0)  # I + S·D, unit upper triangular
    eye = torch.eye(k, dtype=qr.dtype, device=qr.device)
    t = tau[:, None] * torch.linalg.solve_triangular(unit, eye, upper=True, unitriangular=True)
    return v, t


def to_band(a: torch.Tensor, b: int) -> np.ndarray:
    """The lower band of width b of a matrix orthogonally similar to symmetric a [n, n] (its lower
    triangle is read), in LAPACK lower band storage: ab[i, j] = B[j + i, j], float64, CPU numpy
    array [b + 1, n] (entries past the end of a diagonal are 0). See `band_on_device`."""
    return band_on_device(a, b).cpu().numpy()  # waits for this thread's current stream only


def band_on_device(a: torch.Tensor, b: int) -> torch.Tensor:
    """`to_band`'s band, float64 [b + 1, n] on a's device, queued on the current stream (on CUDA
    it returns once the work is queued: the host never waits inside).

    Blocked Householder reduction (LAPACK dsytrd_sy2sb) on a's device: for each panel of b
    columns, QR of the block below the band, B₂₂ ← QᵀB₂₂Q with Q = I − V T Vᵀ as one rank-2b
    update, W = B₂₂VT, X = W − ½V(TᵀVᵀW), B₂₂ −= V Xᵀ + X Vᵀ (the syr2k form: the two-sided
    product needs only B₂₂V and one GEMM with inner dimension 2b). Every step is a device op, so
    on CUDA the host only queues kernels until the band comes back.
    """
    n = int(a.shape[-1])
    if a.shape != (n, n):
        raise ValueError(f"to_band needs a square matrix, got {tuple(a.shape)}")
    if b < 1:
        raise ValueError(f"band width must be ≥ 1, got {b}")
    with torch.no_grad():
        w = _sym_lower(a.to(torch.float64))
        for j0 in range(0, n, b):
            r0 = j0 + b  # first row below the band for this panel
            m = n - r0
            if m < 2:  # one row or none below the band: already banded
                break
            qr, tau = torch.geqrf(w[r0:, j0:r0])
            v, t = _compact_wy(qr, tau)
            k = v.shape[1]
            # The panel's band part: R, upper trapezoidal. Its rows below r0 + k lie outside the
            # band and are never read again (later panels start to the right), so stay as they are.
            w[r0 : r0 + k, j0:r0] = torch.triu(qr[:k])
            trail = w[r0:, r0:]
            wm = trail @ (v @ t)
            x = torch.addmm(wm, v, t.mT @ (v.mT @ wm), alpha=-0.5)
            trail.addmm_(torch.cat([v, x], 1), torch.cat([x, v], 1).mT, alpha=-1.0)
        ab = w.new_zeros((b + 1, n))
        for i in range(min(b, n - 1) + 1):
            ab[i, : n - i] = torch.diagonal(w, -i)
        return ab


# --- stage 2: band → eigenvalues on the CPU, GIL released -----------------------------------------

_P = ctypes.c_void_p
_L = ctypes.c_size_t  # gfortran's hidden lengths of the character arguments


def _cython_lapack_pointer(name: str) -> int | None:
    """The C function pointer that scipy.linalg.cython_lapack publishes for LAPACK routine `name`."""
    import scipy.linalg.cython_lapack as cl

    capsule = cl.__pyx_capi__.get(name)
    if capsule is None:
        return None
    # prototypes of our own: setting argtypes on ctypes.pythonapi's functions would change them
    # for every other user in the process
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(_P, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", ctypes.pythonapi))
    return get_pointer(capsule, get_name(capsule)) or None


def _scipy_lapack_symbol(name: str) -> int | None:
    """The address of Fortran LAPACK routine `name` in the LAPACK that scipy.linalg is linked
    against (32-bit integers), for routines that cython_lapack does not publish (dsbev_2stage).

    dlsym on the handle of scipy's cython_lapack module searches it and the libraries it links
    (scipy's bundled OpenBLAS prefixes its symbols with "scipy_"; a system LAPACK does not)."""
    import scipy.linalg.cython_lapack as cl

    try:
        lib = ctypes.CDLL(cl.__file__)
    except OSError:
        return None
    for symbol in (f"scipy_{name}_", f"{name}_", f"scipy_{name}", name):
        try:
            return ctypes.cast(getattr(lib, symbol), _P).value
        except AttributeError:
            continue
    return None


def _band_routes() -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """[(name, fn)] in order of preference, those that load here; fn(ab) → eigenvalues ascending
    of the band matrix in lower band storage ab."""
    routes: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = []
    ip = lambda v: ctypes.byref(ctypes.c_int(v))  # noqa: E731
    try:
        two_ptr = _scipy_lapack_symbol("dsbev_2stage")
        bevd_ptr = _cython_lapack_pointer("dsbevd")
    except Exception:  # noqa: BLE001 - any failure here only means: scipy's wrapper instead
        two_ptr = bevd_ptr = None
    if two_ptr:
        fn2 = ctypes.CFUNCTYPE(None, *([_P] * 12), _L, _L)(two_ptr)

        def run2(ab: np.ndarray) -> np.ndarray:
            kd, n = ab.shape[0] - 1, ab.shape[1]
            a = np.array(ab, dtype=np.float64, order="F")  # overwritten
            w, z, q, info = np.empty(n), np.empty(1), np.empty(1), ctypes.c_int(0)
            args = (ip(n), ip(kd), a.ctypes.data, ip(kd + 1), w.ctypes.data, z.ctypes.data, ip(1))
            fn2(b"N", b"L", *args, q.ctypes.data, ip(-1), ctypes.byref(info), 1, 1)  # workspace query
            work = np.empty(max(1, int(q[0])))
            fn2(b"N", b"L", *args, work.ctypes.data, ip(work.size), ctypes.byref(info), 1, 1)
            if info.value != 0:
                raise np.linalg.LinAlgError(f"dsbev_2stage: info {info.value}")
            return w

        routes.append(("LAPACK dsbev_2stage (dsytrd_sb2st + dsterf)", run2))
    if bevd_ptr:
        fnd = ctypes.CFUNCTYPE(None, *([_P] * 14))(bevd_ptr)  # a C wrapper: no hidden lengths

        def rund(ab: np.ndarray) -> np.ndarray:
            kd, n = ab.shape[0] - 1, ab.shape[1]
            a = np.array(ab, dtype=np.float64, order="F")
            w, z, work, iwork, info = np.empty(n), np.empty(1), np.empty(2 * n), np.empty(1, np.int32), ctypes.c_int(0)
            fnd(b"N", b"L", ip(n), ip(kd), a.ctypes.data, ip(kd + 1), w.ctypes.data, z.ctypes.data, ip(1),
                work.ctypes.data, ip(2 * n), iwork.ctypes.data, ip(1), ctypes.byref(info))  # fmt: skip
            if info.value != 0:
                raise np.linalg.LinAlgError(f"dsbevd: info {info.value}")
            return w

        routes.append(("LAPACK dsbevd (dsbtrd + dsterf)", rund))

    def run_scipy(ab: np.ndarray) -> np.ndarray:
        import scipy.linalg

        return scipy.linalg.eigvals_banded(ab, lower=True)

    routes.append(("scipy.linalg.eigvals_banded (holds the GIL)", run_scipy))
    return routes


@functools.cache
def _stage2() -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    return _band_routes()[0]


def band_eigvals(ab: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of the symmetric band matrix in LAPACK lower band storage ab [b + 1, n]."""
    if ab.shape[1] == 0:
        return np.empty(0)
    return _stage2()[1](ab)


def stage2_name() -> str:
    """Which LAPACK routine `band_eigvals` calls here."""
    return _stage2()[0]


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one: a container's
    share, not the host's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


@functools.cache
def _pool() -> ThreadPoolExecutor:
    # Shared by every caller (the pipeline's solve threads, a batched call): at most one band
    # solve per core at a time, however many problems are in flight.
    return ThreadPoolExecutor(cores(), thread_name_prefix="svd-probe-band")


_lock = threading.Lock()
_queued = 0  # band solves submitted to the pool and not finished
# How many problems each route took (the hybrid's split; read by benchmarks and tests).
ROUTE_COUNTS = {"band": 0, "device": 0}
# The hybrid's device solves at once: one keeps the GPU's syevd at full speed (two share its
# memory bandwidth) while the CPU works through the bands.
_device_slots = threading.BoundedSemaphore(1)


def _after_fork_in_child() -> None:
    # A forked child has none of the parent's pool threads, but the executor would believe its
    # idle ones exist and queue work for them forever: start afresh.
    global _queued, _lock, _device_slots
    _pool.cache_clear()
    _queued = 0
    _lock = threading.Lock()
    _device_slots = threading.BoundedSemaphore(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _submit(fn: Callable, *args) -> Future:
    """fn(*args) on the pool, counted as queued until it finishes."""
    global _queued
    with _lock:
        _queued += 1
    fut = _pool().submit(fn, *args)
    fut.add_done_callback(_finished)
    return fut


def _finished(_: Future) -> None:
    global _queued
    with _lock:
        _queued -= 1


def _cpu_full() -> bool:
    with _lock:
        return _queued >= cores()


def eigvalsh_band(x: torch.Tensor, b: int | None = None, hybrid: bool = False) -> torch.Tensor:
    """Eigenvalues, ascending, of each symmetric float64 matrix of the batch x [k, n, n] (lower
    triangles read), float64 [k, n] on x's device: stage 1 on x's device (this thread's current
    stream), stage 2 on the CPU pool, one matrix's stage 2 beside the next one's stage 1.

    `hybrid`: a matrix that arrives while every core already has a band to solve goes to
    torch.linalg.eigvalsh on x's device instead (cuSOLVER syevd on CUDA), if no other such
    solve is running; so the device, idle between stage-1 reductions, takes a share.
    Matrices with n ≤ 2b (nothing to gain) go to torch.linalg.eigvalsh."""
    b = DEFAULT_BAND if b is None else b
    if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"eigvalsh_band needs a batch [k, n, n], got {tuple(x.shape)}")
    n = int(x.shape[-1])
    if n <= 2 * b or x.shape[0] == 0:
        return torch.linalg.eigvalsh(x)
    parts: list[Future | torch.Tensor] = []
    for xi in x:
        if hybrid and _cpu_full() and _device_slots.acquire(blocking=False):
            try:
                lam = torch.linalg.eigvalsh(xi)
                if lam.is_cuda:  # the slot is taken until the device is done with it
                    torch.cuda.current_stream(lam.device).synchronize()
                with _lock:
                    ROUTE_COUNTS["device"] += 1
            finally:
                _device_slots.release()
            parts.append(lam)
        else:
            parts.append(_submit(band_eigvals, to_band(xi, b)))
            with _lock:
                ROUTE_COUNTS["band"] += 1
    out = [p if isinstance(p, torch.Tensor) else torch.from_numpy(p.result()).to(x.device) for p in parts]
    return torch.stack(out)
