"""Opening a checkpoint: a Hub repo pinned to a commit, or a local folder.

`open_checkpoint` resolves the revision to its commit (huggingface_hub's `get_hf_file_metadata`
of config.json, through the HTTP edge `svd_probe.hub.http`), fetches config.json and the index
with huggingface_hub (small files, cached in HF_HOME as usual) and returns a `CheckpointSource`
that from then on reads only headers and tensor bytes.

config.json and the index are input we do not control, so both are read with bounds: at most
4 MiB of config and 64 MiB of index (DeepSeek-V3's index is about 9 MB) are read or downloaded,
UTF-8 JSON only, every way `json.loads` can fail (bad syntax, nesting past the recursion limit,
integers past Python's digit limit) ends in `MalformedFileError` naming the file. An index lists
at most a million tensors (DeepSeek-V3: about 92k, Kimi-K2: about 140k), and every shard it names
must be a plain relative name inside the repo or folder (`check_shard_name`): no `..`, no absolute
path, no URL. Otherwise `../x.safetensors` would be read from outside the model folder, and over
the Hub `../../other-org/repo/resolve/main/...` would fetch another repo with the user's token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from svd_probe.atomic import NotRegularFileError, read_head
from svd_probe.errors import EntryNotFoundError, MalformedFileError, TransferError, UnsafeShardNameError
from svd_probe.hub import http
from svd_probe.hub.http import HttpPolicy
from svd_probe.hub.ranges import HubFiles, LocalFiles
from svd_probe.hub.reader_process import READERS
from svd_probe.hub.source import INDEX_FILE, LONE_FILE, CheckpointSource
from svd_probe.models import ModelRef, is_commit

MiB = 1024 * 1024
MAX_CONFIG_BYTES = 4 * MiB
MAX_INDEX_BYTES = 64 * MiB
MAX_INDEX_ENTRIES = 1_000_000
MAX_SHARD_NAME = 1000  # characters; real shard names are ~35

ConfigCheck = Callable[[dict], None]


def open_checkpoint(
    ref: ModelRef | str,
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    concurrency: int = 8,
    check_config: ConfigCheck | None = None,
    **read_options,
) -> CheckpointSource:
    """Open a Hub repo (pinned to the commit `revision` resolves to) or a local folder.

    Args:
        ref: a resolved `ModelRef`, or a model name / alias / folder for `resolve_model`.
        revision: branch, tag or commit (Hub only).
        token: Hub token; None uses HF_TOKEN or the stored login. Sent to the endpoint's host only.
        endpoint: Hub or mirror base URL (default: HF_ENDPOINT, else huggingface.co).
        concurrency: range requests in flight at most (`HubFiles`: 2 while one connection is fast).
        check_config: called with config.json's object right after it is parsed, before the index
            or any shard header is read; raise (a `SvdProbeError`) to refuse the model early.
        read_options: range-read tuning for `HubFiles` (max_gap, gap_fraction, chunk_size,
            fast_connection), the HTTP policy (`svd_probe.hub.http.HttpPolicy`: retries,
            connect_retries, backoff, max_backoff, timeout, deadline, min_rate), and `reader`:
            "thread" (default), "process" (`svd_probe.hub.reader_process`: the HTTP client in
            a process of its own, off this interpreter's GIL; Linux), or "auto" (the process
            where it can run and starts, else threads).

    Returns:
        A `CheckpointSource` (commit, config, tensor_names, read_tensors, ...).

    Raises:
        HubUnreachableError: offline mode, or no answer from the endpoint (raised at once).
        RepoNotFoundError, RevisionNotFoundError, GatedRepoError, EntryNotFoundError,
        MalformedFileError (UnsafeShardNameError), TransferError: as their names say.

    Example:
        >>> src = open_checkpoint("deepseek-v3", check_config=lambda c: None)  # doctest: +SKIP
        >>> src.commit, len(src.tensor_names)  # doctest: +SKIP
    """
    if isinstance(ref, str):
        from svd_probe.models import resolve_model

        ref = resolve_model(ref)
    if ref.is_local:
        return _open_local(ref, check_config)
    return _open_hub(ref, revision or "main", token, endpoint, concurrency, check_config, read_options)


# --- untrusted files -------------------------------------------------------------------------------

_HINT = "The checkpoint's file is damaged or not what its name says; check the repo, revision or folder."
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def parse_json_object(data: bytes, what: str, *, unique_keys: bool = False) -> dict:
    """The JSON object in `data` (UTF-8), or `MalformedFileError` naming `what`. Never echoes the
    bytes. `unique_keys`: refuse an object that names a key twice (JSON keeps the last silently)."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedFileError(f"{what} is not UTF-8 text (bad byte at offset {e.start})", _HINT, file=what) from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as e:
        raise MalformedFileError(
            f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", _HINT, file=what
        ) from None
    except _DuplicateKey as e:
        key = str(e.args[0])
        raise MalformedFileError(f"{what} names {key[:200]!r} twice", _HINT, file=what) from None
    except RecursionError:
        raise MalformedFileError(f"{what} is nested too deeply to be a real file", _HINT, file=what) from None
    except ValueError:  # an integer beyond Python's int-string digit limit, and the like
        raise MalformedFileError(f"{what} holds a number too long to parse", _HINT, file=what) from None
    if not isinstance(obj, dict):
        raise MalformedFileError(
            f"{what} is a JSON {type(obj).__name__ if obj is not None else 'null'}, not an object", _HINT, file=what
        )
    return obj


