"""The two-stage eigensolver (svd_probe/spectra/band.py) against numpy's float64 eigvalsh.

Error bound. Both sides are backward stable: each returns the exact eigenvalues of A + E with
‖E‖₂ ≤ c(n)·eps·‖A‖₂, so by Weyl's inequality every eigenvalue moves by at most ‖E‖₂. For
Householder reductions c(n) grows like n in the worst case and like sqrt(n) in practice
(rounding errors add up as random walks); the bound used is 1e-12·|λ|max·sqrt(n), i.e.
~4500·eps·sqrt(n): loose for rounding, while a wrong reflector, T factor or trailing update
moves eigenvalues by O(|λ|max).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from svd_probe.adapters.base import AttentionFactors
from svd_probe.spectra import band as B
from svd_probe.spectra import band_lapack as BL
from svd_probe.spectra.compute import SOLVERS, SpectraConfig, layer_spectra, layers_spectra, solve, solver_unavailable


def bound(lam: np.ndarray) -> float:
    return 1e-12 * float(np.abs(lam).max()) * np.sqrt(lam.shape[-1])


def planted(rng, n: int, psd: bool) -> tuple[np.ndarray, np.ndarray]:
    """Q·diag(λ)·Qᵀ with Q random orthogonal and |λ| from 1 down to 1e-12 (log-spaced), mixed signs
    unless psd; and the λ."""
    lam = np.logspace(0, -12, n)
    if not psd:
        lam = lam * rng.choice([-1.0, 1.0], n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * lam) @ q.T, np.sort(lam)


def dense_of_band(ab: np.ndarray) -> np.ndarray:
    """The symmetric matrix of lower band storage ab[i, j] = A[j + i, j]."""
    n = ab.shape[1]
    a = np.zeros((n, n))
    for i in range(ab.shape[0]):
        idx = np.arange(n - i)
        a[idx + i, idx] = ab[i, : n - i]
        a[idx, idx + i] = ab[i, : n - i]
    return a


@pytest.mark.parametrize("n,b", [(97, 8), (300, 16), (513, 32)])
@pytest.mark.parametrize("psd", [False, True])
def test_planted_spectra_match_numpy(n, b, psd):
    rng = np.random.default_rng(n + b)
    a, lam = planted(rng, n, psd)
    ref = np.linalg.eigvalsh(a)
    assert np.abs(ref - lam).max() <= bound(lam)  # the reference itself sees the planted spectrum
    got = B.eigvalsh_band(torch.from_numpy(a)[None], b)
    assert got.dtype == torch.float64 and got.shape == (1, n)
    g = got[0].numpy()
    assert np.all(np.diff(g) >= 0), "not ascending"
    assert np.abs(g - ref).max() <= bound(ref)


def test_band_is_a_band_similar_to_the_input():
    # to_band alone: the band's dense matrix has the input's eigenvalues and Frobenius norm (an
    # orthogonal similarity keeps both), and entries past the end of each diagonal are zero.
    rng = np.random.default_rng(1)
    n, b = 130, 16
    x = rng.standard_normal((n, n))
    a = x + x.T
    ab = B.to_band(torch.from_numpy(a), b)
    assert isinstance(ab, np.ndarray) and ab.shape == (b + 1, n) and ab.dtype == np.float64
    for i in range(1, b + 1):
        assert np.all(ab[i, n - i :] == 0)
    d = dense_of_band(ab)
    assert abs(np.linalg.norm(d) - np.linalg.norm(a)) <= 1e-12 * np.linalg.norm(a)
    ref = np.linalg.eigvalsh(a)
    assert np.abs(np.linalg.eigvalsh(d) - ref).max() <= bound(ref)
    # the band really carries the matrix: its sub-band entries are not all zero
    assert np.abs(ab[b]).max() > 1e-3 * np.abs(ref).max()


def test_only_the_lower_triangle_is_read():
    rng = np.random.default_rng(2)
    a, _ = planted(rng, 80, psd=False)
    garbled = a + np.triu(rng.standard_normal((80, 80)), 1)  # upper triangle is noise
    ref = np.linalg.eigvalsh(a)
    got = B.eigvalsh_band(torch.from_numpy(garbled)[None], 8)[0].numpy()
    assert np.abs(got - ref).max() <= bound(ref)


@pytest.mark.parametrize("n", [1, 5, 8, 9])
def test_small_matrices_are_their_own_band(n):
    # n ≤ b + 1: nothing to reduce; the band storage holds the lower triangle as it is.
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, n))
    a = x + x.T
    ab = B.to_band(torch.from_numpy(a), 8)
    for i in range(min(8, n - 1) + 1):
        assert np.array_equal(ab[i, : n - i], np.diagonal(a, -i))
    ref = np.linalg.eigvalsh(a)
    assert np.abs(B.band_eigvals(ab) - ref).max() <= bound(ref)
    # and n ≤ 2b goes straight to torch.linalg.eigvalsh
    assert np.abs(B.eigvalsh_band(torch.from_numpy(a)[None], 8)[0].numpy() - ref).max() <= bound(ref)


def test_rank_deficient_gram_has_its_zeros():
    # A Gram of rank 60 at n = 200: 140 eigenvalues are exactly 0, and must come out within the
    # rounding bound of 0 (no sign flip or spurious mass from the reduction).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 60))
    g = x @ x.T
    ref = np.linalg.eigvalsh(g)
    got = B.eigvalsh_band(torch.from_numpy(g)[None], 16)[0].numpy()
    assert np.abs(got - ref).max() <= bound(ref)
    assert np.abs(got[:140]).max() <= bound(ref)
    assert got[140] > 1e3 * bound(ref)


def test_already_banded_input():
    # Panels whose block below the band is already zero give reflectors with tau = 0 (the
    # identity); the compact-WY T factor must stay finite. A tridiagonal matrix at b = 8.
    rng = np.random.default_rng(4)
    n = 150
    d, e = rng.standard_normal(n), rng.standard_normal(n - 1)
    a = np.diag(d) + np.diag(e, -1) + np.diag(e, 1)
    ab = B.to_band(torch.from_numpy(a), 8)
    assert np.isfinite(ab).all()
    ref = np.linalg.eigvalsh(a)
    assert np.abs(B.band_eigvals(ab) - ref).max() <= bound(ref)


@pytest.mark.parametrize("m,c", [(50, 8), (6, 8), (40, 1)])
def test_compact_wy_is_householder_product(m, c):
    # I − V T Vᵀ against torch's own accumulation of geqrf's reflectors (LAPACK orgqr), also with
    # a zero column (tau = 0) and with fewer rows than columns.
    rng = np.random.default_rng(m * c)
    x = torch.from_numpy(rng.standard_normal((m, c)))
    if c > 1:
        x[1:, 1] = 0.0
        x[:, 0] = 0.0  # first reflector: the identity
    qr, tau = torch.geqrf(x)
    v, t = B._compact_wy(qr, tau)
    k = min(m, c)
    q = torch.eye(m, dtype=torch.float64) - v @ t @ v.mT
    want = torch.linalg.householder_product(qr[:, :k], tau)
    assert torch.allclose(q[:, :k], want, atol=1e-14, rtol=0)
    assert torch.allclose(q.mT @ q, torch.eye(m, dtype=torch.float64), atol=1e-13, rtol=0)


def test_batch():
    rng = np.random.default_rng(5)
    mats = [planted(rng, 120, psd)[0] for psd in (True, False, True)]
    got = B.eigvalsh_band(torch.from_numpy(np.stack(mats)), 16)
    assert got.shape == (3, 120)
    for a, g in zip(mats, got, strict=True):
        ref = np.linalg.eigvalsh(a)
        assert np.abs(g.numpy() - ref).max() <= bound(ref)
    assert B.eigvalsh_band(torch.empty(0, 120, 120, dtype=torch.float64), 16).shape == (0, 120)


def test_every_stage2_route_agrees():
    # Each LAPACK route that loads here (dsbev_2stage, dsbevd through ctypes, scipy's wrapper)
    # on the same band, against the dense matrix of that band.
    rng = np.random.default_rng(6)
    n, b = 257, 12
    ab = rng.standard_normal((b + 1, n))
    ref = np.linalg.eigvalsh(dense_of_band(ab))
    routes = BL._band_routes()
    assert routes[-1][0].startswith("scipy")
    for name, fn in routes:
        got = fn(ab)
        assert np.abs(np.sort(got) - ref).max() <= bound(ref), name
    assert B.stage2_name() == routes[0][0]


def test_stage2_releases_the_gil():
    # The point of the split: while one thread solves a band on the CPU, other Python threads
    # (driving the GPU) must run. A thread holding the GIL through the call would stall the main
    # thread until it returns (scipy.linalg.eigvals_banded does: the ctypes routes exist for this).
    name, fn = BL._stage2()
    if name.startswith("scipy"):
        pytest.skip("no ctypes LAPACK route here; scipy's wrapper holds the GIL")
    ab = np.random.default_rng(7).standard_normal((33, 1500))
    t0 = time.perf_counter()
    fn(ab)
    alone = time.perf_counter() - t0
    started = threading.Event()

    def work():
        started.set()
        fn(ab)

    th = threading.Thread(target=work)
    th.start()
    started.wait()
    time.sleep(0.02)  # inside the LAPACK call by now
    t1 = time.perf_counter()
    sum(range(20000))  # needs the GIL
    stalled = time.perf_counter() - t1
    th.join()
    assert stalled < 0.3 * alone, f"the main thread waited {stalled:.3f} s of a {alone:.3f} s band solve"


def test_registered_and_usable_on_cpu():
    assert "band" in SOLVERS and SOLVERS["band"].eig is B.eigvalsh_band and SOLVERS["band"].svd is None
    assert solver_unavailable("band", torch.device("cpu"), "eig") is None
    assert "no SVD" in (solver_unavailable("band", torch.device("cpu"), "svd") or "")


def _factors(seed: int) -> AttentionFactors:
    # d_model 150 > 2·DEFAULT_BAND, so the big Grams (stacked O and VO, 150 × 150) take the band
    # route with the default band width; Gaussian factors keep them well conditioned
    # (σ_min/σ₁ ≈ 0.06), so the sqrt of the eigenvalues amplifies rounding little: a λ error
    # of 1e-13·λ₁ is a σ error of at most 1e-13·σ₁²/(2σ_min) ≈ 1e-12·σ₁.
    rng = np.random.default_rng(seed)
    t = lambda *s: torch.from_numpy(rng.standard_normal(s))  # noqa: E731
    n, d_model, d_qk, d_v, in_q, in_kv = 8, 150, 6, 24, 20, 32
    return AttentionFactors(q=t(n, d_qk, in_q), k=t(n, d_qk, in_kv), v=t(n, d_v, in_kv), o=t(n, d_model, d_v))


def _assert_same(got, want, tol):
    assert list(got) == list(want)
    for key in want:
        assert got[key][1] == want[key][1], key
        s, w = got[key][0], want[key][0]
        assert float((s - w).abs().max()) <= tol * float(w.abs().max()), key


def test_public_path_equals_default_route():
    assert B.DEFAULT_BAND * 2 < 150
    f = _factors(8)
    kinds = {"O", "VO", "Q", "QK"}
    cfg = SpectraConfig(big_side=100)
    want = layer_spectra(f, kinds, config=cfg)
    got = layer_spectra(f, kinds, config=SpectraConfig(big_side=100, solver="band"))
    _assert_same(got, want, 1e-10)
    # in flight: two layers, their big solves on worker threads, and as one batched call
    for batched in (False, True):
        many = layers_spectra(
            [f, _factors(9)], kinds, config=SpectraConfig(big_side=100, solver="band", inflight=2, batched=batched)
        )
        _assert_same(many[0], want, 1e-10)
        _assert_same(many[1], layer_spectra(_factors(9), kinds, config=cfg), 1e-10)
    # solve() of one matrix by the band solver
    m = torch.from_numpy(np.random.default_rng(10).standard_normal((150, 190)))
    s = solve(m, "gram64", solver="band")
    ref = np.linalg.svd(m.numpy(), compute_uv=False)
    assert np.abs(s.numpy() - ref).max() <= 1e-10 * ref[0]


@pytest.fixture
def band_threads():
    """Stage 2 on threads for one test (a gate of threading.Event cannot go to a process), and
    the hybrid's cpu-full rule, which these tests check (the device-free test sets its own)."""
    B.use_stage2_workers("threads")
    B.use_hybrid_rule("cpu-full")
    yield
    B.use_stage2_workers("auto")
    B.use_hybrid_rule(B.DEFAULT_HYBRID_RULE)


