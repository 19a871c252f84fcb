"""WeightWatcher's heavy-tailed layer metrics, from a stored spectrum (docs/reference.md §4).

WeightWatcher (Martin & Mahoney; the `weightwatcher` package, version 0.7.7 read for this
module) describes a layer weight W (N × M, N ≥ M) by the eigenvalues λ = σ² of WᵀW, taken as
they are: its `analyze()` does not normalize W (its `normalize` option has been off since
0.6.5), so neither do we. From those λ:

- `alpha`: the exponent of a continuous power law p(λ) ∝ λ^−α fitted to the tail λ ≥ xmin.
  λ ≤ 1e-5 are dropped first (WeightWatcher's CPU `EVALS_THRESH`; an absolute threshold, so it
  is scale dependent as there). Every sorted λ but the largest is a candidate xmin; for the
  candidate at sorted index i, with n = N − i tail values, α = 1 + n / Σ_{j≥i} log(λ_j / λ_i)
  (the maximum-likelihood estimate) and the Kolmogorov–Smirnov distance
  D = max_{j≥i} |1 − (λ_j / λ_i)^(1−α) − (j − i)/n|; xmin is the candidate of least D (the
  first on ties), and α the α there. This is WeightWatcher's default fit (its own `WWFit`,
  `pl_package="ww"`); the `powerlaw` package's `Fit`, used by older versions and by
  `pl_package="powerlaw"`, has the same estimator but other candidates (unique values) and
  another empirical CDF. With fewer than 20 values WeightWatcher switches to a bias-corrected
  α = 1 + (n − 1)/Σ log(λ_j/λ_i) and skips tails shorter than 8; we do the same.
- `log_spectral_norm` = log10 λ_max, `alpha_weighted` = α · log10 λ_max.
- `mp_softrank` = λ₊ / λ_max, where λ₊ = (σ_mp·(1 + 1/√Q))² is the bulk edge of the
  Marchenko–Pastur law *fitted* to the ESD, Q = N/M. As WeightWatcher does it: rescale λ so
  that their mean is 1 (all M of them, zeros included), estimate the density with a linear
  (triangular) kernel of bandwidth 0.1 on 1000 points, and fit σ_mp by least squares between
  that density and the MP density: a brute-force search over σ in [0.05, 2)·s₀ by steps of
  0.01·s₀, s₀ = sqrt(λ_max)/(1 + 1/√Q), polished by Nelder–Mead (`scipy.optimize.brute`, as
  WeightWatcher calls it). Square layers (Q = 1) fit the quarter-circle law to σ instead.
  This is a different quantity from `metrics.mp_edge`, the edge of a Gaussian matrix with the
  same Frobenius norm: the fit follows the bulk and ignores the outliers' energy.

Where WeightWatcher reports a failed fit (−1) we return NaN. WeightWatcher also skips layers
with fewer than 8 or more than 15000 eigenvalues by default; we fit any size.

Speed: WeightWatcher's fit is a Python loop over every candidate with an O(n) KS distance each,
O(N²) in all. Here α comes from suffix sums for all candidates at once, and the KS distances
are bounded from below first on a sparse grid of j (the distance at a subset of points cannot
exceed the maximum over all of them): only candidates whose bound does not exceed the best
distance found are computed in full, so the answer is the same argmin. Measured on 2 CPU cores
for N = 7168 (a DeepSeek-V3 hidden size): see `fit_powerlaw`; `mp_softrank` adds ~15 ms.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize

# Eigenvalues at or below this are dropped before the power-law fit (WeightWatcher on CPU).
EVALS_THRESH = 1e-5
# Below this many eigenvalues WeightWatcher uses its small-N estimator.
SMALL_N_CUTOFF = 20
SMALL_N_MIN_TAIL = 8
# Bound of the float64 scratch of one block of KS distances (elements).
_BLOCK = 1 << 20


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit of a tail: exponent, lower cutoff, KS distance, number of tail values."""

    alpha: float
    xmin: float
    D: float
    n_tail: int


_NO_FIT = PowerLawFit(math.nan, math.nan, math.nan, 0)


