"""Subspace alignment: do heads write where later heads read? (docs/reference.md §7)

Principal angles between two column spaces at rank r: take orthonormal bases Q_A, Q_B from the
top-r left singular vectors of A and B; the singular values of Q_Aᵀ·Q_B are the cosines of the
canonical angles (1: a shared direction, 0: orthogonal). `principal_angles(A, B, r)` is that, in
float64. `align(model, ...)` measures three things per layer, in the residual stream:

    head pairs     the output subspaces of two heads of a layer: O_h (or VO_h) column spaces
    head → layer   each head's output subspace against the layer's stacked output subspace
                   (top r of [O_1/s_1, ..., O_n/s_n], docs/reference.md §3)
    layer → next   layer L's stacked output subspace against layer L+1's read subspaces: the
                   row spaces of its stacked query, key and value maps (for MLA the composite
                   maps q_b·q_a and kv_b·kv_a with the RoPE rows, and the latent row spaces of
                   q_a and kv_a themselves), norms folded as in the spectra

The spectra cache holds no singular vectors, so `align` reads weights: it streams the layers it
needs (the adapter's plan, `stream_layers`; one layer held and one in flight, and of the layer
before only its r-dim output basis) and computes in float64 on the analysis device. Results
go to their own folder beside the spectra of the same model, commit and options
(`<analysis folder>/alignment-<O|VO>-r<rank>/layer-NNNN.safetensors`, written atomically as each
layer finishes), so a rerun computes only what is missing and an interrupted run resumes.

Random baseline: for independent uniformly random subspaces of dimensions a and b in R^d,
E‖Q_AᵀQ_B‖_F² = a·b/d, so the mean of the min(a, b) squared cosines is max(a, b)/d. Its root,
√(max(a, b)/d) (√(r/d) for two rank-r subspaces), is the RMS cosine that chance gives, and the
figures draw RMS cosines against it.

    >>> from svd_probe.alignment import align, principal_angles
    >>> principal_angles(A, B, r=8).cosines
    >>> res = align("deepseek-v3", layers="0-3", rank=64)
    >>> res.next_frame()        # layer L → L+1, per target Q, K, V, QA, KVA
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from svd_probe.adapters.base import AttentionFactors
from svd_probe.atomic import atomic_write, atomic_write_json
from svd_probe.cache.store import (
    MAX_MATRIX_SIDE,
    LayerFileRefused,
    SpectraCache,
    SpectraOptions,
    default_cache_root,
    layer_file_name,
    layer_of_file,
    read_json_object,
    read_layer_file,
    recorded_name,
    refuse_links_below,
)
from svd_probe.errors import (
    BadOptionError,
    CacheDamagedError,
    DiskWriteError,
    MissingFigureData,
    OfflineCacheMissError,
    TransferError,
    shown,
)
from svd_probe.options import layers_in_model
from svd_probe.results import CacheQuery, cache_repo, checked_dims, resolve_cached_commit

ALIGN_FORMAT = 1
WRITE_KINDS = ("O", "VO")
# The read targets, in table order: stacked maps, then the MLA latents' own row spaces.
TARGETS = ("Q", "K", "V", "QA", "KVA")
MAX_RANK = 1 << 14
# Problems whose smaller side is at most this go through a float64 SVD; larger ones (stacked O
# of DeepSeek-V3: 7168 × 16384) through the eigenvectors of their float64 Gram matrix, whose top
# vectors are accurate to ~eps64·σ₁²/gap, far below any cosine this module reports.
_SVD_SIDE = 2048
# float64 bytes per chunk of head-pair products (bounds peak memory: 128 heads at r = 64 is
# 537 MB unchunked).
_CHUNK_BYTES = 1 << 28
_MAX_META_CHARS = 1 << 20
# A run's folder, `alignment-<write>-r<rank>`; the rank in ASCII digits (`str.isdigit` took "r²",
# which int() refuses).
_RUN_DIR = re.compile(r"alignment-(O|VO)-r([0-9]{1,9})")
# The arrays of a layer file: the head-pair statistics, the head-layer cosines, and per target
# the layer before's cosines (`prev.<target>`, a target named as TARGETS names them).
_PAIR_STATS = ("mean", "rms", "max", "min")
_PREV_KEY = re.compile(r"prev\.([A-Za-z][A-Za-z0-9_]{0,31})")


# --- principal angles ------------------------------------------------------------------------------


def random_rms_cosine(rank_a: int, rank_b: int, dim: int) -> float:
    """√(max(a, b)/d): the RMS cosine of two independent random subspaces of R^d (module docstring).

    Example:
        >>> round(random_rms_cosine(64, 64, 7168), 4)
        0.0945
    """
    return math.sqrt(max(rank_a, rank_b) / dim) if dim else float("nan")


@dataclass(frozen=True)
class PrincipalAngles:
    """Cosines of the canonical angles between two subspaces, descending (min(rank_a, rank_b) values)."""

    cosines: np.ndarray
    rank_a: int
    rank_b: int
    dim: int

    @property
    def radians(self) -> np.ndarray:
        """The angles, ascending, in radians (scipy.linalg.subspace_angles gives them descending)."""
        return np.arccos(np.clip(self.cosines, 0.0, 1.0))

    @property
    def degrees(self) -> np.ndarray:
        return np.degrees(self.radians)

    @property
    def mean_cos(self) -> float:
        return float(self.cosines.mean()) if self.cosines.size else float("nan")

    @property
    def rms_cos(self) -> float:
        return float(np.sqrt((self.cosines**2).mean())) if self.cosines.size else float("nan")

    @property
    def random_rms_cos(self) -> float:
        """What two random subspaces of these dimensions give for `rms_cos`."""
        return random_rms_cosine(self.rank_a, self.rank_b, self.dim)


def _f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return torch.from_numpy(np.array(x, dtype=np.float64))


def left_basis(x: torch.Tensor, r: int) -> torch.Tensor:
    """Orthonormal top-r left singular vectors of x [..., m, k] (float64 [..., m, min(r, m, k)]).

    Tall x: thin QR, then the SVD of the small R. Wide x up to `_SVD_SIDE` rows: its SVD.
    Wider: the eigenvectors of the float64 Gram x·xᵀ.
    """
    x = x.to(torch.float64)
    m, k = int(x.shape[-2]), int(x.shape[-1])
    r = max(0, min(r, m, k))
    if m > k:
        q, rr = torch.linalg.qr(x)
        u = torch.linalg.svd(rr)[0]
        return q @ u[..., :r]
    if m <= _SVD_SIDE:
        return torch.linalg.svd(x, full_matrices=False)[0][..., :r]
    _, u = torch.linalg.eigh(x @ x.mT)
    return u.flip(-1)[..., :r]


def numerical_rank(x: torch.Tensor) -> int:
    """#{σ > max(m, n)·eps64·σ₁}: the rank scipy.linalg.orth keeps (and so subspace_angles)."""
    s = torch.linalg.svdvals(x.to(torch.float64))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > max(x.shape) * torch.finfo(torch.float64).eps * s[0]).sum())