def test_hybrid_takes_the_device_only_when_every_core_is_busy(band_threads):
    # Fill the band pool with tasks that wait on a gate: every core "busy". The hybrid then
    # solves on the device (torch.linalg.eigvalsh, here the CPU); once the gate opens, on the pool.
    assert B.stage2_workers() == "threads"
    rng = np.random.default_rng(11)
    mats = np.stack([planted(rng, 100, True)[0] for _ in range(2)])
    refs = [np.linalg.eigvalsh(a) for a in mats]
    gate = threading.Event()
    blockers = [B._submit(gate.wait, 30) for _ in range(B.cores())]
    try:
        before = dict(B.ROUTE_COUNTS)
        got = B.eigvalsh_band(torch.from_numpy(mats), 16, hybrid=True)
        assert B.ROUTE_COUNTS["device"] - before["device"] == 2
        assert B.ROUTE_COUNTS["band"] == before["band"]
    finally:
        gate.set()
    for f in blockers:
        f.result()
    for g, ref in zip(got, refs, strict=True):
        assert np.abs(g.numpy() - ref).max() <= bound(ref)
    before = dict(B.ROUTE_COUNTS)
    got = B.eigvalsh_band(torch.from_numpy(mats), 16, hybrid=True)
    assert B.ROUTE_COUNTS["band"] - before["band"] == 2 and B.ROUTE_COUNTS["device"] == before["device"]
    for g, ref in zip(got, refs, strict=True):
        assert np.abs(g.numpy() - ref).max() <= bound(ref)
    assert SOLVERS["band-hybrid"].eig is not None and solver_unavailable("band-hybrid", torch.device("cpu")) is None


