"""WeightWatcher's layer metrics (svd_probe.spectra.heavy_tail) against its formulas and its package.

Three independent expectations:
- hand-computed values on fixed spectra (the MLE, the small-N estimator, log10 λ_max);
- a plain transcription of WeightWatcher 0.7.7's fit (`WW_powerlaw.WWFit`: a Python loop over
  every candidate xmin), which our vectorized, bounded search must reproduce exactly;
- the `weightwatcher` package itself (a test-only dependency), through its public
  `WeightWatcher(model=...).analyze()` on a small torch model.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest

from svd_probe.spectra import heavy_tail as H
from svd_probe.spectra import metrics as M


def ww_loop_fit(evals):
    """WeightWatcher's WWFit for N ≥ 20, written out as it is published: (alpha, xmin, D)."""
    data = np.sort(np.asarray(evals, dtype=np.float64))
    data = data[data > 1e-5]
    big_n = len(data)
    log_data = np.log(data)
    alphas = np.zeros(big_n - 1)
    ds = np.ones(big_n - 1)
    for i, xmin in enumerate(data[:-1]):
        n = float(big_n - i)
        alpha = 1 + n / (np.sum(log_data[i:]) - n * log_data[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = np.max(np.abs(1 - (data[i:] / xmin) ** (-alpha + 1) - np.arange(n) / n))
    i = int(np.argmin(ds))
    return alphas[i], data[i], ds[i]


# --- hand-computed -----------------------------------------------------------------------------------


def test_small_n_estimator_hand_value():
    # λ = e^0 … e^7 (8 values, under the small-N cutoff of 20): only xmin = 1 leaves a tail of ≥ 8,
    # Σ log(λ/1) = 0 + 1 + … + 7 = 28, bias-corrected α = 1 + (8 − 1)/28 = 1.25.
    fit = H.fit_powerlaw(np.exp(np.arange(8.0)))
    assert fit.alpha == pytest.approx(1.25, rel=1e-12)
    assert fit.xmin == 1.0 and fit.n_tail == 8
    # Fewer than 8 values: WeightWatcher falls back to the whole sample, same estimator:
    # λ = 1, e, e²: α = 1 + 2/(0 + 1 + 2) = 5/3.
    assert H.fit_powerlaw([1.0, math.e, math.e**2]).alpha == pytest.approx(5 / 3, rel=1e-12)


def test_mle_at_the_chosen_xmin_and_the_dropped_zeros():
    rng = np.random.default_rng(4)
    lam = (1 - rng.random(500)) ** (-1 / 1.5)  # Pareto, density exponent 2.5
    lam_padded = np.r_[lam, np.zeros(40), np.full(5, 1e-6)]  # ≤ 1e-5 is dropped before fitting
    fit = H.fit_powerlaw(lam_padded)
    assert fit == H.fit_powerlaw(lam)
    tail = lam[lam >= fit.xmin]
    assert fit.n_tail == tail.size
    # α is the MLE of the tail above the chosen xmin: 1 + n / Σ log(λ/xmin)
    assert fit.alpha == pytest.approx(1 + tail.size / np.log(tail / fit.xmin).sum(), rel=1e-12)
    # and, the sample being a Pareto(2.5), close to 2.5 (sampling error ~ (α−1)/√n ≈ 0.1)
    assert 2.2 < fit.alpha < 2.8


def test_exact_pareto_quantiles_recover_the_exponent():
    # λ_i = (1 − i/N)^(−1/(α−1)) are the exact quantiles of a Pareto with density exponent α.
    for alpha in (2.0, 3.0, 4.5):
        q = np.arange(2000) / 2000
        assert H.fit_powerlaw((1 - q) ** (-1 / (alpha - 1))).alpha == pytest.approx(alpha, rel=0.02)


def test_norm_metrics_hand_values():
    # σ₁ = 10: λ_max = 100, log10 = 2; alpha_weighted = 2·α.
    sigma = np.r_[10.0, np.linspace(3, 0.5, 60)]
    row = H.layer_metrics(sigma, (61, 200))
    assert row["log_spectral_norm"] == pytest.approx(2.0, rel=1e-12)
    assert row["alpha_weighted"] == pytest.approx(2.0 * row["alpha"], rel=1e-12)
    assert row["alpha"] == H.fit_powerlaw(sigma**2).alpha
    nan_row = H.layer_metrics(np.zeros(5), (5, 5))
    assert all(math.isnan(v) for v in nan_row.values())
    assert math.isnan(H.fit_powerlaw([3.0]).alpha)
    # A corrupt cache entry (NaN, inf) gives NaN soft rank and a fit of the finite values, no error.
    bad = np.r_[sigma, np.nan, np.inf] ** 2
    assert math.isnan(H.mp_softrank(bad, (63, 200)))
    assert H.fit_powerlaw(bad) == H.fit_powerlaw(sigma**2)


@pytest.mark.slow
def test_mp_softrank_of_a_gaussian_is_about_one_and_spikes_lower_it():
    # The fitted bulk edge of a Gaussian matrix is its largest eigenvalue: soft rank ≈ 1.
    rng = np.random.default_rng(5)
    g = rng.standard_normal((600, 200))
    lam = np.linalg.svd(g, compute_uv=False) ** 2
    assert H.mp_softrank(lam, g.shape) == pytest.approx(1.0, abs=0.1)
    # A planted spike far above the bulk: λ_max grows, the fitted bulk does not: soft rank ≪ 1.
    u, v = rng.standard_normal(600), rng.standard_normal(200)
    w = g + 5 * np.outer(u, v) / math.sqrt(200)
    lam_w = np.linalg.svd(w, compute_uv=False) ** 2
    assert H.mp_softrank(lam_w, w.shape) < 0.5
    assert math.isnan(H.mp_softrank(np.zeros(10), (10, 20)))


@pytest.mark.slow
def test_linear_kde_equals_sklearn():
    neighbors = pytest.importorskip("sklearn.neighbors", reason="scikit-learn (pulled by weightwatcher) missing")
    pts = np.random.default_rng(6).gamma(2.0, 0.5, 700)
    at = np.linspace(0, pts.max() + 0.5, 1000)
    ref = np.exp(neighbors.KernelDensity(kernel="linear", bandwidth=0.1).fit(pts[:, None]).score_samples(at[:, None]))
    assert np.allclose(H._linear_kde(pts, at, 0.1), ref, rtol=1e-9, atol=1e-12)


# --- the published loop --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,n",
    [("student-t", 300), ("student-t", 2000), ("lognormal", 1500), ("mp-bulk", 1200), ("pareto", 3000)],
)
def test_fit_equals_weightwatchers_loop(name, n):
    # Beyond 256 values the KS search is bounded (sparse lower bounds first); the xmin, α and D must
    # still be the loop's, to rounding (our suffix sums round differently from np.sum).
    rng = np.random.default_rng(n)
    lam = {
        "student-t": lambda: rng.standard_t(3, n) ** 2,
        "lognormal": lambda: rng.lognormal(0, 1.5, n),
        "mp-bulk": lambda: np.linalg.svd(rng.standard_normal((2 * n, n)), compute_uv=False) ** 2,
        "pareto": lambda: (1 - rng.random(n)) ** -1.0,
    }[name]()
    alpha, xmin, d = ww_loop_fit(lam)
    fit = H.fit_powerlaw(lam)
    assert fit.xmin == xmin
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.D == pytest.approx(d, rel=1e-10)


# --- the weightwatcher package --------------------------------------------------------------------------


@pytest.mark.slow
def test_layer_metrics_equal_the_weightwatcher_package():
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ww = pytest.importorskip("weightwatcher", reason="weightwatcher (the `test` extra) is not installed")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    rng = np.random.default_rng(3)
    mats = [
        rng.standard_t(3, (300, 120)),  # heavy-tailed
        rng.standard_normal((256, 64)),  # Gaussian
        rng.standard_t(2.5, (200, 200)),  # square: the quarter-circle fit
        rng.standard_normal((90, 180)),  # wide
    ]
    layers = []
    for w in mats:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
        layers.append(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=torch.nn.Sequential(*layers)).analyze(mp_fit=True)
    assert len(details) == len(mats)
    for w, (_, row) in zip(mats, details.iterrows(), strict=True):
        # the weights as torch holds them (float32), σ in float64
        sigma = np.linalg.svd(w.astype(np.float32).astype(np.float64), compute_uv=False)
        ours = M.metrics_batch(sigma[None], w.shape, scope="layer")
        for col in ("alpha", "alpha_weighted", "log_spectral_norm", "mp_softrank"):
            assert ours[col][0] == pytest.approx(float(row[col]), rel=1e-6), (w.shape, col)
