"""`analyze`: stream a checkpoint's attention layer by layer, compute spectra, cache each layer.

The pipeline, for a notebook as much as for the CLI:

    source  = open_checkpoint(model)                 # Hub or local; config, index, headers
    adapter = adapter_for(source.config)             # which tensors, how they slice into heads
    for layer, tensors in stream_layers(...):        # next layer's reads in flight meanwhile
        factors = adapter.factors(layer, tensors)    # per-head factors, norms folded
        spectra = layer_spectra(factors)             # batched, through factors, on the device
        cache.write_layer(spectra)                   # atomic: a killed run loses at most a layer

A rerun finds every requested layer in the cache and fetches nothing for it.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from svd_probe.adapters import adapter_for
from svd_probe.adapters.base import ALL_KINDS, HEAD_KINDS, LAYER_KINDS, STACKED_KINDS, ModelDims
from svd_probe.cache.store import AnalysisCache, AnalysisOptions, LayerSpectra, default_cache_root
from svd_probe.errors import BadOptionError
from svd_probe.models import resolve_model
from svd_probe.options import pick_device
from svd_probe.results import Analysis, cache_repo


@dataclass
class AnalyzeRequest:
    model: str
    revision: str = "main"
    token: str | None = None
    endpoint: str | None = None
    cache_dir: str | Path | None = None
    layers: str | list[int] | None = None
    matrices: str | list[str] | None = None
    fold_norms: bool = True
    normalize_stacked: bool = True
    layernorm_fold: str = "exact"  # pre-LayerNorm models (GPT-2): "exact" W·diag(g)·P, or "gain" W·diag(g)
    include_mtp: bool = True
    device: str = "auto"
    force: bool = False
    concurrency: int = 8
    # Passed to the range reader (retries, backoff, max_gap, chunk_size, timeout).
    read_options: dict = field(default_factory=dict)


@dataclass
class AnalysisRun:
    """What one `analyze` call did, plus the resulting cached analysis."""

    analysis: Analysis
    layers: list[int]
    computed: list[int]
    from_cache: list[int]
    stats: dict = field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.analysis.display

    @property
    def repo_id(self) -> str | None:
        return self.analysis.repo_id

    @property
    def commit(self) -> str:
        return self.analysis.commit

    @property
    def cache_dir(self) -> Path:
        return self.analysis.cache_dir


# --- option parsing (library-level, so notebooks get the same checks) --------------------------


def parse_layers(spec: str | list[int] | None, dims: ModelDims, include_mtp: bool) -> list[int]:
    """`0-3,10,60` → [0, 1, 2, 3, 10, 60]; refuses layers the model lacks."""
    n_main = dims.num_layers - dims.num_mtp_layers
    available = list(range(n_main if not include_mtp else dims.num_layers))
    if spec is None or spec == "" or spec == "all":
        return available
    if isinstance(spec, str):
        wanted: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise BadOptionError(
                    f"bad --layers value {spec!r}: {part!r} is not a layer or a range", "Use e.g. --layers 0-3,10,60."
                )
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise BadOptionError(f"bad --layers range {part!r}: end before start", "Use e.g. --layers 0-3.")
            wanted.extend(range(lo, hi + 1))
    else:
        wanted = [int(x) for x in spec]
    missing = sorted({ly for ly in wanted if ly not in available})
    if missing:
        mtp_span = f"s {n_main}-{dims.num_layers - 1}" if dims.num_mtp_layers > 1 else f" {n_main}"
        mtp = f" and MTP layer{mtp_span}" if dims.num_mtp_layers else ""
        skipped = " (MTP layers are excluded by --no-mtp)" if dims.num_mtp_layers and not include_mtp else ""
        raise BadOptionError(
            f"the model has no layer {', '.join(map(str, missing))}: it has layers 0-{n_main - 1}{mtp}{skipped}",
            f"Pick layers from that range, e.g. --layers 0-{min(3, n_main - 1)}.",
        )
    return sorted(set(wanted))


def parse_matrices(spec: str | list[str] | None, supported: tuple[str, ...]) -> list[str]:
    """`VO,O` → ['O', 'VO'] in canonical order; refuses unknown kinds and kinds the model lacks."""
    if spec is None or spec == "" or spec == "all":
        return [k for k in ALL_KINDS if k in supported]
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    by_lower = {k.lower(): k for k in ALL_KINDS}
    unknown = [s for s in items if s.lower() not in by_lower]
    if unknown:
        raise BadOptionError(
            f"unknown matrix kind {', '.join(map(repr, unknown))}", "Choose from " + ",".join(ALL_KINDS) + "."
        )
    chosen = {by_lower[s.lower()] for s in items}
    lacking = sorted(chosen - set(supported), key=ALL_KINDS.index)
    if lacking:
        raise BadOptionError(
            f"this model has no {', '.join(lacking)} matrices",
            "It has " + ",".join(k for k in ALL_KINDS if k in supported) + ".",
        )
    return [k for k in ALL_KINDS if k in chosen]


def spectrum_keys(kinds: list[str]) -> set[str]:
    """The cache keys (`scope.matrix`) that a set of matrix kinds produces."""
    keys = {f"head.{k}" for k in kinds if k in HEAD_KINDS}
    keys |= {f"stacked.{k}" for k in kinds if k in STACKED_KINDS}
    keys |= {f"layer.{k}" for k in kinds if k in LAYER_KINDS}
    return keys


def _versions() -> dict:
    import numpy
    import safetensors

    import svd_probe

    out = {
        "svd_probe": svd_probe.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }
    try:
        import huggingface_hub

        out["huggingface_hub"] = huggingface_hub.__version__
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    return out


# --- the pipeline --------------------------------------------------------------------------------


def analyze(request: AnalyzeRequest, progress=None) -> AnalysisRun:
    """Run (or resume) an analysis; see the module docstring. `progress` is a `report.Progress`-like
    object with `start(...)`, `layer_done(...)` and `bytes_source(...)`, or None."""
    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.stream import stream_layers
    from svd_probe.spectra.compute import layer_spectra

    t_start = time.perf_counter()
    ref = resolve_model(request.model)
    device = pick_device(request.device)
    source = open_checkpoint(
        ref,
        revision=request.revision,
        token=request.token,
        endpoint=request.endpoint,
        concurrency=request.concurrency,
        **request.read_options,
    )
    adapter = adapter_for(source.config, source.tensor_names)
    dims = adapter.dims()
    kinds = parse_matrices(request.matrices, adapter.supported_kinds())
    layers = parse_layers(request.layers, dims, request.include_mtp)
    options = AnalysisOptions(
        fold_norms=request.fold_norms,
        normalize_stacked=request.normalize_stacked,
        layernorm_fold=layernorm_fold_option(adapter, request.fold_norms, request.layernorm_fold),
    )

    root = default_cache_root(request.cache_dir)
    repo = cache_repo(ref)
    cache = AnalysisCache(root, repo, source.commit, options)
    AnalysisCache.write_ref(root, repo, request.revision, source.commit)
    manifest = cache.read_manifest()
    manifest.update(
        format=1,
        model=ref.display,
        name=ref.name,
        repo_id=ref.repo_id,
        local_path=str(ref.local_path) if ref.local_path else None,
        revision=request.revision,
        commit=source.commit,
        options=dataclasses.asdict(options),
        config=source.config,
        dims=dataclasses.asdict(dims),
        versions=_versions(),
    )
    manifest.setdefault("created", datetime.now(timezone.utc).isoformat())
    manifest.setdefault("layers", {})
    cache.write_manifest(manifest)

    wanted_keys = spectrum_keys(kinds)
    todo = [ly for ly in layers if request.force or not wanted_keys <= cache.layer_kinds(ly)]
    from_cache = [ly for ly in layers if ly not in todo]
    kind_set = set(kinds)

    def plan_for_layer(layer: int):
        return adapter.plan(layer, kind_set, request.fold_norms)

    if progress is not None:
        progress.start(
            total_layers=len(layers), cached_layers=len(from_cache), bytes_source=lambda: source.bytes_fetched
        )

    bytes_before = source.bytes_fetched
    t_layer = time.perf_counter()
    for layer, tensors in stream_layers(source, todo, plan_for_layer, device):
        factors = adapter.factors(layer, tensors, kind_set, request.fold_norms, options.layernorm_fold)
        spectra = layer_spectra(factors, kind_set, normalize_stacked=request.normalize_stacked)
        # Each spectrum records the storage dtype of the weights the plan computes it from.
        storage = {k: tensors.storage_dtype(k.partition(".")[2]) for k in spectra}
        del tensors, factors
        sigma = {k: v[0].numpy() for k, v in spectra.items()}
        shapes = {k: (int(v[1][0]), int(v[1][1])) for k, v in spectra.items()}
        if not request.force and cache.layer_path(layer).is_file():
            # Keep kinds computed by an earlier run with other --matrices.
            old = cache.read_layer(layer)
            sigma = {**old.sigma, **sigma}
            shapes = {**old.shapes, **shapes}
            storage = {**old.storage_dtypes, **storage}
        now = time.perf_counter()
        info = {"seconds": round(now - t_layer, 4), "device": str(device)}
        t_layer = now
        cache.write_layer(LayerSpectra(layer=layer, sigma=sigma, shapes=shapes, storage_dtypes=storage, info=info))
        manifest["layers"][str(layer)] = {**info, "written": datetime.now(timezone.utc).isoformat()}
        manifest["updated"] = datetime.now(timezone.utc).isoformat()
        cache.write_manifest(manifest)
        if progress is not None:
            progress.layer_done(layer)

    stats = {
        "layers": len(layers),
        "computed": len(todo),
        "from_cache": len(from_cache),
        "bytes_fetched": source.bytes_fetched - bytes_before,
        "seconds": round(time.perf_counter() - t_start, 3),
        "device": str(device),
    }
    # Read back from this run's own cache: its options carry layernorm_fold, which
    # `load_analysis` does not take yet.
    cached = set(cache.cached_layers())
    analysis = Analysis(
        ref=ref,
        revision=request.revision,
        commit=source.commit,
        options=options,
        cache_dir=cache.dir,
        manifest=cache.read_manifest(),
        layer_spectra={ly: cache.read_layer(ly) for ly in layers if ly in cached},
        cache_dir_arg=root,
    )
    return AnalysisRun(analysis=analysis, layers=layers, computed=todo, from_cache=from_cache, stats=stats)


def layernorm_fold_option(adapter, fold_norms: bool, requested: str) -> str:
    """The `layernorm_fold` an analysis is keyed and computed with: the requested one where a
    pre-LayerNorm folds into q/k/v (GPT-2), else "exact", which those models' folds are anyway
    (RMSNorm has no centering; BERT's LayerNorm comes after attention; no folding, no fold)."""
    if requested not in ("exact", "gain"):
        raise BadOptionError(f"bad --layernorm-fold value {requested!r}", "Use --layernorm-fold exact or gain.")
    return requested if fold_norms and adapter.folds_layernorm else "exact"