def test_hybrid_waits_for_the_device_when_every_worker_is_busy(band_threads):
    # Every worker busy and the device slot taken (by this test): a hybrid solve must wait for
    # the slot, not join the CPU queue (the first rule did, and gave the GPU 2 of 86 problems);
    # once the slot is free it solves on the device.
    a, _ = planted(np.random.default_rng(15), 100, True)
    gate = threading.Event()
    blockers = [B._submit(gate.wait, 30) for _ in range(B.cores())]
    got: list = []
    try:
        before = dict(B.ROUTE_COUNTS)
        B._device_slots.acquire()
        try:
            t = threading.Thread(target=lambda: got.append(B.eigvalsh_band(torch.from_numpy(a)[None], 16, hybrid=True)))
            t.start()
            t.join(0.5)
            assert t.is_alive() and B.ROUTE_COUNTS == before  # waiting, and not queued on the CPU
        finally:
            B._device_slots.release()
        t.join(30)
        assert B.ROUTE_COUNTS["device"] - before["device"] == 1 and B.ROUTE_COUNTS["band"] == before["band"]
    finally:
        gate.set()
    for f in blockers:
        f.result()
    ref = np.linalg.eigvalsh(a)
    assert np.abs(got[0][0].numpy() - ref).max() <= bound(ref)


