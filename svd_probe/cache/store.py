"""The on-disk cache of spectra: one safetensors file per layer, written atomically.

Layout under the cache root (`--cache-dir`, else `$SVD_PROBE_CACHE`, else the user cache folder):

    <root>/<repo key>/refs/<revision, encoded>        the commit that revision resolved to
    <root>/<repo key>/<commit>/<options key>/
        manifest.json                                 config, options, versions, per-layer keys and timings
        layer-0007.safetensors                        spectra of layer 7
        .lock                                         held while a process updates this folder
    <root>/<repo key>/<commit>/diff/<tuned repo key>/<tuned commit>/<options key>/
                                                      spectra of a weight difference (`DiffCache`)

The repo key is `models--org--name` for Hub repos (as in huggingface_hub's cache) and
`local--<folder name>-<hash of its path>` for local folders, whose "commit" is a fingerprint of
their files. The options key hashes only the options that change a spectrum (norm folding,
stacked normalization, format version); which matrix kinds a layer holds is recorded in its file,
so a rerun with more `--matrices` computes only what is missing.

Tensor keys in a layer file are `<scope>.<matrix>` (`svd_probe.kinds.SpectrumKey`): `head.VO` is
[n_heads, k] (one row per head, σ descending), `stacked.VO` and `layer.QA` are [k]. The file's
metadata holds, per key, the shape (m, n) of the matrix whose σ it is and the storage dtype of
the weights behind it. A file appears only once complete (write to a temporary name, then
rename), so a run killed at any moment leaves only whole layers behind.

Everything here is input we wrote but do not trust: a file can be truncated by a full disk, edited,
or left by an older version. A layer file that does not parse, or lacks keys the manifest says
it holds, raises `CacheDamagedError` naming it, as does one that is a link, a pipe or over
MAX_LAYER_BYTES, one larger than its own header says it is, one recording no matrix shape for a
spectrum, or a shape that is no size or holds fewer singular values than it stores, one recording
another layer than its name, and one whose per-head spectra disagree on the number of heads
(`read_layer_file` opens a layer file once, never through a link, and reads what it checked); a
manifest or ref that does not parse is read as absent.
Writers take `.lock` (fcntl.flock) around each read-modify-write of the manifest and of a layer
file, so concurrent runs of disjoint (or overlapping) layers all end up listed. A failed write
(disk full, quota, read-only) raises `DiskWriteError` and leaves no temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
from safetensors import deserialize
from safetensors.numpy import save_file

from svd_probe.atomic import (
    NotRegularFileError,
    atomic_write,
    atomic_write_bytes,
    is_disk_full,
    open_regular,
    read_head,
)
from svd_probe.errors import CacheDamagedError, CacheLinkError, DiskWriteError, shown
from svd_probe.kinds import HEAD, SpectrumKey, parse_key
from svd_probe.models import is_commit

try:  # POSIX; elsewhere concurrent runs of one model are not guarded.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_FORMAT_VERSION = 1
ENV_CACHE_DIR = "SVD_PROBE_CACHE"

# File names are at most 255 bytes on every common file system; keys stay well below, leaving
# room for the ".NAME.XXXXXXXX.tmp" name of an atomic write.
_MAX_NAME_BYTES = 120
# Bounds on what a layer file's metadata can make us parse (ours are a few KB).
_MAX_META_CHARS = 1 << 20
_MAX_MANIFEST_BYTES = 64 << 20  # the manifest of a 62-layer model is tens of kB
# A layer file is read whole into memory (every σ, then checked), so its size is bounded before
# it is opened: DeepSeek-V3's are a few MB, and a 128-head model with d_model 16384 (head QK and
# VO spectra of 16,384 values a head) about 35 MB. A sparse file claiming more was read whole
# (a 2 GiB one took 4.3 GB of memory to be called damaged). `alignment` bounds its files by this too.
MAX_LAYER_BYTES = 256 << 20
# A layer file's safetensors header (its JSON: tensor names, shapes, offsets, metadata). Ours are
# a few kB; the three metadata fields `read_layer` takes are at most _MAX_META_CHARS each (twice
# that once escaped as JSON), so a longer header is damaged, not read (safetensors reads 100 MB).
_MAX_HEADER_BYTES = 16 << 20
# The most a side of a matrix whose spectrum is cached may be (the recorded (m, n)), as
# `results.checked_dims` bounds the manifest's sizes: DeepSeek-V3's largest is 65,536.
MAX_MATRIX_SIDE = 1 << 31
# Characters of a name (a model) taken from a manifest: a local path is at most 4096 bytes.
MAX_RECORDED_NAME = 4096
# Per-head spectra with a row per key/value group (grouped-query attention); the others have a
# row per query head.
_GROUP_KEYS = frozenset({"head.K", "head.V"})
_LAYER_FILE = re.compile(r"layer-(\d{4,})\.safetensors", re.ASCII)


def layer_file_name(layer: int) -> str:
    """The name of the file that holds a layer's spectra (or its alignment): `layer-0007.safetensors`."""
    return f"layer-{layer:04d}.safetensors"


