"""Spectra of every kind against float64 numpy SVD of the explicitly materialized matrices.

The factors are small and random, with planted ranks (each head's blocks have a known rank
below their size, and the heads share subspaces so that the stacked matrices are rank deficient
too): every σ beyond the planted rank must come out ~0, which a float32 Gram route would get
wrong by ~3e-4·σ₁. The reference materializes VO_h, QK_h and every stacked matrix in float64 and
calls np.linalg.svd; it shares no code with svd_probe.spectra.compute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svd_probe.adapters.base import AttentionFactors
from svd_probe.spectra.compute import SpectraConfig, layer_spectra, requested_keys

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


def test_chunked_grams_match():
    # Tiny chunks: every Gram (per-head factors, stacked O/VO accumulation, solve) is summed over
    # many pieces; the result must not change.
    f = make_factors(seed=10, groups=3)
    cfg = SpectraConfig(chunk_bytes=2000, big_side=10)
    assert_close(layer_spectra(f, ALL, config=cfg), reference(f))
