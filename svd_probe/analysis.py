"""`analyze`: stream a checkpoint's attention layer by layer, compute spectra, cache each layer.

The pipeline, for a notebook as much as for the CLI:

    source  = open_checkpoint(model)                 # Hub or local; config, index, headers
    adapter = adapter_for(source.config)             # which tensors, how they slice into heads
    for layer, tensors in stream_layers(...):        # next layer's reads in flight meanwhile
        factors = adapter.factors(layer, tensors)    # per-head factors, norms folded
        spectra = layer_spectra(factors)             # batched, through factors, on the device
        cache.update_layer(spectra)                  # atomic, merged, listed: a kill loses at most a layer

A rerun finds every requested layer in the cache and fetches nothing for it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import OfflineModeIsEnabled

from svd_probe.adapters import adapter_for
from svd_probe.adapters.base import ModelDims
from svd_probe.cache.store import LayerSpectra, SpectraCache, SpectraOptions, default_cache_root
from svd_probe.errors import (
    BadOptionError,
    CacheDamagedError,
    DiskWriteError,
    OfflineCacheMissError,
    SvdProbeError,
    TransferError,
    shown,
)
from svd_probe.kinds import SpectrumKey, spectrum_keys
from svd_probe.models import ModelRef, is_commit, resolve_model
from svd_probe.options import parse_layers, parse_matrices, pick_device, select_layers
from svd_probe.results import Analysis, CacheQuery, cache_repo, checked_dims, read_layers
from svd_probe.spectra.controls import CONTROL_SEED, apply_control, check_control


@dataclass
class AnalyzeJob:
    """What to analyze and how; `analyze(job)` runs it.

    Example:
        >>> outcome = analyze(AnalyzeJob("deepseek-v3", layers="0-3", matrices="O,VO"))
        >>> outcome.analysis.sigma(layer=0, matrix="VO")
    """

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
    # "gaussian" or "shuffled": analyze a randomized copy of every projection weight instead
    # (`svd_probe.spectra.controls`), cached as an analysis of its own.
    control: str | None = None
    # The overlap pipeline's bounds (`_compute_layers`): layers read ahead of the one being
    # computed, computed layers waiting for the cache writer, and layers whose big eigensolves
    # may be in flight at once (0: auto, `svd_probe.spectra.compute.pipeline_config`).
    prefetch: int = 2
    write_queue: int = 4
    inflight: int = 0
    # The eigensolver of the big problems (a name in `svd_probe.spectra.solvers.SOLVERS`, or
    # "auto": the device's entry in `AUTO_ROUTES`). Every solver meets the same 1e-4·σ₁ contract,
    # so it is not part of the cache key.
    solver: str = "auto"
    # Where the HTTP client runs: "thread", "process" (a child process of its own, off this
    # interpreter's GIL) or "auto" (`svd_probe.hub.reader_process.pick_reader`: the process on
    # CUDA where it can run). Local folders are read in this process either way.
    reader: str = "auto"
    # Passed to the range reader (retries, backoff, max_gap, chunk_size, timeout).
    read_options: dict = field(default_factory=dict)

    @property
    def options(self) -> SpectraOptions:
        """The options that change the numbers, hence the cache key."""
        return SpectraOptions(
            fold_norms=self.fold_norms,
            normalize_stacked=self.normalize_stacked,
            layernorm_fold=self.layernorm_fold,
            control=check_control(self.control),
        )

    def query(self, model: str | ModelRef | None = None) -> CacheQuery:
        """The cached analysis this job reads and fills."""
        return CacheQuery(model or self.model, self.revision or "main", self.cache_dir, self.options)


@dataclass
class AnalyzeOutcome:
    """What one `analyze` call did, plus the resulting analysis (built in memory).

    `notes` are things the user should know (a damaged cache file recomputed, the Hub unreachable
    and the cache used instead); the CLI prints them on stderr.
    """

    analysis: Analysis
    layers: list[int]
    computed: list[int]
    from_cache: list[int]
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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


def _check_request(request: AnalyzeJob, layer_spec: list[int] | None):
    """A check of the job against config.json alone (run before any index or header is read)."""

    def check(config: dict) -> None:
        adapter = adapter_for(config)
        select_layers(layer_spec, adapter.dims(), request.include_mtp)
        parse_matrices(request.matrices, adapter.supported_kinds())

    return check


def analyze(request: AnalyzeJob, progress=None) -> AnalyzeOutcome:
    """Run (or resume) an analysis; see the module docstring.

    Args:
        request: what to analyze (model, revision, layers, matrices, options, device...).
        progress: "auto" (a rich bar in a terminal, tqdm.auto in a notebook when installed, else
            none), "rich", "tqdm", "none"; or a `report.LayerProgress`-like object with
            `start(...)` and `layer_done(...)`; or None (silent).

    Returns:
        An `AnalyzeOutcome`: the `Analysis` of the requested layers (from memory: layers computed
        now and layers read from the cache), which were computed, and notes for the user.
        Under `torchrun` (WORLD_SIZE > 1) the layers still missing are split across the ranks
        (`svd_probe.distributed`); rank 0's outcome covers every requested layer and
        `stats["ranks"]` lists what each rank computed and fetched; another rank's covers only
        its own layers (`stats["rank"]` says which rank answered).

    Raises a `BadOptionError` for a malformed --layers or --matrices before any request, and for
    layers or kinds the model lacks right after config.json. When the Hub cannot be reached (or
    HF_HUB_OFFLINE=1), the commit the cache last resolved for the revision is used and nothing is
    computed: `OfflineCacheMissError` lists the layers that would need the Hub.

    Example:
        >>> analyze(AnalyzeJob("deepseek-v3", layers="0-3")).stats["computed"]
    """
    if isinstance(progress, str):
        from svd_probe.report import progress_for

        with progress_for(progress) as sink:
            return analyze(request, progress=sink)
    from svd_probe.distributed import Ranks
    from svd_probe.spectra.compute import pipeline_config

    picked = pick_device(request.device)
    pipeline_config(picked, request.solver)  # a bad --solver fails before any read
    ranks, device = Ranks.from_env(picked)
    try:
        outcome = _analyze(request, progress, device, ranks)
    finally:
        ranks.close()
    outcome.stats.setdefault("rank", ranks.rank)
    outcome.stats.setdefault("world_size", ranks.world_size)
    return outcome


def _analyze(request: AnalyzeJob, progress, device: torch.device, ranks) -> AnalyzeOutcome:
    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.reader_process import pick_reader

    t_start = time.perf_counter()
    ref = resolve_model(request.model)
    revision = request.revision or "main"
    # The syntax of --layers and --matrices is checked before anything is fetched.
    layer_spec = parse_layers(request.layers)
    parse_matrices(request.matrices)
    options = request.options
    query = request.query(ref)
    root = default_cache_root(request.cache_dir)
    repo = cache_repo(ref)
    notes: list[str] = []
    reader = pick_reader(request.reader, device.type)
    try:
        source = open_checkpoint(
            ref,
            revision=revision,
            token=request.token,
            endpoint=request.endpoint,
            concurrency=request.concurrency,
            check_config=_check_request(request, layer_spec),
            reader=reader,
            **request.read_options,
        )
    except (TransferError, OfflineModeIsEnabled) as e:  # HubUnreachableError is a TransferError
        if ref.is_local:
            raise
        return _analyze_offline(request, query, ref, layer_spec, e, t_start, device)
    with source:  # its reader threads or process, and its open files, end with this job
        adapter = adapter_for(source.config, source.tensor_names)
        dims = adapter.dims()
        kinds = parse_matrices(request.matrices, adapter.supported_kinds())
        layers = select_layers(layer_spec, dims, request.include_mtp)
        # The LayerNorm fold mode matters (and keys the cache) only where a pre-LayerNorm folds.
        options = dataclasses.replace(
            options, layernorm_fold=layernorm_fold_option(adapter, request.fold_norms, request.layernorm_fold)
        )
        query = dataclasses.replace(query, options=options)

        cache = SpectraCache(root, repo, source.commit, options)
        wanted_keys = {str(k) for k in spectrum_keys(kinds)}
        have: dict[int, LayerSpectra] = {}
        todo: list[int] | None = None
        manifest: dict = {}
        if ranks.rank == 0:  # one rank reads the cache and decides what is missing
            manifest = cache.read_manifest(notes)
            have, damaged = ({}, {}) if request.force else read_layers(cache, manifest, layers, notes)
            if damaged:
                notes.append(
                    f"recomputing damaged layer{'s' if len(damaged) > 1 else ''} {','.join(map(str, damaged))}"
                )
            todo = [ly for ly in layers if ly not in have or not wanted_keys <= have[ly].kinds()]
            header = dict(
                format=1,
                model=ref.display,
                name=ref.name,
                repo_id=ref.repo_id,
                local_path=str(ref.local_path) if ref.local_path else None,
                revision=revision,
                commit=source.commit,
                options=dataclasses.asdict(options),
                config=source.config,
                dims=dataclasses.asdict(dims),
            )
            # Nothing is written when nothing changes, so a read-only cache that holds everything
            # works; a manifest rebuilt (or written by an older version) lists the layers found whole.
            unlisted = [have[ly] for ly in have if not cache.expected_keys(manifest, ly)]
            try:
                if todo or unlisted or any(k not in manifest for k in header):
                    manifest = cache.update_manifest({**header, "versions": _versions()}, unlisted)
                SpectraCache.write_ref(root, repo, revision, source.commit)
            except DiskWriteError as e:
                if todo:
                    raise
                notes.append(f"nothing needed computing, but the manifest or refs could not be updated: {e.message}")
        todo, mine = ranks.share(todo)
        from_cache = [ly for ly in layers if ly not in todo]
        if ranks.rank != 0:
            layers = mine
        kind_set = set(kinds)

        if progress is not None:
            progress.start(
                total_layers=len(layers),
                cached_layers=len(from_cache) if ranks.rank == 0 else 0,
                bytes_source=lambda: source.bytes_fetched,
            )

        bytes_before = source.bytes_fetched
        rank_info = {"rank": ranks.rank, "world_size": ranks.world_size} if ranks.active else {}
        computed, route = _compute_layers(
            request, source, adapter, cache, mine, kind_set, options, device, rank_info, progress
        )
        have.update(computed)
        mine_stats = {
            "rank": ranks.rank,
            "layers": mine,
            "bytes_fetched": source.bytes_fetched - bytes_before,
            "seconds": round(time.perf_counter() - t_start, 3),
        }
        per_rank = ranks.gather(mine_stats)  # every rank's layers are on disk past this point
        stats = {
            "layers": len(layers),
            "computed": len(todo) if ranks.rank == 0 else len(mine),
            "from_cache": len(from_cache) if ranks.rank == 0 else 0,
            "bytes_fetched": sum(r["bytes_fetched"] for r in per_rank)
            if ranks.rank == 0
            else mine_stats["bytes_fetched"],
            "seconds": round(time.perf_counter() - t_start, 3),
            "device": str(device),
        }
        if computed:  # the eigensolver and layers in flight this process computed with
            stats.update(route)
        if width := source.stats.get("in_flight"):  # over HTTP: range requests in flight at the end (a folder: 0)
            stats["requests_in_flight"] = width
        if ran := source.stats.get("reader"):  # over HTTP: the reader that ran ("auto" may fall back)
            stats["reader"] = ran
        if ranks.active:
            stats["ranks"] = per_rank
        if todo:
            manifest = cache.read_manifest()
        others = [ly for ly in layers if ly not in have]
        if others:  # rank 0: the layers the other ranks computed, from the shared cache
            got, _ = read_layers(cache, manifest, others, notes)
            have.update(got)
            lost = [ly for ly in others if ly not in have]
            if lost:
                raise CacheDamagedError(
                    f"layer{'s' if len(lost) > 1 else ''} {','.join(map(str, lost))}, computed by another rank, "
                    f"cannot be read from the cache {cache.dir}",
                    "Every rank must write to the same cache folder: put --cache-dir on a filesystem all hosts "
                    "share, then rerun the same command.",
                    path=str(cache.dir),
                )
        analysis = Analysis(
            ref=ref,
            query=query,
            commit=source.commit,
            cache_dir=cache.dir,
            manifest=manifest,
            layer_spectra={ly: have[ly] for ly in layers},
        )
        return AnalyzeOutcome(
            analysis=analysis,
            layers=layers,
            computed=todo if ranks.rank == 0 else mine,
            from_cache=from_cache if ranks.rank == 0 else [],
            stats=stats,
            notes=notes,
        )


def _compute_layers(
    request: AnalyzeJob, source, adapter, cache, layers, kind_set, options, device, rank_info, progress
) -> tuple[dict[int, LayerSpectra], dict]:
    """Read, compute and cache `layers`, the stages of consecutive layers overlapping:

        reader thread      read + dequantize layer L+1 .. L+prefetch   (`stream_layers`)
        this thread        factors + launch the spectra of layer L     (`SpectraPipeline`)
        solver threads     the big eigensolves of layers L-1, L        (CUDA: own streams)
        writer thread      σ of layer L-1 to the host, its file, the manifest  (`LayerWriter`)

    so this thread only launches device work and never waits for the disk or a σ copy.
    On Ctrl-C (or an error) the layers already computed are written before it propagates.
    Returns the layers, and the route they were computed with ({"solver", "inflight"}; the
    solver is also in each layer's info).
    """
    from svd_probe.cache.writer import LayerWriter
    from svd_probe.hub.stream import stream_layers
    from svd_probe.spectra.compute import SpectraPipeline, pipeline_config

    if not layers:
        return {}, {}

    def plan_for_layer(layer: int):
        return adapter.plan(layer, kind_set, request.fold_norms)

    config = pipeline_config(device, request.solver, request.inflight, over_http=source.local_path is None)
    route = {"solver": config.resolved(device).solver, "inflight": config.inflight}
    clock = [time.perf_counter()]

    def finish(layer: int, pending, storage: dict[str, str]) -> LayerSpectra:
        spectra = pending.result()  # waits for this layer's device work (on the writer thread)
        sigma = {k: v[0].numpy() for k, v in spectra.items()}
        shapes = {k: (int(v[1][0]), int(v[1][1])) for k, v in spectra.items()}
        now = time.perf_counter()
        info = {"seconds": round(now - clock[0], 4), "device": str(device), "solver": route["solver"], **rank_info}
        clock[0] = now
        done = LayerSpectra(layer=layer, sigma=sigma, shapes=shapes, storage_dtypes=storage, info=info)
        # One call merges with kinds cached by earlier runs and lists the layer in the manifest.
        return cache.update_layer(done, merge=not request.force)

    out: dict[int, LayerSpectra] = {}

    def collect(writer: LayerWriter) -> None:
        for layer, spectra in writer.finished():
            out[layer] = spectra
            if progress is not None:
                progress.layer_done(layer)

    pipe = SpectraPipeline(kind_set, normalize_stacked=request.normalize_stacked, config=config)
    # The writer's queue holds each layer until its σ are on the host, so it bounds the layers in
    # flight as well: at least `inflight` of them may wait (the band solvers keep 12 pending).
    writer = LayerWriter(depth=max(request.write_queue, config.inflight))
    try:
        for layer, tensors in stream_layers(source, layers, plan_for_layer, device, prefetch=request.prefetch):
            tensors = apply_control(tensors, options.control, CONTROL_SEED)  # --control: randomized weights
            factors = adapter.factors(layer, tensors, kind_set, request.fold_norms, options.layernorm_fold)
            pending = pipe.submit(factors)
            # Each spectrum records the storage dtype of the weights the plan computes it from.
            storage = {k: tensors.storage_dtype(SpectrumKey.parse(k).kind) for k in pending.keys}
            del tensors, factors
            writer.put(layer, functools.partial(finish, layer, pending, storage))
            del pending
            collect(writer)
        writer.close()
        collect(writer)
    finally:
        try:
            writer.close()  # drains: the layers computed so far are kept
        finally:
            try:
                collect(writer)  # the layers the drain wrote are reported done (the Ctrl-C count)
            finally:
                pipe.close()
    return out, route


def _analyze_offline(
    request: AnalyzeJob,
    query: CacheQuery,
    ref: ModelRef,
    layer_spec: list[int] | None,
    error: Exception,
    t_start: float,
    device: torch.device,
) -> AnalyzeOutcome:
    """The Hub cannot be reached: answer from the commit the cache last resolved, or say what is missing."""
    from huggingface_hub import constants

    offline = getattr(error, "offline", False) or isinstance(error, OfflineModeIsEnabled)
    offline = offline or constants.is_offline_mode()
    why = "offline mode (HF_HUB_OFFLINE=1)" if offline else "the Hub is unreachable"
    root, repo, revision = query.root, cache_repo(ref), query.revision
    entry = None if is_commit(revision) else SpectraCache.read_ref(root, repo, revision)
    commit = revision if is_commit(revision) else (entry.commit if entry else None)
    if commit is None:
        detail = error.message if isinstance(error, SvdProbeError) else str(error)
        raise OfflineCacheMissError(
            f"{why}, and no analysis of {ref.display} (revision {revision}) is cached in {root}: {detail}",
            "Reconnect (or unset HF_HUB_OFFLINE) and rerun the same command.",
        )
    notes: list[str] = []
    cache = SpectraCache(root, repo, commit, query.options)
    manifest = cache.read_manifest(notes)
    if not isinstance(manifest.get("config"), dict) and query.options.layernorm_fold != "exact":
        # Only pre-LayerNorm models key their cache by the fold mode; every other model's
        # analysis sits under "exact" whatever --layernorm-fold asked for.
        exact = dataclasses.replace(query.options, layernorm_fold="exact")
        alt = SpectraCache(root, repo, commit, exact)
        alt_manifest = alt.read_manifest()
        alt_config = alt_manifest.get("config")
        if isinstance(alt_config, dict) and not adapter_for(alt_config).folds_layernorm:
            cache, manifest, query = alt, alt_manifest, dataclasses.replace(query, options=exact)
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise OfflineCacheMissError(
            f"{why}, and the cache holds no usable manifest of {ref.display} at {commit[:12]} in {root}",
            "Reconnect (or unset HF_HUB_OFFLINE) and rerun the same command.",
        )
    adapter = adapter_for(config)
    dims = cached_dims(manifest, adapter, cache.manifest_path)
    kinds = parse_matrices(request.matrices, adapter.supported_kinds())
    layers = select_layers(layer_spec, dims, request.include_mtp)
    wanted_keys = {str(k) for k in spectrum_keys(kinds)}
    have, damaged = ({}, {}) if request.force else read_layers(cache, manifest, layers, notes)
    missing = [ly for ly in layers if ly not in have or not wanted_keys <= have[ly].kinds()]
    if missing:
        cached = [ly for ly in layers if ly not in missing]
        pick = (
            f" Layers {','.join(map(str, cached))} are cached: add --layers to summarize only those." if cached else ""
        )
        # A layer whose file is there but damaged is missing too: say what is wrong with it (the
        # notes that hold it are not printed when analyze fails), as `load_analysis` does.
        bad = [damaged[ly] for ly in missing if ly in damaged]
        damage = f"; {bad[0].message}" if bad else ""
        if len(bad) > 1:
            damage += f" (and {len(bad) - 1} more damaged layer files)"
        raise OfflineCacheMissError(
            f"{why}: cannot compute layer{'s' if len(missing) > 1 else ''} {','.join(map(str, missing))} "
            f"of {ref.display} without it (cache {cache.dir}){damage}",
            "Reconnect (or unset HF_HUB_OFFLINE) and rerun the same command." + pick,
        )
    since = f", recorded {entry.since}" if entry is not None and entry.since else ""
    notes.insert(
        0,
        f"{why}: using commit {commit[:12]}, which revision {revision} resolved to when last analyzed{since}; "
        "nothing was fetched",
    )
    stats = {
        "layers": len(layers),
        "computed": 0,
        "from_cache": len(layers),
        "bytes_fetched": 0,
        "seconds": round(time.perf_counter() - t_start, 3),
        "device": str(device),
        "offline": True,
    }
    analysis = Analysis(
        ref=ref,
        query=query,
        commit=commit,
        cache_dir=cache.dir,
        manifest=manifest,
        layer_spectra={ly: have[ly] for ly in layers},
    )
    return AnalyzeOutcome(analysis=analysis, layers=layers, computed=[], from_cache=layers, stats=stats, notes=notes)


def cached_dims(manifest: dict, adapter, where: Path, command: str = "analyze") -> ModelDims:
    """The dims a cache manifest records, checked against those its config.json gives through the
    adapter, as the online path reads them (`adapter.dims()`: every field bounded): only the MTP
    layers may differ, the manifest counting those the checkpoint held (at most those declared).
    A manifest without dims (an older one) gives the config's; a field of a later version is
    ignored. A hand-edited num_layers of "x" ended offline `analyze` in a TypeError, -5 in an
    empty summary (exit 0), 2^31 in a list of 2^31 layers (killed for memory).

    Raises `CacheDamagedError` naming the manifest and the fields that disagree; its hint names
    `svd-probe <command>`, which writes the manifest anew.
    """
    config, raw = adapter.dims(), manifest.get("dims")
    if raw is None:
        return config
    recorded = checked_dims(raw)  # a field of the wrong kind is left out
    held = recorded.get("num_mtp_layers")
    if type(held) is int and held <= config.num_mtp_layers:
        config = dataclasses.replace(
            config, num_layers=config.num_layers - config.num_mtp_layers + held, num_mtp_layers=held
        )
    expected = {k: v for k, v in dataclasses.asdict(config).items() if k != "notes"}
    if not isinstance(raw, dict):
        wrong = [f"{shown(raw, 24)}, not a mapping"]
    else:
        wrong = [
            f"{name} {shown(raw[name], 24)}" if name in raw else f"no {name}"
            for name, value in expected.items()
            if name not in recorded or recorded[name] != value
        ]
    if not wrong:
        return config
    more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
    raise CacheDamagedError(
        f"the cache manifest {where} is damaged: its dims ({', '.join(wrong[:3])}{more}) are not those of "
        "the config.json it records",
        f"Delete it and rerun with the Hub reachable: `svd-probe {command}` writes it anew and keeps the cached layers.",
        path=str(where),
    )


def layernorm_fold_option(adapter, fold_norms: bool, requested: str) -> str:
    """The `layernorm_fold` an analysis is keyed and computed with: the requested one where a
    pre-LayerNorm folds into q/k/v (GPT-2), else "exact", which those models' folds are anyway
    (RMSNorm has no centering; BERT's LayerNorm comes after attention; no folding, no fold)."""
    if requested not in ("exact", "gain"):
        raise BadOptionError(f"bad --layernorm-fold value {requested!r}", "Use --layernorm-fold exact or gain.")
    return requested if fold_norms and adapter.folds_layernorm else "exact"
