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
`scipy.linalg.cython_lapack` publishes; `stage2_name()` says which one runs (that code lives in
band_lapack.py, which imports no torch).

Stage 2's workers: the band solves of all callers share one pool of one worker per core, worker
*processes* where that is safe, else threads (`stage2_workers()` says which). Threads do not
scale: on the H200's 16-core host (2026-12-02) 2 / 4 / 8 threads solved a 7168-wide band in
1.68 / 1.26 / 1.32 s per problem against 2.87 s on one, while 16 spawned processes took 0.34 s
per problem (benchmarks/README.md, "Stage 2 on worker processes"): the LAPACK calls of one process
serialize somewhere inside OpenBLAS, not on the GIL. A band goes to a worker as a (b+1) × n array
(1.9 MB at n = 7168, b = 32) and comes back as n eigenvalues, so the copies cost nothing beside
the seconds of the solve. Processes are started by "spawn" (no fork of a process that holds CUDA
and many threads), which imports the program's main module in each worker as Python's
multiprocessing always does; a main script that would run its work again on import (top-level
code outside `if __name__ == "__main__":`) gets threads instead, checked on its source
(`_spawn_safe`). If the processes cannot start or die, the pool falls back to threads with a
warning, and the problem is solved there.

With `hybrid=True` ("band-hybrid" in SOLVERS), a problem that finds the device free is solved there
by torch.linalg.eigvalsh (cuSOLVER syevd), one at a time, and the others take the band route, so
the GPU takes a share of the problems as well (`use_hybrid_rule`: or only those that find every
worker busy).