def load_json_file(path: Path, what: str, max_bytes: int, *, unique_keys: bool = False) -> dict:
    """`parse_json_object` of the file at `path`, refused without reading if over `max_bytes`."""
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            data = read_head(path, max_bytes + 1)  # the one bounded reader: never a blocking open
            size = len(data)
    except NotRegularFileError:  # a pipe would block the read, a device never end it
        raise MalformedFileError(f"{what} is not a regular file (a pipe, device or folder)", _HINT, file=what) from None
    except OSError as e:
        raise EntryNotFoundError(f"{what} is unreadable: {e.strerror}", "Check the checkpoint files.") from None
    if size > max_bytes:
        raise MalformedFileError(_too_big(what, size, max_bytes), _HINT, file=what)
    return parse_json_object(data, what, unique_keys=unique_keys)


def _too_big(what: str, size: int, max_bytes: int) -> str:
    return f"{what} is {size} bytes, over the {max_bytes}-byte ({max_bytes // MiB} MiB) limit for it"


def check_shard_name(name: str) -> str | None:
    """Why `name` is not a plain relative file name inside a repo or folder, or None if it is.

    A subfolder (`sub/model-1.safetensors`) is fine; `..` / `.` segments, empty segments, absolute
    paths, backslashes, control characters, URL schemes or drive letters, `?` and `#` are not.
    """
    if not name:
        return "empty"
    if len(name) > MAX_SHARD_NAME:
        return f"longer than {MAX_SHARD_NAME} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a name with a control character"
    if "\\" in name:
        return "a name with a backslash"
    if "?" in name or "#" in name:
        return "a name with '?' or '#'"
    if name.startswith("/"):
        return "an absolute path"
    if _SCHEME.match(name):
        return "a URL or a drive path"
    parts = name.split("/")
    if "" in parts:
        return "a path with an empty segment"
    if "." in parts or ".." in parts:
        return "a path with '.' or '..' segments"
    return None