def test_device_free_rule_takes_the_device_whenever_its_slot_is_free(band_threads):
    # "device-free": with idle workers the matrix still goes to the device if its slot is free,
    # and to the band route (without waiting) while the slot is taken; both answers exact.
    mats = np.stack([planted(np.random.default_rng(16 + i), 100, True)[0] for i in range(2)])
    refs = [np.linalg.eigvalsh(m) for m in mats]
    with pytest.raises(ValueError, match="unknown hybrid rule"):
        B.use_hybrid_rule("always")
    B.use_hybrid_rule("device-free")
    try:
        before = dict(B.ROUTE_COUNTS)
        got = B.eigvalsh_band(torch.from_numpy(mats), 16, hybrid=True)
        assert B.ROUTE_COUNTS["device"] - before["device"] == 2 and B.ROUTE_COUNTS["band"] == before["band"]
        for g, ref in zip(got, refs, strict=True):
            assert np.abs(g.numpy() - ref).max() <= bound(ref)
        before = dict(B.ROUTE_COUNTS)
        B._device_slots.acquire()
        try:
            got = B.eigvalsh_band(torch.from_numpy(mats), 16, hybrid=True)  # would hang if it waited
        finally:
            B._device_slots.release()
        assert B.ROUTE_COUNTS["band"] - before["band"] == 2 and B.ROUTE_COUNTS["device"] == before["device"]
        for g, ref in zip(got, refs, strict=True):
            assert np.abs(g.numpy() - ref).max() <= bound(ref)
    finally:
        B.use_hybrid_rule(B.DEFAULT_HYBRID_RULE)