def layer_of_file(name: str) -> int | None:
    """The layer whose spectra the file `name` holds, or None when it is not a layer file's name.

    Only the name `SpectraCache.layer_path` gives counts: `layer-00001` or `layer-1_0` beside
    `layer-0001` listed a layer twice (or one no file is read for)."""
    m = _LAYER_FILE.fullmatch(name)
    layer = int(m.group(1)) if m else None
    return layer if layer is not None and name == layer_file_name(layer) else None


def default_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`--cache-dir`, else `$SVD_PROBE_CACHE`, else the platform's user cache folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("svd-probe", appauthor=False))


def _bounded_name(name: str, whole: str) -> str:
    """`name` if it fits a file name, else its head and a hash of `whole` (which it stands for)."""
    if len(name.encode()) <= _MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(whole.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = name.encode()[: _MAX_NAME_BYTES - 17].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def repo_key(repo_id: str | None, local_path: str | os.PathLike | None = None) -> str:
    """The cache folder name of a Hub repo (`models--org--name`) or a local folder."""
    if repo_id:
        return _bounded_name("models--" + repo_id.replace("/", "--"), repo_id)
    if local_path is None:
        raise ValueError("need a repo id or a local path")
    p = Path(local_path).resolve()
    digest = hashlib.sha1(str(p).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    name = p.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _bounded_name(f"local--{name}-{digest}", str(p))


def ref_file_name(revision: str) -> str:
    """The file name under `refs/` of a revision: percent-encoded, never `.`-led, bounded.

    Any string round-trips (`urllib.parse.unquote` gives it back) except past _MAX_NAME_BYTES,
    where the name ends in a hash; the file also stores its revision, so names are never decoded.
    `/`, `%` and every byte outside [A-Za-z0-9_.~-] are escaped, so no name can leave `refs/`,
    and a leading dot is escaped too, so neither `.` nor `..` names a folder.
    """
    if not revision:
        raise ValueError("empty revision")
    name = quote(revision, safe="", errors="surrogateescape")
    if name.startswith("."):
        name = "%2E" + name[1:]
    return _bounded_name(name, revision)


@dataclass(frozen=True)
class SpectraOptions:
    """Options that change the numbers in a spectrum, hence part of the cache key."""

    fold_norms: bool = True
    normalize_stacked: bool = True
    # How a pre-LayerNorm folds (GPT-2): "exact" W·diag(g)·P, or "gain" W·diag(g) as svd-probe 0.1
    # did. `analyze` sets "exact" for every other model, whose folds these two never tell apart.
    layernorm_fold: str = "exact"
    # A randomized control (`svd_probe.spectra.controls.CONTROL_MODES`): every projection weight
    # replaced by its randomized copy before folding and fusion; None analyses the weights as they are.
    control: str | None = None

    def __post_init__(self) -> None:
        # The mode names a folder: nothing but a lower-case word (which words, `controls` decides).
        if self.control is not None and not (self.control.isascii() and self.control.isalpha()):
            raise ValueError(f"not a control mode: {self.control!r}")

    def key(self) -> str:
        fields = asdict(self)
        if self.layernorm_fold == "exact":
            # Left out of the hash at its default, so keys from before the field existed still
            # name the same spectra for every RMSNorm and BERT model.
            del fields["layernorm_fold"]
        if self.control is None:  # likewise: the real weights keep the keys they always had
            del fields["control"]
        blob = json.dumps({"v": CACHE_FORMAT_VERSION, **fields}, sort_keys=True)
        tag = ("fold" if self.fold_norms else "nofold") + "-" + ("norm" if self.normalize_stacked else "raw")
        if self.layernorm_fold != "exact":
            tag += f"-ln{self.layernorm_fold}"
        if self.control is not None:
            tag += f"-ctl{self.control}"
        return f"{tag}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _head_rows(sigma: dict[str, np.ndarray]) -> tuple[set[int], set[int]]:
    """Row counts of the per-head spectra: (of those with a row per query head, of K's and V's,
    a row per key/value group)."""
    rows = {key: s.shape[0] for key, s in sigma.items() if key.startswith(HEAD + ".")}
    return {n for k, n in rows.items() if k not in _GROUP_KEYS}, {n for k, n in rows.items() if k in _GROUP_KEYS}


def _key_text(scope: str, kind: str) -> str | None:
    try:
        return str(SpectrumKey(scope, kind))
    except ValueError:
        return None


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

    def spectrum(self, scope: str, kind: str) -> np.ndarray | None:
        """σ of `scope.kind`, or None when this layer has none cached (or the pair names none)."""
        key = _key_text(scope, kind)
        return None if key is None else self.sigma.get(key)

    def matrix_shape(self, scope: str, kind: str) -> tuple[int, int] | None:
        """(m, n) of the matrix behind `scope.kind`, or None when not recorded."""
        key = _key_text(scope, kind)
        shape = None if key is None else self.shapes.get(key)
        return None if shape is None else (int(shape[0]), int(shape[1]))

    def heads(self) -> tuple[int | None, int | None]:
        """(query heads, key/value groups) its per-head spectra have rows for, None for one it has
        no spectrum of (`read_layer` checked they agree)."""
        per_query, per_group = _head_rows(self.sigma)
        return max(per_query, default=None), max(per_group, default=None)

    def merged_over(self, old: LayerSpectra) -> LayerSpectra:
        """These spectra, plus the kinds only `old` has (kept from a run with other --matrices)."""
        return LayerSpectra(
            layer=self.layer,
            sigma={**old.sigma, **self.sigma},
            shapes={**old.shapes, **self.shapes},
            storage_dtypes={**old.storage_dtypes, **self.storage_dtypes},
            info=self.info,
        )


@dataclass(frozen=True)
class RefEntry:
    """What `refs/<revision>` says: the commit it resolved to, and since when."""

    revision: str
    commit: str
    since: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_error(path: Path, e: OSError) -> DiskWriteError:
    full = is_disk_full(e)
    why = "the disk is full" if e.errno == errno.ENOSPC else "the disk quota is exceeded" if full else e.strerror
    hint = (
        "Free space there, or point --cache-dir (or SVD_PROBE_CACHE) at another folder; layers already cached are kept."
        if full
        else "Point --cache-dir (or SVD_PROBE_CACHE) at a writable folder; layers already cached are kept."
    )
    return DiskWriteError(f"cannot write the spectra cache at {path}: {why or e}", hint)


def loads_json(text: str | bytes) -> object:
    """json.loads that fails only with ValueError (bad JSON, bad UTF-8, 5000-digit ints, deep nests)."""
    try:
        return json.loads(text)
    except RecursionError as e:  # nested deeper than the interpreter's stack
        raise ValueError("JSON nested too deeply") from e


def recorded_name(value: object, limit: int = MAX_RECORDED_NAME) -> str | None:
    """`value` if it is a name a manifest may give (a string of at most `limit` printable
    characters: no escape sequence or line break to print to a terminal), else None, so the caller
    falls back to the name it knows. Manifests are edited by hand and sent around."""
    if isinstance(value, str) and value and len(value) <= limit and value.isprintable():
        return value
    return None


def plain_text(text: str, limit: int = 300) -> str:
    """Text from a damaged file (a library's error quoting the bytes it choked on) made safe to
    print in a message: control characters as `?`, square brackets (console markup) as round
    ones, at most `limit` characters."""
    out = "".join(ch if ch.isprintable() else "?" for ch in text[:limit]).translate(str.maketrans("[]", "()"))
    return out + ("…" if len(text) > limit else "")


_NOT_REGULAR = "it is a link, pipe or device, not a regular file"


class LayerFileRefused(Exception):
    """`read_layer_file` did not read a layer file; the text says why (for the damaged-file message)."""


# numpy's dtype of each safetensors dtype it has (BF16 and the F8 kinds it has not).
_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "U64": "<u8",
    "I32": "<i4",
    "U32": "<u4",
    "I16": "<i2",
    "U16": "<u2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def _parse_header(header: bytes) -> tuple[dict, int] | None:
    """A safetensors header (the JSON after the 8-byte length) and the end of the data it
    describes (its tensors' largest end offset), or None where it is not a JSON object of
    tensors with offsets (safetensors then says what is wrong with it)."""
    try:
        obj = loads_json(header)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    end = 0
    for name, entry in obj.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)):
            return None
        end = max(end, offsets[1])
    return obj, end


