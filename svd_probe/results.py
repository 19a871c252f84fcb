"""Loading a cached analysis: spectra, metrics table and export records, offline.

    >>> from svd_probe.results import load_analysis
    >>> a = load_analysis("deepseek-v3")            # or a repo id, or a local folder
    >>> a.sigma(layer=10, matrix="VO", scope="stacked")
    >>> df = a.metrics()                            # pandas DataFrame, one row per spectrum

Nothing here touches the network: the revision is looked up in the cache's refs, written by
`svd-probe analyze` when it resolved the revision to a commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from svd_probe.adapters.base import ALL_KINDS
from svd_probe.cache.store import AnalysisCache, AnalysisOptions, LayerSpectra, default_cache_root, repo_key
from svd_probe.errors import CacheMissError
from svd_probe.models import ModelRef, is_commit, resolve_model
from svd_probe.spectra.metrics import DEFAULT_ERRORS, metrics_batch

SCOPES = ("head", "stacked", "layer")


def split_key(key: str) -> tuple[str, str]:
    """`head.VO` → ("head", "VO")."""
    scope, _, matrix = key.partition(".")
    return scope, matrix


@dataclass
class Analysis:
    """A cached analysis of one model at one commit with one set of options."""

    ref: ModelRef
    revision: str
    commit: str
    options: AnalysisOptions
    cache_dir: Path
    manifest: dict
    layer_spectra: dict[int, LayerSpectra] = field(default_factory=dict)
    cache_dir_arg: str | Path | None = None  # as the caller gave it, so hints can repeat it

    @property
    def display(self) -> str:
        return self.manifest.get("model") or self.ref.display

    @property
    def repo_id(self) -> str | None:
        return self.ref.repo_id

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def dims(self) -> dict:
        return self.manifest.get("dims", {})

    @property
    def layers(self) -> list[int]:
        return sorted(self.layer_spectra)

    def kinds(self, scope: str) -> list[str]:
        """Matrix kinds present in any layer for a scope, in canonical order."""
        present = {split_key(k)[1] for ls in self.layer_spectra.values() for k in ls.sigma if split_key(k)[0] == scope}
        return [k for k in ALL_KINDS if k in present]

    def sigma(self, layer: int, matrix: str, scope: str = "stacked", head: int | None = None) -> np.ndarray:
        """σ (descending) of one spectrum; for scope 'head' without `head`, all heads [n, k]."""
        ls = self.layer_spectra.get(layer)
        key = f"{scope}.{matrix}"
        if ls is None or key not in ls.sigma:
            raise CacheMissError(
                f"{self.display}: no {scope} {matrix} spectrum cached for layer {layer}",
                f"Run: {self.analyze_command(layers=str(layer), matrices=matrix)}",
            )
        s = ls.sigma[key]
        return s[head] if (scope == "head" and head is not None) else s

    def shape(self, layer: int, matrix: str, scope: str = "stacked") -> tuple[int, int]:
        return tuple(self.layer_spectra[layer].shapes[f"{scope}.{matrix}"])

    def analyze_command(self, layers: str | None = None, matrices: str | None = None) -> str:
        return analyze_command(
            self.ref, self.revision, self.options, layers=layers, matrices=matrices, cache_dir=self.cache_dir_arg
        )

    def records(self) -> Iterator[dict]:
        """One export record per spectrum (the jsonl format of `svd-probe export`)."""
        for layer in self.layers:
            ls = self.layer_spectra[layer]
            for key in _ordered_keys(ls.sigma):
                scope, matrix = split_key(key)
                s = ls.sigma[key]
                if scope == "head":
                    for h in range(s.shape[0]):
                        yield self._record(layer, matrix, scope, h, s[h])
                else:
                    yield self._record(layer, matrix, scope, None, s)

    def _record(self, layer, matrix, scope, head, s) -> dict:
        return {
            "model": self.display,
            "revision": self.commit,
            "layer": layer,
            "matrix": matrix,
            "scope": scope,
            "head": head,
            "sigma": [float(x) for x in s],
        }

    def metrics(self, errors: tuple[float, ...] = DEFAULT_ERRORS, at_rank: int | None = None):
        """The metrics table: one row per spectrum, one column per metric (pandas DataFrame)."""
        import pandas as pd

        frames = []
        for layer in self.layers:
            ls = self.layer_spectra[layer]
            for key in _ordered_keys(ls.sigma):
                scope, matrix = split_key(key)
                s = np.atleast_2d(ls.sigma[key])
                shape = tuple(ls.shapes.get(key, (s.shape[1], s.shape[1])))
                cols = metrics_batch(
                    s,
                    shape,
                    storage_dtype=ls.storage_dtypes.get(key, "F32"),
                    errors=errors,
                    at_rank=at_rank,
                    scope=scope,
                )
                n = s.shape[0]
                frame = {
                    "model": [self.display] * n,
                    "revision": [self.commit] * n,
                    "layer": np.full(n, layer),
                    "matrix": [matrix] * n,
                    "scope": [scope] * n,
                    "head": np.arange(n) if scope == "head" else np.full(n, -1),
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


def _ordered_keys(sigma: dict) -> list[str]:
    order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in SCOPES for m in ALL_KINDS)}
    return sorted(sigma, key=lambda k: order.get(split_key(k), len(order)))


def analyze_command(
    ref: ModelRef,
    revision: str,
    options: AnalysisOptions,
    layers: str | None = None,
    matrices: str | None = None,
    cache_dir: str | Path | None = None,
) -> str:
    """The `svd-probe analyze` command that would produce this analysis (for hints)."""
    parts = ["svd-probe analyze", ref.name]
    if revision != "main":
        parts += ["--revision", revision]
    if not options.fold_norms:
        parts.append("--no-fold-norms")
    if not options.normalize_stacked:
        parts.append("--no-normalize-stacked")
    if layers:
        parts += ["--layers", layers]
    if matrices:
        parts += ["--matrices", matrices]
    if cache_dir is not None:
        parts += ["--cache-dir", str(cache_dir)]
    return " ".join(parts)


def cache_repo(ref: ModelRef) -> str:
    return repo_key(ref.repo_id, ref.local_path)


def load_analysis(
    model: str | ModelRef,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    *,
    fold_norms: bool = True,
    normalize_stacked: bool = True,
    layers: list[int] | None = None,
) -> Analysis:
    """Load a cached analysis, or raise `CacheMissError` whose hint is the `analyze` command."""
    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    options = AnalysisOptions(fold_norms=fold_norms, normalize_stacked=normalize_stacked)
    root = default_cache_root(cache_dir)
    repo = cache_repo(ref)
    commit = revision if is_commit(revision) else AnalysisCache.read_ref(root, repo, revision)
    if commit is None:
        raise CacheMissError(
            f"no cached analysis of {ref.display} (revision {revision}) in {root}",
            f"Run: {analyze_command(ref, revision, options, cache_dir=cache_dir)}",
        )
    cache = AnalysisCache(root, repo, commit, options)
    cached = cache.cached_layers()
    wanted = cached if layers is None else [ly for ly in layers if ly in cached]
    if not wanted:
        raise CacheMissError(
            f"no cached layers of {ref.display} at {commit[:12]} with these options in {root}",
            f"Run: {analyze_command(ref, revision, options, layers=None if layers is None else ','.join(map(str, layers)), cache_dir=cache_dir)}",
        )
    return Analysis(
        ref=ref,
        revision=revision,
        commit=commit,
        options=options,
        cache_dir=cache.dir,
        manifest=cache.read_manifest(),
        layer_spectra={ly: cache.read_layer(ly) for ly in wanted},
        cache_dir_arg=cache_dir,
    )