def test_fewer_stage2_workers_bound_the_pool_and_the_hybrids_busy_rule():
    # One worker: at most one stage-2 solve runs at once, a single busy worker counts as "every
    # worker busy" (the hybrid then takes the device), and the layers in flight follow the pool.
    from svd_probe.spectra.compute import band_inflight

    with pytest.raises(ValueError, match="count"):
        B.use_stage2_workers("threads", -1)
    B.use_stage2_workers("threads", 10**6)
    B.use_hybrid_rule("cpu-full")  # the busy rule is the one under test
    try:
        assert B.pool_size() == B.cores()  # never more workers than cores
        B.use_stage2_workers("threads", 1)
        assert B.pool_size() == 1 and band_inflight() == 1 // 2 + 4
        running, most = [0], [0]
        lock, gate = threading.Lock(), threading.Event()

        def task():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            gate.wait(30)
            with lock:
                running[0] -= 1

        blockers = [B._submit(task) for _ in range(2)]
        try:
            a, _ = planted(np.random.default_rng(16), 100, True)
            before = dict(B.ROUTE_COUNTS)
            got = B.eigvalsh_band(torch.from_numpy(a)[None], 16, hybrid=True)
            assert B.ROUTE_COUNTS["device"] - before["device"] == 1 and B.ROUTE_COUNTS["band"] == before["band"]
        finally:
            gate.set()
        for f in blockers:
            f.result()
        assert most[0] == 1
        ref = np.linalg.eigvalsh(a)
        assert np.abs(got[0].numpy() - ref).max() <= bound(ref)
    finally:
        B.use_stage2_workers("auto")
        B.use_hybrid_rule(B.DEFAULT_HYBRID_RULE)
    assert B.pool_size() == B.cores() and band_inflight() == B.cores() // 2 + 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_band_solves_in_a_forked_child():
    # The parent's pool has idle threads; a forked child has none of them and must make its own.
    # The child runs stage 2 only (LAPACK through the pool): torch's own CPU ops in a child forked
    # after the parent used its OpenMP threads can hang for reasons of their own (they did in the
    # full suite, 2026-12-02), which is not what this test is about.
    import multiprocessing as mp

    a, _ = planted(np.random.default_rng(12), 100, True)
    ref = np.linalg.eigvalsh(a)
    B.eigvalsh_band(torch.from_numpy(a)[None], 16)  # the pool exists in the parent now
    ab = B.to_band(torch.from_numpy(a), 16)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_band_in_child, (ab,)).get(timeout=20)  # hangs without the fork handler
    assert np.abs(np.sort(got) - ref).max() <= bound(ref)


def _band_in_child(ab: np.ndarray) -> np.ndarray:
    return B._submit(B.band_eigvals, ab).result(timeout=15)


def test_stage2_on_worker_processes_matches_numpy():
    # Spawned workers (the default where the main script is safe to import: pytest's is): the
    # bands go out, the eigenvalues come back, for a batch larger than the pool.
    B.use_stage2_workers("processes")
    try:
        assert B.stage2_workers() == "processes"
        rng = np.random.default_rng(13)
        mats = [planted(rng, 120, i % 2 == 0)[0] for i in range(2 * B.cores() + 1)]
        got = B.eigvalsh_band(torch.from_numpy(np.stack(mats)), 16)
        for g, a in zip(got, mats, strict=True):
            ref = np.linalg.eigvalsh(a)
            assert np.abs(g.numpy() - ref).max() <= bound(ref)
        pid = B._submit(os.getpid).result(timeout=60)
        assert pid != os.getpid()  # it ran in another process
    finally:
        B.use_stage2_workers("auto")


def test_dead_worker_process_falls_back_to_threads():
    # A worker that dies (here: killed by the problem it was given) breaks the process pool; the
    # solve is redone on a thread, with a warning, and later solves stay on threads.
    B.use_stage2_workers("processes")
    try:
        a, _ = planted(np.random.default_rng(14), 100, True)
        ab = B.to_band(torch.from_numpy(a), 16)
        fut = B._submit(os._exit, 3)
        with pytest.warns(RuntimeWarning, match="worker processes failed"):
            got = B._band_result(fut, B.band_eigvals, ab)
        ref = np.linalg.eigvalsh(a)
        assert np.abs(np.sort(got) - ref).max() <= bound(ref)
        assert B.stage2_workers() == "threads"
    finally:
        B.use_stage2_workers("auto")


@pytest.mark.parametrize(
    ("source", "safe"),
    [
        ('"""doc"""\nimport sys\nfrom os import path\nX = 3\nY: int = X + 1\n'
         'def main():\n    print(1)\n\nif __name__ == "__main__":\n    main()\n', True),
        ("import functools\n@functools.cache\ndef f():\n    return 1\nclass A:\n    pass\n", True),
        ("from svd_probe.analysis import analyze\nanalyze('deepseek-v3')\n", False),  # the work itself
        ("import re\nSTEP = re.compile('x')\n", False),  # a call at import: cannot tell it is harmless
        ("for i in range(3):\n    pass\n", False),
        ("import typer\napp = typer.Typer()\n@app.command()\ndef f():\n    pass\n", False),
        ('if __name__ != "__main__":\n    pass\n', False),
        ('if __name__ == "__main__":\n    pass\nelse:\n    work()\n', False),
        ("import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).parent))\n", True),
        ("import sys\nsys.path.append('.')\nsys.exit(main())\n", False),  # the path edit passes, the exit does not
        ("def broken(:\n", False),  # not Python: not safe
    ],
)  # fmt: skip
def test_spawn_safety_of_a_main_script(tmp_path, source, safe):
    script = tmp_path / "main.py"
    script.write_text(source)
    assert B._script_is_spawn_safe(str(script)) is safe


