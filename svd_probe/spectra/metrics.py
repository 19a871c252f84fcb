"""Effective-rank metrics of a stored spectrum (docs/reference.md §4).

Each metric is a pure function of σ (sorted descending) and, where the definition needs it,
the matrix shape (m, n) and the storage dtype's machine epsilon. They run on numpy float64 so
that the cache, the exporter and the plots agree to the last digit.

Every spectrum also gets its scale and a random baseline: `sigma_max` (σ₁), `frobenius`
(‖W‖_F), `mp_edge` (where the singular values of a Gaussian matrix of the same shape and norm
end) and `mp_spikes` (σ above that edge). Energy ranks are ratios, blind to a head that is
uniformly small; these are not. WeightWatcher's layer metrics (`alpha`, `alpha_weighted`,
`log_spectral_norm`, `mp_softrank`, in `heavy_tail`) describe whole weight matrices and are
computed for the scopes in `LAYER_METRIC_SCOPES` only (NaN elsewhere).
"""

from __future__ import annotations

import math

import numpy as np

from svd_probe.spectra.heavy_tail import LAYER_METRIC_COLUMNS, layer_metrics

DEFAULT_ERRORS = (0.01, 0.001)

# Scopes whose spectra are those of a weight matrix as stored (docs/reference.md §3, "layer"):
# WeightWatcher's metrics describe such matrices. Per-head blocks hold d_head eigenvalues, too
# few for a tail fit, and stacked spectra are of a construct (each head divided by its own σ₁),
# not of a weight; `metrics_batch(scope=None)` computes them anyway.
LAYER_METRIC_SCOPES = frozenset({"layer"})

# Machine epsilon of the dtypes weights are stored in; the meaningful tolerance for the
# numerical rank of a quantized weight is its storage precision, not float64's.
STORAGE_EPS = {
    "F8_E4M3": 2.0**-3,
    "F8_E5M2": 2.0**-2,
    "BF16": 2.0**-7,
    "F16": 2.0**-10,
    "F32": 2.0**-23,
    "F64": 2.0**-52,
}


def _sorted(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64).ravel()
    return np.sort(np.clip(s, 0.0, None))[::-1]