def check_weight_map(index: dict, what: str) -> dict[str, str]:
    """The index's weight_map {tensor: shard}, checked: an object of at most MAX_INDEX_ENTRIES
    tensors, each naming a shard that `check_shard_name` accepts; else a typed error naming the entry."""
    wm = index.get("weight_map")
    if not isinstance(wm, dict):
        raise MalformedFileError(f"{what} has no weight_map object", "Check the checkpoint's index file.", file=what)
    if not wm:
        raise MalformedFileError(f"{what} has an empty weight_map", "Check the checkpoint's index file.", file=what)
    if len(wm) > MAX_INDEX_ENTRIES:
        raise MalformedFileError(
            f"{what} lists {len(wm)} tensors, more than the {MAX_INDEX_ENTRIES} any checkpoint has", _HINT, file=what
        )
    accepted: set[str] = set()  # a few hundred shards named ~100k times: check each name once
    for tensor, shard in wm.items():
        if isinstance(shard, str) and shard in accepted:
            continue
        if not isinstance(shard, str):
            raise MalformedFileError(
                f"{what}: weight_map entry {tensor[:200]!r} is a JSON {type(shard).__name__}, not a file name",
                "Check the checkpoint's index file.",
                file=what,
            )
        problem = check_shard_name(shard)
        if problem is not None:
            raise UnsafeShardNameError(
                f"{what}: weight_map entry {tensor[:200]!r} names shard {shard[:200]!r}, {problem}",
                "An index may only name shard files inside the checkpoint. This one is damaged or was "
                "made to read elsewhere: do not use it.",
                file=what,
                entry=tensor,
            )
        accepted.add(shard)
    return wm


# --- local folders -------------------------------------------------------------------------------


def _fingerprint(folder: Path, files: list[Path]) -> str:
    # Names, sizes and mtimes: cheap, and changes whenever a file is replaced.
    h = hashlib.sha1()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _open_local(ref: ModelRef, check_config: ConfigCheck | None) -> CheckpointSource:
    folder = ref.local_path
    assert folder is not None
    cfg_path = folder / "config.json"
    if not os.path.lexists(cfg_path):  # present but not a file: load_json_file says what it is
        raise EntryNotFoundError(
            f"no config.json in {folder}", "Point MODEL at a checkpoint folder (config.json + safetensors)."
        )
    config = load_json_file(cfg_path, f"{cfg_path}", MAX_CONFIG_BYTES)
    if check_config is not None:
        check_config(config)
    files = LocalFiles(folder)
    shards = sorted(folder.glob("*.safetensors"))
    index_path = folder / INDEX_FILE
    if os.path.lexists(index_path):  # a pipe or a broken link there is refused, not skipped
        wm = check_weight_map(
            load_json_file(index_path, str(index_path), MAX_INDEX_BYTES, unique_keys=True), str(index_path)
        )
        # Shards in subfolders count too: replacing one must change the fingerprint.
        listed = sorted({folder / s for s in set(wm.values()) if (folder / s).is_file()} | set(shards))
        return CheckpointSource(
            files,
            config=config,
            weight_map=wm,
            commit=_fingerprint(folder, [cfg_path, index_path] + listed),
            display=ref.display,
            local_path=folder,
        )
    if not shards:
        raise EntryNotFoundError(
            f"no safetensors files in {folder}", f"Expected {INDEX_FILE} with shards, or {LONE_FILE}."
        )
    # No index: map tensors from the headers of every shard (a local read, cheap).
    src = CheckpointSource(
        files,
        config=config,
        weight_map={},
        commit=_fingerprint(folder, [cfg_path] + shards),
        display=ref.display,
        local_path=folder,
    )
    wm = {}
    for s, h in src.headers([s.name for s in shards]).items():
        for n in h.tensors:
            wm[n] = s
    src.weight_map = wm
    src.tensor_names = set(wm)
    return src


# --- Hub repos -----------------------------------------------------------------------------------