def cosines(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between orthonormal bases qa [..., d, a] and qb [..., d, b]."""
    return torch.linalg.svdvals(qa.mT @ qb).clamp(0.0, 1.0)


def principal_angles(a, b, r: int | None = None) -> PrincipalAngles:
    """Principal angles between the column spaces of `a` and `b` at rank `r`.

    Args:
        a, b: matrices [d, n_a] and [d, n_b] (numpy or torch) in the same d-dim space.
        r: compare the spans of each one's top-r left singular vectors (None: the whole column
            space, of each matrix's numerical rank, as scipy.linalg.subspace_angles does).
    Returns:
        `PrincipalAngles`: cosines (descending, float64), ranks, d; `.degrees`, `.rms_cos`,
        `.random_rms_cos`.
    Example:
        >>> e = np.eye(4)
        >>> principal_angles(e[:, :2], e[:, 1:3]).cosines
        array([1., 0.])
    """
    ta, tb = _f64(a), _f64(b)
    if ta.ndim != 2 or tb.ndim != 2 or ta.shape[0] != tb.shape[0]:
        raise ValueError(f"need two matrices with the same number of rows, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    if r is not None and r < 1:
        raise ValueError(f"rank must be at least 1, got {r}")
    qa = left_basis(ta, r if r is not None else numerical_rank(ta))
    qb = left_basis(tb, r if r is not None else numerical_rank(tb))
    c = cosines(qa, qb).numpy()
    return PrincipalAngles(c, int(qa.shape[1]), int(qb.shape[1]), int(ta.shape[0]))


# --- one layer's subspaces ---------------------------------------------------------------------------


def _normalized(blocks: list[torch.Tensor], normalize: bool) -> list[torch.Tensor]:
    """Each block [n, a, c] with every matrix divided by its largest σ (zero matrices left as they are)."""
    if not normalize:
        return blocks
    out = []
    for b in blocks:
        s1 = torch.linalg.svdvals(b)[..., :1] if min(b.shape[-2:]) else b.new_ones(b.shape[0], 1)
        out.append(b / torch.where(s1 > 0, s1, torch.ones_like(s1))[..., None])
    return out


def write_maps(f: AttentionFactors, write: str) -> torch.Tensor:
    """Per head a matrix [d_model, k] with the column space and σ of O_h (write="O") or VO_h ("VO").

    VO_h = o_h·v_g has the left singular vectors and σ of o_h·F_gᵀ, F_g the thin factor of v_g
    (F_gᵀF_g = v_g·v_gᵀ): a d_model × d_v matrix instead of d_model × in_v.
    """
    from svd_probe.spectra.compute import thin_factor

    if f.o is None:
        raise ValueError("the factors have no output projection")
    o = f.o.to(torch.float64)
    if write == "O":
        return o
    if f.v is None:
        raise ValueError("VO needs the value projection")
    thin = thin_factor(f.v, "rows", "gram")
    return o @ thin[f.groups().to(thin.device)].mT


def read_targets(f: AttentionFactors) -> dict[str, tuple[list[torch.Tensor], torch.Tensor | None]]:
    """The read maps of a layer as (blocks [n, rows, c], read map [c, d_model] or None).

    The residual-stream map of a target is the blocks' rows stacked, times the read map: Q reads
    through q_read (MLA: q_a) with its RoPE rows, K through kv_read with MLA's shared RoPE key
    (kv_a_proj_with_mqa's last rows, which read the residual stream directly: the key blocks get
    zero columns for them and the RoPE key is one block [0 | I]), V through kv_read. QA and KVA are
    the latent projections' own row spaces.
    """
    out: dict[str, tuple[list[torch.Tensor], torch.Tensor | None]] = {}
    if f.q is not None:
        q = f.q if f.q_pe is None else torch.cat([f.q, f.q_pe], dim=1)
        out["Q"] = ([q], f.q_read)
    if f.k is not None:
        pe = f.layer.get("KVA_pe")
        if f.kv_read is not None and pe is not None and pe.shape[0] > 0:
            c, dr = int(f.kv_read.shape[0]), int(pe.shape[0])
            k = torch.cat([f.k, f.k.new_zeros(f.k.shape[0], f.k.shape[1], dr)], dim=2)
            eye = torch.eye(dr, dtype=pe.dtype, device=pe.device)
            rope = torch.cat([pe.new_zeros(dr, c), eye], dim=1)[None]
            out["K"] = ([k, rope], torch.cat([f.kv_read, pe], dim=0))
        else:
            out["K"] = ([f.k], f.kv_read)
    if f.v is not None:
        out["V"] = ([f.v], f.kv_read)
    for name in ("QA", "KVA"):
        m = f.layer.get(name)
        if m is not None:
            out[name] = ([m[None]], None)
    return out


def read_basis(blocks: list[torch.Tensor], read: torch.Tensor | None, r: int, normalize: bool) -> torch.Tensor:
    """Orthonormal top-r right singular vectors [d_model, r'] of the stacked read map.

    With a read map P [c, d_model]: Pᵀ = Q·R (thin QR), so block·P = (block·Rᵀ)·Qᵀ and the
    problem is solved in the c-dim latent coordinates (512 + 64 for DeepSeek-V3's keys), then
    mapped back by Q. Each head's block is divided by its own largest σ when `normalize`.
    """
    blocks = [b.to(torch.float64) for b in blocks]
    q = None
    if read is not None:
        q, rr = torch.linalg.qr(read.to(torch.float64).mT)
        blocks = [b @ rr.mT for b in blocks]
    blocks = _normalized(blocks, normalize)
    m = torch.cat([b.reshape(-1, b.shape[-1]) for b in blocks])
    v = left_basis(m.mT, r)
    return q @ v if q is not None else v


def stacked_write_basis(w: torch.Tensor, r: int, normalize: bool) -> torch.Tensor:
    """Top-r left singular vectors [d_model, r'] of the heads' write maps side by side (each / σ₁)."""
    (w,) = _normalized([w], normalize)
    n, d, k = (int(x) for x in w.shape)
    if n * k <= d or d <= _SVD_SIDE:
        return left_basis(w.permute(1, 0, 2).reshape(d, n * k), r)
    # Σ_h W_h·W_hᵀ over chunks of heads: the d × n·k stack itself is never formed.
    g = torch.zeros((d, d), dtype=torch.float64, device=w.device)
    per = max(1, _CHUNK_BYTES // (8 * d * k))
    for i in range(0, n, per):
        c = w[i : i + per].permute(1, 0, 2).reshape(d, -1)
        g.addmm_(c, c.mT)
    _, u = torch.linalg.eigh(g)
    return u.flip(-1)[:, : min(r, d, n * k)]


def head_pair_stats(u: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, RMS, max and min principal cosine between every two heads' bases u [n, d, r]: [n, n] each."""
    n, d, r = (int(x) for x in u.shape)
    out = {name: u.new_zeros((n, n)) for name in ("mean", "rms", "max", "min")}
    per = max(1, _CHUNK_BYTES // max(1, 8 * n * r * r))
    for i in range(0, n, per):
        c = torch.linalg.svdvals(torch.einsum("idr,jds->ijrs", u[i : i + per], u)).clamp(0.0, 1.0)
        out["mean"][i : i + per] = c.mean(-1)
        out["rms"][i : i + per] = (c**2).mean(-1).sqrt()
        out["max"][i : i + per] = c[..., 0]
        out["min"][i : i + per] = c[..., -1]
    return out


@dataclass
class LayerAlignment:
    """One layer's results (numpy float64): its head pairs, heads against the layer, and the
    layer before's output against this layer's reads (`prev`, empty when that layer was not asked)."""

    layer: int
    pairs: dict[str, np.ndarray]  # mean, rms, max, min: [n, n]
    head_layer: np.ndarray  # [n, min(head_rank, layer_rank)] cosines, descending
    prev: dict[str, np.ndarray]  # target → cosines of layer-1's output vs this layer's read subspace
    prev_layer: int | None
    ranks: dict  # head, layer, read: {target: r}, prev_write
    d_model: int


def layer_alignment(
    layer: int,
    f: AttentionFactors,
    rank: int,
    write: str,
    normalize: bool,
    prev: tuple[int, torch.Tensor] | None = None,
) -> tuple[LayerAlignment, torch.Tensor]:
    """Everything `align` measures for one layer from its factors, and its stacked output basis
    (for the next layer). `prev`: (layer − 1, its output basis), or None."""
    w = write_maps(f, write)
    d = int(w.shape[1])
    heads = left_basis(w, rank)
    basis = stacked_write_basis(w, rank, normalize)
    del w
    pairs = head_pair_stats(heads)
    head_layer = cosines(heads, basis[None])
    ranks: dict = {"head": int(heads.shape[-1]), "layer": int(basis.shape[-1]), "read": {}, "prev_write": None}
    prev_cos: dict[str, np.ndarray] = {}
    if prev is not None:
        ranks["prev_write"] = int(prev[1].shape[-1])
        for name, (blocks, read) in read_targets(f).items():
            rb = read_basis(blocks, read, rank, normalize)
            ranks["read"][name] = int(rb.shape[-1])
            prev_cos[name] = cosines(prev[1], rb).cpu().numpy()
    result = LayerAlignment(
        layer=layer,
        pairs={k: v.cpu().numpy() for k, v in pairs.items()},
        head_layer=head_layer.cpu().numpy(),
        prev=prev_cos,
        prev_layer=prev[0] if prev is not None else None,
        ranks=ranks,
        d_model=d,
    )
    return result, basis


# --- the cache ------------------------------------------------------------------------------------------


def _damaged(path: Path, why: str, hint: str) -> CacheDamagedError:
    return CacheDamagedError(f"damaged alignment cache file {path}: {why}", hint, path=str(path))


def _size(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_RANK


def _ranks_ok(ranks: object) -> bool:
    """The `ranks` a layer file records are what `layer_alignment` writes: head and layer ranks,
    prev_write (a rank, or None for a layer compared with none before it) and read (target →
    rank). `Alignment.records` takes each as an int: a "x" there ended `align`, `plot` and
    the export in a ValueError."""
    if not isinstance(ranks, dict) or not _size(ranks.get("head")) or not _size(ranks.get("layer")):
        return False
    read, prev = ranks.get("read", {}), ranks.get("prev_write")
    return (prev is None or _size(prev)) and isinstance(read, dict) and all(_size(r) for r in read.values())


class AlignmentStore:
    """The alignment folder beside one cached analysis: a manifest and a file per layer."""

    def __init__(self, cache: SpectraCache, write: str, rank: int):
        self.cache = cache
        self.write, self.rank = write, rank
        self.dir = cache.dir / f"alignment-{write}-r{rank}"
        refuse_links_below(cache.root, self.dir)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def layer_path(self, layer: int) -> Path:
        return self.dir / layer_file_name(layer)

    def cached_layers(self) -> list[int]:
        """Layers that have a file, named as `layer_path` names it (`store.layer_of_file`)."""
        if not self.dir.is_dir():
            return []
        return sorted(ly for p in self.dir.iterdir() if (ly := layer_of_file(p.name)) is not None)

    def read_manifest(self) -> dict:
        """The manifest, or {} where it is absent or unusable (it is rebuilt from the layer files).
        Read bounded, as the spectra cache's: a huge file or a link to /dev/zero costs 64 MiB at most."""
        obj, _ = read_json_object(self.manifest_path)
        return obj or {}

    def write_manifest(self, fields: dict) -> None:
        with self.cache.lock():
            old = self.read_manifest()
            new = {**old, **fields}
            if new != old:
                try:
                    atomic_write_json(self.manifest_path, new)
                except OSError as e:
                    raise DiskWriteError(f"cannot write {self.manifest_path}: {e.strerror or e}") from None

    def write_layer(self, la: LayerAlignment) -> Path:
        from safetensors.numpy import save_file

        tensors = {f"pairs.{k}": np.ascontiguousarray(v, dtype=np.float64) for k, v in la.pairs.items()}
        tensors["head_layer"] = np.ascontiguousarray(la.head_layer, dtype=np.float64)
        tensors |= {f"prev.{k}": np.ascontiguousarray(v, dtype=np.float64) for k, v in la.prev.items()}
        meta = {
            "format": str(ALIGN_FORMAT),
            "info": json.dumps(
                {"layer": la.layer, "prev_layer": la.prev_layer, "ranks": la.ranks, "d_model": la.d_model}
            ),
        }
        path = self.layer_path(la.layer)
        try:
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as e:
            raise DiskWriteError(
                f"cannot write the alignment cache at {path}: {e.strerror or e}",
                "Point --cache-dir at a writable folder with free space; layers already done are kept.",
            ) from None
        return path

    def read_layer(self, layer: int, hint: str = "") -> LayerAlignment:
        """One layer's results, checked: FileNotFoundError when absent, CacheDamagedError when unusable."""
        path = self.layer_path(layer)
        hint = hint or f"Delete {path}, or rerun `svd-probe align` with --force for this layer."
        known = {*(f"pairs.{k}" for k in _PAIR_STATS), "head_layer"}
        try:
            # Links, pipes, huge files and files larger than their header refused, on the file
            # opened (`read_layer_file`). Other names are left out (a later version's, or
            # anything): only these are kept, and only these are ever named in a message.
            meta, arrays = read_layer_file(path, lambda k: k in known or _PREV_KEY.fullmatch(k) is not None)
        except FileNotFoundError:
            raise
        except LayerFileRefused as e:
            raise _damaged(path, str(e), hint) from None
        except Exception as e:  # safetensors raises its own types for every kind of damage
            raise _damaged(path, f"not a readable safetensors file ({type(e).__name__})", hint) from None
        text = meta.get("info", "")
        try:
            info = json.loads(text) if len(text) <= _MAX_META_CHARS else None
        except (ValueError, RecursionError):
            info = None
        if not isinstance(info, dict) or not _ranks_ok(info.get("ranks")):
            raise _damaged(path, "its metadata is missing or malformed", hint)
        if info.get("layer") != layer:  # a file copied or renamed
            raise _damaged(
                path, f"it holds the alignment of layer {shown(info.get('layer'))}, not of layer {layer}", hint
            )
        for key, a in arrays.items():
            cos_range = a.size == 0 or (-1e-9 <= float(a.min()) and float(a.max()) <= 1 + 1e-9)
            if a.dtype != np.float64 or not np.isfinite(a).all() or not cos_range:
                raise _damaged(path, f"{key} is not a finite float64 array of cosines", hint)
        pairs = {k: arrays.get(f"pairs.{k}") for k in _PAIR_STATS}
        head_layer = arrays.get("head_layer")
        if any(p is None or p.ndim != 2 or p.shape[0] != p.shape[1] for p in pairs.values()) or head_layer is None:
            raise _damaged(path, "it lacks the head-pair or head-layer arrays", hint)
        n = next(iter(pairs.values())).shape[0]  # type: ignore[union-attr]
        if head_layer.ndim != 2 or head_layer.shape[0] != n or any(p.shape != (n, n) for p in pairs.values()):  # type: ignore[union-attr]
            raise _damaged(path, "its arrays disagree on the number of heads", hint)
        prev = {k[5:]: v for k, v in arrays.items() if k.startswith("prev.") and v.ndim == 1}
        prev_layer = info.get("prev_layer")
        if prev_layer is not None and type(prev_layer) is not int:
            raise _damaged(path, "its metadata is malformed", hint)
        # The width `Alignment.records` compares against (random_rms_cosine): a size of a
        # matrix side, as the spectra cache bounds the shapes it records.
        recorded = info.get("d_model")
        if type(recorded) is not int or not 1 <= recorded <= MAX_MATRIX_SIDE:
            raise _damaged(path, f"its d_model is not an int from 1 to {MAX_MATRIX_SIDE:,}", hint)
        d_model: int = recorded
        return LayerAlignment(
            layer=layer,
            pairs=pairs,  # type: ignore[arg-type]
            head_layer=head_layer,
            prev=prev,
            prev_layer=prev_layer,
            ranks=info["ranks"],
            d_model=d_model,
        )


# --- the result --------------------------------------------------------------------------------------


@dataclass
class Alignment:
    """The alignment of one model at one commit, rank and write kind; tables as pandas frames.

    `layers` maps a layer to its `LayerAlignment`. `records()` yields the tidy rows `export_alignment`
    writes: comparison `head_pair` (i < j), `head_layer` and `layer_next` (layer L−1 → L).
    """

    model: str
    commit: str
    revision: str
    options: SpectraOptions
    rank: int
    write: str
    dims: dict
    layers: dict[int, LayerAlignment]
    cache_dir: Path
    notes: list[str] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)  # layers computed by this call (the rest: cache)

    def _row(self, **fields) -> dict:
        return {"model": self.model, "revision": self.commit, "write": self.write, "rank": self.rank, **fields}

    def _stats(self, c: np.ndarray, a: int, b: int, d: int) -> dict:
        c = np.asarray(c, dtype=np.float64)
        return {
            "k": int(c.size),
            "mean_cos": float(c.mean()) if c.size else float("nan"),
            "rms_cos": float(np.sqrt((c**2).mean())) if c.size else float("nan"),
            "max_cos": float(c.max()) if c.size else float("nan"),
            "min_cos": float(c.min()) if c.size else float("nan"),
            "random_rms_cos": random_rms_cosine(a, b, d),
        }

    def records(self, cosines: bool = False, head_pairs: bool = True) -> Iterator[dict]:
        """Tidy rows, layer by layer; `cosines` adds each row's cosines (not for head pairs)."""
        for layer in sorted(self.layers):
            la = self.layers[layer]
            d, rh, rl = la.d_model, int(la.ranks.get("head", 0)), int(la.ranks.get("layer", 0))
            if head_pairs:
                n = la.pairs["mean"].shape[0]
                for i in range(n):
                    for j in range(i + 1, n):
                        yield self._row(
                            comparison="head_pair",
                            layer=layer,
                            other_layer=layer,
                            target=self.write,
                            head=i,
                            other_head=j,
                            k=rh,
                            mean_cos=float(la.pairs["mean"][i, j]),
                            rms_cos=float(la.pairs["rms"][i, j]),
                            max_cos=float(la.pairs["max"][i, j]),
                            min_cos=float(la.pairs["min"][i, j]),
                            random_rms_cos=random_rms_cosine(rh, rh, d),
                        )
            for h, c in enumerate(la.head_layer):
                row = self._row(
                    comparison="head_layer",
                    layer=layer,
                    other_layer=layer,
                    target=f"stacked {self.write}",
                    head=h,
                    other_head=None,
                    **self._stats(c, rh, rl, d),
                )
                yield {**row, "cosines": [float(x) for x in c]} if cosines else row
            for target in [t for t in TARGETS if t in la.prev] + sorted(set(la.prev) - set(TARGETS)):
                c = la.prev[target]
                a, b = int(la.ranks.get("prev_write") or 0), int(la.ranks.get("read", {}).get(target, c.size))
                row = self._row(
                    comparison="layer_next",
                    layer=la.prev_layer,
                    other_layer=layer,
                    target=target,
                    head=None,
                    other_head=None,
                    **self._stats(c, a, b, d),
                )
                yield {**row, "cosines": [float(x) for x in c]} if cosines else row

    def frame(self, comparison: str | None = None):
        """The tidy table (pandas), all comparisons or one of head_pair, head_layer, layer_next."""
        import pandas as pd

        rows = [r for r in self.records(head_pairs=comparison in (None, "head_pair"))]
        df = pd.DataFrame(rows)
        if comparison is not None and len(df):
            df = df[df["comparison"] == comparison].reset_index(drop=True)
        for col in ("head", "other_head", "layer"):
            if col in df:
                df[col] = df[col].astype("Int64")
        return df

    def next_frame(self):
        """Layer L−1 → L: one row per target (Q, K, V, and QA, KVA for MLA)."""
        return self.frame("layer_next")

    def head_layer_frame(self):
        return self.frame("head_layer")

    def pairs_matrix(self, layer: int, stat: str = "mean") -> np.ndarray:
        """[n, n] head×head principal-cosine statistic (mean, rms, max or min) of one layer."""
        if layer not in self.layers:
            raise BadOptionError(
                f"no alignment of layer {layer} cached", f"Layers with one: {', '.join(map(str, sorted(self.layers)))}."
            )
        return self.layers[layer].pairs[stat]


FORMATS = ("csv", "jsonl")


def export_alignment(alignment: Alignment, out: str | Path, format: str | None = None, overwrite: bool = False) -> int:
    """Write the tidy table as csv or jsonl (jsonl rows carry their cosines); returns the row count.

    The format comes from `format`, else from the file's suffix. An existing file is replaced only
    with `overwrite`; the file is written atomically.

    Example:
        >>> export_alignment(align("gpt2", layers="0-3"), "gpt2-align.csv")
    """
    from svd_probe.export import check_output_file, write_output_file

    out = Path(out)
    fmt = (format or out.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise BadOptionError(
            f"unknown alignment export format {fmt!r}", "Use a .csv or .jsonl file, or --export-format."
        )
    out = check_output_file(out, overwrite, flag="--export")
    n = 0

    def write(tmp: str) -> None:
        nonlocal n
        if fmt == "jsonl":
            with open(tmp, "w") as fh:
                for rec in alignment.records(cosines=True):
                    fh.write(json.dumps(rec) + "\n")
                    n += 1
        else:
            df = alignment.frame()
            df.to_csv(tmp, index=False)
            n = len(df)

    write_output_file(out, write, flag="--export", overwrite=overwrite)
    return n


# --- running it ------------------------------------------------------------------------------------------


def align_command(model: str, layers: str | None, rank: int, write: str, options: SpectraOptions, cache_dir) -> str:
    """The `svd-probe align` command for hints, each word shell-quoted where it needs it (as
    `results.analyze_command`): a folder `my model` or `$(...)` is pasted as one word."""
    parts = ["svd-probe", "align", str(model), "--rank", str(rank)]
    if write != "O":
        parts += ["--write", write]
    if layers:
        parts += ["--layers", layers]
    if not options.fold_norms:
        parts.append("--no-fold-norms")
    if not options.normalize_stacked:
        parts.append("--no-normalize-stacked")
    if options.layernorm_fold != "exact":
        parts += ["--layernorm-fold", options.layernorm_fold]
    if cache_dir is not None:
        parts += ["--cache-dir", str(cache_dir)]
    return shlex.join(parts)


def _check_args(rank: int, write: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise BadOptionError(f"bad --rank {rank!r}", f"Give a subspace rank from 1 to {MAX_RANK}, e.g. --rank 64.")
    if write not in WRITE_KINDS:
        raise BadOptionError(
            f"bad --write {write!r}", "Use --write O (output projections) or VO (fused value-output maps)."
        )


def _kinds(adapter, write: str, reads: bool) -> set[str]:
    want = {"O"} | ({"V", "VO"} if write == "VO" else set())
    if reads:
        want |= {"Q", "Q_pe", "K", "V", "QA", "KVA", "KVA_pe"}
    return want & set(adapter.supported_kinds())


def _pairable(prev: int, layer: int, n_main: int) -> bool:
    """Layer `prev` writes into what `layer` reads: consecutive and on the same side of the MTP
    boundary (an MTP layer reads its own embedding projection, not the last layer's stream)."""
    return prev == layer - 1 and (layer < n_main or prev >= n_main)


def _check_rank_fits(rank: int, d_model: int | None) -> None:
    """A rank-d_model subspace is the whole residual stream: every layer's output subspace would
    be all of it, and each cosine against it 1 (`--rank 64` of a d_model-64 model printed a
    table of 1.000s with only a note about d_v)."""
    if d_model is not None and rank >= d_model:
        raise BadOptionError(
            f"--rank {rank} is not below the model's d_model {d_model}: every subspace compared would be "
            "the whole residual stream, every cosine 1",
            f"Give --rank from 1 to {d_model - 1}.",
        )


def _fitting_rank(d_model: int | None) -> int:
    """The rank a hint suggests: 64, or half of a d_model of 64 or less (which refuses 64)."""
    return 64 if not d_model or d_model > 64 else max(1, d_model // 2)


def _whole_stream_note(store: AlignmentStore, d_model: int, layers: list[int] | None = None) -> str:
    what = f"layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))} of " if layers else ""
    return (
        f"{what}{store.dir} left out: its rank {store.rank} is not below d_model {d_model} (a run from before "
        "`align` refused such ranks), so every subspace it compared was the whole residual stream and every "
        "cosine 1; delete the folder"
    )


def _main_layers(dims: dict) -> int | None:
    n, mtp = dims.get("num_layers"), dims.get("num_mtp_layers") or 0
    return n - mtp if n is not None else None


def _asked_pairs(layers: dict[int, LayerAlignment], asked: set[int], n_main: int | None) -> dict[int, LayerAlignment]:
    """`layers` with each one's L-1 → L comparison (`prev`) kept only where layer L-1 was asked too
    and writes what L reads (`_pairable`): a layer file keeps the comparison of the run that wrote
    it, and `align --layers 1` showed a 0 → 1 row although layer 0 was not asked."""
    out = {}
    for ly, la in layers.items():
        p = la.prev_layer
        keep = p is not None and p in asked and (_pairable(p, ly, n_main) if n_main is not None else p == ly - 1)
        if p is not None and not keep:
            la = dataclasses.replace(la, prev={}, prev_layer=None, ranks={**la.ranks, "prev_write": None})
        out[ly] = la
    return out


def _from_store(
    store: AlignmentStore, layers: list[int], notes: list[str], hint: str, recompute: bool = True
) -> dict[int, LayerAlignment]:
    have = {}
    for ly in layers:
        try:
            have[ly] = store.read_layer(ly, hint)
        except FileNotFoundError:
            continue
        except CacheDamagedError as e:
            notes.append(f"recomputing layer {ly}: {e.message}" if recompute else e.message)
    return have


def align(
    model: str,
    *,
    layers: str | list[int] | None = None,
    rank: int = 64,
    write: str = "O",
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    fold_norms: bool = True,
    normalize_stacked: bool = True,
    layernorm_fold: str = "exact",
    include_mtp: bool = False,
    device: str = "auto",
    force: bool = False,
    concurrency: int = 8,
    progress=None,
    read_options: dict | None = None,
) -> Alignment:
    """Stream a checkpoint's attention weights and measure the principal angles of the module docstring.

    Args:
        model: alias, Hub repo id or local folder (as for `analyze`).
        layers: e.g. "0-3,10" (default: every layer; MTP layers only with `include_mtp`). Layer
            L → L+1 is measured for the consecutive pairs among them.
        rank: r, the dimension of every subspace compared: below d_model (heads: at most d_v).
        write: "O" (column spaces of the output projection's head blocks) or "VO" (of O_h·V_h).
        revision, token, endpoint, cache_dir, fold_norms, normalize_stacked, layernorm_fold,
            device, concurrency: as for `analyze`; the results are cached beside the spectra of the
            same model, commit and options.
        force: recompute layers already cached.
        progress: a `report.LayerProgress`-like sink (start, layer_done), or None.
    Returns:
        An `Alignment` of the asked layers (computed now or read from the cache).
    Raises:
        BadOptionError for a bad rank (one of d_model or more too), write kind or layer;
        OfflineCacheMissError when the Hub cannot be reached and the cache lacks a layer.
    Example:
        >>> res = align("deepseek-v3", layers="0-3", rank=64)
        >>> res.next_frame()[["layer", "other_layer", "target", "rms_cos", "random_rms_cos"]]
    """
    from huggingface_hub.errors import OfflineModeIsEnabled

    from svd_probe.adapters import adapter_for
    from svd_probe.analysis import layernorm_fold_option
    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.stream import stream_layers
    from svd_probe.models import resolve_model
    from svd_probe.options import parse_layers, pick_device, select_layers

    _check_args(rank, write)
    layer_spec = parse_layers(layers)
    ref = resolve_model(model)
    dev = pick_device(device)
    root = default_cache_root(cache_dir)
    spec_text = layers if isinstance(layers, str) else (",".join(map(str, layers)) if layers else None)

    def check(config: dict) -> None:
        dims = adapter_for(config).dims()
        select_layers(layer_spec, dims, include_mtp)
        _check_rank_fits(rank, dims.d_model)

    try:
        source = open_checkpoint(
            ref,
            revision=revision,
            token=token,
            endpoint=endpoint,
            concurrency=concurrency,
            check_config=check,
            **(read_options or {}),
        )
    except (TransferError, OfflineModeIsEnabled) as e:
        if ref.is_local:
            raise
        options = SpectraOptions(fold_norms, normalize_stacked, layernorm_fold)
        query = CacheQuery(model, revision, cache_dir, options)
        try:
            cached = load_alignment(query, rank=rank, write=write, layers=layer_spec)
        except MissingFigureData:
            cached = None
        if cached is not None:
            _check_rank_fits(rank, cached.dims.get("d_model"))
        n_cached = (_main_layers(cached.dims) or 0) if cached else 0
        # A range, never a list: the manifest's num_layers is bounded by 2^31 only.
        need = layer_spec if layer_spec is not None else range(n_cached)
        if cached is None or not need or any(ly not in cached.layers for ly in need):
            why = f" ({cached.notes[0]})" if cached is not None and cached.notes else ""
            raise OfflineCacheMissError(
                f"the Hub is unreachable ({getattr(e, 'message', e)}), and the alignment cache lacks layers of {ref.display}{why}",
                "Reconnect (or unset HF_HUB_OFFLINE) and rerun the same command.",
            ) from None
        cached.notes.insert(0, "the Hub is unreachable: alignment read from the cache; nothing was fetched")
        return cached

    with source:
        adapter = adapter_for(source.config, source.tensor_names)
        dims = adapter.dims()
        wanted = select_layers(layer_spec, dims, include_mtp)
        n_main = dims.num_layers - dims.num_mtp_layers
        options = SpectraOptions(
            fold_norms, normalize_stacked, layernorm_fold_option(adapter, fold_norms, layernorm_fold)
        )
        cache = SpectraCache(root, cache_repo(ref), source.commit, options)
        store = AlignmentStore(cache, write, rank)
        notes: list[str] = []
        hint = "Rerun: " + align_command(model, spec_text, rank, write, options, cache_dir) + " --force"
        have = {} if force else _from_store(store, wanted, notes, hint)
        in_set = set(wanted)

        def complete(ly: int) -> bool:
            la = have.get(ly)
            if la is None:
                return False
            needs_prev = (ly - 1) in in_set and _pairable(ly - 1, ly, n_main)
            return (la.prev_layer == ly - 1) if needs_prev else True

        todo = [ly for ly in wanted if not complete(ly)]
        # A layer to compute whose predecessor is cached needs that predecessor's output basis:
        # its output projection is read again (o_proj alone, or with v for VO).
        basis_only = sorted(
            {ly - 1 for ly in todo if ly - 1 in in_set and ly - 1 not in todo and _pairable(ly - 1, ly, n_main)}
        )
        items = sorted(set(todo) | set(basis_only))
        # Read maps are needed only where the layer before is in the set to compare against.
        full_kinds, write_kinds = _kinds(adapter, write, True), _kinds(adapter, write, False)
        reads = {ly for ly in todo if ly - 1 in in_set and _pairable(ly - 1, ly, n_main)}
        kinds_of = {ly: (full_kinds if ly in reads else write_kinds) for ly in items}
        # The revision's commit, for `load_alignment` and offline reruns (as `analyze` records it).
        SpectraCache.write_ref(root, cache_repo(ref), revision or "main", source.commit)
        store.write_manifest(
            {
                "format": ALIGN_FORMAT,
                "model": ref.display,
                "repo_id": ref.repo_id,
                "revision": revision,
                "commit": source.commit,
                "options": dataclasses.asdict(options),
                "rank": rank,
                "write": write,
                "dims": dataclasses.asdict(dims),
            }
        )
        if progress is not None:
            progress.start(
                total_layers=len(wanted),
                cached_layers=len(wanted) - len(todo),
                bytes_source=lambda: source.bytes_fetched,
            )
        prev: tuple[int, torch.Tensor] | None = None
        with torch.no_grad():
            for layer, tensors in stream_layers(
                source, items, lambda ly: adapter.plan(ly, kinds_of[ly], fold_norms), dev
            ):
                kinds = kinds_of[layer]
                f = adapter.factors(layer, tensors, kinds, fold_norms, options.layernorm_fold)
                del tensors
                use_prev = prev if (prev is not None and _pairable(prev[0], layer, n_main)) else None
                if layer in todo:
                    la, basis = layer_alignment(layer, f, rank, write, normalize_stacked, use_prev)
                    store.write_layer(la)
                    have[layer] = la
                    if progress is not None:
                        progress.layer_done(layer)
                else:
                    w = write_maps(f, write)
                    basis = stacked_write_basis(w, rank, normalize_stacked)
                    del w
                del f
                prev = (layer, basis)
    if dims.d_v < rank:
        notes.append(f"heads have d_v = {dims.d_v} < rank {rank}: head subspaces are {dims.d_v}-dimensional")
    return Alignment(
        model=ref.display,
        commit=source.commit,
        revision=revision,
        options=options,
        rank=rank,
        write=write,
        dims=dataclasses.asdict(dims),
        layers=_asked_pairs({ly: have[ly] for ly in wanted}, in_set, n_main),
        cache_dir=store.dir,
        notes=notes,
        computed=todo,
    )


def load_alignment(
    query: CacheQuery | str,
    *,
    rank: int | None = None,
    write: str | None = None,
    layers: list[int] | None = None,
) -> Alignment:
    """A cached `svd-probe align` run of the analysis `query` names, from disk alone.

    With several cached runs (ranks, write kinds), `rank` and `write` pick one; otherwise the most
    recently written. Raises `MissingFigureData` (a `CacheMissError`; hint: the align command)
    when none is cached.

    Example:
        >>> res = load_alignment(CacheQuery("deepseek-v3", cache_dir="cache"), rank=64)
    """
    query = query if isinstance(query, CacheQuery) else CacheQuery(query)
    ref = query.ref
    hint = align_command(query.name, None, rank or 64, write or "O", query.options, query.cache_dir)
    commit = resolve_cached_commit(query, ref)
    if commit is None:
        raise MissingFigureData(f"{ref.display}: no alignment cached (the revision was never analyzed)", hint)
    base = SpectraCache(query.root, cache_repo(ref), commit, query.options)
    if rank is None:  # the hint's rank, below the analysis' d_model (--rank 64 of a d_model-64 model is refused)
        fits = _fitting_rank(checked_dims(base.read_manifest().get("dims")).get("d_model"))
        hint = align_command(query.name, None, fits, write or "O", query.options, query.cache_dir)
    runs = []
    for d in base.dir.glob("alignment-*-r*") if base.dir.is_dir() else []:
        m = _RUN_DIR.fullmatch(d.name)
        if m is None or d.is_symlink() or not d.is_dir():  # a link could lead out of the cache
            continue
        w, r = m.group(1), int(m.group(2))
        if (rank is None or r == rank) and (write in (None, w)):
            store = AlignmentStore(base, w, r)
            if store.cached_layers():
                runs.append((store.manifest_path.stat().st_mtime if store.manifest_path.is_file() else 0.0, store))
    if not runs:
        raise MissingFigureData(f"{ref.display}: no alignment cached at {commit[:12]} with these options", hint)
    notes: list[str] = []
    # The most recent run whose rank is below d_model: one at d_model or more (cached before
    # `align` refused such ranks) compared the whole residual stream with itself, every cosine 1.
    d_model = 0
    for _, store in sorted(runs, key=lambda x: x[0], reverse=True):
        manifest = store.read_manifest()
        dims = checked_dims(manifest.get("dims"))
        if not dims.get("d_model") or store.rank < dims["d_model"]:
            break
        d_model = dims["d_model"]
        notes.append(_whole_stream_note(store, d_model))
    else:
        if rank is not None:
            _check_rank_fits(rank, d_model)  # the BadOptionError `align --rank` gives online
        hint = align_command(query.name, None, _fitting_rank(d_model), write or "O", query.options, query.cache_dir)
        raise MissingFigureData(f"{ref.display}: no usable alignment cached: {'; '.join(notes)}", hint)
    cached = store.cached_layers()
    wanted = cached if layers is None else sorted(set(layers) & set(cached))
    wanted, left_out = layers_in_model(wanted, dims.get("num_layers"), store.layer_path)
    notes += [left_out] if left_out else []
    # A damaged file is recomputed by rerunning the run it belongs to, at its rank and write kind.
    rerun = align_command(query.name, None, store.rank, store.write, query.options, query.cache_dir)
    got = _from_store(store, wanted, notes, rerun + " --force", recompute=False)
    # A run without a manifest's dims: each layer file records its d_model.
    whole = [ly for ly, la in got.items() if store.rank >= la.d_model]
    if whole:
        notes.append(_whole_stream_note(store, got[whole[0]].d_model, whole))
        got = {ly: la for ly, la in got.items() if ly not in whole}
    if not got:
        raise MissingFigureData(
            f"{ref.display}: no readable alignment layers cached" + (f"; {'; '.join(notes)}" if notes else ""), hint
        )
    got = _asked_pairs(got, set(cached if layers is None else layers), _main_layers(dims))
    return Alignment(
        model=recorded_name(manifest.get("model")) or ref.display,
        commit=commit,
        revision=query.revision,
        options=query.options,
        rank=store.rank,
        write=store.write,
        dims=dims,
        layers=got,
        cache_dir=store.dir,
        notes=notes,
    )
