"""The band solver's tridiagonal eigenvalues: Sturm bisection (svd_probe/spectra/sturm.py) and
LAPACK's dsytrd_sb2st, against float64 references.

The Triton kernel runs here in Triton's interpreter (TRITON_INTERPRET=1, numpy underneath), in a
subprocess so that no Triton imported earlier by another test decides the mode; on a GPU the
same kernel is compiled (benchmarks/bench_solvers.py, section band, times and checks it there)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from svd_probe.spectra import band as B
from svd_probe.spectra import band_lapack as BL

triton = pytest.importorskip("triton")  # in the test extra on Linux x86_64: CI runs these


def _tridiagonals(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that bisection gets wrong first: random; a Gram B·Bᵀ (B lower bidiagonal) of rank n/2,
    so half the eigenvalues are 0 with tiny ones beside them; a diagonal matrix (e = 0) with a
    repeated eigenvalue; a tight cluster (d constant, e 1e-9) around a large value; and a
    matrix scaled by 1e-150 (pivmin guards the divisions)."""
    rng = np.random.default_rng(7)
    d = np.empty((5, n))
    e = np.empty((5, n - 1))
    d[0], e[0] = rng.standard_normal(n), rng.standard_normal(n - 1)
    bl = np.diag(rng.standard_normal(n)) + np.diag(rng.standard_normal(n - 1), -1)
    bl[:, n // 2 :] = 0
    g = bl @ bl.T
    d[1], e[1] = np.diag(g), np.diag(g, -1)
    d[2], e[2] = np.repeat(rng.standard_normal(n // 4), 4)[:n], np.zeros(n - 1)
    d[3], e[3] = np.full(n, 1e3), np.full(n - 1, 1e-9)
    d[4], e[4] = 1e-150 * rng.standard_normal(n), 1e-150 * rng.standard_normal(n - 1)
    return d, e


def _dense_ref(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(np.diag(d) + np.diag(e, -1) + np.diag(e, 1))


@pytest.mark.triton_interpreter
def test_bisection_matches_float64_in_the_interpreter(tmp_path):
    n = 40
    d, e = _tridiagonals(n)
    np.save(tmp_path / "d.npy", d)
    np.save(tmp_path / "e.npy", e)
    code = textwrap.dedent(f"""
        import numpy as np, torch
        from svd_probe.spectra.sturm import tridiagonal_eigvalsh
        d, e = np.load({str(tmp_path / "d.npy")!r}), np.load({str(tmp_path / "e.npy")!r})
        w = tridiagonal_eigvalsh(torch.from_numpy(d), torch.from_numpy(e))
        # numpy input (the band solver's, from its workers), here for two rows
        w2 = tridiagonal_eigvalsh(d[1:3], e[1:3], "cpu")
        np.save({str(tmp_path / "w.npy")!r}, w.numpy())
        np.save({str(tmp_path / "w2.npy")!r}, w2.numpy())
        print(w.dtype, tuple(w.shape))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch.float64", f"({len(d)},", f"{n})"]
    w, w2 = np.load(tmp_path / "w.npy"), np.load(tmp_path / "w2.npy")
    eps = np.finfo(np.float64).eps
    for i, got in [*enumerate(w), (1, w2[0]), (2, w2[1])]:
        ref = _dense_ref(d[i], e[i])
        scale = max(np.abs(ref).max(), np.abs(d[i]).max())
        # the contract of dstebz/dsterf: absolute error a small multiple of n·eps·||T||
        assert np.abs(got - ref).max() <= 4 * n * eps * scale, i
        assert np.all(np.diff(got) >= 0), i  # ascending, as eigvalsh returns them
    # the planted rank: exactly n/2 eigenvalues at zero (within the tolerance), the rest not
    tol = 4 * n * eps * np.abs(w[1]).max()
    assert int((np.abs(w[1]) <= tol).sum()) == n // 2


def test_bisection_rejects_mismatched_shapes():
    from svd_probe.spectra.sturm import tridiagonal_eigvalsh

    with pytest.raises(ValueError, match=r"d \[k, n\] and e \[k, n-1\]"):
        tridiagonal_eigvalsh(torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.skipif(not BL.has_band_tridiagonal(), reason="scipy's LAPACK has no dsytrd_sb2st")
def test_band_to_tridiagonal_keeps_the_spectrum():
    # dsytrd_sb2st is an orthogonal similarity: the tridiagonal's eigenvalues (dsterf) equal the
    # dense band matrix's (numpy), for a band from the solver's own stage 1 of a planted-rank Gram
    rng = np.random.default_rng(3)
    n, b, r = 120, 16, 30
    x = rng.standard_normal((n, r))
    a = x @ x.T
    ab = B.to_band(torch.from_numpy(a), b)
    d, e = BL.band_tridiagonal(ab)
    assert d.shape == (n,) and e.shape == (n - 1,)
    got = BL.band_eigvals(np.column_stack([d, np.append(e, 0.0)]).T.copy())  # as a band of width 1
    ref = np.linalg.eigvalsh(a)
    assert np.abs(got - ref).max() <= 1e-12 * ref.max()
    assert int((got > 1e-9 * ref.max()).sum()) == r


def test_device_tridiagonal_only_on_cuda():
    # the automatic choice never sends a CPU matrix's tridiagonal to the kernel, and False wins
    assert B.tridiagonal_on_device(torch.device("cpu")) is False
    B.use_device_tridiagonal(False)
    try:
        assert B.tridiagonal_on_device(torch.device("cuda")) is False
    finally:
        B.use_device_tridiagonal(None)
