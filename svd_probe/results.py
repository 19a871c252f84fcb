"""Loading a cached analysis: spectra, metrics table and export records, offline.

    >>> from svd_probe.results import CacheQuery, load_analysis
    >>> a = load_analysis("deepseek-v3")            # or a repo id, or a local folder
    >>> a = load_analysis(CacheQuery("deepseek-v3", revision="main", cache_dir="/data/cache"))
    >>> a.sigma(layer=10, matrix="VO", scope="stacked")
    >>> df = a.metrics()                            # pandas DataFrame, one row per spectrum

A `CacheQuery` names one cached analysis (model, revision, cache folder, spectra options); `export`,
`make_plots`, `load_analysis` and the CLI all take it. Nothing here touches the network: the
revision is looked up in the cache's refs, written by `svd-probe analyze` when it resolved the
revision to a commit.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from svd_probe.cache.store import (
    LayerSpectra,
    SpectraCache,
    SpectraOptions,
    default_cache_root,
    layer_file_name,
    recorded_name,
    repo_key,
)
from svd_probe.errors import BadOptionError, CacheDamagedError, CacheMissError, utf8_text
from svd_probe.kinds import HEAD, SpectrumKey, canonical_kinds, parse_key, sort_keys
from svd_probe.models import ModelRef, is_commit, resolve_model
from svd_probe.options import layers_in_model
from svd_probe.spectra.metrics import DEFAULT_ERRORS, metrics_batch


@dataclass(frozen=True)
class CacheQuery:
    """Which cached analysis: a model at a revision, in a cache folder, with spectra options.

    Args:
        model: alias, Hub repo id, local folder (as given to `analyze`), or a resolved ModelRef.
        revision: branch, tag or commit; looked up in the cache's refs, never on the network.
        cache_dir: the cache root (default: $SVD_PROBE_CACHE, else the user cache folder).
        options: the options that change the numbers (norm folding, stacked normalization).

    Example:
        >>> q = CacheQuery("deepseek-v3", options=SpectraOptions(fold_norms=False))
        >>> load_analysis(q).layers
    """

    model: str | ModelRef
    revision: str = "main"
    cache_dir: str | Path | None = None
    options: SpectraOptions = field(default_factory=SpectraOptions)

    @property
    def ref(self) -> ModelRef:
        return self.model if isinstance(self.model, ModelRef) else resolve_model(self.model)

    @property
    def name(self) -> str:
        """The model as the user typed it (for commands in hints)."""
        return self.model.name if isinstance(self.model, ModelRef) else self.model

    @property
    def root(self) -> Path:
        return default_cache_root(self.cache_dir)


# The ModelDims fields that are sizes (`svd_probe.adapters.base.ModelDims`); q_latent and
# kv_latent are None for a model without MLA latents.
_DIM_SIZES = ("num_layers", "num_mtp_layers", "d_model", "n_heads", "n_kv_groups", "d_qk", "d_rope", "d_v")
_DIM_OPTIONAL = ("q_latent", "kv_latent")
_MAX_DIM = 1 << 31


def checked_dims(raw: object) -> dict:
    """The `dims` a manifest records, each field checked, a field of the wrong kind left out
    (read as unknown, which every reader handles): sizes are ints in [0, 2^31] (q_latent and
    kv_latent may be None), model_type a name, notes a list of names. A size of "x", -5 or
    1e400 in a hand-edited manifest ended `plot` and `report` in a traceback."""
    if not isinstance(raw, dict):
        return {}
    out: dict = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            continue
        if key == "notes":
            if isinstance(value, list):
                out[key] = [n for n in value if recorded_name(n) is not None]
        elif key == "model_type":
            if recorded_name(value) is not None:
                out[key] = value
        elif type(value) is int and 0 <= value <= _MAX_DIM:
            out[key] = value
        elif value is None and key not in _DIM_SIZES:
            out[key] = value
        elif key not in (*_DIM_SIZES, *_DIM_OPTIONAL) and recorded_name(value, 200) is not None:
            out[key] = value  # a field of a later version, shown as text in the report
    return out


def as_query(query: CacheQuery | str | ModelRef) -> CacheQuery:
    """A CacheQuery as it is, or a model name with every other field at its default."""
    return query if isinstance(query, CacheQuery) else CacheQuery(query)


@dataclass
class Analysis:
    """A cached analysis of one model at one commit with one set of options.

    `notes` says what loading left out (damaged layer files, with the command that repairs them).
    """

    ref: ModelRef
    query: CacheQuery
    commit: str
    cache_dir: Path
    manifest: dict
    layer_spectra: dict[int, LayerSpectra] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # Short: the spectra themselves are megabytes (the generated repr was 183 KB on the demo).
        layers = self.layers
        from svd_probe.options import format_layers

        span = format_layers(layers) if layers else "none"
        stacked = ",".join(self.kinds("stacked")) or "-"
        return (
            f"Analysis({self.display} @ {self.commit[:12]}, layers {span}, stacked {stacked}, "
            f"control {self.control}, cache {self.cache_dir})"
        )

    def _repr_html_(self) -> str:
        """The summary table `analyze` prints, for notebooks."""
        from html import escape

        from svd_probe.report import layer_summary, summary_columns

        rows = layer_summary(self)
        ranked, head = summary_columns(rows)
        cols = [("layer", "layer")]
        for kind in ranked:
            cols += [(f"{kind}_rank_1pct", f"{kind} 1%"), (f"{kind}_rank_0.1pct", f"{kind} 0.1%")]
        if ranked:
            cols.append((f"{ranked[0]}_full_rank", "full"))
        if head:
            cols.append((f"head_{head}_median_rank_1pct", f"median head {head} 1%"))

        def cell(v) -> str:
            return "-" if v is None else escape(f"{v:g}" if isinstance(v, float) else str(v))

        head_html = "".join(f"<th>{escape(label)}</th>" for _, label in cols)
        body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
        caption = escape(f"{self.display} @ {self.commit[:12]} · ranks at 1% / 0.1% energy error · {self.cache_dir}")
        return f"<table><caption>{caption}</caption><thead><tr>{head_html}</tr></thead><tbody>{body}</tbody></table>"

    @property
    def revision(self) -> str:
        return self.query.revision

    @property
    def options(self) -> SpectraOptions:
        return self.query.options

    @property
    def control(self) -> str:
        """The randomized control these spectra are of ("gaussian", "shuffled"), or "none"."""
        return self.options.control or "none"

    @property
    def display(self) -> str:
        """The model's name as the manifest records it, if it is a name (else the query's)."""
        return recorded_name(self.manifest.get("model")) or self.ref.display

    @property
    def repo_id(self) -> str | None:
        return self.ref.repo_id

    @property
    def config(self) -> dict:
        c = self.manifest.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def dims(self) -> dict:
        return checked_dims(self.manifest.get("dims"))

    @property
    def layers(self) -> list[int]:
        return sorted(self.layer_spectra)

    def kinds(self, scope: str) -> list[str]:
        """Matrix kinds present in any layer for a scope, in canonical order."""
        keys = (parse_key(k) for ls in self.layer_spectra.values() for k in ls.sigma)
        return canonical_kinds(k.kind for k in keys if k is not None and k.scope == scope)

    def sigma(self, layer: int, matrix: str, scope: str = "stacked", head: int | None = None) -> np.ndarray:
        """σ (descending) of one spectrum; for scope 'head' without `head`, all heads [n, k]."""
        try:
            key = str(SpectrumKey(scope, matrix))
        except ValueError as e:
            raise BadOptionError(str(e), "Scopes: head, stacked, layer; see `svd_probe.kinds`.") from None
        ls = self.layer_spectra.get(layer)
        if ls is None or key not in ls.sigma:
            raise CacheMissError(
                f"{self.display}: no {scope} {matrix} spectrum cached for layer {layer}",
                f"Run: {self.analyze_command(layers=str(layer), matrices=matrix)}",
            )
        s = ls.sigma[key]
        return s[head] if (scope == HEAD and head is not None) else s

    def shape(self, layer: int, matrix: str, scope: str = "stacked") -> tuple[int, int]:
        """(m, n) of the matrix behind one cached spectrum.

        Raises `CacheMissError` (as `sigma` does) when the layer or the spectrum is not cached.
        """
        self.sigma(layer, matrix, scope)  # the typed error, with the command, when it is not cached
        shape = self.layer_spectra[layer].matrix_shape(scope, matrix)
        if shape is None:  # `SpectraCache.read_layer` calls a file without it damaged
            raise CacheDamagedError(
                f"{self.display}: layer {layer} records no matrix shape for its {scope} {matrix} spectrum",
                f"Recompute it: {self.analyze_command(layers=str(layer))}",
                path=str(self.cache_dir / layer_file_name(layer)),
            )
        return shape

    def analyze_command(self, layers: str | None = None, matrices: str | None = None) -> str:
        return analyze_command(self.query, layers=layers, matrices=matrices)

    def records(self) -> Iterator[dict]:
        """One export record per spectrum (the jsonl format of `svd-probe export`)."""
        for layer in self.layers:
            ls = self.layer_spectra[layer]
            for text in sort_keys(ls.sigma):
                key = SpectrumKey.parse(text)
                s = ls.sigma[text]
                if key.scope == HEAD:
                    for h in range(s.shape[0]):
                        yield self._record(layer, key, h, s[h])
                else:
                    yield self._record(layer, key, None, s)

    def _record(self, layer: int, key: SpectrumKey, head: int | None, s) -> dict:
        # A control's records say so; the real analysis' records keep the fields they always had.
        control = {"control": self.control} if self.options.control else {}
        return {
            "model": self.display,
            "revision": self.commit,
            **control,
            "layer": layer,
            "matrix": key.kind,
            "scope": key.scope,
            "head": head,
            "sigma": [float(x) for x in s],
        }

    def metrics(self, errors: tuple[float, ...] = DEFAULT_ERRORS, at_rank: int | None = None):
        """The metrics table: one row per spectrum, one column per metric (pandas DataFrame)."""
        import pandas as pd

        # The name as UTF-8 can hold it: a local folder's undecodable byte (a lone surrogate)
        # ended csv and parquet exports, `plot` and `report` in pyarrow's UnicodeEncodeError.
        model = utf8_text(self.display)
        frames = []
        for layer in self.layers:
            ls = self.layer_spectra[layer]
            for text in sort_keys(ls.sigma):
                key = SpectrumKey.parse(text)
                s = np.atleast_2d(ls.sigma[text])
                shape = self.shape(layer, key.kind, key.scope)
                cols = metrics_batch(
                    s,
                    shape,
                    storage_dtype=ls.storage_dtypes.get(text, "F32"),
                    errors=errors,
                    at_rank=at_rank,
                    scope=key.scope,
                )
                n = s.shape[0]
                frame = {
                    "model": [model] * n,
                    "revision": [self.commit] * n,
                    "layer": np.full(n, layer),
                    "matrix": [key.kind] * n,
                    "scope": [key.scope] * n,
                    "head": np.arange(n) if key.scope == HEAD else np.full(n, -1),
                    "control": [self.control] * n,
                    "m": np.full(n, shape[0]),
                    "n": np.full(n, shape[1]),
                    **cols,
                }
                frames.append(pd.DataFrame(frame))
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True)
        # Heads are nullable integers: NaN-free ints for per-head rows, <NA> for stacked/layer rows.
        df["head"] = df["head"].astype("Int64").where(df["scope"] == "head")
        return df


def analyze_command(query: CacheQuery, layers: str | None = None, matrices: str | None = None) -> str:
    """The `svd-probe analyze` command that would produce this analysis (for hints), each word
    shell-quoted where it needs it (`shlex.quote`): a folder `my model` split in two when pasted,
    and one named `$(...)` ran its command. Plain names stay as they are."""
    parts = ["svd-probe", "analyze", query.name]
    if query.revision != "main":
        parts += ["--revision", query.revision]
    if not query.options.fold_norms:
        parts.append("--no-fold-norms")
    if not query.options.normalize_stacked:
        parts.append("--no-normalize-stacked")
    if query.options.layernorm_fold != "exact":
        parts += ["--layernorm-fold", query.options.layernorm_fold]
    if query.options.control is not None:
        parts += ["--control", query.options.control]
    if layers:
        parts += ["--layers", layers]
    if matrices:
        parts += ["--matrices", matrices]
    if query.cache_dir is not None:
        parts += ["--cache-dir", str(query.cache_dir)]
    return shlex.join(parts)


def cache_repo(ref: ModelRef) -> str:
    return repo_key(ref.repo_id, ref.local_path)


def resolve_cached_commit(query: CacheQuery, ref: ModelRef) -> str | None:
    """The commit a revision names in the cache: itself when it is one, else its ref, else None."""
    if is_commit(query.revision):
        return query.revision
    entry = SpectraCache.read_ref(query.root, cache_repo(ref), query.revision or "main")
    return entry.commit if entry is not None else None


def read_layers(
    cache: SpectraCache, manifest: dict, layers: list[int], notes: list[str]
) -> tuple[dict[int, LayerSpectra], dict[int, CacheDamagedError]]:
    """Read and check these layers' files: (readable, damaged); damaged ones are noted, missing skipped."""
    good: dict[int, LayerSpectra] = {}
    damaged: dict[int, CacheDamagedError] = {}
    for ly in layers:
        try:
            good[ly] = cache.read_layer(ly, cache.expected_keys(manifest, ly))
        except FileNotFoundError:
            continue
        except CacheDamagedError as e:
            damaged[ly] = e
            notes.append(e.message)
    return good, damaged


