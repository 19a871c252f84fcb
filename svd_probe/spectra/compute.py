"""Singular-value spectra of one layer's attention, computed through the factors (docs/reference.md §3).

`layer_spectra(factors, kinds)` returns, for every requested key `<scope>.<matrix>`, the σ
(float64, CPU, descending) and the shape (m, n) of the matrix they belong to.

The whole module rests on one identity: if FᵀF = AᵀA then A = P·F for some P with orthonormal
columns, so σ(A·B) = σ(F·B) and, for a stack of blocks, σ([A_1; A_2; ...]) is unchanged when
each block A_i is swapped for its own F_i (blockdiag(P_i) has orthonormal columns). We compute
one small square factor per head and per kind once ("thin factors", k×k with k = d_qk, d_rope or
d_v) and everything else follows from them:

    head.Q, Q_pe, K, V, O   σ(F)                                   k×k
    head.VO                 σ(F_O,h · F_V,gᵀ)                      d_v×d_v   (not d_model×in_v)
    head.QK                 σ(F_Q,h · F_K,gᵀ)                      d_qk×d_qk (not in_q×in_k)
    stacked.Q/Q_pe/K/V      rows q_h/s_h stacked                   [n·d, in]
    stacked.O               columns o_h/s_h side by side           [d_model, n·d_v]
    stacked.VO              columns o_h·F_V,gᵀ/s_h                 [d_model, n·d_v] (not n·in_v)
    stacked.QK              rows F_Q,h·k_g/s_h                     [n·d_qk, in_k] (not n·in_q)
    stacked.KQ              rows F_K,g·q_h/s_h (the transpose)     [n·d_qk, in_q] (not n·in_k)
    layer.QA/KVA/KVA_pe     the matrix itself                      [out, in]

where F_X,h is the thin factor of head h (X_h X_hᵀ = F_XᵀF_X for the wide q, q_pe, k, v blocks,
o_hᵀo_h = F_OᵀF_O for the tall o blocks) and s_h the head's own largest σ of that kind.
Where a reduced problem has fewer singular values than the matrix it stands for, the missing
ones are exact zeros (rank ≤ inner dimension) and are appended, so every spectrum has min(m, n)
entries, as `np.linalg.svd` of the materialized matrix would give.

Routes (`SpectraConfig`) choose how each step runs; "auto" picks per device (`AUTO_ROUTES`):
- thin factors: "gram" forms the k×k Gram in float64 and takes its Cholesky factor (batched),
  falling back to an eigendecomposition for heads whose Gram is singular to working precision
  (planted low ranks); "qr" takes R of a thin QR instead.
- small square problems (per head): batched SVD in float64 (gesvda on CUDA).
- stacked / layer problems: "gram64" = eigvalsh of the float64 Gram of the smaller side;
  "svd32"/"svd64" = svdvals of the tall orientation (gesvda on CUDA) in float32/float64.
  For stacked O and VO the float64 Gram Σ_h B_h B_hᵀ (d_model × d_model) is accumulated over
  chunks of heads, so the stacked matrix itself is never formed on that route.
A float32 Gram is never used: it loses every σ below ~1e-4·σ₁ (σ² carries an absolute error of
about eps32·σ₁²). A float64 Gram's absolute error in σ is about sqrt(eps64)·σ₁ ≈ 1.5e-8·σ₁.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from svd_probe.adapters.base import AttentionFactors
from svd_probe.kinds import HEAD, LAYER, STACKED, SpectrumKey, parse_key, spectrum_keys

Result = dict[str, tuple[torch.Tensor, tuple[int, int]]]

_FACTOR_ROUTES = ("gram", "qr")
_SOLVE_ROUTES = ("gram64", "svd32", "svd64")


@dataclass(frozen=True)
class SpectraConfig:
    """How to compute; every choice gives the same σ to within the 1e-4·σ₁ contract.

    `stacked` applies to stacked and layer problems whose smaller side is at most `big_side`;
    `big` to the rest (DeepSeek-V3: stacked O and VO, 7168 × 16384 after reduction).
    """

    factor: str = "auto"
    stacked: str = "auto"
    big: str = "auto"
    big_side: int = 2048
    # Bytes of float64 scratch per chunk when forming Grams; bounds peak memory on CPU hosts.
    chunk_bytes: int = 1 << 28
    # On CUDA, solve the big stacked problems (O and VO) at the same time, each on its own
    # stream from its own host thread: cuSOLVER's float64 eigvalsh at 7168 is a chain of
    # bandwidth-bound, low-occupancy kernels with host round trips, so two of them overlap.
    concurrent: bool = True

    def resolved(self, device: torch.device) -> SpectraConfig:
        auto = AUTO_ROUTES["cuda" if device.type == "cuda" else "cpu"]
        picked = {
            name: getattr(self, name) if getattr(self, name) != "auto" else auto[name]
            for name in ("factor", "stacked", "big")
        }
        for name, ok in (("factor", _FACTOR_ROUTES), ("stacked", _SOLVE_ROUTES), ("big", _SOLVE_ROUTES)):
            if picked[name] not in ok:
                raise ValueError(f"SpectraConfig.{name}={picked[name]!r}: choose from {ok} or 'auto'")
        return replace(self, **picked)


# What "auto" means per device. The float64 Gram routes are accurate on any input (σ error
# ~sqrt(eps64)·σ₁); whether gesvda ("svd32"/"svd64") is both faster and accurate on CUDA is what
# benchmarks/bench_spectra.py measures on a deliberately ill-conditioned layer: its "fastest
# accurate routes" line is the candidate for the "cuda" entry. On CPU, LAPACK's SVD of the
# reduced matrices was 1.3-2x slower than float64 GEMM + eigvalsh (bench at --scale 0.125/0.25).
AUTO_ROUTES = {
    "cuda": {"factor": "gram", "stacked": "gram64", "big": "gram64"},
    "cpu": {"factor": "gram", "stacked": "gram64", "big": "gram64"},
}


DEFAULT_CONFIG = SpectraConfig()


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


def _gram(x: torch.Tensor, side: str, chunk_bytes: int) -> torch.Tensor:
    """float64 Gram of each matrix in a batch: x xᵀ ("rows") or xᵀx ("cols"), chunked over the batch.

    Chunking keeps the float64 copy of the inputs bounded (o of DeepSeek-V3 is 940 MB in float64).
    """
    b, m, n = x.shape
    per = max(1, chunk_bytes // max(1, m * n * 8))
    k = m if side == "rows" else n
    out = torch.empty((b, k, k), dtype=torch.float64, device=x.device)
    for i in range(0, b, per):
        c = x[i : i + per].to(torch.float64)
        out[i : i + per] = c @ c.mT if side == "rows" else c.mT @ c
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


def solve(m: torch.Tensor, route: str, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """σ (float64, descending, min(rows, cols) values) of one matrix, by `route`."""
    r, c = m.shape
    k = min(r, c)
    if k == 0:
        return m.new_zeros(0, dtype=torch.float64)
    if route == "gram64":
        tall = m if r >= c else m.mT  # Gram of the smaller side: k×k
        g = torch.zeros((k, k), dtype=torch.float64, device=m.device)
        per = max(1, chunk_bytes // (k * 8))
        for i in range(0, tall.shape[0], per):
            blk = tall[i : i + per].to(torch.float64)
            g.addmm_(blk.mT, blk)
        lam = torch.linalg.eigvalsh(g)
        return lam.flip(-1).clamp_min(0).sqrt()
    if route == "svd32":
        return _sorted_desc(svdvals(m.to(torch.float32)).to(torch.float64))
    if route == "svd64":
        return _sorted_desc(svdvals(m.to(torch.float64)))
    raise ValueError(f"unknown solve route {route!r}")


# --- the layer -----------------------------------------------------------------------------------


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
    }
    scoped = {parse_key(k) for k in kinds if "." in k}
    keys = {k for k in scoped if k is not None} | set(spectrum_keys(k for k in kinds if "." not in k))

    def available(key: SpectrumKey) -> bool:
        return factors.layer.get(key.kind) is not None if key.scope == LAYER else needs[key.kind]

    return [str(key) for key in sorted(keys) if available(key)]


class _Layer:
    """Lazily computed pieces of one layer, each at most once (factors, per-head σ)."""

    def __init__(self, f: AttentionFactors, cfg: SpectraConfig):
        self.f = f
        self.cfg = cfg
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def grp(self) -> torch.Tensor:
        """Key/value group of each query head, as an index tensor on the factors' device."""
        f = self.f
        dev = next(t for t in (f.q, f.o, f.k, f.v) if t is not None).device
        return self._memo("grp", lambda: f.groups().to(device=dev, dtype=torch.long))

    def _memo(self, name, fn):
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    def _as_float(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype in (torch.float32, torch.float64) else t.float()

    # thin factors: [heads or groups, k, k] float64
    def factor(self, kind: str) -> torch.Tensor:
        src = {"Q": self.f.q, "Q_pe": self.f.q_pe, "K": self.f.k, "V": self.f.v, "O": self.f.o}[kind]
        side = "cols" if kind == "O" else "rows"
        return self._memo(
            "F" + kind, lambda: thin_factor(self._as_float(src), side, self.cfg.factor, self.cfg.chunk_bytes)
        )

    # per-head σ, float64 on the device, padded to min(m, n)
    def head(self, kind: str) -> torch.Tensor:
        return self._memo("S" + kind, lambda: self._head(kind))

    def _head(self, kind: str) -> torch.Tensor:
        m, n = self.head_shape(kind)
        if kind in ("Q", "Q_pe", "K", "V", "O"):
            core = self.factor(kind)
        elif kind == "VO":
            core = self.factor("O") @ self.factor("V")[self.grp].mT  # [n, d_v, d_v]
        elif kind == "QK":
            core = self.factor("Q") @ self.factor("K")[self.grp].mT  # [n, d_qk, d_qk]
        else:
            raise KeyError(kind)
        return _pad(_sorted_desc(svdvals(core)), min(m, n))

    def head_shape(self, kind: str) -> tuple[int, int]:
        f = self.f
        if kind == "Q":
            return tuple(f.q.shape[1:])
        if kind == "Q_pe":
            return tuple(f.q_pe.shape[1:])
        if kind == "K":
            return tuple(f.k.shape[1:])
        if kind == "V":
            return tuple(f.v.shape[1:])
        if kind == "O":
            return tuple(f.o.shape[1:])
        if kind == "VO":
            return (f.o.shape[1], f.v.shape[2])
        if kind == "QK":
            return (f.q.shape[2], f.k.shape[2])
        raise KeyError(kind)

    def scale(self, kind: str, normalize: bool, dtype) -> torch.Tensor:
        """1/s_h per head (or group) for stacking; heads with σ₁ = 0 stay as they are (zero)."""
        s1 = self.head(kind)[:, 0]
        if not normalize:
            return torch.ones_like(s1, dtype=dtype)
        return torch.where(s1 > 0, 1.0 / torch.where(s1 > 0, s1, torch.ones_like(s1)), torch.ones_like(s1)).to(dtype)

    def stacked(self, kind: str, normalize: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        f = self.f
        n = f.n_heads if (f.q is not None or f.o is not None) else 0  # K/V alone need no n

        # The reduced stacked matrix is built in float64 when a float64 solver reads it, else in
        # float32 (half the memory traffic for gesvda's float32 route).
        def work_dtype(mat_small_side: int) -> torch.dtype:
            route = self.cfg.big if mat_small_side > self.cfg.big_side else self.cfg.stacked
            return torch.float32 if route == "svd32" else torch.float64

        if kind in ("Q", "Q_pe", "K", "V"):
            x = {"Q": f.q, "Q_pe": f.q_pe, "K": f.k, "V": f.v}[kind]
            b, d, inp = x.shape
            shape = (b * d, inp)
            dt = work_dtype(min(shape))
            red = (self._as_float(x).to(dt) * self.scale(kind, normalize, dt)[:, None, None]).reshape(b * d, inp)
        elif kind in ("O", "VO"):
            _, dm, dv = f.o.shape
            shape = (dm, n * (dv if kind == "O" else f.v.shape[2]))
            dt = work_dtype(min(shape))
            sc = self.scale(kind, normalize, dt)
            fv = self.factor("V")[self.grp].to(dt) if kind == "VO" else None

            def blocks(i0: int, i1: int) -> torch.Tensor:
                """Heads i0:i1 of the reduced stack, [c, d_model, r]: o_h/s_h or o_h F_Vᵀ/s_h."""
                ob = self._as_float(f.o[i0:i1]).to(dt) * sc[i0:i1, None, None]
                return ob if fv is None else ob @ fv[i0:i1].mT

            route = self.cfg.big if min(shape) > self.cfg.big_side else self.cfg.stacked
            r_blk = dv if fv is None else fv.shape[1]
            if route == "gram64" and dm <= n * r_blk:
                # Σ_h B_h B_hᵀ accumulated over chunks of heads: the [d_model, n·r] stack and
                # its float64 copies never exist at once (3 × 940 MB for DeepSeek-V3's VO).
                g = torch.zeros((dm, dm), dtype=torch.float64, device=f.o.device)
                per = max(1, self.cfg.chunk_bytes // max(1, dm * r_blk * 8))
                for i in range(0, n, per):
                    c = blocks(i, min(n, i + per)).to(torch.float64).permute(1, 0, 2).reshape(dm, -1)
                    g.addmm_(c, c.mT)
                sigma = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0).sqrt()
                return _pad(sigma, min(shape)), shape
            red = blocks(0, n).permute(1, 0, 2).reshape(dm, -1)
        elif kind in ("QK", "KQ"):
            in_q, in_k = f.q.shape[2], f.k.shape[2]
            shape = (n * in_q, in_k) if kind == "QK" else (in_q, n * in_k)
            dt = work_dtype(min(shape))
            sc = self.scale("QK", normalize, dt)[:, None, None]
            if kind == "QK":
                # rows of QK_h = P_Q F_Q k_g: drop P_Q (blockdiag, orthonormal columns)
                red = ((self.factor("Q").to(dt) * sc) @ self._as_float(f.k)[self.grp].to(dt)).reshape(-1, in_k)
            else:
                # columns of QK_h = q_hᵀ F_Kᵀ P_Kᵀ: drop P_Kᵀ; stored transposed (same σ)
                red = ((self.factor("K")[self.grp].to(dt) * sc) @ self._as_float(f.q).to(dt)).reshape(-1, in_q)
        else:
            raise KeyError(kind)
        route = self.cfg.big if min(shape) > self.cfg.big_side else self.cfg.stacked
        return _pad(solve(red, route, self.cfg.chunk_bytes), min(shape)), shape

    def layer(self, kind: str) -> tuple[torch.Tensor, tuple[int, int]]:
        w = self._as_float(self.f.layer[kind])
        shape = tuple(w.shape)
        route = self.cfg.big if min(shape) > self.cfg.big_side else self.cfg.stacked
        return solve(w, route, self.cfg.chunk_bytes), shape


def layer_spectra(
    factors: AttentionFactors,
    kinds,
    *,
    normalize_stacked: bool = True,
    config: SpectraConfig | None = None,
) -> Result:
    """Spectra of one layer: {"head.VO": (σ [n, k], (m, n)), "stacked.O": (σ [k], (m, n)), ...}.

    `kinds`: matrix names (Q, Q_pe, K, V, O, VO, QK, KQ, QA, KVA, KVA_pe: each in every scope it
    exists in) and/or scoped keys such as "stacked.VO". Kinds whose factors are missing are left
    out. σ are float64 CPU tensors, descending, min(m, n) per spectrum; head-scope K and V have one
    row per key/value group. Runs on the device of the factors.
    """
    keys = requested_keys(factors, kinds)
    if not keys:
        return {}
    any_t = next(t for t in (factors.q, factors.o, factors.k, factors.v, *factors.layer.values()) if t is not None)
    cfg = (config or DEFAULT_CONFIG).resolved(any_t.device)
    out: Result = {}
    with _full_fp32_matmul(), torch.no_grad():
        lay = _Layer(factors, cfg)

        def compute(key: str):
            parsed = SpectrumKey.parse(key)
            scope, kind = parsed.scope, parsed.kind
            if scope == HEAD:
                sigma, shape = lay.head(kind), lay.head_shape(kind)
            elif scope == STACKED:
                sigma, shape = lay.stacked(kind, normalize_stacked)
            else:
                sigma, shape = lay.layer(kind)
            return sigma.to("cpu", torch.float64), (int(shape[0]), int(shape[1]))

        big = [k for k in keys if k in ("stacked.O", "stacked.VO")] if (cfg.concurrent and any_t.is_cuda) else []
        if len(big) == 2:
            out.update(_concurrently(lay, big, compute))
        for key in keys:
            if key not in out:
                out[key] = compute(key)
    return {k: out[k] for k in keys}


def _concurrently(lay: _Layer, keys: list[str], compute) -> Result:
    """Compute `keys` at once, one CUDA stream and host thread each (see SpectraConfig.concurrent).

    Everything they share is computed first, on the caller's stream: the per-head spectra that
    give the 1/σ₁ scales and V's thin factors, so the threads only read the memo."""
    from concurrent.futures import ThreadPoolExecutor

    lay.head("O"), lay.head("VO"), lay.factor("V")
    caller = torch.cuda.current_stream()

    def run(key: str):
        stream = torch.cuda.Stream(device=caller.device)
        stream.wait_stream(caller)  # the shared inputs above are complete before we read them
        with torch.cuda.stream(stream):
            return key, compute(key)  # .to("cpu") in compute waits for this stream's work

    with ThreadPoolExecutor(len(keys)) as pool:
        return dict(pool.map(run, keys))
