"""The on-disk cache of spectra: one safetensors file per layer, written atomically.

Layout under the cache root (`--cache-dir`, else `$SVD_PROBE_CACHE`, else the user cache folder):

    <root>/<repo key>/refs/<revision>                 the commit that revision resolved to
    <root>/<repo key>/<commit>/<options key>/
        manifest.json                                 config, options, versions, per-layer timings
        layer-0007.safetensors                        spectra of layer 7

The repo key is `models--org--name` for Hub repos (as in huggingface_hub's cache) and
`local--<folder name>` for local folders, whose "commit" is a fingerprint of their files.
The options key hashes only the options that change a spectrum (norm folding, stacked
normalization, format version); which matrix kinds a layer holds is recorded in its file, so a
rerun with more `--matrices` computes only what is missing.

Tensor keys in a layer file are `<scope>.<matrix>`: `head.VO` is [n_heads, k] (one row per head,
σ descending), `stacked.VO` and `layer.QA` are [k]. The file's metadata holds, per key, the
shape (m, n) of the matrix whose σ it is and the storage dtype of the weights behind it.
A file appears only once complete (write to a temporary name, then rename), so a run killed at
any moment leaves only whole layers behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from svd_probe.atomic import atomic_write, atomic_write_bytes

CACHE_FORMAT_VERSION = 1
ENV_CACHE_DIR = "SVD_PROBE_CACHE"


def default_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`--cache-dir`, else `$SVD_PROBE_CACHE`, else the platform's user cache folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("svd-probe", appauthor=False))


def repo_key(repo_id: str | None, local_path: str | os.PathLike | None = None) -> str:
    if repo_id:
        return "models--" + repo_id.replace("/", "--")
    if local_path is None:
        raise ValueError("need a repo id or a local path")
    p = Path(local_path).resolve()
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:8]
    return f"local--{p.name}-{digest}"


@dataclass(frozen=True)
class AnalysisOptions:
    """Options that change the numbers in a spectrum, hence part of the cache key."""

    fold_norms: bool = True
    normalize_stacked: bool = True
    # How a pre-LayerNorm folds (GPT-2): "exact" W·diag(g)·P, or "gain" W·diag(g) as svd-probe 0.1
    # did. `analyze` sets "exact" for every other model, whose folds these two never tell apart.
    layernorm_fold: str = "exact"

    def key(self) -> str:
        fields = asdict(self)
        if self.layernorm_fold == "exact":
            # Left out of the hash at its default, so keys from before the field existed still
            # name the same spectra for every RMSNorm and BERT model.
            del fields["layernorm_fold"]
        blob = json.dumps({"v": CACHE_FORMAT_VERSION, **fields}, sort_keys=True)
        tag = ("fold" if self.fold_norms else "nofold") + "-" + ("norm" if self.normalize_stacked else "raw")
        if self.layernorm_fold != "exact":
            tag += f"-ln{self.layernorm_fold}"
        return f"{tag}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


@dataclass
class LayerSpectra:
    """Spectra of one layer as stored: key `<scope>.<matrix>` → σ array (descending)."""

    layer: int
    sigma: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, int]]
    storage_dtypes: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # seconds, bytes fetched, device...

    def kinds(self) -> set[str]:
        return set(self.sigma)


class AnalysisCache:
    """The cache folder of one (repo, commit, options)."""

    def __init__(self, root: str | os.PathLike, repo: str, commit: str, options: AnalysisOptions):
        self.root = Path(root)
        self.repo = repo
        self.commit = commit
        self.options = options
        self.dir = self.root / repo / commit / options.key()

    # --- revision refs: let offline commands find the commit a revision resolved to ----------
    @staticmethod
    def write_ref(root: str | os.PathLike, repo: str, revision: str, commit: str) -> None:
        atomic_write_bytes(Path(root) / repo / "refs" / revision.replace("/", "%2F"), commit.encode())

    @staticmethod
    def read_ref(root: str | os.PathLike, repo: str, revision: str) -> str | None:
        p = Path(root) / repo / "refs" / revision.replace("/", "%2F")
        return p.read_text().strip() if p.is_file() else None

    # --- layers ------------------------------------------------------------------------------
    def layer_path(self, layer: int) -> Path:
        return self.dir / f"layer-{layer:04d}.safetensors"

    def cached_layers(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.glob("layer-*.safetensors"):
            try:
                out.append(int(p.stem.split("-")[1]))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def layer_kinds(self, layer: int) -> set[str]:
        """Keys (`scope.matrix`) stored for a layer, read from the header only."""
        p = self.layer_path(layer)
        if not p.is_file():
            return set()
        try:
            with safe_open(p, framework="numpy") as f:
                return set(f.keys())
        except Exception:
            return set()  # unreadable: treat as not cached, so it is recomputed

    def write_layer(self, spectra: LayerSpectra) -> Path:
        tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float64)) for k, v in spectra.sigma.items()}
        meta = {
            "format": str(CACHE_FORMAT_VERSION),
            "layer": str(spectra.layer),
            "shapes": json.dumps({k: list(v) for k, v in spectra.shapes.items()}),
            "storage_dtypes": json.dumps(spectra.storage_dtypes),
            "info": json.dumps(spectra.info),
        }
        path = self.layer_path(spectra.layer)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    def read_layer(self, layer: int) -> LayerSpectra:
        p = self.layer_path(layer)
        with safe_open(p, framework="numpy") as f:
            meta = f.metadata() or {}
            sigma = {k: f.get_tensor(k) for k in f.keys()}
        shapes = {k: tuple(v) for k, v in json.loads(meta.get("shapes", "{}")).items()}
        return LayerSpectra(
            layer=int(meta.get("layer", layer)),
            sigma=sigma,
            shapes=shapes,
            storage_dtypes=json.loads(meta.get("storage_dtypes", "{}")),
            info=json.loads(meta.get("info", "{}")),
        )

    # --- manifest ----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
