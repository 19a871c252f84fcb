"""`diff`: spectra of the weight difference TUNED − BASE of two checkpoints of one architecture.

    base, tuned = open_checkpoint(BASE), open_checkpoint(TUNED)   # configs compared first
    check the plans and every planned header shape of both       # before any tensor byte
    for layer in zip(stream_layers(base), stream_layers(tuned)): # each read once, attention only
        fb, ft = adapter.factors(base layer), adapter.factors(tuned layer)   # each folds its norms
        delta, reference = diff_layer_spectra(fb, ft, kinds)     # through factors, as `analyze`
        cache.update_layer(...)                                  # atomic: a kill loses at most a layer

What the difference of each kind is. Every matrix is taken after its own model's norm folding,
so a changed norm gain is part of the delta, exactly as the map the model applies changes:

- Q, Q_pe, K, V, O and the layer kinds (QA, KVA, KVA_pe): ΔX = X_t − X_b, formed in float32.
- VO: ΔVO_h = O_t·V_t − O_b·V_b = [O_t, −O_b]·[V_t; V_b], a product of inner dimension 2·d_v. The
  same map is written ΔO·V_t + O_b·ΔV = [ΔO, O_b]·[V_t; ΔV] (ΔO = O_t − O_b, ΔV = V_t − V_b), and
  that form is the one used: it carries the difference explicitly instead of as the cancellation
  of two large products, so rounding in the factors stays relative to the delta, not to ‖O‖‖V‖.
  Either way it is a fused product like any other (`spectra.compute.FactoredHeads`): its σ come
  from 2d_v × 2d_v thin factors; nothing of size d_model × in_v is ever formed.
- QK: ΔQK_h = Q_tᵀK_t − Q_bᵀK_b = [ΔQ; Q_b]ᵀ·[K_t; ΔK]; KQ stacks the same heads by columns.

Stacked deltas stack the per-head deltas, each divided by the BASE head's σ₁ of that kind (with
`normalize_stacked`, the default): the stack is then, to first order, the change of the
normalized stack `analyze` computes for BASE, and a head that barely changed weighs little in
it. (Dividing each delta by its own σ₁ would give every head's change the same weight, however
small.) With `normalize_stacked=False` the raw deltas are stacked.

Beside the delta spectra the cache keeps BASE's head and layer spectra (its `reference`), from
which `DiffAnalysis.metrics` reports ‖ΔW‖_F/‖W‖_F for every spectrum: per head against the base
head, per stack against the base stack (normalized the same way), per layer matrix against it.

Before any tensor byte is read, both configs must describe the same architecture (model type
and every shape of `ModelDims`), both adapters must plan the same tensors with the same shapes,
and every planned tensor must have the same shape in both checkpoints' shard headers; otherwise
`CheckpointMismatchError` says what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from svd_probe.cache.store import (
    DiffCache,
    LayerSpectra,
    SpectraCache,
    SpectraOptions,
    default_cache_root,
    recorded_name,
)
from svd_probe.errors import (
    CacheDamagedError,
    CacheMissError,
    DiskWriteError,
    OfflineCacheMissError,
    SvdProbeError,
    TransferError,
    utf8_text,
)
from svd_probe.kinds import HEAD, JOINT_KINDS, LAYER, STACKED, SpectrumKey, sort_keys, spectrum_keys
from svd_probe.models import ModelRef, is_commit, resolve_model
from svd_probe.options import layers_in_model, parse_layers, parse_matrices, pick_device, select_layers
from svd_probe.results import (
    Analysis,
    CacheQuery,
    _folds_layernorm,
    as_query,
    cache_repo,
    checked_dims,
    read_layers,
)

if TYPE_CHECKING:  # torch and the adapters load only to compute; loading a cached diff needs neither
    import torch

    from svd_probe.adapters.base import ArchitectureAdapter, AttentionFactors, ModelDims

    Result = dict[str, tuple[torch.Tensor, tuple[int, int]]]

__all__ = [
    "CheckpointMismatchError",
    "DiffAnalysis",
    "DiffJob",
    "DiffOutcome",
    "delta_factors",
    "diff",
    "diff_command",
    "diff_layer_spectra",
    "load_diff",
    "reference_keys",
]

# Kinds whose delta is a plain difference; VO and QK (and KQ, stacked from QK) are fused.
PLAIN_KINDS = ("Q", "Q_pe", "K", "V", "O", "QA", "KVA", "KVA_pe")
FUSED_KINDS = ("VO", "QK", "KQ")
# The per-head kind a stacked kind stacks (KQ stacks the QK heads by columns).
_HEADS_OF = {"KQ": "QK"}
# The ModelDims fields two checkpoints must share to be diffed (layers are compared apart).
_SHAPE_FIELDS = ("d_model", "n_heads", "n_kv_groups", "d_qk", "d_rope", "d_v", "q_latent", "kv_latent")


class CheckpointMismatchError(SvdProbeError):
    """BASE and TUNED are not the same architecture: model type, a shape of config.json, the
    tensors the adapters plan, or a tensor's shape in the shard headers differ."""


# --- the math of one layer ------------------------------------------------------------------------


