"""Singular-value spectra of attention layers, computed through the factors (docs/reference.md §3).

`layer_spectra(factors, kinds)` returns, for every requested key `<scope>.<matrix>`, the σ
(float64, CPU, descending) and the shape (m, n) of the matrix they belong to.
`layers_spectra([factors, ...], kinds)` and `SpectraPipeline` do the same for a sequence of
layers, with the big eigensolves of up to `SpectraConfig.inflight` layers in flight at once; the
σ are the same as `layer_spectra`'s, layer by layer.

The whole module rests on one identity: if FᵀF = AᵀA then A = P·F for some P with orthonormal
columns, so σ(A·B) = σ(F·B) and, for a stack of blocks, σ([A_1; A_2; ...]) is unchanged when
each block A_i is swapped for its own F_i (blockdiag(P_i) has orthonormal columns). Every per-head
matrix is a product M_h = L_h·R_h of at most two factors (`FactoredHeads`, after TransformerLens'
FactoredMatrix: one small object holds the factors, checks their shapes once and caches its σ).
Each factor gets one small square "thin factor" per head, once (k×k, k the inner dimension:
d_qk, d_rope or d_v), and everything else follows from them:

    kind    L_h      R_h      head σ                    stacked (reduced)
    Q       -        q_h      σ(F_Q)                    rows q_h/s_h                [n·d_qk, in_q]
    Q_pe    -        q_pe_h   σ(F_Qpe)                  rows q_pe_h/s_h             [n·d_rope, in_q]
    K, V    -        k_g, v_g σ(F_K), σ(F_V)            rows k_g/s_g, v_g/s_g       [g·d, in_kv]
    O       o_h      -        σ(F_O)                    columns o_h/s_h             [d_model, n·d_v]
    VO      o_h      v_g      σ(F_O,h·F_V,gᵀ) d_v×d_v   columns o_h·F_V,gᵀ/s_h      [d_model, n·d_v] (not n·in_v)
    QK      q_hᵀ     k_g      σ(F_Q,h·F_K,gᵀ) d_qk²     rows F_Q,h·k_g/s_h          [n·d_qk, in_k] (not n·in_q)
    KQ      (the columns of the QK stack)               columns q_hᵀ·F_K,gᵀ/s_h     [in_q, n·d_qk] (not n·in_k)
    QA, KVA, KVA_pe (layer scope): the matrix itself    [out, in]
    Qjoint  (layer) [q_0; q_1; ...]·q_read: σ(F_J·q_read), F_J the thin factor of the row stack  [n·d_qk, in]
    KVjoint (layer) [k_0; ...; v_0; ...]·kv_read, the same way                                [g·(d_qk+d_v), in]
                    (without a read map, the row stack itself)

where F_X,h is the thin factor of head h (X_h X_hᵀ = F_XᵀF_X for a right factor, X_hᵀX_h for a
left one), g the key/value group of head h, and s_h the head's own largest σ of that kind.
A rows stack swaps each L_h for its thin factor, a columns stack each R_h. Where a reduced
problem has fewer singular values than the matrix it stands for, the missing ones are exact zeros
(rank ≤ inner dimension) and are appended, so every spectrum has min(m, n) entries, as
`np.linalg.svd` of the materialized matrix would give.

Routes (`SpectraConfig`) choose how each step runs; "auto" picks per device (`AUTO_ROUTES`):
- thin factors: "gram" forms the k×k Gram in float64 and takes its Cholesky factor (batched),
  falling back to an eigendecomposition for heads whose Gram is singular to working precision
  (planted low ranks); "qr" takes R of a thin QR instead.
- small square problems (per head): batched SVD in float64 (gesvda on CUDA).
- stacked / layer problems (`SpectraConfig.route`, the one choice per shape): "gram64" = the
  eigenvalues of the float64 Gram of the smaller side, summed over chunks of blocks so that the
  stacked matrix itself is never formed; "svd32"/"svd64" = svdvals of the materialized reduced
  matrix in float32/float64.
- the big problems (smaller side > `big_side`; DeepSeek-V3: stacked O and VO, Grams 7168²) run on
  `SpectraConfig.solver`: torch (cuSOLVER syevd / gesvda), CuPy (syevd, syevj), JAX (QR, Jacobi,
  polar), band (two-stage: GEMMs on the device, then LAPACK on CPU worker processes, svd_probe/spectra/
  band.py), listed in `SOLVERS`; on CUDA each on its own stream and host thread, or batched.
  The band solver's CPU stage takes seconds per problem and runs beside everything else, so it
  pays only with about one big problem in flight per core (`inflight` ≈ cores / 2).
A float32 Gram is never used: it loses every σ below ~1e-4·σ₁ (σ² carries an absolute error of
about eps32·σ₁²). A float64 Gram's absolute error in σ is about sqrt(eps64)·σ₁ ≈ 1.5e-8·σ₁.
For the same reason no float32 eigensolver is offered for the float64 Grams: its eigenvalues
carry that same eps32·σ₁² error, and on an H100 it was no faster (0.36 s vs 0.43 s at 7168).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, replace

import torch

from svd_probe.adapters.base import AttentionFactors
from svd_probe.kinds import HEAD, JOINT_KINDS, LAYER, SpectrumKey, parse_key, spectrum_keys
from svd_probe.spectra import stagelog
from svd_probe.spectra.solvers import SOLVERS, Solver, solver_unavailable, svdvals

__all__ = [
    "AUTO_ROUTES",
    "BAND_MIN_CORES",
    "SOLVERS",
    "FactoredHeads",
    "PendingSpectra",
    "Solver",
    "SpectraConfig",
    "SpectraPipeline",
    "layer_spectra",
    "layers_spectra",
    "pipeline_config",
    "requested_keys",
    "solve",
    "solver_unavailable",
    "svdvals",
    "thin_factor",
]

Result = dict[str, tuple[torch.Tensor, tuple[int, int]]]

_FACTOR_ROUTES = ("gram", "qr")
_SOLVE_ROUTES = ("gram64", "svd32", "svd64")


@dataclass(frozen=True)
class SpectraConfig:
    """How to compute; every choice gives the same σ to within the 1e-4·σ₁ contract.

    `stacked` applies to stacked and layer problems whose smaller side is at most `big_side`;
    `big` to the rest (DeepSeek-V3: stacked O and VO, 7168 × 16384 after reduction), and those
    big problems are solved by `solver` (a name in `SOLVERS`). "auto", 0 and None take the
    device's entry in `AUTO_ROUTES`.
    """

    factor: str = "auto"
    stacked: str = "auto"
    big: str = "auto"
    big_side: int = 2048
    # Bytes of float64 scratch per chunk when forming Grams; bounds peak memory on CPU hosts.
    chunk_bytes: int = 1 << 28
    # On CUDA, solve the big problems of a layer at the same time, each on its own stream from
    # its own host thread: cuSOLVER's float64 eigvalsh at 7168 is a chain of bandwidth-bound,
    # low-occupancy kernels with host round trips, so two of them overlap (0.83 s for two on an
    # H100 instead of 0.97 s), and the layer's small problems run on the caller's stream meanwhile.
    concurrent: bool = True
    solver: str = "auto"
    # layers_spectra / SpectraPipeline: layers whose big solves may be pending at once (0: auto).
    # Each pending layer holds its big Grams (DeepSeek-V3: 2 × 411 MB of float64).
    inflight: int = 0
    # The big solves of `inflight` layers go to the solver as one batched call on one thread
    # (True) instead of one call per problem, each on its own thread and stream (False).
    batched: bool | None = None

    def resolved(self, device: torch.device) -> SpectraConfig:
        """This config with every "auto" filled in for `device`, checked.

        Raises ValueError for an unknown route or solver, or a solver whose library is missing
        or cannot run on `device`."""
        auto = AUTO_ROUTES["cuda" if device.type == "cuda" else "cpu"]
        picked: dict = {
            name: getattr(self, name) if getattr(self, name) != "auto" else auto[name]
            for name in ("factor", "stacked", "big", "solver")
        }
        picked["inflight"] = self.inflight or auto["inflight"]
        picked["batched"] = auto["batched"] if self.batched is None else self.batched
        for name, ok in (("factor", _FACTOR_ROUTES), ("stacked", _SOLVE_ROUTES), ("big", _SOLVE_ROUTES)):
            if picked[name] not in ok:
                raise ValueError(f"SpectraConfig.{name}={picked[name]!r}: choose from {ok} or 'auto'")
        if picked["inflight"] < 1:
            raise ValueError(f"SpectraConfig.inflight={picked['inflight']}: must be ≥ 1 (or 0 for auto)")
        op = "eig" if picked["big"] == "gram64" else "svd"
        why = solver_unavailable(picked["solver"], device, op)
        if why:
            raise ValueError(f"SpectraConfig.solver={picked['solver']!r} with big={picked['big']!r}: {why}")
        return replace(self, **picked)

    def is_big(self, shape: tuple[int, int]) -> bool:
        return min(shape) > self.big_side

    def route(self, shape: tuple[int, int]) -> str:
        """The route for a stacked or layer problem of this (full, unreduced) shape."""
        return self.big if self.is_big(shape) else self.stacked


# What "auto" means per device. The float64 Gram routes are accurate on any input (σ error
# ~sqrt(eps64)·σ₁); which solver and how many layers in flight are fastest on CUDA is what
# benchmarks/bench_solvers.py measures on a DeepSeek-V3-shaped layer: its "fastest accurate"
# line is the candidate for the "cuda" entry. On CPU, LAPACK's SVD of the reduced matrices was
# 1.3-2x slower than float64 GEMM + eigvalsh (bench_spectra.py at --scale 0.125/0.25).
AUTO_ROUTES: dict[str, dict] = {
    "cuda": {
        "factor": "gram",
        "stacked": "gram64",
        "big": "gram64",
        "solver": "torch",
        "inflight": 1,
        "batched": False,
    },
    "cpu": {"factor": "gram", "stacked": "gram64", "big": "gram64", "solver": "torch", "inflight": 1, "batched": False},
}


DEFAULT_CONFIG = SpectraConfig()

# The solvers whose stage 2 needs many layers in flight (`band_inflight`): on the CPU workers, or
# (band-device) as one Triton program a matrix, each seconds long, the GPU's SMs shared among them.
BAND_SOLVERS = ("band", "band-hybrid", "band-device")


# Cores from which analyze's auto solver on CUDA is a band solver (pipeline_config).
BAND_MIN_CORES = 8


def pipeline_config(
    device: torch.device, solver: str = "auto", inflight: int = 0, over_http: bool = False
) -> SpectraConfig:
    """The config of `analyze`'s overlap pipeline on `device`: `solver` ("auto" or a name in
    SOLVERS) for the big problems, `inflight` layers pending (0: auto), never batched (the writer
    thread collects each layer's σ). Raises BadOptionError for a solver that cannot run here.

    Auto solver, on CUDA with at least `BAND_MIN_CORES` cores: from a folder (or factors in
    memory), "band-device" (every stage on the GPU; it falls back to band-hybrid by itself where
    its Triton kernels cannot run), or "band-hybrid" where Triton is missing; `over_http`,
    "band-hybrid". 62 DeepSeek-V3 layers on three H200s with 16 cores, 2026-12-03: compute
    27.7-28.9 s with band-device against band-hybrid's 32.5-33.7 s, from the folder 27.9-29.4 s
    against 35.2 s; but over HTTP band-device scattered from 33.2 s to over 50 s in five runs,
    where band-hybrid stays within 36-38 s (benchmarks/README.md, "band-device as the default").
    On three H100 machines (2026-12-07) band-device over HTTP took 27.2-28.9 s in eight runs
    against band-hybrid's 32.7 s, but on an H200 the same day 35.8, 56.4 and 43.0 s against
    band-hybrid's 35.8 s on that machine (benchmarks/README.md, "band-device over HTTP"), so
    over HTTP auto stays band-hybrid. band-device's compute scatters on one machine too (one
    H100, 2026-12-07: 26.7-39.4 s in six runs, band-hybrid 36.4 s; "band-device five times on
    one H100"), so from a folder it is the faster route on the median, not in every run.
    Else the device's `AUTO_ROUTES` entry (torch's syevd on CUDA).

    Auto in flight: on CUDA two layers (0.726 s a DeepSeek-V3 layer instead of 0.774 s with one,
    benchmarks/README.md, H200), or for the band solvers enough layers for every core's worker
    (`band_inflight`); on the CPU one, each layer inline."""
    from svd_probe.errors import BadOptionError

    if solver == "auto" and device.type == "cuda":
        from svd_probe.spectra.band import cores

        if cores() >= BAND_MIN_CORES:
            for name in ("band-hybrid",) if over_http else ("band-device", "band-hybrid"):
                if not solver_unavailable(name, device):
                    solver = name
                    break
    config = SpectraConfig(solver=solver, inflight=max(0, inflight), batched=False)
    try:
        picked = config.resolved(device).solver
    except ValueError as e:
        names = ", ".join(SOLVERS)
        raise BadOptionError(f"--solver {solver}: {e}", f"Use --solver auto or one of: {names}.") from None
    if not inflight:
        auto = band_inflight() if picked in BAND_SOLVERS else 2
        config = replace(config, inflight=auto if device.type == "cuda" else 1)
    return config


def band_inflight() -> int:
    """Layers in flight that keep the band solvers' CPU workers fed: half a layer per worker
    (two problems a layer; a worker per core unless `use_stage2_workers` set fewer) and four
    more, for the GPU's share (band-hybrid) and the stage-1 queue."""
    from svd_probe.spectra.band import pool_size

    return pool_size() // 2 + 4