def _heads_checked(manifest: dict, layer_spectra: dict[int, LayerSpectra], notes: list[str], where: Path) -> dict:
    """The manifest, less its dims' head counts where its layer files hold other counts (read as
    unknown, with a note): figures size themselves by them, and a hand-edited n_heads of 2^31
    asked numpy for 16 GiB (a traceback), one of 24 drew an 8-head layer as 24 heads."""
    dims = checked_dims(manifest.get("dims"))
    wrong = []
    for i, name in enumerate(("n_heads", "n_kv_groups")):
        held = {n for ls in layer_spectra.values() if (n := ls.heads()[i]) is not None}
        if dims.get(name) is not None and held and held != {dims[name]}:
            wrong.append(name)
            notes.append(
                f"{where}: its dims say {name} {dims[name]:,}, but the layer files hold "
                f"{', '.join(map(str, sorted(held)))}: read as unknown; delete the manifest and `svd-probe analyze` writes it anew"
            )
    return {**manifest, "dims": {k: v for k, v in dims.items() if k not in wrong}} if wrong else manifest


def _folds_layernorm(config: dict) -> bool:
    from svd_probe.adapters import adapter_for
    from svd_probe.errors import SvdProbeError

    try:
        return bool(getattr(adapter_for(config), "folds_layernorm", False))
    except SvdProbeError:
        return False