def energy_rank(sigma, error: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ (1 − error)·Σσ² ("rank at `error`"); 0 for a zero matrix."""
    if not 0.0 <= error < 1.0:
        raise ValueError(f"error must be in [0, 1), got {error}")
    s2 = _sorted(sigma) ** 2
    if s2.size == 0:
        return 0
    cum = np.cumsum(s2)
    # The total is the cumulative sum's own last entry: `s2.sum()` sums pairwise and can exceed
    # it by many ulps on long spectra, which pushed error=0 past the end (rank len + 1).
    total = cum[-1]
    if total == 0.0:
        return 0
    # A relative slack of a few ulps keeps exact cases (e.g. error=0 on a rank-r matrix)
    # from being pushed one index further by rounding in the cumulative sum.
    target = (1.0 - error) * total * (1.0 - 8 * np.finfo(np.float64).eps)
    return int(min(np.searchsorted(cum, target, side="left") + 1, s2.size))


def entropy_rank(sigma) -> float:
    """Roy & Vetterli (2007): exp(H(p)), p_i = σ_i / Σσ."""
    s = _sorted(sigma)
    total = s.sum()
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def stable_rank(sigma) -> float:
    """‖A‖_F² / ‖A‖_2² = Σσ² / σ₁²."""
    s = _sorted(sigma)
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)


def participation_ratio(sigma) -> float:
    """(Σσ²)² / Σσ⁴."""
    s2 = _sorted(sigma) ** 2
    denom = (s2**2).sum()
    return 0.0 if denom == 0.0 else float(s2.sum() ** 2 / denom)


def numerical_rank(sigma, shape: tuple[int, int], eps: float = STORAGE_EPS["F32"]) -> int:
    """#{σ_i > max(m, n)·eps·σ₁} (numpy's `matrix_rank` convention).

    The tables use eps of float32, the precision the spectra are computed from. docs/reference.md §4
    suggests the storage dtype's eps instead, but with FP8 (2⁻³) or BF16 (2⁻⁷) the tolerance
    max(m, n)·eps·σ₁ exceeds σ₁ itself for any real size (16384 · 2⁻⁷ = 128), so every rank would
    be 0; `storage_rank` below measures the storage precision in a way that scales.
    """
    s = _sorted(sigma)
    if s.size == 0 or s[0] == 0.0:
        return 0
    tol = max(shape) * eps * s[0]
    return int((s > tol).sum())


def storage_noise_floor(sigma, shape: tuple[int, int], eps: float) -> float:
    """Expected spectral norm of the rounding noise of storing A at precision eps.

    Rounding to a relative precision eps leaves errors of about uniform size ±eps/2·|a_ij|, i.e.
    standard deviation eps/(2√3)·rms(A); an m×n matrix of such independent errors has spectral
    norm ≈ std·(√m + √n). σ below that cannot be told from rounding. A heuristic for block-scaled
    FP8 (whose error follows the block maximum, not each element) and for fused products of
    two stored matrices; it is exact in neither case, and reported as such.
    """
    s = _sorted(sigma)
    m, n = shape
    if s.size == 0 or m == 0 or n == 0:
        return 0.0
    rms = math.sqrt((s**2).sum() / (m * n))
    return eps / (2 * math.sqrt(3)) * rms * (math.sqrt(m) + math.sqrt(n))


def storage_rank(sigma, shape: tuple[int, int], eps: float) -> int:
    """#{σ_i > storage_noise_floor}: how many directions the stored precision can resolve."""
    s = _sorted(sigma)
    return int((s > storage_noise_floor(s, shape, eps)).sum()) if s.size and s[0] > 0 else 0


def frobenius_norm(sigma) -> float:
    """‖W‖_F = sqrt(Σσ²)."""
    return float(math.sqrt((_sorted(sigma) ** 2).sum()))


def mp_edge(sigma, shape: tuple[int, int]) -> float:
    """Largest singular value of a Gaussian matrix with W's shape and Frobenius norm.

    An m×n matrix of i.i.d. entries of variance s² has its singular values in a Marchenko–Pastur
    bulk whose upper edge is s·(√m + √n) (as m, n → ∞; a finite Gaussian matrix's σ₁ falls within
    O(s·(√m + √n)^(1/3)) of it, mostly below). Matching the norm, s² = ‖W‖_F²/(m·n).

    "Same shape" is the (m, n) recorded with the spectrum: the full matrix's, also where σ came
    from a reduced problem (a fused VO_h is d_model × in_v though rank ≤ d_v; its stored σ are
    padded with exact zeros, which change neither the norm nor the edge). For stacked spectra
    the norm is that of the stack as analysed, each head divided by its own σ₁.
    """
    m, n = shape
    if m == 0 or n == 0:
        return 0.0
    return math.sqrt((_sorted(sigma) ** 2).sum() / (m * n)) * (math.sqrt(m) + math.sqrt(n))


def mp_spikes(sigma, shape: tuple[int, int]) -> int:
    """#{σ_i > mp_edge}: directions that stand out of a random matrix's bulk."""
    return int((_sorted(sigma) > mp_edge(sigma, shape)).sum())


def gavish_donoho_omega(beta: float) -> float:
    """ω(β) of the optimal hard threshold with unknown noise (Gavish & Donoho 2014, eq. 5)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gavish_donoho_rank(sigma, shape: tuple[int, int]) -> int:
    """#{σ_i > ω(β)·median(σ)} with β = min(m, n) / max(m, n)."""
    s = _sorted(sigma)
    if s.size == 0:
        return 0
    m, n = shape
    beta = min(m, n) / max(m, n)
    tau = gavish_donoho_omega(beta) * float(np.median(s))
    return int((s > tau).sum())


def relative_error_at_rank(sigma, r: int) -> float:
    """‖A − A_r‖_F / ‖A‖_F for the best rank-r approximation: sqrt(Σ_{i>r} σ_i² / Σσ²)."""
    if r < 0:
        raise ValueError(f"rank must be ≥ 0, got {r}")
    s2 = _sorted(sigma) ** 2
    total = s2.sum()
    if total == 0.0:
        return 0.0
    return float(math.sqrt(max(s2[r:].sum(), 0.0) / total))


def energy_kept_at_rank(sigma, r: int) -> float:
    """Fraction of Σσ² captured by the top r singular values."""
    return 1.0 - relative_error_at_rank(sigma, r) ** 2


def error_column(error: float) -> str:
    """Column name of the energy rank at `error`: 0.01 → 'rank_1pct', 0.001 → 'rank_0.1pct'."""
    pct = f"{error * 100:.6g}"
    return f"rank_{pct}pct"


def metrics_batch(
    sigmas,
    shape: tuple[int, int],
    *,
    storage_dtype: str = "F32",
    errors: tuple[float, ...] = DEFAULT_ERRORS,
    at_rank: int | None = None,
    scope: str | None = None,
) -> dict[str, np.ndarray]:
    """All metrics of N spectra of one matrix shape at once ([N, k] → a column per metric).

    A full DeepSeek-V3 analysis holds ~55k per-head spectra; the row-at-a-time functions above
    would take tens of seconds, this takes well under one. Each column equals the scalar
    function applied to that row (the tests hold them to that).

    Args:
        sigmas: [N, k] (or [k]) singular values, any order.
        shape: (m, n) of the matrix each row belongs to.
        storage_dtype: safetensors dtype of the stored weights (for `storage_rank`).
        errors: energy-rank errors, one `rank_*pct` column each.
        at_rank: add `rel_error_at_{at_rank}`.
        scope: "head", "stacked" or "layer". WeightWatcher's columns (`alpha`, `alpha_weighted`,
            `log_spectral_norm`, `mp_softrank`) are computed, one row at a time, where the scope
            is in `LAYER_METRIC_SCOPES` or is None (every row), and are NaN elsewhere.

    Returns:
        Column name → array of N values.

    Example:
        >>> cols = metrics_batch(np.ones((2, 4)), (4, 8), scope="head")
        >>> int(cols["mp_spikes"][0]), bool(np.isnan(cols["alpha"][0]))
        (0, True)
    """
    s = np.sort(np.clip(np.atleast_2d(np.asarray(sigmas, dtype=np.float64)), 0.0, None), axis=1)[:, ::-1]
    n_rows, k = s.shape
    s2 = s**2
    total = s2.sum(axis=1)
    nonzero = total > 0
    safe_total = np.where(nonzero, total, 1.0)
    cols: dict[str, np.ndarray] = {
        "full_rank": np.full(n_rows, int(min(shape))),
        "sigma_max": s[:, 0] if k else np.zeros(n_rows),
    }
    cum = np.cumsum(s2, axis=1)
    for e in errors:
        target = (1.0 - e) * total * (1.0 - 8 * np.finfo(np.float64).eps)
        r = (cum < target[:, None]).sum(axis=1) + 1
        cols[error_column(e)] = np.where(nonzero, np.minimum(r, k), 0)
    l1 = s.sum(axis=1)
    p = s / np.where(l1 > 0, l1, 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    cols["entropy_rank"] = np.where(l1 > 0, np.exp(-plogp.sum(axis=1)), 0.0)
    smax2 = np.where(s[:, 0] > 0, s[:, 0] ** 2, 1.0)
    cols["stable_rank"] = np.where(nonzero, total / smax2, 0.0)
    s4 = (s2**2).sum(axis=1)
    cols["participation_ratio"] = np.where(s4 > 0, total**2 / np.where(s4 > 0, s4, 1.0), 0.0)
    tol = max(shape) * STORAGE_EPS["F32"] * s[:, 0]
    cols["numerical_rank"] = np.where(s[:, 0] > 0, (s > tol[:, None]).sum(axis=1), 0)
    m_, n_ = shape
    eps = STORAGE_EPS.get(storage_dtype, STORAGE_EPS["F32"])
    floor = eps / (2 * math.sqrt(3)) * np.sqrt(total / max(m_ * n_, 1)) * (math.sqrt(m_) + math.sqrt(n_))
    cols["storage_rank"] = np.where(s[:, 0] > 0, (s > floor[:, None]).sum(axis=1), 0)
    m, n = shape
    tau = gavish_donoho_omega(min(m, n) / max(m, n)) * np.median(s, axis=1)
    cols["gavish_donoho_rank"] = (s > tau[:, None]).sum(axis=1)
    if at_rank is not None:
        tail = s2[:, at_rank:].sum(axis=1)
        cols[f"rel_error_at_{at_rank}"] = np.where(nonzero, np.sqrt(np.maximum(tail, 0.0) / safe_total), 0.0)
    cols["frobenius"] = np.sqrt(total)
    edge = np.sqrt(total / (m * n)) * (math.sqrt(m) + math.sqrt(n)) if m and n else np.zeros(n_rows)
    cols["mp_edge"] = edge
    cols["mp_spikes"] = (s > edge[:, None]).sum(axis=1)
    layer_cols = {c: np.full(n_rows, np.nan) for c in LAYER_METRIC_COLUMNS}
    if scope is None or scope in LAYER_METRIC_SCOPES:
        for i in range(n_rows):
            for c, v in layer_metrics(s[i], shape).items():
                layer_cols[c][i] = v
    cols.update(layer_cols)
    return cols


def spectrum_metrics(
    sigma,
    shape: tuple[int, int],
    *,
    storage_dtype: str = "F32",
    errors: tuple[float, ...] = DEFAULT_ERRORS,
    at_rank: int | None = None,
    scope: str | None = None,
) -> dict[str, float | int]:
    """All metrics of one spectrum, as one row of the metrics table (`scope` as in `metrics_batch`)."""
    row: dict[str, float | int] = {
        "full_rank": int(min(shape)),
        "sigma_max": float(_sorted(sigma)[0]) if np.size(sigma) else 0.0,
    }
    for e in errors:
        row[error_column(e)] = energy_rank(sigma, e)
    row["entropy_rank"] = entropy_rank(sigma)
    row["stable_rank"] = stable_rank(sigma)
    row["participation_ratio"] = participation_ratio(sigma)
    row["numerical_rank"] = numerical_rank(sigma, shape)
    row["storage_rank"] = storage_rank(sigma, shape, STORAGE_EPS.get(storage_dtype, STORAGE_EPS["F32"]))
    row["gavish_donoho_rank"] = gavish_donoho_rank(sigma, shape)
    if at_rank is not None:
        row[f"rel_error_at_{at_rank}"] = relative_error_at_rank(sigma, at_rank)
    row["frobenius"] = frobenius_norm(sigma)
    row["mp_edge"] = mp_edge(sigma, shape)
    row["mp_spikes"] = mp_spikes(sigma, shape)
    if scope is None or scope in LAYER_METRIC_SCOPES:
        row.update(layer_metrics(sigma, shape))
    else:
        row.update(dict.fromkeys(LAYER_METRIC_COLUMNS, math.nan))
    return row