def _ks_rows(x: np.ndarray, cand: np.ndarray, alpha: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """KS distance of each candidate xmin = x[cand] at its α, over j in `cols` (default: all).

    Bit for bit WeightWatcher's expression, 1 − (x_j/x_i)^(1−α) − (j−i)/n, so the distances
    (hence the argmin) agree with it, not merely to a tolerance.
    """
    big_n = x.size
    cols = np.arange(big_n) if cols is None else cols
    out = np.empty(cand.size)
    if cand.size == 0:
        return out
    order = np.argsort(cand, kind="stable")
    per = max(1, _BLOCK // max(cols.size, 1))
    for start in range(0, cand.size, per):
        idx = order[start : start + per]
        ci = cand[idx]
        use = cols[cols >= ci.min()]
        jj = use[None, :] - ci[:, None]
        n = (big_n - ci).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ratio = x[use][None, :] / x[ci][:, None]
            dev = np.abs(1 - ratio ** (-alpha[idx] + 1)[:, None] - jj / n[:, None])
        out[idx] = np.where(jj >= 0, dev, 0.0).max(axis=1)
    return out


def fit_powerlaw(evals) -> PowerLawFit:
    """WeightWatcher's power-law fit of eigenvalues, xmin chosen by the KS distance.

    Args:
        evals: eigenvalues λ = σ² of WᵀW, any order; values ≤ 1e-5 are dropped.

    Returns:
        PowerLawFit(alpha, xmin, D, n_tail); all NaN (n_tail 0) when fewer than two values remain
        or the fit degenerates (every tail constant). Non-finite values are dropped.

    Measured (2 shared CPU cores, N = 7168; MP bulk + Pareto tail, MP bulk alone, Pareto,
    lognormal): 44–86 ms, against 570–690 ms for WeightWatcher's loop on the same values and
    650 ms for computing every KS distance vectorized.

    Example:
        >>> lam = (1 - np.arange(200) / 200) ** -2.0     # quantiles of a Pareto, p(λ) ∝ λ^-1.5
        >>> round(fit_powerlaw(lam).alpha, 2)
        1.51
    """
    x = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    x = x[(x > EVALS_THRESH) & np.isfinite(x)]
    big_n = x.size
    if big_n < 2:
        return _NO_FIT
    logx = np.log(x)
    cand = np.arange(big_n - 1)
    n = (big_n - cand).astype(np.float64)
    # Σ_{j≥i} log x_j − n·log x_i for every candidate i at once.
    s = np.cumsum(logx[::-1])[::-1][:-1] - n * logx[:-1]
    small = big_n < SMALL_N_CUTOFF
    with np.errstate(divide="ignore", invalid="ignore"):
        if small:
            ok = (big_n - cand >= SMALL_N_MIN_TAIL) & (s > 1e-12)
            alpha = np.where(ok, 1.0 + (n - 1.0) / np.where(ok, s, 1.0), 0.0)
        else:
            alpha = 1.0 + n / s
    valid = alpha > 1  # False for NaN as well
    dist = np.ones(big_n - 1)
    if small and not valid.any():
        # WeightWatcher's small-N fallback: the whole sample is the tail.
        if not s[0] > 1e-12:
            return _NO_FIT
        alpha[0] = 1.0 + (big_n - 1.0) / s[0]
        valid[0] = True
    live = np.flatnonzero(valid)
    if big_n <= 256:
        dist[live] = _ks_rows(x, live, alpha[live])
    else:
        # Lower bounds from a sparse grid of j, then full distances only where the bound does not
        # already exceed the best full distance found (first the 64 most promising candidates).
        grid = np.unique(np.r_[np.arange(0, big_n, max(1, big_n // 256)), big_n - 1])
        bound = _ks_rows(x, live, alpha[live], grid)
        rank = live[np.argsort(bound, kind="stable")]
        first = rank[:64]
        dist[first] = _ks_rows(x, first, alpha[first])
        best = dist[first].min()
        rest = live[(bound <= best)]
        rest = rest[~np.isin(rest, first)]
        dist[rest] = _ks_rows(x, rest, alpha[rest])
        # Candidates never computed keep a bound above `best`; mark them so argmin skips them.
        done = np.zeros(big_n - 1, dtype=bool)
        done[first] = done[rest] = True
        dist[valid & ~done] = np.inf
    i = int(np.argmin(dist))
    if not alpha[i] > 1 or not np.isfinite(dist[i]):
        return _NO_FIT
    return PowerLawFit(float(alpha[i]), float(x[i]), float(dist[i]), int(big_n - i))


def _linear_kde(points: np.ndarray, at: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density of a triangular-kernel KDE: (1/(n·h)) Σ max(0, 1 − |x − p|/h).

    sklearn's `KernelDensity(kernel="linear")`, which WeightWatcher calls, computes the same
    sum (its 1-D normalization of the linear kernel is 1/h); written with prefix sums here so
    that it costs O((n + points) log n) and sklearn is not a dependency.
    """
    p = np.sort(points)
    csum = np.r_[0.0, np.cumsum(p)]
    lo = np.searchsorted(p, at - bandwidth, side="right")
    mid = np.searchsorted(p, at, side="right")
    hi = np.searchsorted(p, at + bandwidth, side="left")
    left_n, right_n = mid - lo, hi - mid
    # Σ |x − p| over the window, split at x: x·#left − Σ left + Σ right − x·#right.
    abs_sum = at * left_n - (csum[mid] - csum[lo]) + (csum[hi] - csum[mid]) - at * right_n
    dens = ((hi - lo) - abs_sum / bandwidth) / (p.size * bandwidth)
    return np.maximum(dens, 0.0)


def mp_softrank(evals, shape: tuple[int, int]) -> float:
    """WeightWatcher's MP soft rank λ₊/λ_max, with λ₊ the edge of the MP law fitted to the ESD.

    Args:
        evals: all eigenvalues of WᵀW (the min(m, n) of them, zeros included: they enter the
            rescaling to mean 1, as in WeightWatcher).
        shape: (m, n) of W; Q = max/min.

    Returns:
        λ₊/λ_max, or NaN where WeightWatcher's fit fails (a zero matrix, no density above 0.01).

    Example:
        >>> w = np.random.default_rng(0).standard_normal((400, 100))
        >>> 0.8 < mp_softrank(np.linalg.svd(w, compute_uv=False) ** 2, w.shape) < 1.2
        True
    """
    # Ascending, as WeightWatcher holds them, so that the sums round the same way.
    lam = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    m, n = shape
    if lam.size == 0 or min(m, n) == 0 or not np.isfinite(lam).all():
        return math.nan
    q = max(m, n) / min(m, n)
    total = lam.sum()
    if not total > 0:
        return math.nan
    wscale = math.sqrt(lam.size) / math.sqrt(total)
    scaled = (wscale * wscale) * lam
    lambda_max = float(scaled.max())
    to_fit = np.sqrt(scaled) if q == 1 else scaled
    xde = np.linspace(0, to_fit.max() + 0.5, 1000)
    yde = _linear_kde(to_fit, xde, 0.1)
    n_bad = int((yde < 0.01).sum())
    good = yde > 0.01
    xde, yde = xde[good], yde[good]
    if xde.size == 0:
        return math.nan
    peak = xde[np.argmax(yde)]
    x_top = xde.max()
    pad = np.zeros(n_bad)

    def residual(p) -> float:
        sigma = np.asarray(p, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            if q == 1:
                ymp = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - xde**2))
                r = ymp - yde
            else:
                b = np.power(sigma * (1 + np.sqrt(1 / q)), 2)
                a = np.power(sigma * (1 - np.sqrt(1 / q)), 2)
                if np.any((b < peak) | (b > x_top) | (a > peak)):
                    r = np.zeros(xde.size) + 1000
                else:
                    ymp = np.nan_to_num(
                        (1 / (2 * np.pi * sigma * sigma * xde * (1 / q))) * np.sqrt((b - xde) * (xde - a))
                    )
                    r = ymp - yde
        return float(np.sum(np.concatenate((r, pad)) ** 2))

    s0 = float(np.sqrt(lambda_max / np.square(1 + 1 / np.sqrt(q))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        found = optimize.brute(residual, (slice(0.05 * s0, 2.0 * s0, 0.01 * s0),), full_output=True)
    sigma_mp = float(np.ravel(found[0])[0])
    bulk_max = (sigma_mp * (1 + 1 / math.sqrt(q))) ** 2
    return bulk_max / lambda_max


def layer_metrics(sigma, shape: tuple[int, int]) -> dict[str, float]:
    """`alpha`, `alpha_weighted`, `log_spectral_norm`, `mp_softrank` of one weight's σ.

    Args:
        sigma: singular values of W (any order; structural zeros allowed).
        shape: (m, n) of W.

    Returns:
        The four columns, NaN where undefined (a zero matrix, a failed fit).

    Example:
        >>> sorted(layer_metrics([3.0, 2.0, 1.0], (3, 5)))
        ['alpha', 'alpha_weighted', 'log_spectral_norm', 'mp_softrank']
    """
    lam = np.asarray(sigma, dtype=np.float64).ravel() ** 2
    lmax = float(lam.max()) if lam.size else 0.0
    log_norm = math.log10(lmax) if lmax > 0 else math.nan
    alpha = fit_powerlaw(lam).alpha
    return {
        "alpha": alpha,
        "alpha_weighted": alpha * log_norm,
        "log_spectral_norm": log_norm,
        "mp_softrank": mp_softrank(lam, shape) if lmax > 0 else math.nan,
    }


LAYER_METRIC_COLUMNS = ("alpha", "alpha_weighted", "log_spectral_norm", "mp_softrank")