def _read_bounded(f, size: int) -> tuple[bytes, dict]:
    """The bytes of the open layer file `f` (of `size` bytes when it was checked) and its parsed
    header: the header, at most _MAX_HEADER_BYTES, then exactly the data it describes (what
    safetensors' save_file writes: an 8-byte little-endian length, the JSON header padded with
    spaces, the tensors' bytes back to back). A file larger than that is refused before its data
    is read, and one that grows or changes while read is caught (one byte more than its size is
    asked for, and the header read again is compared). A header that does not parse is returned
    alone, for safetensors to say what is wrong; no read asks for more than the file's size."""
    head = f.read(8)
    if len(head) < 8:
        return head, {}
    n = int.from_bytes(head, "little")
    if n > _MAX_HEADER_BYTES:
        raise LayerFileRefused(
            f"not a readable safetensors file (its header is {n:,} bytes, over the "
            f"{_MAX_HEADER_BYTES >> 20} MiB a layer file's header holds)"
        )
    header = f.read(min(n, max(size - 8, 0)))
    parsed = _parse_header(header) if len(header) == n else None
    if parsed is None:
        return head + header, {}
    obj, end = parsed
    expected = 8 + n + end
    if expected > MAX_LAYER_BYTES:
        raise LayerFileRefused(
            f"its header describes {expected:,} bytes, over the {MAX_LAYER_BYTES >> 20} MiB a layer file holds"
        )
    if size > expected:
        raise LayerFileRefused(f"it is {size:,} bytes, over the {expected:,} bytes its header describes")
    f.seek(0)  # the whole file in one bytes object, as safetensors takes it (no copy to join)
    data = f.read(size + 1)
    if len(data) > size or data[8 : 8 + n] != header:
        raise LayerFileRefused(f"it changed while it was read (it was {size:,} bytes)")
    return data, obj