def test_unguarded_script_gets_threads_and_finishes(tmp_path):
    # A user's script that calls the band solver at top level: spawned workers would each run it
    # again, so it must get threads, and finish with the right answer.
    import subprocess
    import sys

    script = tmp_path / "user.py"
    script.write_text(
        "import numpy as np, torch\n"
        "from svd_probe.spectra import band as B\n"
        "a = np.random.default_rng(0).standard_normal((90, 90)); a = a + a.T\n"
        "got = B.eigvalsh_band(torch.from_numpy(a)[None], 8)[0].numpy()\n"
        "print(B.stage2_workers(), float(np.abs(got - np.linalg.eigvalsh(a)).max()))\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    kind, err = r.stdout.split()
    assert kind == "threads" and float(err) < 1e-9


@pytest.mark.triton_interpreter
def test_bulge_chasing_kernel_in_the_interpreter(tmp_path):
    """Stage 2 on the device (`bulge.band_to_tridiagonal`, a Triton kernel), here in Triton's
    interpreter: the tridiagonals of a batch of three bands of width 5 (the kernel's tile is 8),
    planted spectra from 1 down to 1e-12 (mixed signs, then PSD) and a random symmetric one, have
    their bands' eigenvalues (numpy float64) within the Householder bound; and
    `eigvalsh_band_device` of the dense matrices too (stage 1, the kernel, bisection)."""
    import subprocess
    import sys
    import textwrap

    rng = np.random.default_rng(3)
    n, b = 45, 5
    mats = []
    for psd in (False, True):
        a, _ = planted(rng, n, psd)
        mats.append(dense_of_band(B.to_band(torch.from_numpy(a), b)))  # a band of width b
    x = rng.standard_normal((n, n))
    mats.append(dense_of_band(B.to_band(torch.from_numpy(x + x.T), b)))
    np.save(tmp_path / "a.npy", np.stack(mats))
    code = textwrap.dedent(f"""
        import numpy as np, torch
        from svd_probe.spectra import band as B, bulge
        a = torch.from_numpy(np.load({str(tmp_path / "a.npy")!r}))
        ab = torch.stack([torch.from_numpy(B.to_band(m, {b})) for m in a])
        d, e = bulge.band_to_tridiagonal(ab, num_warps=1)  # the warps change the schedule of threads only
        np.save({str(tmp_path / "d.npy")!r}, d.numpy())
        np.save({str(tmp_path / "e.npy")!r}, e.numpy())
        lam = B.eigvalsh_band_device(a[:2], b=4)  # n > 2b: stage 1, the kernel, bisection
        np.save({str(tmp_path / "lam.npy")!r}, lam.numpy())
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    d, e, lam = (np.load(tmp_path / f"{k}.npy") for k in ("d", "e", "lam"))
    assert d.shape == (3, n) and e.shape == (3, n - 1)
    for i, m in enumerate(mats):
        ref = np.linalg.eigvalsh(m)
        tri = np.diag(d[i]) + np.diag(e[i], 1) + np.diag(e[i], -1)
        assert np.abs(np.linalg.eigvalsh(tri) - ref).max() <= bound(ref), i
        if i < 2:
            assert np.abs(lam[i] - ref).max() <= bound(ref), i


def _chase_task(a: np.ndarray, k: int, t: int, bs: int) -> bool:
    """Reflector t of sweep k of the bulge chase, on the lower triangle of the dense a, as the
    kernel of svd_probe.spectra.bulge applies it (its L, S and B tiles); False past the band's end."""
    n = a.shape[0]
    j, r0 = (k, k + 1) if t == 0 else (k + 1 + (t - 1) * bs, k + 1 + t * bs)
    if r0 >= n - 1:
        return False
    r1 = min(r0 + bs, n)
    lb = a[r0:r1, j:r0]
    x = lb[:, 0].copy()
    alpha, sigma = x[0], float((x[1:] ** 2).sum())
    v, tau = np.zeros_like(x), 0.0
    v[0] = 1.0
    if sigma > 0:
        beta = -np.hypot(alpha, np.sqrt(sigma)) if alpha >= 0 else np.hypot(alpha, np.sqrt(sigma))
        v[1:] = x[1:] / (alpha - beta)
        tau = (beta - alpha) / beta
    lb -= tau * np.outer(v, v @ lb)
    if sigma > 0:
        lb[:, 0] = 0.0
        lb[0, 0] = beta
    s = np.tril(a[r0:r1, r0:r1])
    s = s + np.tril(s, -1).T
    p = tau * (s @ v)
    w = p - 0.5 * tau * (p @ v) * v
    s -= np.outer(v, w) + np.outer(w, v)
    a[r0:r1, r0:r1] = np.tril(s) + np.triu(a[r0:r1, r0:r1], 1)
    bb = a[r1 : r1 + bs, r0:r1]
    bb -= tau * np.outer(bb @ v, v)
    return True


def _chase(a: np.ndarray, bs: int, lag: int | None) -> np.ndarray:
    """The chase of a's band in order (lag None), or with every sweep run at once, each `lag`
    reflectors behind the one before: each round applies every reflector whose sweep's predecessor
    had gone far enough when the round began, later sweeps first (a reader before its writer)."""
    a = np.tril(a).copy()
    n = a.shape[0]
    if lag is None:
        for k in range(n - 2):
            t = 0
            while _chase_task(a, k, t, bs):
                t += 1
        return a
    done = [0] * (n - 2)
    finished = [False] * (n - 2)
    while not all(finished):
        ready = [
            k for k in range(n - 2) if not finished[k] and (k == 0 or finished[k - 1] or done[k - 1] >= done[k] + lag)
        ]
        for k in reversed(ready):
            if _chase_task(a, k, done[k], bs):
                done[k] += 1
            else:
                finished[k] = True
    return a


def test_bulge_chasing_schedule_lag():
    """The bulge kernel's programs chase sweeps at once, sweep k+1 `bulge.LAG` reflectors behind
    sweep k. Replayed in numpy with every sweep in flight (the most any number of programs can
    run), the tridiagonal equals the in-order chase's bit for bit, and has the band's
    eigenvalues; one reflector less of lag changes it."""
    from svd_probe.spectra import bulge

    rng = np.random.default_rng(5)
    n, bs = 40, 4
    x = rng.standard_normal((n, n))
    dense = dense_of_band(B.to_band(torch.from_numpy(x + x.T), bs))
    in_order = _chase(dense, bs, None)
    tri = np.tril(in_order)
    assert np.abs(np.tril(tri, -2)).max() < 1e-12 * np.abs(dense).max()  # tridiagonal
    d, e = np.diag(tri), np.diag(tri, -1)
    ref = np.linalg.eigvalsh(dense)
    assert np.abs(np.linalg.eigvalsh(np.diag(d) + np.diag(e, 1) + np.diag(e, -1)) - ref).max() <= bound(ref)
    assert np.array_equal(_chase(dense, bs, bulge.LAG), in_order)
    assert not np.array_equal(_chase(dense, bs, bulge.LAG - 1), in_order)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bulge kernel with several programs a band runs on CUDA")
def test_bulge_chasing_kernel_slots_on_cuda():
    """On a GPU, the chase of several programs a band (each spinning until the program of the sweep
    before has gone LAG reflectors ahead) gives the one-program result bit for bit, for two bands
    at once, and the band's eigenvalues (LAPACK's)."""
    pytest.importorskip("triton")
    from svd_probe.spectra import bulge

    rng = np.random.default_rng(6)
    n, b = 1200, 32
    mats = []
    for _ in range(2):
        x = rng.standard_normal((n, n))
        mats.append(x + x.T)
    ab = torch.stack([torch.from_numpy(B.to_band(torch.from_numpy(m), b)) for m in mats]).cuda()
    d1, e1 = bulge.band_to_tridiagonal(ab, slots=1)
    for slots in (2, 9, None):
        ds, es = bulge.band_to_tridiagonal(ab, slots=slots)
        assert torch.equal(ds, d1) and torch.equal(es, e1), slots
    for i, m in enumerate(mats):
        ref = np.linalg.eigvalsh(dense_of_band(B.to_band(torch.from_numpy(m), b)))
        d, e = d1[i].cpu().numpy(), e1[i].cpu().numpy()
        assert np.abs(np.linalg.eigvalsh(np.diag(d) + np.diag(e, 1) + np.diag(e, -1)) - ref).max() <= bound(ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the chase-free rule chases bands on CUDA")
def test_hybrid_chase_free_rule_on_cuda():
    """band-hybrid's "chase-free" rule: each matrix's stage 2 by the bulge kernel on the device
    when no other chase runs (ROUTE_COUNTS["chase"]), on a CPU worker while one does (here the
    test holds the kernel's launch lock); the eigenvalues are numpy's either way."""
    pytest.importorskip("triton")
    from svd_probe.spectra import bulge

    rng = np.random.default_rng(7)
    n = 600
    mats = []
    for _ in range(2):
        x = rng.standard_normal((n, n))
        mats.append(x + x.T)
    x = torch.from_numpy(np.stack(mats)).cuda()
    ref = np.linalg.eigvalsh(np.stack(mats))
    B.use_hybrid_rule("chase-free")
    try:
        before = dict(B.ROUTE_COUNTS)
        got = B.eigvalsh_band(x, 16, hybrid=True).cpu().numpy()
        assert B.ROUTE_COUNTS["chase"] - before["chase"] == 2 and B.ROUTE_COUNTS["band"] == before["band"]
        assert np.abs(got - ref).max() <= bound(ref)
        before = dict(B.ROUTE_COUNTS)
        with bulge._launch_lock:  # another chase is running
            got = B.eigvalsh_band(x, 16, hybrid=True).cpu().numpy()
        assert B.ROUTE_COUNTS["band"] - before["band"] == 2 and B.ROUTE_COUNTS["chase"] == before["chase"]
        assert np.abs(got - ref).max() <= bound(ref)
    finally:
        B.use_hybrid_rule(B.DEFAULT_HYBRID_RULE)


def test_stagelog_summary_counts_overlap_once():
    """stagelog's per-stage totals on planted spans: total is the sum of the durations, busy the
    length of their union (overlaps counted once), and nothing is recorded outside `recording()`."""
    from svd_probe.spectra import stagelog

    log = [
        stagelog.Span("a", 1, 0.0, 2.0),
        stagelog.Span("a", 2, 1.0, 3.0),  # overlaps the first by 1 s
        stagelog.Span("a", 1, 5.0, 5.5),
        stagelog.Span("b", 1, 0.0, 0.25),
    ]
    s = stagelog.summary(log)
    assert s["a"] == {"count": 3, "total_s": 4.5, "mean_s": 1.5, "max_s": 2.0, "busy_s": 3.5}
    assert s["b"]["busy_s"] == 0.25 and s["b"]["count"] == 1
    with stagelog.span("outside"):
        pass
    with stagelog.recording() as rec:
        with stagelog.span("inside"):
            pass
    with stagelog.span("after"):
        pass
    assert [r.stage for r in rec] == ["inside"] and rec[0].end >= rec[0].start


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the Triton kernels cannot run")
def test_band_device_falls_back_to_band_hybrid_where_its_kernels_cannot_run(monkeypatch):
    """band-device (analyze's default on CUDA) on a device where Triton cannot launch (here the
    CPU, outside the interpreter): one warning, then band-hybrid's route for this call and the
    next, the planted spectra to the Householder bound all the same."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(B, "_chase_on_device", None)
    rng = np.random.default_rng(11)
    a = [planted(rng, 96, psd)[0] for psd in (False, True)]
    x = torch.from_numpy(np.stack(a))
    ref = np.linalg.eigvalsh(np.stack(a))
    before = sum(B.ROUTE_COUNTS.values())
    with pytest.warns(RuntimeWarning, match="band-device: stage 2 back on the CPU workers"):
        got = B.eigvalsh_band_device(x, 16).numpy()
    assert np.abs(got - ref).max() <= bound(ref)
    assert sum(B.ROUTE_COUNTS.values()) - before == 2 and B._chase_on_device is False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call: no second warning
        again = B.eigvalsh_band_device(x, 16).numpy()
    assert np.abs(again - ref).max() <= bound(ref)


def test_use_chase_launches_lets_that_many_chases_hold_the_launch_slot_at_once():
    from svd_probe.spectra import bulge

    try:
        bulge.use_chase_launches(2)
        held = [bulge._launch_lock.acquire(blocking=False) for _ in range(3)]
        assert held == [True, True, False]  # band-hybrid's chase-free rule sees the third as busy
        for _ in range(2):
            bulge._launch_lock.release()
        with pytest.raises(ValueError, match="must be ≥ 1"):
            bulge.use_chase_launches(0)
    finally:
        bulge.use_chase_launches(1)
    assert bulge._launch_lock.acquire(blocking=False) and not bulge._launch_lock.acquire(blocking=False)
    bulge._launch_lock.release()