def load_analysis(
    query: CacheQuery | str | ModelRef,
    *,
    layers: list[int] | None = None,
    on_damaged: Literal["raise", "skip"] = "raise",
) -> Analysis:
    """Load a cached analysis from disk alone.

    Args:
        query: which analysis (a model name alone means the defaults: revision main, default
            cache folder, default options).
        layers: only these layers (default: every cached one).
        on_damaged: "raise" a `CacheDamagedError` naming a truncated or malformed layer file, or
            "skip" it and say so in `Analysis.notes`.

    Returns:
        The `Analysis` (its layers are those cached and readable).

    Raises `CacheMissError`, whose hint is the `analyze` command, when nothing is cached.

    Example:
        >>> a = load_analysis(CacheQuery("deepseek-v3", cache_dir="cache"), layers=[0, 1])
        >>> a.metrics().head()
    """
    query = as_query(query)
    ref = query.ref
    root = query.root
    commit = resolve_cached_commit(query, ref)
    if commit is None:
        raise CacheMissError(
            f"no cached analysis of {ref.display} (revision {query.revision}) in {root}",
            f"Run: {analyze_command(query)}",
        )
    cache = SpectraCache(root, cache_repo(ref), commit, query.options)
    cached = cache.cached_layers()
    if not cached and query.options.layernorm_fold != "exact":
        # Only pre-LayerNorm models key their cache by the fold mode; every other model's
        # analysis sits under "exact" whatever --layernorm-fold asks for.
        exact = dataclasses.replace(query.options, layernorm_fold="exact")
        alt = SpectraCache(root, cache_repo(ref), commit, exact)
        config = alt.read_manifest().get("config")
        if isinstance(config, dict) and not _folds_layernorm(config):
            cache, query, cached = alt, dataclasses.replace(query, options=exact), alt.cached_layers()
    wanted = cached if layers is None else [ly for ly in layers if ly in cached]
    asked = None if layers is None else ",".join(map(str, layers))
    if not wanted:
        raise CacheMissError(
            f"no cached layers of {ref.display} at {commit[:12]} with these options in {root}",
            f"Run: {analyze_command(query, layers=asked)}",
        )
    notes: list[str] = []
    manifest = cache.read_manifest(notes)
    # The model's layers are 0 to num_layers - 1 (MTP layers included): a file past them holds
    # no spectrum of this model (one copied in from a larger model was exported and plotted).
    n_layers = checked_dims(manifest.get("dims")).get("num_layers")
    wanted, left_out = layers_in_model(wanted, n_layers, cache.layer_path)
    if left_out:
        notes.append(left_out)
    good, damaged = read_layers(cache, manifest, wanted, notes)
    if damaged and on_damaged == "raise":
        first = next(iter(damaged.values()))
        others = f" (and {len(damaged) - 1} more damaged layer files)" if len(damaged) > 1 else ""
        bad = ",".join(map(str, damaged))
        raise CacheDamagedError(
            first.message + others,
            f"Recompute them: {analyze_command(query, layers=bad)}",
            path=first.path,
        )
    if not good:
        raise CacheMissError(
            f"no readable cached layers of {ref.display} at {commit[:12]} in {root}"
            + (f"; {left_out}" if left_out else ""),
            f"Run: {analyze_command(query, layers=asked)}",
        )
    return Analysis(
        ref=ref,
        query=query,
        commit=commit,
        cache_dir=cache.dir,
        manifest=_heads_checked(manifest, good, notes, cache.manifest_path),
        layer_spectra=good,
        notes=notes,
    )
