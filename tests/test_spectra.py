"""Spectra of every kind against float64 numpy SVD of the explicitly materialized matrices.

The factors are small and random, with planted ranks (each head's blocks have a known rank
below their size, and the heads share subspaces so that the stacked matrices are rank deficient
too): every σ beyond the planted rank must come out ~0, which a float32 Gram route would get
wrong by ~3e-4·σ₁. The reference materializes VO_h, QK_h and every stacked matrix in float64 and
calls np.linalg.svd; it shares no code with svd_probe.spectra.compute.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from svd_probe.adapters.base import AttentionFactors
from svd_probe.spectra.compute import (
    SOLVERS,
    SpectraConfig,
    SpectraPipeline,
    layer_spectra,
    layers_spectra,
    requested_keys,
    solve,
    solver_unavailable,
)

# Small dims with the MLA proportions (d_model > in_q > in_k; d_qk > d_rope)
N, D_MODEL, IN_Q, IN_KV, D_QK, D_ROPE, D_V = 6, 40, 24, 18, 7, 3, 5
TOL = 1e-6  # the contract is 1e-4·σ₁; the float64 routes should beat it by far


def _low_rank(rng, shape, rank, left=None):
    """A random matrix of exactly `rank` with decaying singular values; `left` (optional) is a
    shared basis for the column space, so blocks built on it overlap (rank-deficient stacks)."""
    m, n = shape
    a = left[:, :rank] if left is not None else rng.standard_normal((m, rank))
    decay = 2.0 ** -np.arange(rank)
    return (a * decay) @ rng.standard_normal((rank, n))


def make_factors(seed=0, groups=N, ranks=None, zero_head=None, with_pe=True, with_layer=True):
    rng = np.random.default_rng(seed)
    r = {"q": 4, "q_pe": 2, "k": 5, "v": 3, "o": 3}
    r.update(ranks or {})
    # A shared residual-side basis of width 8 for o: stacked O then has rank ≤ 8 < d_model.
    res_basis = rng.standard_normal((D_MODEL, 8))
    q = np.stack([_low_rank(rng, (D_QK, IN_Q), r["q"]) for _ in range(N)])
    q_pe = np.stack([_low_rank(rng, (D_ROPE, IN_Q), r["q_pe"]) for _ in range(N)])
    k = np.stack([_low_rank(rng, (D_QK, IN_KV), r["k"]) for _ in range(groups)])
    v = np.stack([_low_rank(rng, (D_V, IN_KV), r["v"]) for _ in range(groups)])
    o = np.stack(
        [_low_rank(rng, (D_MODEL, D_V), r["o"], left=res_basis @ rng.standard_normal((8, 8))) for _ in range(N)]
    )
    if zero_head is not None:
        o[zero_head] = 0.0
    layer = {}
    if with_layer:
        layer = {
            "QA": _low_rank(rng, (IN_Q, D_MODEL), 10),
            "KVA": rng.standard_normal((IN_KV, D_MODEL)),
            "KVA_pe": rng.standard_normal((D_ROPE, D_MODEL)),
        }
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731 - float32, as the contract says
    kv_group = None if groups == N else torch.arange(N) // (N // groups)
    return AttentionFactors(
        q=t(q),
        k=t(k),
        v=t(v),
        o=t(o),
        q_pe=t(q_pe) if with_pe else None,
        kv_group=kv_group,
        layer={name: t(w) for name, w in layer.items()},
    )


def _sv(a):
    return np.linalg.svd(a, compute_uv=False)


def reference(f: AttentionFactors, normalize=True):
    """float64 numpy: materialize every matrix exactly as docs/reference.md §3 defines it."""
    n = lambda t: t.double().numpy()  # noqa: E731 - the float32 inputs, exactly, in float64
    q, k, v, o = n(f.q), n(f.k), n(f.v), n(f.o)
    grp = f.groups().numpy()
    heads = {
        "Q": [q[h] for h in range(len(q))],
        "K": list(k),
        "V": list(v),
        "O": list(o),
        "VO": [o[h] @ v[grp[h]] for h in range(len(o))],
        "QK": [q[h].T @ k[grp[h]] for h in range(len(q))],
    }
    if f.q_pe is not None:
        heads["Q_pe"] = list(n(f.q_pe))
    out = {}
    for kind, mats in heads.items():
        out[f"head.{kind}"] = (np.stack([_sv(m) for m in mats]), mats[0].shape)

    def norm(mats):
        s = [_sv(m)[0] for m in mats]
        return [m / si if (normalize and si > 0) else m for m, si in zip(mats, s, strict=False)]

    for kind in ("Q", "Q_pe", "K", "V"):
        if kind in heads:
            m = np.concatenate(norm(heads[kind]), axis=0)  # rows: the input space is shared
            out[f"stacked.{kind}"] = (_sv(m), m.shape)
    for kind in ("O", "VO"):
        m = np.concatenate(norm(heads[kind]), axis=1)  # columns: the residual stream is shared
        out[f"stacked.{kind}"] = (_sv(m), m.shape)
    qk = norm(heads["QK"])
    m = np.concatenate(qk, axis=0)
    out["stacked.QK"] = (_sv(m), m.shape)
    m = np.concatenate(qk, axis=1)
    out["stacked.KQ"] = (_sv(m), m.shape)
    for name, w in f.layer.items():
        out[f"layer.{name}"] = (_sv(n(w)), tuple(w.shape))
    return out


def assert_close(got, ref, tol=TOL):
    for key, (s_ref, shape_ref) in ref.items():
        assert key in got, key
        s, shape = got[key]
        assert shape == tuple(shape_ref), (key, shape, shape_ref)
        assert s.dtype == torch.float64 and s.device.type == "cpu"
        s = s.numpy()
        assert s.shape == s_ref.shape, (key, s.shape, s_ref.shape)
        # descending
        assert np.all(np.diff(s, axis=-1) <= 1e-12 * np.abs(s).max()), key
        scale = np.max(s_ref, axis=-1, keepdims=True)
        scale = np.where(scale > 0, scale, 1.0)
        err = np.max(np.abs(s - s_ref) / scale)
        assert err <= tol, f"{key}: max error {err:.3g}·σ₁ > {tol}"


ALL = {"Q", "Q_pe", "K", "V", "O", "VO", "QK", "KQ", "QA", "KVA", "KVA_pe"}


@pytest.mark.parametrize("groups", [N, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_all_kinds_match_numpy(groups, normalize):
    f = make_factors(seed=1, groups=groups)
    got = layer_spectra(f, ALL, normalize_stacked=normalize)
    ref = reference(f, normalize)
    assert set(got) == set(ref)
    assert_close(got, ref)


@pytest.mark.parametrize("factor", ["gram", "qr"])
@pytest.mark.parametrize("solver,tol", [("gram64", TOL), ("svd64", TOL), ("svd32", 2e-5)])
def test_every_route_matches_numpy(factor, solver, tol):
    # big_side=10 sends the larger stacked problems through `big` too, so both settings are used
    cfg = SpectraConfig(factor=factor, stacked=solver, big=solver, big_side=10)
    f = make_factors(seed=2, groups=3)
    assert_close(layer_spectra(f, ALL, config=cfg), reference(f), tol)


def test_planted_ranks_are_exact():
    f = make_factors(seed=3)
    got = layer_spectra(f, ALL)

    def tail(key, r):
        s = got[key][0].numpy()
        s = s if s.ndim == 2 else s[None]
        assert np.all(s[:, r - 1] > 1e-3 * s[:, 0]), f"{key}: rank below {r}"
        assert np.all(s[:, r:] <= 1e-7 * s[:, :1]), f"{key}: σ beyond rank {r} not ~0: {s[:, r:].max()}"

    tail("head.Q", 4)
    tail("head.Q_pe", 2)
    tail("head.K", 5)
    tail("head.V", 3)
    tail("head.O", 3)
    tail("head.VO", 3)  # rank ≤ min(rank o, rank v)
    tail("head.QK", 4)
    tail("stacked.O", 8)  # all heads write into one 8-dim residual subspace
    tail("stacked.VO", 8)
    tail("layer.QA", 10)
    # fused spectra keep the full length min(m, n), zeros included
    assert got["head.VO"][0].shape == (N, min(D_MODEL, IN_KV))
    assert got["head.QK"][0].shape == (N, min(IN_Q, IN_KV))


def test_gqa_groups_shape_and_pairing():
    f = make_factors(seed=4, groups=2)
    got = layer_spectra(f, {"K", "V", "VO", "QK", "KQ"})
    assert got["head.K"][0].shape == (2, min(D_QK, IN_KV))
    assert got["head.V"][0].shape == (2, min(D_V, IN_KV))
    assert got["stacked.K"][1] == (2 * D_QK, IN_KV)
    assert got["stacked.VO"][1] == (D_MODEL, N * IN_KV)
    assert got["stacked.KQ"][1] == (IN_Q, N * IN_KV)
    # Pairing: heads 0-2 read group 0, heads 3-5 group 1; a wrong pairing changes VO_h's σ.
    wrong = AttentionFactors(q=f.q, k=f.k, v=f.v, o=f.o, kv_group=torch.tensor([1, 1, 1, 0, 0, 0]))
    bad = layer_spectra(wrong, {"VO"})["head.VO"][0]
    assert not torch.allclose(bad, got["head.VO"][0], rtol=1e-3)
    assert_close(got, {k: v for k, v in reference(f).items() if k in got})


def test_kinds_subset_and_scopes():
    f = make_factors(seed=5)
    got = layer_spectra(f, {"VO", "KQ", "KVA"})
    assert set(got) == {"head.VO", "stacked.VO", "stacked.KQ", "layer.KVA"}
    got = layer_spectra(f, {"stacked.O", "head.Q"})
    assert set(got) == {"stacked.O", "head.Q"}
    assert_close(got, {k: v for k, v in reference(f).items() if k in got})
    assert layer_spectra(f, set()) == {}


@pytest.mark.slow
def test_missing_factors_are_skipped():
    f = make_factors(seed=6, with_pe=False, with_layer=False)
    got = layer_spectra(f, ALL)
    assert not any("Q_pe" in key or key.startswith("layer.") for key in got)
    g = AttentionFactors(q=None, k=None, v=f.v, o=f.o)
    assert set(requested_keys(g, ALL)) == {"head.V", "head.O", "head.VO", "stacked.V", "stacked.O", "stacked.VO"}
    assert_close(layer_spectra(g, ALL), {k: v for k, v in reference(f).items() if k in requested_keys(g, ALL)})
    kv_only = AttentionFactors(q=None, k=f.k, v=f.v, o=None)
    got = layer_spectra(kv_only, ALL)
    assert set(got) == {"head.K", "head.V", "stacked.K", "stacked.V"}
    assert_close(got, {k: v for k, v in reference(f).items() if k in got})


def test_zero_head_is_not_normalized_into_nan():
    f = make_factors(seed=7, zero_head=2)
    got = layer_spectra(f, {"O", "VO"})
    for s, _ in got.values():
        assert torch.isfinite(s).all()
    assert float(got["head.O"][0][2].abs().max()) == 0.0
    assert_close(got, {k: v for k, v in reference(f).items() if k in got})


def test_normalization_makes_heads_count_equally():
    # Scale one head by 1000: unnormalized, stacked O is dominated by it; normalized, it is not.
    f = make_factors(seed=8)
    f.o[0] *= 1000.0
    raw = layer_spectra(f, {"stacked.O"}, normalize_stacked=False)["stacked.O"][0]
    nrm = layer_spectra(f, {"stacked.O"}, normalize_stacked=True)["stacked.O"][0]
    head0 = layer_spectra(f, {"head.O"})["head.O"][0][0]
    assert raw[0] >= head0[0] * (1 - 1e-6)  # the big head alone already has this σ₁
    assert nrm[0] <= np.sqrt(N) * (1 + 1e-6)  # n unit-norm blocks: σ₁ ≤ sqrt(n)
    assert_close({"stacked.O": (nrm, (D_MODEL, N * D_V))}, {k: v for k, v in reference(f).items() if k == "stacked.O"})


def test_tf32_setting_is_ignored_and_restored():
    f = make_factors(seed=9)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = layer_spectra(f, {"VO", "QK"})
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
    assert_close(got, {k: v for k, v in reference(f).items() if k in got})


def test_bad_route_is_refused():
    with pytest.raises(ValueError):
        layer_spectra(make_factors(), {"O"}, config=SpectraConfig(big="svd16"))


@pytest.mark.slow
def test_chunked_grams_match():
    # Tiny chunks: every Gram (per-head factors, stacked O/VO accumulation, solve) is summed over
    # many pieces; the result must not change.
    f = make_factors(seed=10, groups=3)
    cfg = SpectraConfig(chunk_bytes=2000, big_side=10)
    assert_close(layer_spectra(f, ALL, config=cfg), reference(f))


# --- several layers in flight, and the solver routes ------------------------------------------------

# big_side=10 makes most stacked and layer problems "big", so they take the deferred path
# (worker threads, or one batched call) and the configured solver.
BIG = dict(big_side=10)


def _assert_identical(got, want, rounding=0.0):
    """The same keys, shapes and σ; bit for bit unless `rounding` (relative to σ₁) is allowed."""
    assert list(got) == list(want)
    for key in want:
        assert got[key][1] == want[key][1], key
        if rounding == 0.0:
            assert torch.equal(got[key][0], want[key][0]), f"{key}: differs from the single-layer path"
        else:
            scale = float(want[key][0].abs().max()) or 1.0
            diff = float((got[key][0] - want[key][0]).abs().max()) / scale
            assert diff <= rounding, f"{key}: differs from the single-layer path by {diff:.2g}·σ₁"


@pytest.mark.slow
@pytest.mark.parametrize("inflight,batched", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_layers_in_flight_equal_layer_by_layer(inflight, batched):
    # Layers of different shapes (GQA groups, a K/V-only layer) mixed in one sequence: every
    # result must be the single-layer path's, and right against numpy. One thread per solve
    # runs the very same calls: bit for bit. A batched call may not: LAPACK's rounding depends
    # on where a matrix sits in memory (seen: eigenvalues 4e-16·λ₁ apart for one Gram at batch
    # offset 1), so σ that are 0 in exact arithmetic move by up to sqrt(eps64)·σ₁ ≈ 1.5e-8·σ₁.
    base = make_factors(seed=11, groups=3)
    layers = [
        base,
        make_factors(seed=12),
        AttentionFactors(q=None, k=base.k, v=base.v, o=None),
        make_factors(seed=13, groups=2, with_pe=False),
    ]
    refs = [reference(f) for f in (base, layers[1], base, layers[3])]  # K/V alone: base's K and V
    one = [layer_spectra(f, ALL, config=SpectraConfig(**BIG)) for f in layers]
    got = layers_spectra(layers, ALL, config=SpectraConfig(**BIG, inflight=inflight, batched=batched))
    assert len(got) == len(layers)
    assert set(got[2]) == {"head.K", "head.V", "stacked.K", "stacked.V"}
    for g, o, ref in zip(got, one, refs, strict=True):
        _assert_identical(g, o, rounding=1e-7 if batched else 0.0)
        assert_close(g, {k: v for k, v in ref.items() if k in g})


def test_pipeline_results_out_of_order_and_after_close():
    # result() of a layer still in an unlaunched batch launches it; results stay valid after close.
    layers = [make_factors(seed=s, groups=2) for s in (14, 15, 16)]
    cfg = SpectraConfig(**BIG, inflight=4, batched=True)  # 3 layers never fill a batch of 4
    with SpectraPipeline({"O", "VO", "QK"}, config=cfg) as pipe:
        pending = [pipe.submit(f) for f in layers]
        last = pending[2].result()
    first = pending[0].result()
    assert_close(last, {k: v for k, v in reference(layers[2]).items() if k in last})
    assert_close(first, {k: v for k, v in reference(layers[0]).items() if k in first})
    _assert_identical(first, layer_spectra(layers[0], {"O", "VO", "QK"}, config=SpectraConfig(**BIG)), 1e-7)
    with SpectraPipeline(ALL) as pipe:
        assert pipe.submit(AttentionFactors(q=None, k=None, v=None, o=layers[0].o)).result().keys() == {
            "head.O",
            "stacked.O",
        }


def _usable(name, op):
    return solver_unavailable(name, torch.device("cpu"), op) is None


@pytest.mark.parametrize(
    "name",
    # JAX compiles every new shape (~1-3 s each here), so its routes are the slow ones.
    [pytest.param(n, marks=pytest.mark.slow) if SOLVERS[n].library == "jax" else n for n in SOLVERS],
)
@pytest.mark.parametrize("big,tol", [("gram64", TOL), ("svd64", TOL), ("svd32", 2e-5)])
def test_every_solver_matches_numpy(name, big, tol):
    # Each solver for the big problems, where its library is installed and runs on this device;
    # the others are skipped (on CPU: the CUDA-only ones; without JAX: JAX's).
    if not _usable(name, "eig" if big == "gram64" else "svd"):
        pytest.skip(solver_unavailable(name, torch.device("cpu"), "eig" if big == "gram64" else "svd"))
    f = make_factors(seed=17, groups=3)
    cfg = SpectraConfig(big=big, solver=name, **BIG)
    assert_close(layer_spectra(f, ALL, config=cfg), reference(f), tol)
    assert_close(layers_spectra([f, f], ALL, config=replace(cfg, inflight=2, batched=True))[1], reference(f), tol)


def test_solve_one_matrix_by_every_route():
    rng = np.random.default_rng(18)
    for shape in ((30, 12), (12, 30)):
        a = _low_rank(rng, shape, 5)  # exact zeros beyond rank 5
        want = _sv(a)
        for route, tol in (("gram64", TOL), ("svd64", TOL), ("svd32", 2e-5)):
            got = solve(torch.tensor(a, dtype=torch.float32), route, chunk_bytes=100).numpy()
            assert got.shape == want.shape
            assert np.max(np.abs(got - want)) <= tol * want[0], (shape, route)


def test_unusable_solvers_and_settings_are_refused():
    f = make_factors(seed=19)
    with pytest.raises(ValueError, match="unknown solver"):
        layer_spectra(f, {"O"}, config=SpectraConfig(solver="magma"))
    with pytest.raises(ValueError, match="CUDA"):
        layer_spectra(f, {"O"}, config=SpectraConfig(solver="cupy"))  # CPU tensors here
    with pytest.raises(ValueError, match="no eigensolver"):
        layer_spectra(f, {"O"}, config=SpectraConfig(solver="torch-gesvdj", big="gram64"))
    with pytest.raises(ValueError, match="inflight"):
        layers_spectra([f], {"O"}, config=SpectraConfig(inflight=-1))


def test_mismatched_factors_are_refused():
    # An adapter bug (o and v disagree on d_v) must not produce spectra of the wrong product.
    f = make_factors(seed=20)
    bad = AttentionFactors(q=f.q, k=f.k, v=f.v[:, :4], o=f.o)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        layer_spectra(bad, {"VO"})
