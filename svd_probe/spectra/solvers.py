"""Solvers for the big stacked problems, by library, and the SVD primitive (see `SOLVERS`).

Each solver takes a batch and answers for every matrix of it: `eig` the eigenvalues, ascending,
of float64 PSD Grams [b, n, n]; `svd` the singular values of matrices [b, m, n] (any order, any
float dtype, any device: the caller sorts and converts). torch is always there; CuPy and JAX
(the `solvers` extra) are imported on first use only, and `solver_unavailable` says why one
cannot run, so that a missing library only removes its routes. Which is fastest on a GPU is
measured by benchmarks/bench_solvers.py, not guessed: cuSOLVER's float64 syevd at 7168 was
0.42-0.43 s on an H100 and an H200 alike, and the GPU far from busy, so the libraries and the
algorithms (syevd, Jacobi, polar) are all on offer, and "band", a two-stage eigensolver of our
own (svd_probe/spectra/band.py: dense → band by GEMMs on the device, band → λ by LAPACK on the
CPU), since every library's route is a one-stage tridiagonal reduction.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from svd_probe.spectra.band import eigvalsh_band, eigvalsh_band_device


def svdvals(a: torch.Tensor) -> torch.Tensor:
    """σ of a (batch of) matrices, descending, in a's dtype; gesvda on CUDA.

    gesvda handles only tall matrices (m ≥ n), so wide ones are transposed (same σ).
    """
    if a.shape[-2] < a.shape[-1]:
        a = a.mT
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        return a.new_zeros(a.shape[:-2] + (0,))
    if a.is_cuda:
        # gesvda is an "approximate" solver. It refuses to converge on some exactly
        # rank-deficient inputs (seen on an H100 with planted low-rank heads: "error code 29"),
        # and could in principle return non-finite values; either way the default driver,
        # slower but robust, takes over for that call rather than failing or storing garbage.
        try:
            s = torch.linalg.svdvals(a.contiguous(), driver="gesvda")
        except torch.linalg.LinAlgError:
            return torch.linalg.svdvals(a)
        if not bool(torch.isfinite(s).all()):
            s = torch.linalg.svdvals(a)
        return s
    return torch.linalg.svdvals(a)


@dataclass(frozen=True)
class Solver:
    """One library's way to solve the big problems (see `SOLVERS`)."""

    library: str  # "torch", "triton", "cupy" or "jax": the module that must import
    eig: Callable[[torch.Tensor], torch.Tensor] | None
    svd: Callable[[torch.Tensor], torch.Tensor] | None
    cuda_only: bool
    what: str