def _open_hub(
    ref: ModelRef,
    revision: str,
    token: str | None,
    endpoint: str | None,
    concurrency: int,
    check_config: ConfigCheck | None,
    read_options: dict,
) -> CheckpointSource:
    from huggingface_hub import constants

    repo_id = ref.repo_id
    assert repo_id is not None
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    policy, range_options = HttpPolicy.split(read_options)
    reader = range_options.pop("reader", "thread")
    if reader not in READERS:
        raise TypeError(f"reader must be 'auto', 'thread' or 'process', not {reader!r}")
    if reader != "thread":  # refused here, before any request, if it cannot run
        from svd_probe.hub.reader_process import refuse_unusable, usable

        if reader == "process":
            refuse_unusable()
        elif not usable():
            reader = "thread"
    if http.is_offline():  # before any request: huggingface_hub would refuse each one anyway
        raise http.offline_error(endpoint, repo_id)
    common: dict[str, Any] = dict(token=token, endpoint=endpoint, policy=policy, label=revision)

    meta = http.file_metadata(repo_id, "config.json", revision=revision, **common)
    commit = meta.commit_hash
    if not commit or not is_commit(commit):
        raise TransferError(
            f"{endpoint} did not answer with an X-Repo-Commit header for {repo_id}",
            "The endpoint does not look like a Hugging Face Hub or mirror; check --endpoint / HF_ENDPOINT.",
        )
    config = _fetch_json(repo_id, "config.json", commit, meta.size, MAX_CONFIG_BYTES, common)
    if check_config is not None:
        check_config(config)

    options: dict[str, Any] = dict(token=token, concurrency=concurrency, revision=revision, policy=policy)
    options.update(range_options)
    if reader == "thread":
        files: Any = HubFiles(endpoint, repo_id, commit, **options)
    else:
        from svd_probe.hub.reader_process import ProcessFiles, ReaderStartError

        try:
            files = ProcessFiles(endpoint, repo_id, commit, **options)
        except ReaderStartError as e:
            if reader == "process":
                raise
            warnings.warn(f"{e}; reading in threads instead", stacklevel=3)
            files = HubFiles(endpoint, repo_id, commit, **options)
    index = _fetch_index(repo_id, commit, common)
    if index is not None:
        what = f"{INDEX_FILE} of {repo_id}"
        return CheckpointSource(
            files,
            config=config,
            weight_map=check_weight_map(index, what),
            commit=commit,
            display=ref.display,
            repo_id=repo_id,
            revision=revision,
        )
    # A single-file checkpoint: its header is the index.
    src = CheckpointSource(
        files, config=config, weight_map={}, commit=commit, display=ref.display, repo_id=repo_id, revision=revision
    )
    try:
        h = src.headers([LONE_FILE])[LONE_FILE]
    except EntryNotFoundError:
        files.close()
        raise EntryNotFoundError(
            f"{repo_id} has neither {INDEX_FILE} nor {LONE_FILE} at revision {revision!r}",
            "svd-probe reads safetensors checkpoints; pick a repo or revision that has them.",
        ) from None
    src.weight_map = {n: LONE_FILE for n in h.tensors}
    src.tensor_names = set(src.weight_map)
    return src


def _fetch_json(repo_id: str, path: str, commit: str, size: int | None, max_bytes: int, common: dict) -> dict:
    what = f"{path} of {repo_id}"
    if size is not None and size > max_bytes:  # refused before a byte of it is downloaded
        raise MalformedFileError(_too_big(what, size, max_bytes), _HINT, file=what)
    local = http.download(repo_id, path, commit=commit, max_bytes=max_bytes, **common)
    return load_json_file(local, what, max_bytes, unique_keys=path == INDEX_FILE)


def _fetch_index(repo_id: str, commit: str, common: dict) -> dict | None:
    """The index at `commit`, or None when the repo has none (a single-file checkpoint)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, INDEX_FILE, revision=commit)
    if isinstance(cached, str):  # pinned to a commit: what is cached cannot have changed
        return load_json_file(Path(cached), f"{INDEX_FILE} of {repo_id}", MAX_INDEX_BYTES, unique_keys=True)
    if cached is not None:  # huggingface_hub recorded that this commit has no index
        return None
    try:
        meta = http.file_metadata(repo_id, INDEX_FILE, revision=commit, **common)
    except EntryNotFoundError:
        return None
    return _fetch_json(repo_id, INDEX_FILE, commit, meta.size, MAX_INDEX_BYTES, common)
