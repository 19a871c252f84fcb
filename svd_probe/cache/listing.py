"""What the spectra cache holds, and removing a model from it (`svd-probe cache list`, `cache rm`).

Reads the layout `cache.store` writes (see its docstring): `<root>/<repo key>/refs/<revision>`
and `<root>/<repo key>/<commit>/<options key>/manifest.json` beside `layer-NNNN.safetensors`.
Everything is read as untrusted: a manifest that does not parse still lists its layer files, a
folder that is not a 40-hex commit is left alone, and symlinks are never followed.

Removal works on whole commit folders (every options key, diffs and alignments under it) and the
refs that name them. Each path is checked to lie inside the cache root before it is deleted.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from svd_probe.cache.store import (
    SpectraCache,
    layer_of_file,
    read_json_object,
    read_ref_file,
    recorded_name,
    ref_file_name,
)
from svd_probe.errors import BadOptionError, CacheMissError
from svd_probe.models import is_commit


@dataclass
class CachedAnalysis:
    """One cached analysis: a model at a commit with one set of options."""

    model: str
    repo_key: str
    commit: str
    revisions: list[str]
    options: dict
    layers: list[int]
    bytes: int
    updated: str  # the newest file's modification time (UTC); reads leave no trace
    path: str
    repo_id: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _files(folder: Path):
    """Every regular file under `folder`, not following symlinks."""
    for dirpath, _dirs, names in os.walk(folder, followlinks=False):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                yield p


def _size_and_mtime(folder: Path) -> tuple[int, float]:
    size, newest = 0, 0.0
    for p in _files(folder):
        st = p.stat()
        size += st.st_size
        newest = max(newest, st.st_mtime)
    return size, newest


def _utc_text(mtime: float) -> str:
    """A modification time as ISO text, or "" when none or out of datetime's range: a file of a
    copied cache dated in the year 33658 (tmpfs keeps it) ended `cache list` in a traceback."""
    try:
        return datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds") if mtime else ""
    except (ValueError, OverflowError, OSError):
        return ""


def read_refs(repo_dir: Path) -> dict[str, str]:
    """revision → commit, from `refs/` (unreadable entries are skipped)."""
    from urllib.parse import unquote

    refs: dict[str, str] = {}
    folder = repo_dir / "refs"
    if not folder.is_dir() or folder.is_symlink():
        return refs
    for f in sorted(folder.iterdir()):
        # A bare commit hash (the earlier format) is named by its file: the name is the revision.
        entry = read_ref_file(f, unquote(f.name))
        # Only the file a revision's lookup reads speaks for it (`SpectraCache.read_ref`): a file
        # `x` recording revision main made `cache rm` delete the commit it named, and main's own
        # ref (to another commit, which was kept).
        if entry is not None and ref_file_name(entry.revision) == f.name:
            refs[entry.revision] = entry.commit
    return refs


def _options(raw: object) -> dict:
    """The manifest's options, scalars only: anything else says nothing `cache list` shows, and a
    list nested 600 deep ended `cache list --json` in a RecursionError. Floats are finite: a
    manifest's NaN or Infinity (which Python's json reads) made `--json` print no JSON."""
    if not isinstance(raw, dict):
        return {}
    return {
        k: v
        for k, v in raw.items()
        if isinstance(k, str)
        and (
            v is None
            or isinstance(v, (bool, int))
            or (isinstance(v, float) and math.isfinite(v))  # NaN, Infinity: not JSON for `--json`
            or recorded_name(v, 200) is not None
        )
    }


def _manifest(folder: Path) -> dict:
    obj, _ = read_json_object(folder / "manifest.json")  # SpectraCache.read_manifest's reader
    return obj or {}


def list_cache(root: str | os.PathLike) -> list[CachedAnalysis]:
    """Every analysis under the cache root, sorted by model then commit."""
    root = Path(root)
    found: list[CachedAnalysis] = []
    if not root.is_dir():
        return found
    for repo_dir in sorted(root.iterdir()):
        if repo_dir.is_symlink() or not repo_dir.is_dir() or not repo_dir.name.startswith(("models--", "local--")):
            continue
        refs = read_refs(repo_dir)
        for commit_dir in sorted(repo_dir.iterdir()):
            if commit_dir.is_symlink() or not commit_dir.is_dir() or not is_commit(commit_dir.name):
                continue
            for opts_dir in sorted(commit_dir.iterdir()):
                if opts_dir.is_symlink() or not opts_dir.is_dir() or opts_dir.name in ("diff", "alignment"):
                    continue
                layers = sorted(ly for p in opts_dir.iterdir() if (ly := layer_of_file(p.name)) is not None)
                manifest = _manifest(opts_dir)
                if not layers and not manifest:
                    continue
                size, mtime = _size_and_mtime(opts_dir)
                model = recorded_name(manifest.get("model"))
                options = _options(manifest.get("options"))
                found.append(
                    CachedAnalysis(
                        model=model or repo_dir.name,
                        repo_key=repo_dir.name,
                        commit=commit_dir.name,
                        revisions=sorted(r for r, c in refs.items() if c == commit_dir.name),
                        options={**options, "key": opts_dir.name},
                        layers=layers,
                        bytes=size,
                        updated=_utc_text(mtime),
                        path=str(opts_dir),
                        repo_id=recorded_name(manifest.get("repo_id")),
                    )
                )
    return found


def options_text(options: dict) -> str:
    """fold_norms / normalize_stacked / control, in a few characters: `fold,norm` or `raw,gaussian`."""
    parts = ["fold" if options.get("fold_norms", True) else "nofold"]
    parts.append("norm" if options.get("normalize_stacked", True) else "raw")
    if options.get("control"):
        parts.append(str(options["control"]))
    return ",".join(parts)


def _matches(entry: CachedAnalysis, model: str) -> bool:
    from svd_probe.models import ALIASES

    want = {model, model.lower()}
    if model.lower() in ALIASES:
        want.add(ALIASES[model.lower()].repo_id)
    return bool(want & {entry.model, entry.repo_id, entry.repo_key})


@dataclass
class RemovalPlan:
    """What `cache rm` deletes: whole commit folders and the refs naming them."""

    root: Path
    folders: list[Path]
    refs: list[Path]
    entries: list[CachedAnalysis]
    repo_dirs: list[Path]  # removed whole when nothing else is left in them

    @property
    def bytes(self) -> int:
        return sum(_size_and_mtime(f)[0] for f in self.folders)


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return path.resolve() != root.resolve() and not path.is_symlink()


def plan_removal(
    root: str | os.PathLike, model: str, revision: str | None = None, everything: bool = False
) -> RemovalPlan:
    """The folders `cache rm MODEL [--revision R] [--all]` would delete; raises if none match.

    revision: the commits it resolved to (or a commit) are removed, with their refs; default main.
    everything: every commit of MODEL, and its refs.
    """
    root = Path(root)
    entries = [e for e in list_cache(root) if _matches(e, model)]
    if not entries:
        raise CacheMissError(
            f"the cache {root} holds no analysis of {model}", "`svd-probe cache list` shows what it holds."
        )
    if everything and revision:
        raise BadOptionError("--all and --revision exclude each other", "Pass one of them.")
    if not everything:
        rev = revision or "main"
        keep = []
        for e in entries:
            if rev in e.revisions or (is_commit(rev) and e.commit == rev.lower()):
                keep.append(e)
        if not keep:
            have = sorted({r for e in entries for r in e.revisions} | {e.commit[:12] for e in entries})
            raise CacheMissError(
                f"no cached analysis of {model} at revision {rev!r}",
                f"Cached: {', '.join(have)}. Pass one with --revision, or --all for every revision.",
            )
        entries = keep
    repo_dirs = sorted({root / e.repo_key for e in entries})
    folders = sorted({root / e.repo_key / e.commit for e in entries})
    refs: list[Path] = []
    for repo_dir in repo_dirs:
        gone = {f.name for f in folders if f.parent == repo_dir}
        for rev_name, commit in read_refs(repo_dir).items():
            if commit in gone:
                refs.append(SpectraCache.ref_path(root, repo_dir.name, rev_name))
    for p in (*folders, *refs, *repo_dirs):
        if not _inside(root, p):
            raise BadOptionError(f"refusing to delete {p}: it is not inside the cache {root}", None)
    return RemovalPlan(root=root, folders=folders, refs=refs, entries=entries, repo_dirs=repo_dirs)


def remove(plan: RemovalPlan) -> int:
    """Delete what `plan` lists; returns the bytes freed. Empty repo folders go too."""
    freed = plan.bytes
    for folder in plan.folders:
        if _inside(plan.root, folder) and folder.is_dir():
            shutil.rmtree(folder)
    for ref in plan.refs:
        if _inside(plan.root, ref) and ref.is_file():
            ref.unlink()
    for repo_dir in plan.repo_dirs:
        if not _inside(plan.root, repo_dir):
            continue
        left = [p for p in repo_dir.iterdir() if p.name != "refs"]
        refs = repo_dir / "refs"
        if not left and (not refs.is_dir() or not any(refs.iterdir())):
            shutil.rmtree(repo_dir)
    return freed
