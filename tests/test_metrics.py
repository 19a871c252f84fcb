"""Every metric of svd_probe.spectra.metrics against values worked out by hand (docs/reference.md §4).

The running example is σ = [3, 2, 1]:
    σ² = [9, 4, 1], E = Σσ² = 14, cumulative σ² = [9, 13, 14], Σσ⁴ = 81 + 16 + 1 = 98, Σσ = 6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from svd_probe.spectra import metrics as M

S = [3.0, 2.0, 1.0]


# --- energy rank ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error,expected",
    [
        (0.5, 1),  # target 0.5·14 = 7:      9 ≥ 7 at r = 1
        (0.2, 2),  # target 0.8·14 = 11.2:   9 < 11.2, 13 ≥ 11.2 at r = 2
        (0.1, 2),  # target 0.9·14 = 12.6:   13 ≥ 12.6
        (0.05, 3),  # target 0.95·14 = 13.3: 13 < 13.3, so r = 3
        (0.01, 3),  # target 13.86
        (0.0, 3),  # all the energy
    ],
)
def test_energy_rank_hand_values(error, expected):
    assert M.energy_rank(S, error) == expected


def test_energy_rank_exact_boundary_and_zeros():
    # σ = [1, 1, 1, 1]: cumulative [1, 2, 3, 4] of E = 4. error 0.5 → target 2 → reached exactly at r = 2
    # (rounding must not push it to 3); error 0.25 → target 3 → r = 3.
    assert M.energy_rank([1, 1, 1, 1], 0.5) == 2
    assert M.energy_rank([1, 1, 1, 1], 0.25) == 3
    # Trailing zeros of a rank-3 matrix never count: error 0 → 3, not 5.
    assert M.energy_rank([3, 2, 1, 0, 0], 0.0) == 3
    # Unsorted input is sorted first: [1, 3, 2] is the same spectrum as [3, 2, 1].
    assert M.energy_rank([1, 3, 2], 0.1) == 2
    assert M.energy_rank([0, 0, 0], 0.01) == 0
    assert M.energy_rank([], 0.01) == 0


def test_energy_rank_zero_error_on_long_spectra_is_the_length():
    # A full-rank spectrum needs every σ at error 0: exactly len(σ), never len + 1 (a sum computed
    # pairwise vs cumulatively differs by ulps on 7168 values; the rank must not overshoot).
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.random(7168) * rng.random(7168) ** 3 + 1e-3
        assert M.energy_rank(s, 0.0) == 7168


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_energy_rank_refuses_bad_error(bad):
    with pytest.raises(ValueError):
        M.energy_rank(S, bad)


# --- entropy, stable rank, participation ratio -----------------------------------------------------


def test_entropy_rank_hand_values():
    # p = σ/Σσ = [1/2, 1/3, 1/6];
    # H = ½·ln2 + ⅓·ln3 + ⅙·ln6 = 0.3465736 + 0.3662041 + 0.2986266 = 1.0114043; exp(H) = 2.7495
    assert M.entropy_rank(S) == pytest.approx(2.749459, rel=1e-6)
    # Uniform spectra have entropy rank exactly their length: p_i = 1/4, H = ln 4.
    assert M.entropy_rank([2, 2, 2, 2]) == pytest.approx(4.0, rel=1e-12)
    # One nonzero σ: p = [1, 0, 0], H = 0 (0·log 0 taken as 0), exp(0) = 1.
    assert M.entropy_rank([5, 0, 0]) == pytest.approx(1.0, rel=1e-12)
    assert M.entropy_rank([0, 0]) == 0.0


def test_stable_rank_hand_values():
    # E / σ₁² = 14 / 9
    assert M.stable_rank(S) == pytest.approx(14 / 9, rel=1e-12)
    # [1, 1, 1, 1] → 4 / 1 = 4; a rank-1 spectrum → 1
    assert M.stable_rank([1, 1, 1, 1]) == pytest.approx(4.0)
    assert M.stable_rank([7, 0, 0]) == pytest.approx(1.0)
    assert M.stable_rank([0, 0]) == 0.0


def test_participation_ratio_hand_values():
    # E² / Σσ⁴ = 14² / 98 = 196 / 98 = 2
    assert M.participation_ratio(S) == pytest.approx(2.0, rel=1e-12)
    # σ = [2, 1]: σ² = [4, 1], E = 5, Σσ⁴ = 17 → 25/17
    assert M.participation_ratio([2, 1]) == pytest.approx(25 / 17, rel=1e-12)
    assert M.participation_ratio([0, 0]) == 0.0


# --- numerical rank and Gavish–Donoho ---------------------------------------------------------------


@pytest.mark.parametrize(
    "eps,expected",
    [
        (0.1, 3),  # tol = max(3, 3)·0.1·3 = 0.9: all of 3, 2, 1 exceed it
        (0.2, 2),  # tol = 3·0.2·3 = 1.8: 3 and 2
        (0.25, 1),  # tol = 3·0.25·3 = 2.25: only 3
        (0.32, 1),  # tol = 2.88
        (0.34, 0),  # tol = 3.06: even σ₁ is below
    ],
)
def test_numerical_rank_hand_values(eps, expected):
    assert M.numerical_rank(S, (3, 3), eps) == expected


def test_numerical_rank_uses_the_larger_dimension_and_storage_eps():
    # shape (3, 10): tol = 10·0.05·3 = 1.5 → σ > 1.5: 3 and 2
    assert M.numerical_rank(S, (3, 10), 0.05) == 2
    assert M.numerical_rank(S, (10, 3), 0.05) == 2
    # BF16 eps = 2⁻⁷ = 0.0078125: shape (100, 100) → tol = 100·0.0078125·3 = 2.34375 → only 3
    assert M.numerical_rank(S, (100, 100), M.STORAGE_EPS["BF16"]) == 1
    assert M.numerical_rank([0, 0], (2, 2), 0.1) == 0


def test_gavish_donoho_omega_hand_values():
    # β = 1: 0.56 − 0.95 + 1.82 + 1.43 = 2.86
    assert M.gavish_donoho_omega(1.0) == pytest.approx(2.86, abs=1e-12)
    # β = 0.5: 0.56·0.125 − 0.95·0.25 + 1.82·0.5 + 1.43 = 0.07 − 0.2375 + 0.91 + 1.43 = 2.1725
    assert M.gavish_donoho_omega(0.5) == pytest.approx(2.1725, abs=1e-12)


def test_gavish_donoho_rank_hand_values():
    s = [10, 2.5, 1, 1, 1]  # median 1
    # square (5, 5): β = 1, τ = 2.86·1 = 2.86 → only 10 exceeds it
    assert M.gavish_donoho_rank(s, (5, 5)) == 1
    # (5, 10) and (10, 5): β = 0.5, τ = 2.1725 → 10 and 2.5
    assert M.gavish_donoho_rank(s, (5, 10)) == 2
    assert M.gavish_donoho_rank(s, (10, 5)) == 2
    # σ = [3, 2, 1], shape (3, 6): τ = 2.1725·median 2 = 4.345 → none
    assert M.gavish_donoho_rank(S, (3, 6)) == 0
    assert M.gavish_donoho_rank([], (3, 3)) == 0


# --- error at a fixed rank -------------------------------------------------------------------------


def test_relative_error_at_rank_hand_values():
    # r = 1: sqrt((4 + 1) / 14) = sqrt(5/14) = 0.5976143
    assert M.relative_error_at_rank(S, 1) == pytest.approx(math.sqrt(5 / 14), rel=1e-12)
    assert M.relative_error_at_rank(S, 1) == pytest.approx(0.5976143, rel=1e-6)
    # r = 2: sqrt(1/14); r = 0: the whole matrix, 1; r ≥ 3: exact, 0
    assert M.relative_error_at_rank(S, 2) == pytest.approx(math.sqrt(1 / 14), rel=1e-12)
    assert M.relative_error_at_rank(S, 0) == pytest.approx(1.0)
    assert M.relative_error_at_rank(S, 3) == 0.0
    assert M.relative_error_at_rank(S, 10) == 0.0
    assert M.relative_error_at_rank([0, 0], 1) == 0.0
    with pytest.raises(ValueError):
        M.relative_error_at_rank(S, -1)


def test_energy_kept_at_rank_hand_values():
    # r = 1: 9/14; r = 2: 13/14
    assert M.energy_kept_at_rank(S, 1) == pytest.approx(9 / 14, rel=1e-12)
    assert M.energy_kept_at_rank(S, 2) == pytest.approx(13 / 14, rel=1e-12)


def test_error_column_names():
    assert M.error_column(0.01) == "rank_1pct"
    assert M.error_column(0.001) == "rank_0.1pct"
    assert M.error_column(0.05) == "rank_5pct"


def test_spectrum_metrics_row():
    row = M.spectrum_metrics(np.array(S), (3, 6), storage_dtype="F32", at_rank=1)
    assert row["full_rank"] == 3
    assert row["sigma_max"] == 3.0
    assert row["rank_1pct"] == 3  # target 13.86 > 13
    assert row["rank_0.1pct"] == 3
    assert row["entropy_rank"] == pytest.approx(2.749459, rel=1e-6)
    assert row["stable_rank"] == pytest.approx(14 / 9)
    assert row["participation_ratio"] == pytest.approx(2.0)
    assert row["numerical_rank"] == 3  # tol = 6·2⁻²³·3 ≈ 2e-6
    assert row["gavish_donoho_rank"] == 0  # τ = 4.345, as above
    assert row["rel_error_at_1"] == pytest.approx(math.sqrt(5 / 14))
    # The table's numerical rank is float32's, whatever the storage: still 3 under F8.
    assert M.spectrum_metrics(S, (3, 6), storage_dtype="F8_E4M3")["numerical_rank"] == 3
    # the 10% energy rank, asked for by name: target 12.6 → r = 2
    assert M.spectrum_metrics(S, (3, 6), errors=(0.1,))["rank_10pct"] == 2


def test_storage_rank_hand_values():
    # σ = [3, 2, 1, 0.1, 0.01], A is 5×20: ‖A‖_F² = 14.0101, rms = sqrt(14.0101/100) = 0.374301,
    # √5 + √20 = 6.708204. Floor = eps/(2√3) · rms · 6.708204:
    #   F8_E4M3 (eps 0.125):  0.0360844 · 0.374301 · 6.708204 = 0.090604 → 3, 2, 1, 0.1 pass: 4
    #   BF16 (eps 2⁻⁷):       0.0022553 · 0.374301 · 6.708204 = 0.0056628 → all five pass: 5
    s = [3, 2, 1, 0.1, 0.01]
    assert M.storage_noise_floor(s, (5, 20), 0.125) == pytest.approx(0.090604, rel=1e-4)
    assert M.storage_rank(s, (5, 20), M.STORAGE_EPS["F8_E4M3"]) == 4
    assert M.storage_rank(s, (5, 20), M.STORAGE_EPS["BF16"]) == 5
    assert M.spectrum_metrics(s, (5, 20), storage_dtype="F8_E4M3")["storage_rank"] == 4
    assert M.storage_rank([0, 0], (2, 2), 0.1) == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F8_E4M3"])
def test_batch_metrics_equal_the_one_spectrum_functions(dtype):
    """The cache's tables use the vectorized `metrics_batch`; each of its columns must equal the
    scalar definitions above on every row, zero rows and rank-deficient rows included."""
    rng = np.random.default_rng(7)
    sig = np.abs(rng.standard_normal((40, 24))) ** 3
    sig[3] = 0.0
    sig[5, 6:] = 0.0
    cols = M.metrics_batch(sig, (30, 24), storage_dtype=dtype, errors=(0.01, 0.001, 0.2), at_rank=5)
    for i, row in enumerate(sig):
        one = M.spectrum_metrics(row, (30, 24), storage_dtype=dtype, errors=(0.01, 0.001, 0.2), at_rank=5)
        assert set(one) == set(cols)
        for k, v in one.items():
            assert cols[k][i] == pytest.approx(v, rel=1e-12, abs=1e-12, nan_ok=True), (i, k)


# --- scale and the Marchenko–Pastur baseline -------------------------------------------------------


def test_frobenius_and_mp_edge_hand_values():
    # σ = [3, 2, 1]: ‖W‖_F = √14. Shape (3, 6): s² = 14/18, edge = sqrt(14/18)·(√3 + √6)
    #   = 0.8819171 · 4.1815405 = 3.6877721 > 3, so no spikes.
    assert M.frobenius_norm(S) == pytest.approx(math.sqrt(14), rel=1e-12)
    assert M.mp_edge(S, (3, 6)) == pytest.approx(3.6877721, rel=1e-7)
    assert M.mp_spikes(S, (3, 6)) == 0
    # σ = [10, 1, 1, 1], E = 103. Square (4, 4): s = sqrt(103/16) = 2.5372229, edge = 4s = 10.149 > 10: 0.
    # Shape (4, 100): s = sqrt(103/400) = 0.5074446, edge = s·(2 + 10) = 6.0893 → one spike (10).
    s = [10, 1, 1, 1]
    assert M.mp_edge(s, (4, 4)) == pytest.approx(4 * math.sqrt(103 / 16), rel=1e-12)
    assert M.mp_spikes(s, (4, 4)) == 0
    assert M.mp_edge(s, (4, 100)) == pytest.approx(12 * math.sqrt(103 / 400), rel=1e-12)
    assert M.mp_spikes(s, (4, 100)) == 1
    # Structural zeros (the padding of a reduced problem) change neither the norm nor the edge:
    # the edge depends on the recorded shape only.
    assert M.mp_edge([3, 2, 1, 0, 0], (5, 40)) == M.mp_edge(S, (5, 40))
    assert M.mp_edge([0, 0], (2, 2)) == 0.0 and M.mp_spikes([0, 0], (2, 2)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(300, 200), (500, 100), (256, 256), (64, 1000)])
def test_gaussian_matrices_have_about_zero_spikes(shape):
    # A Gaussian matrix's σ₁ sits at the MP edge to within Tracy–Widom fluctuations, mostly below
    # (σ₁/edge ∈ [0.97, 1.011] over these 40 matrices): at most one spike, and rarely that.
    spikes = []
    for seed in range(10):
        w = np.random.default_rng(seed).standard_normal(shape)
        s = np.linalg.svd(w, compute_uv=False)
        assert 0.95 < s[0] / M.mp_edge(s, shape) < 1.05
        spikes.append(M.mp_spikes(s, shape))
    assert max(spikes) <= 1 and sum(spikes) <= 2, spikes


@pytest.mark.parametrize("r", [1, 5, 12])
def test_planted_rank_signal_above_the_edge_gives_r_spikes(r):
    # W = G + U·diag(θ)·Vᵀ, G 400×200 standard normal (bulk edge √400 + √200 = 34.1), θ ∈ [60, 120]
    # (BBP outliers at ~θ + 600/θ). The signal raises ‖W‖_F and so the edge (to 42 for r = 5, 53 for
    # r = 12), still below every outlier and above the bulk: exactly r spikes.
    rng = np.random.default_rng(r)
    m, n = 400, 200
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    w = rng.standard_normal((m, n)) + u @ np.diag(np.linspace(60, 120, r)) @ v.T
    s = np.linalg.svd(w, compute_uv=False)
    assert M.mp_spikes(s, (m, n)) == r
    cols = M.metrics_batch(s[None], (m, n), scope="head")
    assert cols["mp_spikes"][0] == r
    assert cols["frobenius"][0] == pytest.approx(np.linalg.norm(w), rel=1e-10)
    assert cols["sigma_max"][0] == pytest.approx(np.linalg.norm(w, 2), rel=1e-10)


def test_per_head_batches_skip_the_layer_metrics():
    # Layer metrics are NaN for head and stacked scopes and computed for layers (and scope=None).
    rng = np.random.default_rng(0)
    sig = np.abs(rng.standard_normal((3, 40))) + 0.1
    for scope in ("head", "stacked"):
        cols = M.metrics_batch(sig, (40, 90), scope=scope)
        assert all(np.isnan(cols[c]).all() for c in ("alpha", "alpha_weighted", "log_spectral_norm", "mp_softrank"))
    for scope in ("layer", None):
        cols = M.metrics_batch(sig, (40, 90), scope=scope)
        assert cols["log_spectral_norm"] == pytest.approx(np.log10(sig.max(axis=1) ** 2), rel=1e-12)
        assert np.isfinite(cols["alpha"]).all() and (cols["alpha"] > 1).all()
        assert np.isfinite(cols["mp_softrank"]).all()