# --- primitives ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_fp32_matmul():
    """TF32 (or bf16 on CPU) matmuls carry ~1e-3 relative error: far outside the 1e-4 contract.

    A caller may have switched them on globally for training; switch them off while we work.
    """
    # Only the one legacy switch: it governs CUDA TF32 and CPU bf16 alike, and recent torch
    # refuses to report the precision when the legacy and the per-backend APIs are mixed.
    try:
        old = torch.get_float32_matmul_precision()
    except RuntimeError:  # a caller used the per-backend API: answer in kind
        old = None
    if old is not None:
        if old != "highest":
            torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            if old != "highest":
                torch.set_float32_matmul_precision(old)
        return
    backends = [
        b
        for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
        if b is not None and hasattr(b, "fp32_precision")
    ]
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, p in zip(backends, saved, strict=False):
            b.fp32_precision = p


def _pad(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Trim or zero-pad the last axis to exactly k values.

    Padding is exact: the reduced problem has fewer σ only when the matrix's rank is bounded by the
    reduced size. Trimming drops values that are zero in exact arithmetic (e.g. a k×k factor of a
    matrix with fewer than k columns)."""
    have = sigma.shape[-1]
    if have >= k:
        return sigma[..., :k]
    return torch.cat([sigma, sigma.new_zeros(sigma.shape[:-1] + (k - have,))], dim=-1)


def _sorted_desc(s: torch.Tensor) -> torch.Tensor:
    return torch.sort(s, dim=-1, descending=True).values


def _spans(n: int, item_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges [i0, i1) over range(n), each about chunk_bytes of items of item_bytes."""
    per = max(1, chunk_bytes // max(1, item_bytes))
    for i in range(0, n, per):
        yield i, min(n, i + per)


def _gram(x: torch.Tensor, side: str, chunk_bytes: int) -> torch.Tensor:
    """float64 Gram of each matrix in a batch: x xᵀ ("rows") or xᵀx ("cols"), chunked over the batch.

    Chunking keeps the float64 copy of the inputs bounded (o of DeepSeek-V3 is 940 MB in float64).
    """
    b, m, n = x.shape
    k = m if side == "rows" else n
    out = torch.empty((b, k, k), dtype=torch.float64, device=x.device)
    for i0, i1 in _spans(b, m * n * 8, chunk_bytes):
        c = x[i0:i1].to(torch.float64)
        out[i0:i1] = c @ c.mT if side == "rows" else c.mT @ c
    return out


def _factor_from_gram(g: torch.Tensor) -> torch.Tensor:
    """F with FᵀF = G for a batch of PSD float64 matrices.

    Cholesky (G = L Lᵀ, F = Lᵀ) is batched and fast, and backward stable whenever it completes.
    It fails when rounding makes a singular Gram indefinite (heads of planted low rank); those
    heads take F = diag(sqrt(λ₊))·Uᵀ from an eigendecomposition instead, which is exact for
    any PSD matrix.
    """
    l, info = torch.linalg.cholesky_ex(g)  # noqa: E741 - the Cholesky factor L
    f = l.mT
    bad = (info != 0).nonzero().flatten()
    if bad.numel():
        lam, u = torch.linalg.eigh(g[bad])
        f = f.clone()
        f[bad] = lam.clamp_min(0).sqrt().unsqueeze(-1) * u.mT
    return f


def thin_factor(x: torch.Tensor, side: str, route: str, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """Small float64 factor F of each matrix of a batch.

    side="rows" (wide blocks such as q_h: [d, in]): FᵀF = x xᵀ, so x = Fᵀ·Pᵀ, P orthonormal columns.
    side="cols" (tall blocks such as o_h: [d_model, d_v]): FᵀF = xᵀx, so x = P·F.
    """
    if route == "gram":
        return _factor_from_gram(_gram(x, side, chunk_bytes))
    if route == "qr":
        # R of x = Q R (cols) or of xᵀ = Q R (rows); QR is backward stable in float32 and needs no
        # care for rank deficiency. mode="r" yields min(m, n) rows, still a valid factor.
        a = x if side == "cols" else x.mT
        return torch.linalg.qr(a, mode="r")[1].to(torch.float64)
    raise ValueError(f"unknown factor route {route!r}")


@dataclass
class _Solve:
    """One stacked or layer problem, ready for its solver: a float64 Gram ("eig") or the reduced
    matrix itself ("svd"); `k` = min(m, n) of the matrix it stands for."""

    op: str
    x: torch.Tensor | None
    solver: str
    k: int

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """σ, float64, descending, exactly k values, from the solver's answer for this problem."""
        if self.op == "eig":
            sigma = raw.flip(-1).clamp_min(0).sqrt()
        else:
            sigma = _sorted_desc(raw.to(torch.float64))
        return _pad(sigma, self.k)


def _run_solves(jobs: Sequence[_Solve]) -> list[torch.Tensor]:
    """σ of each problem; problems of one op, solver, shape and dtype go to the solver as one batch."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        assert job.x is not None
        groups.setdefault((job.op, job.solver, tuple(job.x.shape), job.x.dtype), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(jobs)
    for (op, solver, _, _), idx in groups.items():
        spec = SOLVERS[solver]
        fn = spec.eig if op == "eig" else spec.svd
        assert fn is not None
        xs = [jobs[i].x for i in idx]
        batch = xs[0][None] if len(xs) == 1 else torch.stack(xs)  # type: ignore[index, arg-type]
        raw = fn(batch)
        for j, i in enumerate(idx):
            out[i] = jobs[i].finish(raw[j])
    return out


# --- factors, heads and stacks --------------------------------------------------------------------


class _Blocks:
    """One factor of every head (or key/value group): a batch x [b, r, c] and its thin factors.

    `inner` is the axis of x that meets the other factor in a product: 1 (rows) for right factors
    such as q_h [d_qk, in_q] (Q_h = q_h; QK_h = q_hᵀ·k_g uses q_hᵀ as a left factor, still
    through its rows), 2 (columns) for left factors such as o_h [d_model, d_v]. The thin factor
    F (k×k float64, k = x.shape[inner]) has FᵀF = the Gram of that side, computed once.
    """

    def __init__(self, x: torch.Tensor, inner: int, cfg: SpectraConfig):
        self.x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        self.inner = inner
        self._cfg = cfg
        self._thin: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        """The inner dimension."""
        return int(self.x.shape[self.inner])

    @property
    def outer(self) -> int:
        return int(self.x.shape[3 - self.inner])

    def thin(self) -> torch.Tensor:
        if self._thin is None:
            side = "rows" if self.inner == 1 else "cols"
            self._thin = thin_factor(self.x, side, self._cfg.factor, self._cfg.chunk_bytes)
        return self._thin

    def as_left(self) -> torch.Tensor:
        """x oriented as a left factor, [b, outer, inner]."""
        return self.x if self.inner == 2 else self.x.mT

    def as_right(self) -> torch.Tensor:
        """x oriented as a right factor, [b, inner, outer]."""
        return self.x if self.inner == 1 else self.x.mT


class _Stack:
    """A tall matrix S = [B_0; B_1; ...; B_{n-1}] given block by block (each [a, b]), whose σ are
    those of a stacked or layer matrix of the (full) `shape`; `blocks(i0, i1, dtype)` gives
    B_i0..B_i1-1 as one [i1 - i0, a, b] tensor."""

    def __init__(self, n: int, a: int, b: int, blocks: Callable[[int, int, torch.dtype], torch.Tensor], shape, device):
        self.n, self.a, self.b = n, a, b
        self.blocks = blocks
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = device

    @classmethod
    def of_matrix(cls, w: torch.Tensor) -> _Stack:
        """A plain matrix [out, in], one row per block."""
        w = w if w.dtype in (torch.float32, torch.float64) else w.float()
        return cls(int(w.shape[0]), 1, int(w.shape[1]), lambda i0, i1, dt: w[i0:i1, None, :].to(dt), w.shape, w.device)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.blocks(0, self.n, dtype).reshape(self.n * self.a, self.b)

    def gram64(self, chunk_bytes: int) -> torch.Tensor:
        """float64 Gram of S's smaller side, accumulated over chunks.

        S tall (b ≤ n·a, the usual case): Σ_chunks PᵀP over chunks of blocks, so neither S nor a
        float64 copy of it exists at once (3 × 940 MB for DeepSeek-V3's stacked VO otherwise).
        S wide: S is formed and Σ over its column chunks of P Pᵀ gives the n·a × n·a Gram.
        """
        if self.b <= self.n * self.a:
            g = torch.zeros((self.b, self.b), dtype=torch.float64, device=self.device)
            for i0, i1 in _spans(self.n, self.a * self.b * 8, chunk_bytes):
                p = self.blocks(i0, i1, torch.float64).reshape(-1, self.b)
                g.addmm_(p.mT, p)
            return g
        s = self.materialize(torch.float64)
        k = s.shape[0]
        g = torch.zeros((k, k), dtype=torch.float64, device=s.device)
        for j0, j1 in _spans(self.b, k * 8, chunk_bytes):
            p = s[:, j0:j1]
            g.addmm_(p, p.mT)
        return g


class FactoredHeads:
    """The per-head matrices M_h = L_h · R_g(h) of one kind, held as their factors.

    After TransformerLens' FactoredMatrix, for a batch of heads: the shapes are checked once,
    nothing of size m×p is ever formed, and the per-head σ are computed once and cached.
    `left` (e.g. o for VO) or `right` (e.g. q for Q) may be absent (the identity); `index` maps
    each head to its right factor's block (its key/value group), None for one block per head.
    """

    def __init__(self, left: _Blocks | None, right: _Blocks | None, index: torch.Tensor | None = None):
        if left is None and right is None:
            raise ValueError("FactoredHeads needs at least one factor")
        if left is not None and right is not None:
            if left.dim != right.dim:
                raise ValueError(f"inner dimensions differ: {left.dim} (left) vs {right.dim} (right)")
            if index is None and left.n != right.n:
                raise ValueError(f"{left.n} left blocks but {right.n} right blocks and no index")
            if index is not None and int(index.shape[0]) != left.n:
                raise ValueError(f"index has {int(index.shape[0])} entries for {left.n} heads")
        self.left, self.right = left, right
        self.index = index if (left is not None and right is not None) else None
        self._sigma: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.left.n if self.left is not None else self.right.n  # type: ignore[union-attr]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, p) of each M_h."""
        m = self.left.outer if self.left is not None else self.right.dim  # type: ignore[union-attr]
        p = self.right.outer if self.right is not None else self.left.dim  # type: ignore[union-attr]
        return (m, p)

    def _pick(self, i0: int, i1: int) -> slice | torch.Tensor:
        """Which right blocks heads i0:i1 read."""
        return slice(i0, i1) if self.index is None else self.index[i0:i1]

    def core(self) -> torch.Tensor:
        """[n, k, k] float64 with the same σ as each M_h: F_L·F_Rᵀ, or the one thin factor."""
        if self.left is not None and self.right is not None:
            return self.left.thin() @ self.right.thin()[self._pick(0, self.n)].mT
        return (self.left or self.right).thin()  # type: ignore[union-attr]

    @property
    def sigma(self) -> torch.Tensor:
        """Per-head σ, float64 on the factors' device, descending, min(m, p) each: [n, min(m, p)]."""
        if self._sigma is None:
            self._sigma = _pad(_sorted_desc(svdvals(self.core())), min(self.shape))
        return self._sigma

    def scale(self, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
        """1/s_h per head for stacking; heads with σ₁ = 0 stay as they are (zero)."""
        s1 = self.sigma[:, 0]
        if not normalize:
            return torch.ones_like(s1, dtype=dtype)
        return torch.where(s1 > 0, 1.0 / torch.where(s1 > 0, s1, torch.ones_like(s1)), torch.ones_like(s1)).to(dtype)

    def stacked(self, by: str, normalize: bool) -> _Stack:
        """The heads' matrices (each divided by its σ₁ if `normalize`) stacked by "rows" (the input
        space is shared) or "cols" (the output space is shared), reduced through the thin factors:
        rows drop each L_h's orthonormal part, columns each R_h's."""
        n, (m, p) = self.n, self.shape
        left, right = self.left, self.right
        scales: dict[torch.dtype, torch.Tensor] = {}

        def scale(i0: int, i1: int, dt: torch.dtype) -> torch.Tensor:
            if dt not in scales:
                scales[dt] = self.scale(normalize, dt)
            return scales[dt][i0:i1, None, None]

        if by == "rows":
            # B_h = F_L,h · R_h / s_h  (or R_h / s_h, or F_L,h / s_h)
            a = left.dim if left is not None else m
            width, shape = p, (n * m, p)

            def blocks(i0: int, i1: int, dt: torch.dtype) -> torch.Tensor:
                sc = scale(i0, i1, dt)
                if right is None:
                    return left.thin()[i0:i1].to(dt) * sc  # type: ignore[union-attr]
                r = right.as_right()[self._pick(i0, i1)].to(dt)
                if left is None:
                    return r * sc
                return (left.thin()[i0:i1].to(dt) * sc) @ r

        elif by == "cols":
            # stored transposed (same σ): B_hᵀ = F_R,g · L_hᵀ / s_h  (or L_hᵀ / s_h, or F_R,g / s_h)
            a = right.dim if right is not None else p
            width, shape = m, (m, n * p)

            def blocks(i0: int, i1: int, dt: torch.dtype) -> torch.Tensor:
                sc = scale(i0, i1, dt)
                if left is None:
                    return right.thin()[self._pick(i0, i1)].to(dt) * sc  # type: ignore[union-attr]
                lt = left.as_left()[i0:i1].mT.to(dt)
                if right is None:
                    return lt * sc
                return (right.thin()[self._pick(i0, i1)].to(dt) * sc) @ lt

        else:
            raise ValueError(f"stack by 'rows' or 'cols', not {by!r}")
        return _Stack(n, a, width, blocks, shape, (left or right).x.device)  # type: ignore[union-attr]


# The one map from a per-head kind to its factors (left L_h, right R_g): names of AttentionFactors
# fields; a product reads the right factor of the head's key/value group.
_STRUCTURE = {
    "Q": (None, "q"),
    "Q_pe": (None, "q_pe"),
    "K": (None, "k"),
    "V": (None, "v"),
    "O": ("o", None),
    "VO": ("o", "v"),
    "QK": ("q", "k"),
}

# How each stacked kind stacks the heads of which FactoredHeads (the table in the module docstring).
_STACKING = {
    "Q": ("Q", "rows"),
    "Q_pe": ("Q_pe", "rows"),
    "K": ("K", "rows"),
    "V": ("V", "rows"),
    "QK": ("QK", "rows"),
    "KQ": ("QK", "cols"),
    "O": ("O", "cols"),
    "VO": ("VO", "cols"),
}


class _LayerProblems:
    """Every problem of one layer, built lazily from its factors, each piece at most once."""

    def __init__(self, f: AttentionFactors, cfg: SpectraConfig, normalize: bool):
        self.cfg = cfg
        self.normalize = normalize
        self.device = _device_of(f)

        def blocks(t: torch.Tensor | None, inner: int) -> _Blocks | None:
            return None if t is None else _Blocks(t, inner, cfg)

        have = {
            name: _Blocks(t, inner, cfg)
            for name, t, inner in (("q", f.q, 1), ("q_pe", f.q_pe, 1), ("k", f.k, 1), ("v", f.v, 1), ("o", f.o, 2))
            if t is not None
        }
        grp = f.groups().to(device=self.device, dtype=torch.long) if (f.q is not None or f.o is not None) else None
        self.heads: dict[str, FactoredHeads] = {}
        for kind, (left, right) in _STRUCTURE.items():
            if all(name in have for name in (left, right) if name is not None):
                pair = left is not None and right is not None
                self.heads[kind] = FactoredHeads(
                    have[left] if left else None, have[right] if right else None, grp if pair else None
                )
        self.layer = {name: w for name, w in f.layer.items() if w is not None}
        self.joint_parts = {"Qjoint": ((f.q,), f.q_read), "KVjoint": ((f.k, f.v), f.kv_read)}
        self._joint: dict[str, _Stack] = {}

    def stack(self, key: str) -> _Stack:
        scope, _, kind = key.partition(".")
        if scope == "stacked":
            name, by = _STACKING[kind]
            return self.heads[name].stacked(by, self.normalize)
        if scope == "layer" and kind in JOINT_KINDS:
            if kind not in self._joint:
                self._joint[kind] = self.joint(kind)
            return self._joint[kind]
        if scope == "layer":
            return _Stack.of_matrix(self.layer[kind])
        raise KeyError(key)

    def joint(self, kind: str) -> _Stack:
        """Qjoint or KVjoint: the heads' rows stacked as they are (not normalized), then through the
        read map. σ(J·P) = σ(F_J·P) with F_Jᵀ F_J = JᵀJ (the module's identity), so DeepSeek-V3's
        KVjoint [32768, 7168] is solved as [512, 7168]; its rank is at most kv_lora_rank."""
        parts, read = self.joint_parts[kind]
        rows = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts if p is not None])
        rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
        if read is None:
            return _Stack.of_matrix(rows)
        f = thin_factor(rows[None], "cols", self.cfg.factor, self.cfg.chunk_bytes)[0]
        m = f @ read.to(torch.float64)
        full = (int(rows.shape[0]), int(read.shape[1]))
        return _Stack(int(m.shape[0]), 1, int(m.shape[1]), lambda i0, i1, dt: m[i0:i1, None, :].to(dt), full, m.device)

    def shape(self, key: str) -> tuple[int, int]:
        """The full matrix shape of a key, from tensor shapes alone (nothing is computed)."""
        k = SpectrumKey.parse(key)
        if k.scope == HEAD:
            return self.heads[k.kind].shape
        return self.stack(key).shape

    def is_big(self, key: str) -> bool:
        return SpectrumKey.parse(key).scope != HEAD and self.cfg.is_big(self.shape(key))

    def head(self, kind: str) -> torch.Tensor:
        return self.heads[kind].sigma

    def solve_for(self, key: str) -> _Solve:
        """The problem for a stacked or layer key, its Gram or reduced matrix formed now (on the
        caller's stream), to be solved by its route's solver."""
        stack = self.stack(key)
        route = self.cfg.route(stack.shape)
        solver = self.cfg.solver if self.cfg.is_big(stack.shape) else "torch"
        k = min(stack.shape)
        if route == "gram64":
            return _Solve("eig", stack.gram64(self.cfg.chunk_bytes), solver, k)
        return _Solve("svd", stack.materialize(torch.float32 if route == "svd32" else torch.float64), solver, k)


def _device_of(f: AttentionFactors) -> torch.device:
    return next(t for t in (f.q, f.o, f.k, f.v, f.q_pe, *f.layer.values()) if t is not None).device


# --- the layer and the pipeline ---------------------------------------------------------------------


def requested_keys(factors: AttentionFactors, kinds) -> list[str]:
    """Keys `<scope>.<matrix>` to compute: bare kinds expand to every scope they exist in
    (VO → head.VO, stacked.VO), scoped keys are taken as they are; kinds the factors lack are
    dropped (no q_pe → no Q_pe)."""
    have_q, have_k, have_v, have_o = (t is not None for t in (factors.q, factors.k, factors.v, factors.o))
    needs = {
        "Q": have_q,
        "Q_pe": factors.q_pe is not None,
        "K": have_k,
        "V": have_v,
        "O": have_o,
        "VO": have_o and have_v,
        "QK": have_q and have_k,
        "KQ": have_q and have_k,
        "Qjoint": have_q,
        "KVjoint": have_k and have_v,
    }
    scoped = {parse_key(k) for k in kinds if "." in k}
    keys = {k for k in scoped if k is not None} | set(spectrum_keys(k for k in kinds if "." not in k))

    def available(key: SpectrumKey) -> bool:
        if key.scope == LAYER and key.kind not in JOINT_KINDS:
            return factors.layer.get(key.kind) is not None
        return needs[key.kind]

    return [str(key) for key in sorted(keys) if available(key)]


class PendingSpectra:
    """The spectra of one layer submitted to a `SpectraPipeline`; `result()` waits for them."""

    def __init__(self, pipe: SpectraPipeline | None, keys: list[str], shapes: dict, device: torch.device):
        self._pipe = pipe
        self.keys = keys
        self._shapes = shapes
        self._device = device
        self._ready: dict[str, torch.Tensor] = {}  # key -> σ on the device, complete at `_event`
        self._event = None
        self._solved: dict[str, tuple[Future, int]] = {}  # key -> (future of a list of σ, index)
        self._result: Result | None = None

    def result(self) -> Result:
        """{key: (σ float64 CPU descending, (m, n))} in `requested_keys` order, as `layer_spectra`."""
        if self._result is None:
            if self._pipe is not None:
                self._pipe._launch_if_building(self)
            cpu = self._ready_on_cpu()
            out: Result = {}
            for key in self.keys:
                if key in cpu:
                    sigma = cpu[key]
                else:
                    fut, i = self._solved[key]
                    sigma = fut.result()[i]
                out[key] = (sigma, self._shapes[key])
            self._result = out
            self._ready = {}
        return self._result

    def _ready_on_cpu(self) -> dict[str, torch.Tensor]:
        if self._event is None or self._pipe is None:
            return {k: s.to("cpu", torch.float64) for k, s in self._ready.items()}
        # Copy on a side stream that waits only for this layer's work, not for later layers'
        # work queued on the caller's stream since.
        stream = self._pipe._copy_stream(self._device)
        with torch.cuda.stream(stream):
            stream.wait_event(self._event)
            return {k: s.to("cpu", torch.float64) for k, s in self._ready.items()}


class SpectraPipeline:
    """Spectra of a sequence of layers, with the big solves of up to `config.inflight` layers in
    flight while the next layers' small problems are computed.

    `submit(factors)` computes the layer's small problems and the big problems' Grams on the
    caller's stream and hands the big solves to worker threads (each with its own CUDA stream;
    with `config.batched`, the solves of `inflight` layers as one batched call); it blocks while
    `inflight` layers are still pending, which bounds memory to their Grams. `result()` of the
    returned `PendingSpectra` gives exactly what `layer_spectra` gives for that layer. On CPU,
    with `inflight` 1 everything runs inline, as `layer_spectra` always did.
    Use it from one thread; close it (or use it as a context manager) to wait for every solve.

    Example:
        >>> with SpectraPipeline({"O", "VO"}, config=SpectraConfig(inflight=4)) as pipe:
        ...     pending = [pipe.submit(f) for f in factors_per_layer]
        ...     spectra = [p.result() for p in pending]
    """

    def __init__(self, kinds, *, normalize_stacked: bool = True, config: SpectraConfig | None = None):
        self.kinds = kinds
        self.normalize_stacked = normalize_stacked
        self.config = config or DEFAULT_CONFIG
        self._pool: ThreadPoolExecutor | None = None
        self._active: deque[list[Future]] = deque()  # solve groups launched and maybe unfinished
        self._building: list[tuple[PendingSpectra, list[str], list[_Solve], object]] = []
        self._batch_device: torch.device | None = None
        self._copy_streams: dict = {}

    # -- public --

    def submit(self, factors: AttentionFactors) -> PendingSpectra:
        """Start one layer; see the class docstring."""
        keys = requested_keys(factors, self.kinds)
        if not keys:
            return PendingSpectra(None, [], {}, torch.device("cpu"))
        device = _device_of(factors)
        cfg = self.config.resolved(device)
        cuda = device.type == "cuda"
        threaded = cfg.inflight > 1 or (cfg.concurrent and cuda)
        if threaded and not cfg.batched:
            self._wait_active(cfg.inflight - 1)  # room for this layer's solves
        if cfg.batched and self._building and self._batch_device != device:
            self._launch_batch()
        with _full_fp32_matmul(), torch.no_grad(), stagelog.span("layer-submit"):
            lay = _LayerProblems(factors, cfg, self.normalize_stacked)
            shapes = {k: lay.shape(k) for k in keys}
            big = [k for k in keys if lay.is_big(k)] if threaded else []
            # The big problems first, so that their solves run while the rest is computed.
            with stagelog.span("submit-big"):  # their Grams or reduced matrices, formed here
                solves = [lay.solve_for(k) for k in big]
            event = _record(device)
            pending = PendingSpectra(self, keys, shapes, device)
            if solves:
                if cfg.batched:
                    self._building.append((pending, big, solves, event))
                    self._batch_device = device
                    if len(self._building) >= cfg.inflight:
                        self._launch_batch()
                else:
                    group = []
                    for key, job in zip(big, solves, strict=True):
                        fut = self._workers(cfg).submit(_solve_on_worker, [job], [event], device)
                        pending._solved[key] = (fut, 0)
                        group.append(fut)
                    self._active.append(group)
                del solves
            ready: dict[str, torch.Tensor] = {}
            with stagelog.span("submit-small"):  # the per-head σ and the small stacks, solved here
                for key in keys:
                    if key in big:
                        continue
                    parsed = SpectrumKey.parse(key)
                    if parsed.scope == HEAD:
                        ready[key] = lay.head(parsed.kind)
                    else:
                        ready[key] = _run_solves([lay.solve_for(key)])[0]
            pending._ready = ready
            pending._event = _record(device)
        return pending

    def close(self) -> None:
        """Launch what is batched, wait for every solve, stop the worker threads."""
        self._launch_batch()
        self._wait_active(0)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> SpectraPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --

    def _workers(self, cfg: SpectraConfig) -> ThreadPoolExecutor:
        if self._pool is None:
            # two big problems per layer (DeepSeek-V3: stacked O and VO) for each layer in flight
            self._pool = ThreadPoolExecutor(max(2, 2 * cfg.inflight), thread_name_prefix="svd-probe-solve")
        return self._pool

    def _wait_active(self, limit: int) -> None:
        """Wait for the oldest solve groups until at most `limit` are unfinished."""
        while len(self._active) > limit:
            wait_futures(self._active.popleft())

    def _launch_batch(self) -> None:
        if not self._building:
            return
        self._wait_active(0)  # one batch solving while the next is built
        building, self._building = self._building, []
        jobs = [job for _, _, solves, _ in building for job in solves]
        events = [ev for *_, ev in building]
        device = self._batch_device
        assert device is not None
        cfg = self.config.resolved(device)
        fut = self._workers(cfg).submit(_solve_on_worker, jobs, events, device)
        i = 0
        for pending, keys, solves, _ in building:
            for key in keys:
                pending._solved[key] = (fut, i)
                i += 1
            solves.clear()
        self._active.append([fut])

    def _launch_if_building(self, pending: PendingSpectra) -> None:
        if any(p is pending for p, *_ in self._building):
            self._launch_batch()

    def _copy_stream(self, device: torch.device):
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device=device)
        return self._copy_streams[device]


def _record(device: torch.device):
    """An event at this point of the caller's stream (None on CPU, where work is synchronous)."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


def _solve_on_worker(jobs: list[_Solve], events: list, device: torch.device) -> list[torch.Tensor]:
    """Solve on a worker thread: on CUDA on a stream of its own that first waits for the caller's
    work that formed the inputs; returns σ on the CPU and frees the inputs."""
    try:
        with torch.no_grad():
            if device.type != "cuda":
                return [s.to("cpu", torch.float64) for s in _run_solves(jobs)]
            stream = torch.cuda.Stream(device=device)
            for ev in events:
                stream.wait_event(ev)
            for job in jobs:
                job.x.record_stream(stream)  # type: ignore[union-attr] # not reused before we are done
            with torch.cuda.stream(stream), stagelog.span("solve"):
                return [s.to("cpu", torch.float64) for s in _run_solves(jobs)]  # waits for this stream
    finally:
        for job in jobs:
            job.x = None


def layer_spectra(
    factors: AttentionFactors,
    kinds,
    *,
    normalize_stacked: bool = True,
    config: SpectraConfig | None = None,
) -> Result:
    """Spectra of one layer: {"head.VO": (σ [n, k], (m, n)), "stacked.O": (σ [k], (m, n)), ...}.

    `kinds`: matrix names (Q, Q_pe, K, V, O, VO, QK, KQ, QA, KVA, KVA_pe, Qjoint, KVjoint: each in every scope it
    exists in) and/or scoped keys such as "stacked.VO". Kinds whose factors are missing are left
    out. σ are float64 CPU tensors, descending, min(m, n) per spectrum; head-scope K and V have one
    row per key/value group. Runs on the device of the factors.

    Example:
        >>> spectra = layer_spectra(factors, {"O", "VO"})
        >>> sigma, (m, n) = spectra["stacked.VO"]
    """
    with SpectraPipeline(kinds, normalize_stacked=normalize_stacked, config=config) as pipe:
        return pipe.submit(factors).result()


def layers_spectra(
    layers: Iterable[AttentionFactors],
    kinds,
    *,
    normalize_stacked: bool = True,
    config: SpectraConfig | None = None,
) -> list[Result]:
    """`layer_spectra` of each layer, in order, with the big solves of up to `config.inflight`
    layers in flight at once (see `SpectraPipeline`); the σ are the same as layer by layer.

    Example:
        >>> cfg = SpectraConfig(inflight=4)
        >>> per_layer = layers_spectra([f0, f1, f2, f3], {"O", "VO"}, config=cfg)
        >>> per_layer[2]["stacked.O"][0]  # σ of layer 2's stacked O
    """
    with SpectraPipeline(kinds, normalize_stacked=normalize_stacked, config=config) as pipe:
        pending = [pipe.submit(f) for f in layers]
        return [p.result() for p in pending]


def solve(m: torch.Tensor, route: str, chunk_bytes: int = 1 << 28, solver: str = "torch") -> torch.Tensor:
    """σ (float64, descending, min(rows, cols) values) of one matrix, by `route` and `solver`."""
    if route not in _SOLVE_ROUTES:
        raise ValueError(f"unknown solve route {route!r}")
    if min(m.shape) == 0:
        return m.new_zeros(0, dtype=torch.float64)
    stack = _Stack.of_matrix(m)
    k = min(stack.shape)
    with _full_fp32_matmul(), torch.no_grad():
        if route == "gram64":
            job = _Solve("eig", stack.gram64(chunk_bytes), solver, k)
        else:
            job = _Solve("svd", stack.materialize(torch.float32 if route == "svd32" else torch.float64), solver, k)
        return _run_solves([job])[0]