def _sub(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a - b


def delta_factors(base: AttentionFactors, tuned: AttentionFactors) -> tuple[AttentionFactors, AttentionFactors]:
    """The factors of the differences TUNED − BASE of one layer: (plain, fused).

    `plain` holds ΔQ, ΔQ_pe, ΔK, ΔV, ΔO and the layer deltas. `fused` holds factors whose
    products are the fused deltas (inner dimension doubled, see the module docstring):
    o = [ΔO, O_b] and v = [V_t; ΔV] (ΔVO_h = o_h·v_g), q = [ΔQ; Q_b] and k = [K_t; ΔK]
    (ΔQK_h = q_hᵀ·k_g); its Q, K, V and O mean nothing by themselves.

    Example:
        >>> plain, fused = delta_factors(fb, ft)
        >>> layer_spectra(fused, {"head.VO"})["head.VO"][0]  # σ of O_t·V_t − O_b·V_b per head
    """
    import torch

    from svd_probe.adapters.base import AttentionFactors

    dq, dk, dv, do = (_sub(getattr(tuned, r), getattr(base, r)) for r in ("q", "k", "v", "o"))
    plain = AttentionFactors(
        q=dq,
        k=dk,
        v=dv,
        o=do,
        q_pe=_sub(tuned.q_pe, base.q_pe),
        kv_group=base.kv_group,
        layer={name: tuned.layer[name] - w for name, w in base.layer.items() if name in tuned.layer},
    )
    vo = do is not None and dv is not None
    qk = dq is not None and dk is not None
    fused = AttentionFactors(
        q=torch.cat([dq, base.q], dim=1) if qk else None,  # type: ignore[list-item]
        k=torch.cat([tuned.k, dk], dim=1) if qk else None,  # type: ignore[list-item]
        v=torch.cat([tuned.v, dv], dim=1) if vo else None,  # type: ignore[list-item]
        o=torch.cat([do, base.o], dim=2) if vo else None,  # type: ignore[list-item]
        kv_group=base.kv_group,
    )
    return plain, fused


def reference_keys(keys: Sequence[str]) -> list[str]:
    """The BASE spectra a diff of these keys is measured against: the head spectra of every head
    and stacked kind (σ₁ per head normalizes the stacks, the norms give ‖ΔW‖/‖W‖) and the layer
    spectra of the layer kinds.

    Example:
        >>> reference_keys(["stacked.KQ", "head.O", "layer.QA"])
        ['head.O', 'head.QK', 'layer.QA']
    """
    out = set()
    for text in keys:
        key = SpectrumKey.parse(text)
        out.add(text if key.scope == LAYER else str(SpectrumKey(HEAD, _HEADS_OF.get(key.kind, key.kind))))
    return sort_keys(out)


def _diff_kinds(adapter) -> tuple[str, ...]:
    """The kinds a diff computes: every kind the layout has except the joint input maps
    (Qjoint, KVjoint), which serve the input-latent planner of one model, not a delta."""
    return tuple(k for k in adapter.supported_kinds() if k not in JOINT_KINDS)


def _inverse(s1: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1/σ₁ per head as a [n, 1, 1] tensor on `like`'s device; heads with σ₁ = 0 keep scale 1."""
    import torch

    s1 = s1.to(device=like.device, dtype=torch.float64)
    inv = torch.where(s1 > 0, 1.0 / torch.where(s1 > 0, s1, torch.ones_like(s1)), torch.ones_like(s1))
    return inv.to(like.dtype)[:, None, None]


def _scaled(plain: AttentionFactors, fused: AttentionFactors, s1: dict[str, torch.Tensor]):
    """The delta factors with each head's delta divided by the base head's σ₁ of its kind."""

    def div(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
        return None if t is None or kind not in s1 else t * _inverse(s1[kind], t)

    plain_s = dataclasses.replace(
        plain,
        q=div(plain.q, "Q"),
        q_pe=div(plain.q_pe, "Q_pe"),
        k=div(plain.k, "K"),
        v=div(plain.v, "V"),
        o=div(plain.o, "O"),
    )
    # ΔVO_h = o_h·v_g and ΔQK_h = q_hᵀ·k_g: the per-head (left) factor carries the head's scale.
    fused_s = dataclasses.replace(fused, o=div(fused.o, "VO"), q=div(fused.q, "QK"))
    return plain_s, fused_s


def diff_layer_spectra(
    base: AttentionFactors,
    tuned: AttentionFactors,
    kinds,
    *,
    normalize_stacked: bool = True,
    config=None,
) -> tuple[Result, Result]:
    """Spectra of one layer's differences TUNED − BASE, and BASE's reference spectra.

    Args:
        base, tuned: the two layers' factors (the same adapter, norms folded alike).
        kinds: matrix kinds and/or scoped keys, as `spectra.compute.layer_spectra` takes them.
        normalize_stacked: divide each head's delta by the base head's σ₁ before stacking.
        config: a `spectra.compute.SpectraConfig` (routes and solvers).

    Returns:
        (delta, reference): `layer_spectra`-style dicts {key: (σ float64 CPU descending, (m, n))};
        `delta` for every requested key, `reference` for `reference_keys` of them (BASE's).

    Example:
        >>> delta, ref = diff_layer_spectra(fb, ft, {"O", "VO"})
        >>> delta["head.VO"][0]  # [n_heads, min(d_model, in_v)]: σ of O_t·V_t − O_b·V_b
    """
    from svd_probe.spectra.compute import layer_spectra, requested_keys

    keys = requested_keys(base, kinds)
    reference = layer_spectra(base, reference_keys(keys), config=config) if keys else {}
    plain, fused = delta_factors(base, tuned)
    parsed = {k: SpectrumKey.parse(k) for k in keys}
    unstacked = [k for k in keys if parsed[k].scope != STACKED]
    stacked = [k for k in keys if parsed[k].scope == STACKED]
    out: Result = {}

    def run(factors: AttentionFactors, wanted: list[str]) -> None:
        if wanted:
            out.update(layer_spectra(factors, wanted, normalize_stacked=False, config=config))

    run(plain, [k for k in unstacked if parsed[k].kind in PLAIN_KINDS])
    run(fused, [k for k in unstacked if parsed[k].kind in FUSED_KINDS])
    if stacked:
        if normalize_stacked:
            s1 = {
                key.partition(".")[2]: sigma[:, 0] for key, (sigma, _) in reference.items() if key.startswith("head.")
            }
            plain, fused = _scaled(plain, fused, s1)
        run(plain, [k for k in stacked if parsed[k].kind in PLAIN_KINDS])
        run(fused, [k for k in stacked if parsed[k].kind in FUSED_KINDS])
    return {k: out[k] for k in keys}, reference


# --- checking the two checkpoints against each other ----------------------------------------------


def _mismatch(base: str, tuned: str, what: list[str], hint: str | None = None) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{base} and {tuned} are not the same architecture: {'; '.join(what[:6])}"
        + (f" (and {len(what) - 6} more)" if len(what) > 6 else ""),
        hint or "Diff a fine-tune against the checkpoint it was tuned from (same config shapes, same tensors).",
    )


def check_architectures(names: tuple[str, str], dims: tuple[ModelDims, ModelDims], include_mtp: bool) -> None:
    """`CheckpointMismatchError` unless both configs describe the same attention (model type and
    shapes, as the adapters read them from config.json) and the same number of layers."""
    (bn, tn), (bd, td) = names, dims
    what = []
    if bd.model_type != td.model_type:
        what.append(f"model_type {bd.model_type!r} vs {td.model_type!r}")
    what += [f"{f} {getattr(bd, f)} vs {getattr(td, f)}" for f in _SHAPE_FIELDS if getattr(bd, f) != getattr(td, f)]
    main_b, main_t = bd.num_layers - bd.num_mtp_layers, td.num_layers - td.num_mtp_layers
    if main_b != main_t:
        what.append(f"{main_b} vs {main_t} layers")
    if what:
        raise _mismatch(bn, tn, what)
    if include_mtp and bd.num_mtp_layers != td.num_mtp_layers:
        raise _mismatch(
            bn,
            tn,
            [f"{bd.num_mtp_layers} vs {td.num_mtp_layers} multi-token-prediction layers held"],
            "Pass --no-mtp to diff the main layers only.",
        )


def check_plans(
    names: tuple[str, str],
    sources: tuple,
    adapters: tuple[ArchitectureAdapter, ArchitectureAdapter],
    layers: Sequence[int],
    kinds: set[str],
    fold_norms: bool,
) -> None:
    """`CheckpointMismatchError` unless, for every layer, both adapters plan the same tensors with
    the same shapes and both checkpoints' shard headers agree on each shape. Reads headers only."""
    (bn, tn), (sb, st), (ab, at) = names, sources, adapters
    wanted: list[str] = []
    for layer in layers:
        pb, pt = ab.plan(layer, kinds, fold_norms), at.plan(layer, kinds, fold_norms)
        if pb.tensors != pt.tensors:
            only_b = sorted(set(pb.tensors) - set(pt.tensors))
            only_t = sorted(set(pt.tensors) - set(pb.tensors))
            raise _mismatch(
                bn,
                tn,
                [f"layer {layer} reads {', '.join(only_b) or '-'} in one, {', '.join(only_t) or '-'} in the other"],
            )
        diffs = [
            f"{n} {list(pb.shapes[n])} vs {list(pt.shapes[n])}" for n in pb.tensors if pb.shapes[n] != pt.shapes[n]
        ]
        if diffs:
            raise _mismatch(bn, tn, diffs)
        wanted += [n for n in pb.tensors if n not in wanted]
    for src in (sb, st):  # every header needed, one parallel round per checkpoint
        src.headers({src.shard_of(n) for n in wanted})
    diffs = []
    for n in wanted:
        shape_b, shape_t = tuple(sb.shape(n)), tuple(st.shape(n))
        if shape_b != shape_t:
            diffs.append(f"{n} is {list(shape_b)} in {bn} but {list(shape_t)} in {tn}")
    if diffs:
        raise _mismatch(bn, tn, diffs)


# --- the job ----------------------------------------------------------------------------------------


@dataclass
class DiffJob:
    """Which two checkpoints to diff and how; `diff(job)` runs it.

    Example:
        >>> outcome = diff(DiffJob("deepseek-v3-base", "deepseek-r1", layers="0-3", matrices="O,VO"))
        >>> outcome.analysis.metrics()[["layer", "scope", "matrix", "rank_1pct", "rel_delta_norm"]]
    """

    base: str
    tuned: str
    base_revision: str = "main"
    tuned_revision: str = "main"
    token: str | None = None
    endpoint: str | None = None
    cache_dir: str | Path | None = None
    layers: str | list[int] | None = None
    matrices: str | list[str] | None = None
    fold_norms: bool = True
    normalize_stacked: bool = True
    layernorm_fold: str = "exact"
    include_mtp: bool = True
    device: str = "auto"
    force: bool = False
    concurrency: int = 8
    read_options: dict = field(default_factory=dict)

    @property
    def options(self) -> SpectraOptions:
        """The options that change the numbers, hence part of the cache key."""
        return SpectraOptions(
            fold_norms=self.fold_norms, normalize_stacked=self.normalize_stacked, layernorm_fold=self.layernorm_fold
        )

    def queries(self) -> tuple[CacheQuery, CacheQuery]:
        """(BASE, TUNED) as cache queries: the options and the cache folder are BASE's."""
        base = CacheQuery(self.base, self.base_revision or "main", self.cache_dir, self.options)
        tuned = CacheQuery(self.tuned, self.tuned_revision or "main", self.cache_dir, self.options)
        return base, tuned


@dataclass
class DiffOutcome:
    """What one `diff` call did, plus the resulting `DiffAnalysis` (built in memory)."""

    analysis: DiffAnalysis
    layers: list[int]
    computed: list[int]
    from_cache: list[int]
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _side(ref: ModelRef, revision: str, commit: str) -> dict:
    return {
        "model": ref.display,
        "name": ref.name,
        "repo_id": ref.repo_id,
        "local_path": str(ref.local_path) if ref.local_path else None,
        "revision": revision,
        "commit": commit,
    }


def _check_config(job: DiffJob, layer_spec: list[int] | None):
    def check(config: dict) -> None:
        from svd_probe.adapters import adapter_for

        adapter = adapter_for(config)
        select_layers(layer_spec, adapter.dims(), job.include_mtp)
        parse_matrices(job.matrices, _diff_kinds(adapter))

    return check


def diff(job: DiffJob, progress=None) -> DiffOutcome:
    """Compute (or resume) the spectra of TUNED − BASE; see the module docstring.

    Args:
        job: the two checkpoints, their revisions, layers, matrices, options, device...
        progress: a `report.LayerProgress`-like object (`start(...)`, `layer_done(...)`), or None.

    Returns:
        A `DiffOutcome`: the `DiffAnalysis` of the requested layers, which layers were computed
        and which came from the cache, stats (bytes fetched from both, seconds) and notes.

    Raises `CheckpointMismatchError` when the two are not one architecture (before any tensor
    byte is read), `BadOptionError` for bad --layers / --matrices, and, with the Hub unreachable,
    `OfflineCacheMissError` unless every requested layer is cached.

    Example:
        >>> diff(DiffJob("kimi-k2-base", "kimi-k2", layers="0-1")).stats["computed"]
    """
    from huggingface_hub.errors import OfflineModeIsEnabled

    from svd_probe.adapters import adapter_for
    from svd_probe.analysis import _versions, layernorm_fold_option
    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.dtypes import coarsest
    from svd_probe.hub.stream import stream_layers

    t_start = time.perf_counter()
    ref_b, ref_t = resolve_model(job.base), resolve_model(job.tuned)
    device = pick_device(job.device)
    layer_spec = parse_layers(job.layers)
    parse_matrices(job.matrices)
    options = job.options
    query_b, query_t = job.queries()
    root = default_cache_root(job.cache_dir)
    notes: list[str] = []
    opened = []
    try:
        for ref, revision in ((ref_b, query_b.revision), (ref_t, query_t.revision)):
            opened.append(
                open_checkpoint(
                    ref,
                    revision=revision,
                    token=job.token,
                    endpoint=job.endpoint,
                    concurrency=job.concurrency,
                    check_config=_check_config(job, layer_spec),
                    **job.read_options,
                )
            )
    except (TransferError, OfflineModeIsEnabled) as e:  # HubUnreachableError is a TransferError
        for src in opened:
            src.close()
        if ref_b.is_local and ref_t.is_local:
            raise
        return _diff_offline(job, (ref_b, ref_t), layer_spec, e, t_start, device)
    src_b, src_t = opened

    def fetched() -> int:
        return src_b.bytes_fetched + src_t.bytes_fetched

    bytes_before = fetched()  # shard headers and tensors count, as in `analyze`
    try:
        names = (ref_b.display, ref_t.display)
        ad_b = adapter_for(src_b.config, src_b.tensor_names)
        ad_t = adapter_for(src_t.config, src_t.tensor_names)
        dims = ad_b.dims()
        check_architectures(names, (dims, ad_t.dims()), job.include_mtp)
        kinds = parse_matrices(job.matrices, _diff_kinds(ad_b))
        layers = select_layers(layer_spec, dims, job.include_mtp)
        options = dataclasses.replace(
            options, layernorm_fold=layernorm_fold_option(ad_b, job.fold_norms, job.layernorm_fold)
        )
        query_b = dataclasses.replace(query_b, model=ref_b, options=options)
        query_t = dataclasses.replace(query_t, model=ref_t, options=options)
        repo_b, repo_t = cache_repo(ref_b), cache_repo(ref_t)
        cache = DiffCache(root, repo_b, src_b.commit, repo_t, src_t.commit, options)
        reference = cache.reference()
        manifest = cache.read_manifest(notes)
        ref_manifest = reference.read_manifest(notes)
        wanted = {str(k) for k in spectrum_keys(kinds)}
        wanted_ref = set(reference_keys(sorted(wanted)))
        if job.force:
            have: dict[int, LayerSpectra] = {}
            have_ref: dict[int, LayerSpectra] = {}
        else:
            have, damaged = read_layers(cache, manifest, layers, notes)
            have_ref, damaged_ref = read_layers(reference, ref_manifest, layers, notes)
            bad = sorted(set(damaged) | set(damaged_ref))
            if bad:
                notes.append(f"recomputing damaged layer{'s' if len(bad) > 1 else ''} {','.join(map(str, bad))}")

        def done(ly: int) -> bool:
            return ly in have and wanted <= have[ly].kinds() and ly in have_ref and wanted_ref <= have_ref[ly].kinds()

        todo = [ly for ly in layers if not done(ly)]
        from_cache = [ly for ly in layers if ly not in todo]
        kind_set = set(kinds)
        # Every header of every layer to compute, before any tensor byte of either checkpoint.
        check_plans(names, (src_b, src_t), (ad_b, ad_t), todo, kind_set, job.fold_norms)
        header = dict(
            format=1,
            model=diff_display(ref_b.display, ref_t.display),
            base=_side(ref_b, query_b.revision, src_b.commit),
            tuned=_side(ref_t, query_t.revision, src_t.commit),
            commit=src_b.commit,
            options=dataclasses.asdict(options),
            config=src_b.config,
            tuned_config=src_t.config,
            dims=dataclasses.asdict(dims),
        )
        unlisted = [have[ly] for ly in have if not cache.expected_keys(manifest, ly)]
        unlisted_ref = [have_ref[ly] for ly in have_ref if not reference.expected_keys(ref_manifest, ly)]
        try:
            if todo or unlisted or any(k not in manifest for k in header):
                manifest = cache.update_manifest({**header, "versions": _versions()}, unlisted)
            if todo or unlisted_ref or "commit" not in ref_manifest:
                reference.update_manifest(
                    {"format": 1, "model": ref_b.display, "commit": src_b.commit, "of": "the base of a diff"},
                    unlisted_ref,
                )
            SpectraCache.write_ref(root, repo_b, query_b.revision, src_b.commit)
            SpectraCache.write_ref(root, repo_t, query_t.revision, src_t.commit)
        except DiskWriteError as e:
            if todo:
                raise
            notes.append(f"nothing needed computing, but the manifest or refs could not be updated: {e.message}")

        def plan_for_layer(layer: int):
            return ad_b.plan(layer, kind_set, job.fold_norms)  # the same plan for both (checked)

        if progress is not None:
            progress.start(total_layers=len(layers), cached_layers=len(from_cache), bytes_source=fetched)
        t_layer = time.perf_counter()
        with contextlib.ExitStack() as stack:
            # Two streams, each reading its checkpoint's next layer while this one is computed;
            # closed on the way out (an error, Ctrl-C), which cancels the reads still in flight.
            stream_b = stream_layers(src_b, todo, plan_for_layer, device)
            stream_t = stream_layers(src_t, todo, plan_for_layer, device)
            for stream in (stream_b, stream_t):
                stack.callback(getattr(stream, "close", lambda: None))
            for (layer, tb), (_, tt) in zip(stream_b, stream_t, strict=True):
                lnfold = options.layernorm_fold
                fb = ad_b.factors(layer, tb, kind_set, job.fold_norms, lnfold)
                ft = ad_t.factors(layer, tt, kind_set, job.fold_norms, lnfold)
                delta, ref_spectra = diff_layer_spectra(fb, ft, kind_set, normalize_stacked=job.normalize_stacked)
                storage = {
                    k: coarsest(
                        [tb.storage_dtype(SpectrumKey.parse(k).kind), tt.storage_dtype(SpectrumKey.parse(k).kind)]
                    )
                    or "F32"
                    for k in delta
                }
                ref_storage = {k: tb.storage_dtype(SpectrumKey.parse(k).kind) for k in ref_spectra}
                del tb, tt, fb, ft
                now = time.perf_counter()
                info = {"seconds": round(now - t_layer, 4), "device": str(device)}
                t_layer = now
                # The reference first: a layer counts as done only once both files are whole.
                have_ref[layer] = reference.update_layer(
                    _layer_spectra(layer, ref_spectra, ref_storage, info), merge=not job.force
                )
                have[layer] = cache.update_layer(_layer_spectra(layer, delta, storage, info), merge=not job.force)
                if progress is not None:
                    progress.layer_done(layer)
        stats = {
            "layers": len(layers),
            "computed": len(todo),
            "from_cache": len(from_cache),
            "bytes_fetched": fetched() - bytes_before,
            "seconds": round(time.perf_counter() - t_start, 3),
            "device": str(device),
        }
        if todo:
            manifest = cache.read_manifest()
    finally:
        src_b.close()
        src_t.close()
    analysis = DiffAnalysis(
        ref=ref_b,
        query=query_b,
        commit=src_b.commit,
        cache_dir=cache.dir,
        manifest=manifest,
        layer_spectra={ly: have[ly] for ly in layers},
        tuned_query=query_t,
        tuned_commit=src_t.commit,
        base_spectra={ly: have_ref[ly] for ly in layers if ly in have_ref},
    )
    return DiffOutcome(analysis=analysis, layers=layers, computed=todo, from_cache=from_cache, stats=stats, notes=notes)


def _layer_spectra(layer: int, spectra: Result, storage: dict[str, str], info: dict) -> LayerSpectra:
    return LayerSpectra(
        layer=layer,
        sigma={k: v[0].numpy() for k, v in spectra.items()},
        shapes={k: (int(v[1][0]), int(v[1][1])) for k, v in spectra.items()},
        storage_dtypes=storage,
        info=info,
    )


def _diff_offline(
    job: DiffJob,
    refs: tuple[ModelRef, ModelRef],
    layer_spec: list[int] | None,
    error: Exception,
    t_start: float,
    device: torch.device,
) -> DiffOutcome:
    """The Hub cannot be reached: answer from the cache, or say which layers need the Hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    from svd_probe.adapters import adapter_for
    from svd_probe.analysis import cached_dims

    offline = getattr(error, "offline", False) or isinstance(error, OfflineModeIsEnabled) or constants.is_offline_mode()
    why = "offline mode (HF_HUB_OFFLINE=1)" if offline else "the Hub is unreachable"
    base_q, tuned_q = job.queries()
    hint = "Reconnect (or unset HF_HUB_OFFLINE) and rerun the same command."
    try:
        analysis = load_diff(
            dataclasses.replace(base_q, model=refs[0]), dataclasses.replace(tuned_q, model=refs[1]), on_damaged="skip"
        )
    except CacheMissError as e:
        detail = error.message if isinstance(error, SvdProbeError) else str(error)
        raise OfflineCacheMissError(f"{why}, and {e.message}: {detail}", hint) from None
    adapter = adapter_for(analysis.config)
    dims = cached_dims(analysis.manifest, adapter, analysis.cache_dir / "manifest.json", command="diff")
    kinds = parse_matrices(job.matrices, _diff_kinds(adapter))
    layers = select_layers(layer_spec, dims, job.include_mtp)
    wanted = {str(k) for k in spectrum_keys(kinds)}
    wanted_ref = set(reference_keys(sorted(wanted)))
    missing = [
        ly
        for ly in layers
        if job.force
        or ly not in analysis.layer_spectra
        or not wanted <= analysis.layer_spectra[ly].kinds()
        or ly not in analysis.base_spectra
        or not wanted_ref <= analysis.base_spectra[ly].kinds()
    ]
    if missing:
        raise OfflineCacheMissError(
            f"{why}: cannot compute layer{'s' if len(missing) > 1 else ''} {','.join(map(str, missing))} "
            f"of {analysis.display} without it (cache {analysis.cache_dir})",
            hint,
        )
    analysis.layer_spectra = {ly: analysis.layer_spectra[ly] for ly in layers}
    analysis.base_spectra = {ly: analysis.base_spectra[ly] for ly in layers}
    notes = [
        f"{why}: using commits {analysis.commit[:12]} and {analysis.tuned_commit[:12]}, which the revisions "
        "resolved to when last diffed; nothing was fetched",
        *analysis.notes,
    ]
    stats = {
        "layers": len(layers),
        "computed": 0,
        "from_cache": len(layers),
        "bytes_fetched": 0,
        "seconds": round(time.perf_counter() - t_start, 3),
        "device": str(device),
        "offline": True,
    }
    return DiffOutcome(analysis=analysis, layers=layers, computed=[], from_cache=layers, stats=stats, notes=notes)


# --- loading ----------------------------------------------------------------------------------------


def diff_display(base: str, tuned: str) -> str:
    """How a diff is named in tables, exports and titles: `deepseek-r1 − deepseek-v3-base`."""
    return f"{tuned} − {base}"


def diff_command(base: CacheQuery, tuned: CacheQuery, layers: str | None = None, matrices: str | None = None) -> str:
    """The `svd-probe diff` command that would compute this diff (for hints), each word
    shell-quoted where it needs it, as `results.analyze_command` quotes its own: a folder
    `my model` split in two when pasted, and one named `$(...)` ran its command."""
    parts = ["svd-probe", "diff", base.name, tuned.name]
    if base.revision != "main":
        parts += ["--revision", base.revision]
    if tuned.revision != "main":
        parts += ["--tuned-revision", tuned.revision]
    o = base.options
    if not o.fold_norms:
        parts.append("--no-fold-norms")
    if not o.normalize_stacked:
        parts.append("--no-normalize-stacked")
    if o.layernorm_fold != "exact":
        parts += ["--layernorm-fold", o.layernorm_fold]
    if layers:
        parts += ["--layers", layers]
    if matrices:
        parts += ["--matrices", matrices]
    if base.cache_dir is not None:
        parts += ["--cache-dir", str(base.cache_dir)]
    return shlex.join(parts)


@dataclass
class DiffAnalysis(Analysis):
    """A cached diff TUNED − BASE: an `Analysis` whose spectra are those of the differences.

    Everything an `Analysis` offers works on the deltas (`sigma`, `shape`, `records`,
    `metrics`); `ref`, `query` and `commit` are BASE's, `tuned_query` and `tuned_commit` TUNED's,
    and `base_spectra` holds BASE's head and layer spectra (`reference_keys`). Records and
    metrics rows name both checkpoints (`base_model`, `base_revision`, `tuned_model`,
    `tuned_revision`), and the metrics add `base_frobenius` (‖W‖_F of the BASE matrix, head or
    stack or layer matrix, stacks normalized as the delta's) and `rel_delta_norm` = ‖ΔW‖_F/‖W‖_F.
    """

    tuned_query: CacheQuery = field(default_factory=lambda: CacheQuery(""))
    tuned_commit: str = ""
    base_spectra: dict[int, LayerSpectra] = field(default_factory=dict)

    @property
    def tuned_ref(self) -> ModelRef:
        return self.tuned_query.ref

    def _side_name(self, side: str) -> str | None:
        """The name the manifest records for one side, if it is a name (`recorded_name`)."""
        entry = self.manifest.get(side)
        return recorded_name(entry.get("model")) if isinstance(entry, dict) else None

    @property
    def base_display(self) -> str:
        return self._side_name("base") or self.ref.display

    @property
    def tuned_display(self) -> str:
        return self._side_name("tuned") or self.tuned_ref.display

    @property
    def display(self) -> str:
        return diff_display(self.base_display, self.tuned_display)

    def analyze_command(self, layers: str | None = None, matrices: str | None = None) -> str:
        return diff_command(self.query, self.tuned_query, layers=layers, matrices=matrices)

    def base_sigma(self, layer: int, matrix: str, scope: str = HEAD, head: int | None = None) -> np.ndarray:
        """σ of BASE's reference spectrum (head or layer scope) for one layer."""
        ls = self.base_spectra.get(layer)
        s = ls.spectrum(scope, matrix) if ls is not None else None
        if s is None:
            raise CacheMissError(
                f"{self.display}: no base {scope} {matrix} spectrum cached for layer {layer}",
                f"Run: {self.analyze_command(layers=str(layer), matrices=matrix)}",
            )
        return s[head] if (scope == HEAD and head is not None) else s

    def _ids(self) -> dict:
        return {
            "base_model": self.base_display,
            "base_revision": self.commit,
            "tuned_model": self.tuned_display,
            "tuned_revision": self.tuned_commit,
        }

    def records(self) -> Iterator[dict]:
        """One export record per delta spectrum, as `Analysis.records`, naming both checkpoints."""
        ids = self._ids()
        for record in super().records():
            yield {**record, **ids}

    def _base_frobenius(self, layer: int, scope: str, matrix: str, rows: int) -> np.ndarray:
        """‖W‖_F of the BASE matrices behind `rows` delta rows of one spectrum (NaN when unknown)."""
        ls = self.base_spectra.get(layer)
        unknown = np.full(rows, np.nan)
        if ls is None:
            return unknown
        if scope == LAYER:
            s = ls.spectrum(LAYER, matrix)
            return unknown if s is None else np.full(rows, float(np.sqrt((s**2).sum())))
        heads = ls.spectrum(HEAD, _HEADS_OF.get(matrix, matrix))
        if heads is None:
            return unknown
        frob = np.sqrt((np.atleast_2d(heads) ** 2).sum(axis=1))
        if scope == HEAD:
            return frob if frob.shape[0] == rows else unknown
        if self.options.normalize_stacked:
            s1 = np.atleast_2d(heads)[:, 0]
            frob = np.where(s1 > 0, frob / np.where(s1 > 0, s1, 1.0), frob)
        return np.full(rows, float(np.sqrt((frob**2).sum())))

    def metrics(self, errors=None, at_rank: int | None = None):
        """The metrics table of the deltas (`Analysis.metrics`), plus both checkpoints' names,
        `base_frobenius` and `rel_delta_norm` = frobenius / base_frobenius."""
        from svd_probe.spectra.metrics import DEFAULT_ERRORS

        df = super().metrics(errors=errors or DEFAULT_ERRORS, at_rank=at_rank)
        if df.empty:
            return df
        for name, value in self._ids().items():
            # As `Analysis.metrics` writes the model column: a local folder's undecodable byte
            # (a lone surrogate) in either name ended csv and parquet exports in a
            # UnicodeEncodeError.
            df[name] = utf8_text(value) if isinstance(value, str) else value
        base = np.full(len(df), np.nan)
        for (layer, scope, matrix), idx in df.groupby(["layer", "scope", "matrix"], sort=False).indices.items():
            base[idx] = self._base_frobenius(int(layer), scope, matrix, len(idx))
        df["base_frobenius"] = base
        with np.errstate(divide="ignore", invalid="ignore"):
            df["rel_delta_norm"] = np.where(
                base > 0, df["frobenius"].to_numpy() / np.where(base > 0, base, 1.0), np.nan
            )
        return df


def load_diff(
    base: CacheQuery | str | ModelRef,
    tuned: CacheQuery | str | ModelRef,
    *,
    layers: list[int] | None = None,
    on_damaged: Literal["raise", "skip"] = "raise",
) -> DiffAnalysis:
    """Load a cached diff TUNED − BASE from disk alone.

    Args:
        base: BASE as a `CacheQuery` (its revision, cache folder and options are the diff's), or
            a model name (revision main, default cache folder and options).
        tuned: TUNED as a model name (revision main) or a `CacheQuery` (only its model and
            revision are read).
        layers: only these layers (default: every cached one).
        on_damaged: "raise" a `CacheDamagedError` naming a damaged layer file, or "skip" it and
            say so in `notes`.

    Returns:
        The `DiffAnalysis` of the cached layers.

    Raises `CacheMissError`, whose hint is the `diff` command, when nothing is cached.

    Example:
        >>> d = load_diff(CacheQuery("deepseek-v3-base", cache_dir="cache"), "deepseek-r1")
        >>> d.metrics().query("scope == 'head' and matrix == 'VO'")["rel_delta_norm"].median()
    """
    bq = as_query(base)
    tq = tuned if isinstance(tuned, CacheQuery) else CacheQuery(tuned)
    tq = dataclasses.replace(tq, cache_dir=bq.cache_dir, options=bq.options)
    ref_b, ref_t = bq.ref, tq.ref
    root = bq.root
    commits = []
    for q, ref in ((bq, ref_b), (tq, ref_t)):
        if is_commit(q.revision):
            commits.append(q.revision)
            continue
        entry = SpectraCache.read_ref(root, cache_repo(ref), q.revision or "main")
        if entry is None:
            raise CacheMissError(
                f"no cached diff of {diff_display(ref_b.display, ref_t.display)}: {ref.display} (revision "
                f"{q.revision}) was never opened with this cache ({root})",
                f"Run: {diff_command(bq, tq)}",
            )
        commits.append(entry.commit)
    commit_b, commit_t = commits

    def cache_for(options: SpectraOptions) -> DiffCache:
        return DiffCache(root, cache_repo(ref_b), commit_b, cache_repo(ref_t), commit_t, options)

    cache = cache_for(bq.options)
    cached = cache.cached_layers()
    if not cached and bq.options.layernorm_fold != "exact":
        # As `load_analysis`: only pre-LayerNorm models key their cache by the fold mode.
        exact = dataclasses.replace(bq.options, layernorm_fold="exact")
        alt = cache_for(exact)
        config = alt.read_manifest().get("config")
        if isinstance(config, dict) and not _folds_layernorm(config):
            cache, cached = alt, alt.cached_layers()
            bq, tq = (dataclasses.replace(q, options=exact) for q in (bq, tq))
    wanted = cached if layers is None else [ly for ly in layers if ly in cached]
    if not wanted:
        asked = None if layers is None else ",".join(map(str, layers))
        raise CacheMissError(
            f"no cached layers of the diff {diff_display(ref_b.display, ref_t.display)} at "
            f"{commit_b[:12]}..{commit_t[:12]} with these options in {root}",
            f"Run: {diff_command(bq, tq, layers=asked)}",
        )
    notes: list[str] = []
    manifest = cache.read_manifest(notes)
    wanted, left_out = layers_in_model(wanted, checked_dims(manifest.get("dims")).get("num_layers"), cache.layer_path)
    notes += [left_out] if left_out else []
    reference = cache.reference()
    good, damaged = read_layers(cache, manifest, wanted, notes)
    good_ref, damaged_ref = read_layers(reference, reference.read_manifest(notes), wanted, notes)
    damaged = {**damaged_ref, **damaged}
    if damaged and on_damaged == "raise":
        first = next(iter(damaged.values()))
        bad = ",".join(map(str, sorted(damaged)))
        raise CacheDamagedError(first.message, f"Recompute them: {diff_command(bq, tq, layers=bad)}", path=first.path)
    lacking = [ly for ly in good if ly not in good_ref]
    if lacking:
        notes.append(
            f"no base reference cached for layer{'s' if len(lacking) > 1 else ''} {','.join(map(str, lacking))}: "
            f"rel_delta_norm is NaN there (run: {diff_command(bq, tq, layers=','.join(map(str, lacking)))})"
        )
    if not good:
        raise CacheMissError(
            f"no readable cached layers of the diff {diff_display(ref_b.display, ref_t.display)} in {root}"
            + (f"; {left_out}" if left_out else ""),
            f"Run: {diff_command(bq, tq)}",
        )
    return DiffAnalysis(
        ref=ref_b,
        query=bq,
        commit=commit_b,
        cache_dir=cache.dir,
        manifest=manifest,
        layer_spectra=good,
        notes=notes,
        tuned_query=tq,
        tuned_commit=commit_t,
        base_spectra=good_ref,
    )