def _torch_gesvdj(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(a if a.shape[-2] >= a.shape[-1] else a.mT, driver="gesvdj")


@functools.cache
def _import(library: str):
    """The module for a solver library, or the ImportError/RuntimeError that says why not."""
    if library == "cupy":
        import cupy
        import cupyx.cusolver  # noqa: F401 - syevj and gesvdj live here

        return cupy
    if library == "jax":
        # JAX takes 75% of GPU memory at start unless told otherwise, which would starve torch.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax

        # float64 arrays stay float64 only with x64 on; without it JAX silently computes in float32.
        jax.config.update("jax_enable_x64", True)
        return jax
    if library == "triton":
        import triton

        return triton
    raise ValueError(library)


@contextlib.contextmanager
def _cupy_on_current_stream(device: torch.device):
    """CuPy, with its current stream set to torch's current stream on `device` (this thread)."""
    cp = _import("cupy")
    with cp.cuda.Device(device.index), cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        yield cp


def _cupy_each(fn_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A CuPy solver applied to each matrix of the batch in turn (CuPy's own batched paths for
    these routines are Jacobi kernels meant for matrices of at most 32 rows)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with _cupy_on_current_stream(x.device) as cp:
            import cupyx.cusolver

            fn = {
                "syevd": lambda a: cp.linalg.eigvalsh(a, UPLO="L"),
                "syevj": lambda a: cupyx.cusolver.syevj(a, UPLO="L", with_eigen_vector=False),
                "gesvd": lambda a: cp.linalg.svd(a, compute_uv=False),
                "gesvdj": lambda a: cupyx.cusolver.gesvdj(a, compute_uv=False),
            }[fn_name]
            # DLPack both ways: zero-copy, and ordered by the one stream both libraries now use
            return torch.stack([torch.from_dlpack(fn(cp.from_dlpack(xi.contiguous()))) for xi in x])

    return run


def _to_jax(jax, x: torch.Tensor):
    if x.is_cuda:
        return jax.dlpack.from_dlpack(x.contiguous())  # torch makes JAX's stream wait for ours
    return jax.numpy.asarray(x.numpy())


def _jax_solver(op: str, algorithm: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        jax = _import("jax")
        lin = jax.lax.linalg
        # JAX's default float32 matmul precision on GPU is TF32: far outside the contract.
        with jax.default_matmul_precision("highest"):
            a = _to_jax(jax, x)
            if op == "eig" and algorithm == "POLAR":
                # σ of a PSD matrix are its eigenvalues; the polar-decomposition SVD (QDWH) is built
                # from GEMMs and QRs, not from a tridiagonal reduction.
                out = lin.svd(a, full_matrices=False, compute_uv=False, algorithm=lin.SvdAlgorithm.POLAR)
            elif op == "eig":
                impl = getattr(lin.EighImplementation, algorithm)
                out = lin.eigh(a, lower=True, symmetrize_input=False, implementation=impl)[1]
            else:
                out = lin.svd(a, full_matrices=False, compute_uv=False, algorithm=getattr(lin.SvdAlgorithm, algorithm))
            # the σ/λ are small: bring them to the host (this also waits for JAX's stream)
            host = torch.from_numpy(np.array(out))
        return torch.sort(host, dim=-1).values if op == "eig" else host

    return run


def _sorted_eig(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.sort(fn(x), dim=-1).values


SOLVERS: dict[str, Solver] = {
    "torch": Solver(
        "torch", torch.linalg.eigvalsh, svdvals, False, "torch.linalg.eigvalsh (cuSOLVER syevd) / svdvals (gesvda)"
    ),
    # Not CUDA-only: stage 1 runs on whatever device the Gram is on, so CPU tests exercise it.
    "band": Solver(
        "torch",
        eigvalsh_band,
        None,
        False,
        "two-stage: dense → band (torch geqrf + GEMMs, on the device), band → λ (LAPACK, a CPU worker process per core)",
    ),
    "band-hybrid": Solver(
        "torch",
        functools.partial(eigvalsh_band, hybrid=True),
        None,
        False,
        "band, and torch.linalg.eigvalsh on the device for each problem that finds the device free",
    ),
    "band-device": Solver(
        "triton",
        eigvalsh_band_device,
        None,
        True,
        "band with stage 2 on the device too: bulge chasing by one Triton program a matrix, then Sturm bisection",
    ),
    "torch-gesvdj": Solver("torch", None, _torch_gesvdj, True, "torch.linalg.svdvals(driver='gesvdj')"),
    "cupy": Solver(
        "cupy",
        _sorted_eig(_cupy_each("syevd")),
        _cupy_each("gesvd"),
        True,
        "cupy.linalg.eigvalsh (syevd) / svd (gesvd)",
    ),
    "cupy-jacobi": Solver(
        "cupy", _sorted_eig(_cupy_each("syevj")), _cupy_each("gesvdj"), True, "cupyx.cusolver.syevj / gesvdj"
    ),
    "jax": Solver("jax", _jax_solver("eig", "QR"), _jax_solver("svd", "QR"), False, "jax.lax.linalg.eigh / svd, QR"),
    "jax-jacobi": Solver(
        "jax", _jax_solver("eig", "JACOBI"), _jax_solver("svd", "JACOBI"), True, "jax.lax.linalg.eigh / svd, JACOBI"
    ),
    "jax-polar": Solver(
        "jax", _jax_solver("eig", "POLAR"), _jax_solver("svd", "POLAR"), True, "jax.lax.linalg.svd, POLAR (QDWH)"
    ),
}


def solver_unavailable(name: str, device: torch.device, op: str = "eig") -> str | None:
    """None if solver `name` can do `op` ("eig" for gram64, "svd" for svd32/svd64) on `device`;
    else why not (unknown name, no such routine, CUDA only, library missing)."""
    spec = SOLVERS.get(name)
    if spec is None:
        return f"unknown solver; choose from {tuple(SOLVERS)}"
    if (spec.eig if op == "eig" else spec.svd) is None:
        return f"it has no {'eigensolver' if op == 'eig' else 'SVD'} route"
    if spec.cuda_only and device.type != "cuda":
        return "it runs on CUDA devices only"
    if spec.library == "torch":
        return None
    try:
        lib = _import(spec.library)
    except Exception as e:  # noqa: BLE001 - any failure to load means "cannot run here"
        return f"{spec.library} is not usable ({type(e).__name__}: {e}); pip install 'svd-probe[solvers]'"
    if spec.library == "jax" and device.type == "cuda":
        try:
            lib.devices("gpu")
        except RuntimeError as e:
            return f"JAX sees no GPU ({e})"
    return None