Stage 2's last step, the tridiagonal's eigenvalues, runs on the GPU when the matrix is there
(`svd_probe.spectra.sturm`, Sturm bisection in one Triton kernel, 0.046 s a 7168 problem on an
H200): the workers run dsytrd_sb2st only and hand back the tridiagonal. dsterf in the worker is
the fallback (no CUDA, no Triton, or a LAPACK without dsytrd_sb2st).
"""

from __future__ import annotations

import ast
import functools
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

from svd_probe.spectra import stagelog, sturm
from svd_probe.spectra.band_lapack import band_eigvals, band_tridiagonal, has_band_tridiagonal, stage2_name

__all__ = ["DEFAULT_BAND", "DEFAULT_HYBRID_RULE", "band_eigvals", "band_on_device", "cores", "eigvalsh_band", "eigvalsh_band_device", "stage2_name",
           "stage2_workers", "to_band", "tridiagonal_on_device", "use_device_tridiagonal", "use_hybrid_rule", "use_stage2_workers"]  # fmt: skip

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


# --- stage 2: band → eigenvalues on the CPU (band_lapack.py), on worker processes or threads ---------


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one: a container's
    share, not the host's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


WORKER_KINDS = ("auto", "processes", "threads")
_choice = "auto"  # set by use_stage2_workers
_count = 0  # stage 2's workers (0: one per core); set by use_stage2_workers
# Bounds the check of the main script's source (a larger "script" gets threads).
_MAX_MAIN_SOURCE = 4 << 20


def _script_is_spawn_safe(path: str) -> bool:
    """Whether importing the Python file at `path` as a module only defines things: its top level
    holds imports, definitions, assignments of literals and names, docstrings, `sys.path` edits and
    `if __name__ == "__main__":` blocks, nothing that calls or loops. A spawned worker imports the
    main script (multiprocessing's rule); a script failing this check would run its work again
    in every worker."""
    try:
        if os.path.getsize(path) > _MAX_MAIN_SOURCE:
            return False
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return False

    def inert(value: ast.expr | None) -> bool:  # no call, comprehension or await: nothing runs
        return value is None or not any(
            isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr, ast.ListComp,
                           ast.SetComp, ast.DictComp, ast.GeneratorExp))
            for n in ast.walk(value)
        )  # fmt: skip

    def main_guard(test: ast.expr) -> bool:
        return (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "__name__"
            and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__"
        )

    def sys_path_edit(value: ast.expr) -> bool:
        f = value.func if isinstance(value, ast.Call) else None
        return (
            isinstance(f, ast.Attribute)
            and f.attr in ("insert", "append")
            and isinstance(f.value, ast.Attribute)
            and f.value.attr == "path"
            and isinstance(f.value.value, ast.Name)
            and f.value.value.id == "sys"
        )

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Pass)):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if all(inert(d) for d in node.decorator_list):
                continue  # a decorator call runs at import: only names and attributes pass
            return False
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if isinstance(node, ast.Expr) and sys_path_edit(node.value):
            continue  # sys.path.insert(0, ...) / append(...): a script finding its package
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and inert(node.value):
            continue
        if isinstance(node, ast.If) and main_guard(node.test) and not node.orelse:
            continue
        return False
    return True


@functools.cache
def _spawn_safe() -> bool:
    """Whether spawned workers may import this program's main module: an interactive session or
    `python -c` has no file to import; a script or `python -m` module must pass
    `_script_is_spawn_safe`. A process that is itself a spawned child (a worker of someone's
    pool) starts no processes of its own."""
    if multiprocessing.parent_process() is not None:
        return False
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return True if path is None else _script_is_spawn_safe(path)


def use_stage2_workers(kind: str, count: int = 0) -> None:
    """Where stage 2 runs from now on: "processes", "threads", or "auto" (processes where
    `_spawn_safe()` and there is more than one core, else threads), and on how many workers
    (`count`; 0: one per core, `cores()`; at most that). Fewer workers than cores leave some to
    the rest of the job (an HTTP transfer's reader threads). Takes effect for solves submitted
    after the call; the old pool finishes what it has."""
    global _choice, _count
    if kind not in WORKER_KINDS:
        raise ValueError(f"stage 2 workers {kind!r}: choose from {WORKER_KINDS}")
    if count < 0:
        raise ValueError(f"stage 2 workers: count {count} must be 0 (one per core) or more")
    with _pool_lock:
        _choice, _count = kind, count
        _retire_pool()


def pool_size() -> int:
    """Stage 2's workers: the count `use_stage2_workers` set, else one per core (never more)."""
    return min(_count, cores()) if _count else cores()


def stage2_workers() -> str:
    """The kind of worker ("processes" or "threads") that band solves submitted now go to."""
    return _executor()[0]


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it (keeps what is done, says
    # how to resume); a worker printing its own KeyboardInterrupt traceback would bury that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_pool_lock = threading.Lock()
_pool: list[tuple[str, Executor]] = []  # the one pool, once made


def _retire_pool() -> None:
    # The next _executor() makes a new pool; the old one runs what it was given, then its
    # threads or worker processes exit (they would otherwise idle until the interpreter ends).
    # Called with _pool_lock held.
    for _, ex in _pool:
        ex.shutdown(wait=False)
    _pool[:] = []


def _executor() -> tuple[str, Executor]:
    # Shared by every caller (the pipeline's solve threads, a batched call): at most one band
    # solve per core at a time, however many problems are in flight.
    with _pool_lock:
        if not _pool:
            kind = _choice
            if kind == "auto":
                kind = "processes" if cores() > 1 and _spawn_safe() else "threads"
            if kind == "processes":
                ctx = multiprocessing.get_context("spawn")
                _pool.append((kind, ProcessPoolExecutor(pool_size(), mp_context=ctx, initializer=_worker_init)))
            else:
                _pool.append(("threads", ThreadPoolExecutor(pool_size(), thread_name_prefix="svd-probe-band")))
        return _pool[0]


def _fall_back_to_threads(why: BaseException) -> None:
    global _choice
    with _pool_lock:
        if _choice == "threads" or (_pool and _pool[0][0] == "threads"):
            return
        _choice = "threads"
        _retire_pool()
    warnings.warn(
        f"svd-probe: the band solver's worker processes failed ({type(why).__name__}: {why}); "
        "stage 2 runs on threads from now on (slower on many cores)",
        RuntimeWarning,
        stacklevel=3,
    )


_lock = threading.Lock()
_queued = 0  # band solves submitted to the pool and not finished
# How many problems each route took (the hybrid's split; read by benchmarks and tests).
ROUTE_COUNTS = {"band": 0, "device": 0, "chase": 0}
# The hybrid's device solves at once: one keeps the GPU's syevd at full speed (two share its
# memory bandwidth) while the CPU works through the bands.
_device_slots = threading.BoundedSemaphore(1)


def _after_fork_in_child() -> None:
    # A forked child has none of the parent's pool threads or worker processes, but the executor
    # would believe they exist and queue work for them forever: start afresh.
    global _queued, _lock, _pool_lock, _device_slots
    _pool[:] = []
    _pool_lock = threading.Lock()
    _spawn_safe.cache_clear()
    _queued = 0
    _lock = threading.Lock()
    _device_slots = threading.BoundedSemaphore(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _submit(fn: Callable, *args) -> Future:
    """fn(*args) on the stage-2 pool (fn and args picklable for processes), counted as queued
    until it finishes."""
    global _queued
    with _lock:
        _queued += 1
    try:
        try:
            fut = _executor()[1].submit(fn, *args)
        except (BrokenExecutor, OSError, RuntimeError) as e:  # no process could start
            _fall_back_to_threads(e)
            fut = _executor()[1].submit(fn, *args)
    except BaseException:
        _finished(None)  # nothing was queued after all
        raise
    fut.add_done_callback(_finished)
    return fut


def _finished(_: Future | None) -> None:
    global _queued
    with _lock:
        _queued -= 1


def _cpu_full() -> bool:
    with _lock:
        return _queued >= pool_size()


def _band_result(fut: Future, fn: Callable, ab: np.ndarray):  # noqa: ANN202 - fn's result
    """What the band solve fn(ab) returned; a worker process that died is replaced by a thread."""
    try:
        return fut.result()
    except BrokenExecutor as e:
        _fall_back_to_threads(e)
        return _submit(fn, ab).result()


# Where stage 2's last step (tridiagonal → eigenvalues) runs: None = on the device when it can
# (a CUDA matrix, Triton, and dsytrd_sb2st in scipy's LAPACK), False = dsterf in the worker.
_device_tridiagonal: bool | None = None


def use_device_tridiagonal(on: bool | None = None) -> None:
    """Stage 2's tridiagonal eigenvalues by Sturm bisection on the device (True, where it can
    run), by dsterf on the CPU worker (False), or the automatic choice (None: the device where
    it can). For benchmarks that time both routes side by side."""
    global _device_tridiagonal
    _device_tridiagonal = on


def tridiagonal_on_device(device: torch.device) -> bool:
    """Whether band solves of matrices on `device` find their tridiagonal eigenvalues there:
    the CPU workers then run dsytrd_sb2st only (at n = 7168, b = 32: 64% of stage 2's time on one
    core of the dev VM, 86% on the H200 host, the rest being dsterf)."""
    if _device_tridiagonal is False or device.type != "cuda":
        return False
    return sturm.available() and has_band_tridiagonal()


def _eigvals_from(result, device: torch.device) -> torch.Tensor:  # noqa: ANN001 - λ or (d, e)
    """The eigenvalues on `device` from what a worker returned: λ (dsterf ran there), or the
    tridiagonal (d, e), whose eigenvalues the device finds. If the kernel cannot run (a Triton
    that fails to compile for this GPU), dsterf here instead, with a warning, and later solves
    leave the tridiagonal to the workers."""
    global _device_tridiagonal
    if isinstance(result, tuple):
        try:
            d, e = result
            return sturm.tridiagonal_eigvalsh(d[None], e[None], device)[0]
        except Exception as why:  # noqa: BLE001 - any kernel failure: the CPU route still answers
            if _device_tridiagonal is not False:
                warnings.warn(
                    f"band solver: tridiagonal eigenvalues back on the CPU ({why!s:.120})", RuntimeWarning, stacklevel=2
                )
            _device_tridiagonal = False
            return torch.from_numpy(sturm.tridiagonal_eigvalsh_numpy(*result)).to(device)
    return torch.from_numpy(result).to(device)


# The hybrid's rule for sending a matrix to the device: "device-free" (the default: whenever the
# device slot is free at once, so the device is kept busy and the rest go to the band route) or
# "cpu-full" (only when every CPU worker is busy, waiting for the slot). On an H200 host, 16
# DeepSeek-V3 layers in flight, two runs each in rotating order: device-free 0.429 / 0.449 s a
# layer (the device took 14 and 13 of 70 problems), cpu-full 0.552 / 0.523 (it took none),
# band 0.715 / 0.595 (benchmarks/README.md, "Stage 2's tridiagonal on the GPU"). "chase-free": every
# matrix's stage 1 on the device, then its stage 2 there too (the bulge kernel, many programs a band,
# then bisection) if no other chase is running, else on a CPU worker. Set by use_hybrid_rule.
HYBRID_RULES = ("device-free", "cpu-full", "chase-free")
DEFAULT_HYBRID_RULE = HYBRID_RULES[0]
_hybrid_rule = DEFAULT_HYBRID_RULE


def use_hybrid_rule(rule: str) -> None:
    """Which rule band-hybrid follows (HYBRID_RULES): for benchmarks that time both."""
    global _hybrid_rule
    if rule not in HYBRID_RULES:
        raise ValueError(f"unknown hybrid rule {rule!r}: pick from {', '.join(HYBRID_RULES)}")
    _hybrid_rule = rule


def _solve_on_device(xi: torch.Tensor) -> torch.Tensor:
    """torch.linalg.eigvalsh of xi with the device slot held (the caller holds it)."""
    with stagelog.span("device-syevd"):
        lam = torch.linalg.eigvalsh(xi)
        if lam.is_cuda:  # the slot is taken until the device is done with it
            torch.cuda.current_stream(lam.device).synchronize()
    with _lock:
        ROUTE_COUNTS["device"] += 1
    return lam


def _on_device_if_free(xi: torch.Tensor) -> torch.Tensor | None:
    """The "device-free" rule: eigenvalues on the device if its slot is free now, else None.

    Stage 1 costs the host 0.17 s of launches a problem and its CPU worker 2.6 s (H200 host,
    2026-12-02, fifth session), a device solve 0.39 s of GPU time and one call: so every problem
    the device can take is one the host thread and the workers need not."""
    if not _device_slots.acquire(blocking=False):
        return None
    try:
        return _solve_on_device(xi)
    finally:
        _device_slots.release()


def _on_device_if_cpu_full(xi: torch.Tensor) -> torch.Tensor | None:
    """The hybrid's choice for one matrix: its eigenvalues by torch.linalg.eigvalsh on its device
    if every CPU worker is busy, else None (the band route).

    A matrix that finds every worker busy waits for the device slot rather than joining the CPU
    queue: on the H200 host a queued band waits seconds for a worker (16 problems in 5.4 s),
    where the device solves one in 0.39 s. Taking the slot only when it was free (the first
    form) handed the device 2 of 86 problems (benchmarks/README.md, "Stage 2 on worker
    processes"). After the wait the CPU may have room again: then the band route."""
    if not _cpu_full():
        return None
    with _device_slots:
        if not _cpu_full():
            return None
        return _solve_on_device(xi)


def _chase_if_free(abd: torch.Tensor) -> torch.Tensor | None:
    """The "chase-free" rule: the eigenvalues of the band abd [b + 1, n] (on the device) by the
    bulge kernel and bisection there if no other chase is running, else None (a CPU worker's).

    On an H200 the kernel chases a 7168-wide band of width 32 in 0.104 s with 32 programs
    (1.864 s with one), where a CPU worker takes 2.47 s (benchmarks/README.md, "Stage 2 on the
    GPU")."""
    from svd_probe.spectra import bulge

    de = bulge.band_to_tridiagonal(abd[None], wait=False)
    if de is None:
        return None
    with _lock:
        ROUTE_COUNTS["chase"] += 1
    return sturm.tridiagonal_eigvalsh(de[0], de[1])[0]


def _band_width(x: torch.Tensor, b: int | None, who: str) -> int | None:
    """The band width for the batch x [k, n, n] (b, or DEFAULT_BAND), or None where the band
    route has nothing to gain (n ≤ 2b, or an empty batch): then torch.linalg.eigvalsh."""
    b = DEFAULT_BAND if b is None else b
    if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{who} needs a batch [k, n, n], got {tuple(x.shape)}")
    return None if int(x.shape[-1]) <= 2 * b or x.shape[0] == 0 else b


def eigvalsh_band(x: torch.Tensor, b: int | None = None, hybrid: bool = False) -> torch.Tensor:
    """Eigenvalues, ascending, of each symmetric float64 matrix of the batch x [k, n, n] (lower
    triangles read), float64 [k, n] on x's device: stage 1 on x's device (this thread's current
    stream), stage 2 on the CPU pool, one matrix's stage 2 beside the next one's stage 1.

    `hybrid`: a matrix that arrives while every core already has a band to solve goes to
    torch.linalg.eigvalsh on x's device instead (cuSOLVER syevd on CUDA), one such solve at a
    time (`_on_device_if_cpu_full`); so the device, idle between stage-1 reductions, takes a share.
    Matrices with n ≤ 2b (nothing to gain) go to torch.linalg.eigvalsh."""
    b = _band_width(x, b, "eigvalsh_band")
    if b is None:
        return torch.linalg.eigvalsh(x)
    fn = band_tridiagonal if tridiagonal_on_device(x.device) else band_eigvals
    # the chase needs CUDA and Triton, as the tridiagonal's bisection after it does
    chase = hybrid and _hybrid_rule == "chase-free" and x.device.type == "cuda" and sturm.available()
    parts: list[tuple[Future, Callable, np.ndarray] | torch.Tensor] = []
    for xi in x:
        lam = None
        abd = None
        if chase:
            with stagelog.span("stage1-issue"):
                abd = band_on_device(xi, b)
            lam = _chase_if_free(abd)
        elif hybrid:
            lam = _on_device_if_free(xi) if _hybrid_rule == "device-free" else _on_device_if_cpu_full(xi)
        if lam is not None:
            parts.append(lam)
        else:
            with stagelog.span("stage1"):  # queued, then the band to the host: stage 1 done
                ab = to_band(xi, b) if abd is None else abd.cpu().numpy()
            parts.append((_submit(fn, ab), fn, ab))
            with _lock:
                ROUTE_COUNTS["band"] += 1
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            out.append(p)
            continue
        with stagelog.span("cpu-stage2-wait"):
            result = _band_result(*p)
        with stagelog.span("bisection"):
            out.append(_eigvals_from(result, x.device))
    return torch.stack(out)


def eigvalsh_band_device(x: torch.Tensor, b: int | None = None) -> torch.Tensor:
    """Eigenvalues, ascending, of each symmetric float64 matrix of the batch x [k, n, n] (lower
    triangles read), float64 [k, n], every step on x's device: stage 1 (`band_on_device`), the
    band's bulge chasing (`svd_probe.spectra.bulge`, several Triton programs a band) and the
    tridiagonal's Sturm bisection (`svd_probe.spectra.sturm`). No CPU worker takes part. The
    "band-device" entry of SOLVERS, and analyze's default on a GPU host reading a local folder.

    If the kernels cannot run here (no Triton driver for this device, a Triton that fails to
    compile for this GPU), this call and every later one are band-hybrid's instead, with one
    warning of its own (band-hybrid's bisection on the device, a Triton kernel too, has its own
    fallback and warning): the same eigenvalues to the contract, by the CPU workers."""
    global _chase_on_device
    from svd_probe.spectra import bulge

    b = _band_width(x, b, "eigvalsh_band_device")
    if b is None:
        return torch.linalg.eigvalsh(x)
    if _chase_on_device is not False:
        try:
            with stagelog.span("stage1-issue"):
                bands = torch.stack([band_on_device(xi, b) for xi in x])
            de = bulge.band_to_tridiagonal(bands)
            assert de is not None  # it waits for its turn
            with stagelog.span("bisection"):
                return sturm.tridiagonal_eigvalsh(*de)
        except Exception as why:  # noqa: BLE001 - any kernel failure: the CPU route still answers
            with _lock:
                if _chase_on_device is not False:
                    warnings.warn(
                        f"band-device: stage 2 back on the CPU workers, as band-hybrid ({why!s:.120})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                _chase_on_device = False
    return eigvalsh_band(x, b, hybrid=True)


# False once band-device's kernels have failed here (eigvalsh_band_device falls back for good).
_chase_on_device: bool | None = None