def read_layer_file(
    path: Path, wanted: Callable[[str], bool] = lambda name: True
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, arrays) of the safetensors layer file `path`: the arrays whose names `wanted`
    takes, as writable numpy arrays (numpy's dtype of each; another dtype is a ValueError).

    The file is opened once (`atomic.open_regular`, links not followed: one could point out of
    the cache), and only what was opened is checked and read: a link, pipe or device is refused,
    and so is a regular file over MAX_LAYER_BYTES or larger than its header says
    (`_read_bounded`), so one swapped in after the check is refused the same way, never read
    through. Raises FileNotFoundError where there is none (or a folder), LayerFileRefused with
    the reason where it is refused, and safetensors' own errors (or ValueError) where it does
    not parse.
    """
    try:
        with open_regular(path, follow_links=False) as (f, st):
            if st.st_size > MAX_LAYER_BYTES:
                raise LayerFileRefused(
                    f"it is {st.st_size:,} bytes, over the {MAX_LAYER_BYTES >> 20} MiB a layer file holds"
                )
            data, header = _read_bounded(f, st.st_size)
    except NotRegularFileError as e:
        if e.folder:  # a folder of that name counts as no layer file, as before
            raise FileNotFoundError(errno.ENOENT, "a folder, not a layer file", str(path)) from None
        raise LayerFileRefused(_NOT_REGULAR) from None
    tensors = deserialize(data)  # SafetensorError where the bytes are no safetensors file
    del data
    raw_meta = header.get("__metadata__")  # a map of strings: safetensors took the header
    meta = {k: v for k, v in raw_meta.items() if isinstance(v, str)} if isinstance(raw_meta, dict) else {}
    arrays: dict[str, np.ndarray] = {}
    for name, t in tensors:
        if not wanted(name):
            continue
        dtype = _NUMPY_DTYPES.get(t["dtype"])
        if dtype is None:
            raise ValueError(f"{name} is of dtype {t['dtype']}, which numpy has not")
        arrays[name] = np.frombuffer(t["data"], dtype=dtype).reshape(t["shape"]).copy()
    return meta, arrays


# A refs file is {"revision", "commit", "since"} (or, from earlier versions, a bare commit hash).
# Its revision is whatever string the user gave, so there is no natural size; 64 KiB holds a
# revision of over 10,000 characters even with every one escaped as JSON's \\uXXXX. write_ref
# records nothing longer, so every ref it writes reads back.
MAX_REF_BYTES = 64 << 10


def read_ref_file(path: Path, plain_revision: str) -> RefEntry | None:
    """The entry of one refs file, or None where it is absent, a link, over MAX_REF_BYTES, or
    neither format. `plain_revision`: the revision a bare commit hash (the earlier format) is
    taken for, since such a file names only its commit. `SpectraCache.read_ref` and `cache list`
    both read refs through this."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):  # a link could point anywhere, a pipe would block
            return None
        data = read_head(path, MAX_REF_BYTES + 1)
    except OSError:  # absent, a folder, or `refs` is not a folder (left by an older version)
        return None
    if len(data) > MAX_REF_BYTES:
        return None
    text = data.decode("ascii", "replace").strip()
    if is_commit(text):
        return RefEntry(plain_revision, text)
    try:
        obj = loads_json(data)
    except ValueError:  # loads_json's only error, deep nests included
        return None
    if not isinstance(obj, dict):
        return None
    revision, commit, since = obj.get("revision"), obj.get("commit"), obj.get("since")
    if not isinstance(revision, str) or not isinstance(commit, str) or not is_commit(commit):
        return None
    return RefEntry(revision, commit, since if isinstance(since, str) else None)


def read_json_object(path: Path) -> tuple[dict | None, str | None]:
    """(object, None), (None, None) when absent, or (None, why) when unreadable or not an object.

    A link is not followed (it could point out of the cache, at a file of the user's), and a
    folder, pipe or device is not read (a read of a pipe would block)."""
    try:
        if path.is_symlink():
            return None, "it is a link, not a file"
        data = read_head(path, _MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except NotRegularFileError:  # a folder, or a pipe or device a read would block on
        return None, "it is not a regular file"
    except OSError as e:
        return None, f"cannot read it ({e.strerror or e})"
    if len(data) > _MAX_MANIFEST_BYTES:
        return None, f"it is over {_MAX_MANIFEST_BYTES >> 20} MiB"
    try:
        obj = loads_json(data)
    except ValueError as e:  # includes JSONDecodeError and UnicodeDecodeError
        return None, f"it is not valid JSON ({type(e).__name__})"
    if not isinstance(obj, dict):
        return None, f"it holds a JSON {type(obj).__name__}, not an object"
    return obj, None


def refuse_links_below(root: Path, path: Path) -> None:
    """CacheLinkError where a folder or file from below `root` down to `path` is a link.

    The cache is often shared (a filesystem several hosts write, a folder another user filled),
    and a link planted in it (`models--x/COMMIT -> ~/somewhere`) led `analyze` to write its layer
    files and manifest there and `export` to read from there. The root is the user's choice and
    may be a link; what lies below it is checked where each cache object is made, from names
    alone (a link made after the check is not caught: the threat is a link left in the folder).
    """
    cur = root
    for part in path.relative_to(root).parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return
        except OSError:
            return  # unreadable: the read or write that follows says so in its own words
        if stat.S_ISLNK(st.st_mode):
            raise _link_error(root, cur)


def _link_error(root: Path, path: Path) -> CacheLinkError:
    return CacheLinkError(
        f"{plain_text(str(path))} is a link inside the cache folder {plain_text(str(root))}: "
        "reads and writes through it would leave the cache",
        "Remove the link (or put the folder it points to in its place), or pass another --cache-dir.",
        path=str(path),
    )


class SpectraCache:
    """The cache folder of one (repo, commit, options)."""

    def __init__(self, root: str | os.PathLike, repo: str, commit: str, options: SpectraOptions):
        if not is_commit(commit):
            raise ValueError(f"not a commit hash: {commit!r}")
        if not repo or "/" in repo or repo.startswith("."):
            raise ValueError(f"not a cache repo key: {repo!r}")
        self.root = Path(root)
        self.repo = repo
        self.commit = commit
        self.options = options
        self.dir = self.root / repo / commit / options.key()
        refuse_links_below(self.root, self.dir)

    # --- revision refs: let offline commands find the commit a revision resolved to ----------
    @staticmethod
    def ref_path(root: str | os.PathLike, repo: str, revision: str) -> Path:
        return Path(root) / repo / "refs" / ref_file_name(revision)

    @staticmethod
    def read_ref(root: str | os.PathLike, repo: str, revision: str) -> RefEntry | None:
        """The commit `revision` last resolved to, or None (never written, or unreadable, or a
        link: read as absent, as a damaged ref is). CacheLinkError where the repo folder is a link."""
        path = SpectraCache.ref_path(root, repo, revision)
        refuse_links_below(Path(root), path.parent.parent)
        if path.parent.is_symlink() or path.is_symlink():
            return None
        entry = read_ref_file(path, revision)
        return entry if entry is not None and entry.revision == revision else None

    @staticmethod
    def write_ref(root: str | os.PathLike, repo: str, revision: str, commit: str) -> bool:
        """Record revision → commit; returns False (writing nothing) when already recorded."""
        if not is_commit(commit):
            raise ValueError(f"not a commit hash: {commit!r}")
        old = SpectraCache.read_ref(root, repo, revision)
        if old is not None and old.commit == commit:
            return False
        body = (json.dumps({"revision": revision, "commit": commit, "since": _now()}) + "\n").encode(
            "utf-8", "surrogateescape"
        )
        if len(body) > MAX_REF_BYTES:  # read_ref would not read it back: resolved afresh each time
            return False
        path = SpectraCache.ref_path(root, repo, revision)
        refs = path.parent
        try:
            if refs.is_symlink() or (refs.exists() and not refs.is_dir()):
                # A file named `refs`: what `--revision .` left behind in earlier versions.
                refs.unlink()
            atomic_write_bytes(path, body)
        except OSError as e:
            raise _write_error(path, e) from None
        return True

    # --- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this folder's lock (exclusive, across processes) for a read-modify-write."""
        path = self.dir / ".lock"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Never through a link: O_CREAT created the file a dangling `.lock` link named, out of the cache.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _link_error(self.root, path) from None
            raise _write_error(self.dir, e) from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # --- layers ------------------------------------------------------------------------------
    def layer_path(self, layer: int) -> Path:
        return self.dir / layer_file_name(layer)

    def cached_layers(self) -> list[int]:
        """Layers that have a file (whole, thanks to the atomic rename; not yet checked)."""
        if not self.dir.is_dir():
            return []
        return sorted(ly for p in self.dir.iterdir() if (ly := layer_of_file(p.name)) is not None)

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
        try:
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as e:
            raise _write_error(path, e) from None
        return path

    def _damaged(self, layer: int, why: str) -> CacheDamagedError:
        path = self.layer_path(layer)
        return CacheDamagedError(
            f"damaged cache file {path}: {why}",
            f"`svd-probe analyze` recomputes it (with --layers {layer} for just this layer), or delete the file.",
            path=str(path),
        )

    def read_layer(self, layer: int, expect: Iterable[str] = ()) -> LayerSpectra:
        """Read and check one layer file; `expect` lists keys it must hold (from the manifest).

        Keys that name no spectrum of this version (`kinds.parse_key`) are left out.
        Raises FileNotFoundError when there is no file, `CacheDamagedError` when it is unusable:
        also when it is a link, a pipe, over MAX_LAYER_BYTES or larger than its header says,
        checked before its data is read (`read_layer_file`), records no shape for a key, a shape
        that is no size, or another layer than `layer` (a file copied or renamed), or per-head
        spectra of unequal heads.
        """
        path = self.layer_path(layer)
        try:  # bounded, and never through a link: checked before any byte, on the file read
            meta, sigma = read_layer_file(path, lambda k: parse_key(k) is not None)
        except FileNotFoundError:
            raise
        except LayerFileRefused as e:
            raise self._damaged(layer, str(e)) from None
        except Exception as e:  # safetensors raises its own error types for every kind of damage
            # Its message quotes the header's bytes: made printable, and never taken as markup.
            why = f"not a readable safetensors file ({type(e).__name__}: {plain_text(str(e))})"
            raise self._damaged(layer, why) from None

        def meta_dict(name: str) -> dict:
            text = meta.get(name, "{}")
            if len(text) > _MAX_META_CHARS:
                raise self._damaged(layer, f"its {name} metadata is {len(text)} characters long")
            try:
                obj = loads_json(text)
            except ValueError:
                raise self._damaged(layer, f"its {name} metadata is not valid JSON") from None
            if not isinstance(obj, dict):
                raise self._damaged(layer, f"its {name} metadata is not a JSON object")
            return obj

        raw_shapes, storage, info = meta_dict("shapes"), meta_dict("storage_dtypes"), meta_dict("info")
        recorded = meta.get("layer")
        if recorded is not None and recorded != str(layer):  # write_layer records it
            raise self._damaged(layer, f"it holds the spectra of layer {shown(recorded)}, not of layer {layer}")
        if not sigma:
            raise self._damaged(layer, "it holds no spectra")
        missing = sorted(set(expect) - set(sigma))
        if missing:
            raise self._damaged(layer, f"it lacks {', '.join(missing)}, which the manifest lists")
        shapes: dict[str, tuple[int, int]] = {}
        for key, s in sigma.items():
            if s.dtype != np.float64 or not np.isfinite(s).all():
                raise self._damaged(layer, f"{key} is not a finite float64 spectrum")
            per_head = key.startswith(HEAD + ".")  # [heads, k]; the others one spectrum [k]
            if s.ndim != (2 if per_head else 1) or s.size == 0 or (s < 0).any():  # metrics read σ₁ of each
                want = "one row of singular values per head" if per_head else "one row of singular values"
                raise self._damaged(layer, f"{key} has shape {list(s.shape)}, not {want} (non-negative)")
            shape = raw_shapes.get(key)
            if shape is None:  # write_layer records every key's; metrics need it (m, n, the rank bound)
                raise self._damaged(layer, f"it records no matrix shape for {key}")
            # Two sizes from 1 to MAX_MATRIX_SIDE, of a matrix with at least as many singular
            # values as are stored (min(m, n): the ones a reduced problem lacks are stored as
            # zeros). A size of 2^40 or 3 for a 64-value spectrum was exported as it was.
            ok = isinstance(shape, list) and len(shape) == 2
            ok = ok and all(type(x) is int and 1 <= x <= MAX_MATRIX_SIDE for x in shape)
            if not ok:
                raise self._damaged(
                    layer, f"the shape recorded for {key} is not two sizes from 1 to {MAX_MATRIX_SIDE:,}"
                )
            if s.shape[-1] > min(shape):
                raise self._damaged(
                    layer,
                    f"{key} holds {s.shape[-1]} singular values, more than the {min(shape)} of "
                    f"the {shape[0]} × {shape[1]} matrix recorded for it",
                )
            shapes[key] = (shape[0], shape[1])
        # One layer's heads: a row per query head in each per-head spectrum, but K and V a row per
        # key/value group, which divides them. A head.VO of 3 rows beside a head.O of 8 ended `plot`
        # and `report` in a traceback; one of 24 drew each O row three times as if grouped.
        per_query, per_group = _head_rows(sigma)
        if len(per_query) > 1 or len(per_group) > 1 or any(q % g for q in per_query for g in per_group):
            counts = ", ".join(f"{key} {s.shape[0]}" for key, s in sorted(sigma.items()) if key.startswith(HEAD + "."))
            raise self._damaged(layer, f"its per-head spectra disagree on the number of heads (rows: {counts})")
        return LayerSpectra(
            layer=layer,
            sigma=sigma,
            shapes=shapes,
            storage_dtypes={k: v for k, v in storage.items() if isinstance(v, str)},
            info=info,
        )

    def update_layer(self, spectra: LayerSpectra, *, merge: bool = True) -> LayerSpectra:
        """Store a layer's new spectra and list it in the manifest, under the folder's lock.

        With `merge`, kinds already cached for the layer (by a run with other `--matrices`) are
        kept beside the new ones; a damaged old file is replaced, not merged. Returns what the
        file now holds.
        """
        with self.lock():
            if merge:
                with contextlib.suppress(FileNotFoundError, CacheDamagedError):
                    spectra = spectra.merged_over(self.read_layer(spectra.layer))
            self.write_layer(spectra)
            manifest = self.read_manifest()
            layers = manifest.get("layers")
            if not isinstance(layers, dict):
                layers = manifest["layers"] = {}
            now = _now()
            layers[str(spectra.layer)] = {**spectra.info, "keys": sorted(spectra.sigma), "written": now}
            manifest["updated"] = now
            self.write_manifest(manifest)
        return spectra

    # --- manifest ----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def read_manifest(self, notes: list[str] | None = None) -> dict:
        """The manifest, or {} when absent or unreadable (then a note says why, if `notes` is given)."""
        obj, why = read_json_object(self.manifest_path)
        if why and notes is not None:
            notes.append(f"{self.manifest_path} is unreadable: {why}; read as empty; `svd-probe analyze` rebuilds it")
        return obj or {}

    def write_manifest(self, manifest: dict) -> None:
        try:
            atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        except OSError as e:
            raise _write_error(self.manifest_path, e) from None

    def update_manifest(self, fields: dict, found: Iterable[LayerSpectra] = ()) -> dict:
        """Set the manifest's top-level `fields` and list the `found` layers' keys (layers whole on
        disk that it does not list), under the lock; writes only if something changed."""
        with self.lock():
            manifest = self.read_manifest()
            new = {**manifest, **fields}
            new.setdefault("created", _now())
            if not isinstance(new.get("layers"), dict):
                new["layers"] = {}
            new["layers"] = dict(new["layers"])
            for ls in found:
                entry = new["layers"].get(str(ls.layer))
                new["layers"][str(ls.layer)] = {
                    **(entry if isinstance(entry, dict) else ls.info),
                    "keys": sorted(ls.sigma),
                }
            if new != manifest:
                self.write_manifest(new)
        return new

    def expected_keys(self, manifest: dict, layer: int) -> list[str]:
        """Keys the manifest says layer `layer`'s file holds ([] when it does not say). Keys that
        name no spectrum of this version are left out, as `read_layer` leaves them out of a file:
        the manifest is an index, and one listing `[/]` made a whole layer file damaged."""
        layers = manifest.get("layers")
        entry = layers.get(str(layer)) if isinstance(layers, dict) else None
        keys = entry.get("keys") if isinstance(entry, dict) else None
        if not isinstance(keys, list):
            return []
        return [k for k in keys if isinstance(k, str) and parse_key(k) is not None]


class DiffCache(SpectraCache):
    """The cache folder of the weight difference TUNED − BASE (`svd_probe.diff`) with options:

        <root>/<base repo key>/<base commit>/diff/<tuned repo key>/<tuned commit>/<options key>/
            manifest.json, layer-NNNN.safetensors     spectra of the differences (`scope.kind` keys)
            base/layer-NNNN.safetensors               BASE's head and layer spectra: the ‖W‖ of ‖ΔW‖/‖W‖

    Both commits and the options name the folder, so a new commit of either side is a new diff.
    Writing, reading, checking and locking are SpectraCache's, for both folders.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        base_repo: str,
        base_commit: str,
        tuned_repo: str,
        tuned_commit: str,
        options: SpectraOptions,
    ):
        super().__init__(root, base_repo, base_commit, options)
        if not is_commit(tuned_commit):
            raise ValueError(f"not a commit hash: {tuned_commit!r}")
        if not tuned_repo or "/" in tuned_repo or tuned_repo.startswith("."):
            raise ValueError(f"not a cache repo key: {tuned_repo!r}")
        self.tuned_repo = tuned_repo
        self.tuned_commit = tuned_commit
        self.dir = self.root / base_repo / base_commit / "diff" / tuned_repo / tuned_commit / options.key()
        refuse_links_below(self.root, self.dir)  # a link `diff/` made `diff` write where it pointed

    def reference(self) -> SpectraCache:
        """The folder of BASE's reference spectra, inside this one."""
        ref = SpectraCache(self.root, self.repo, self.commit, self.options)
        ref.dir = self.dir / "base"
        refuse_links_below(self.root, ref.dir)
        return ref
