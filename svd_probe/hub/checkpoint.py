"""Opening a checkpoint: a Hub repo pinned to a commit, or a local folder.

`open_checkpoint` resolves the revision to its commit, fetches config.json and the index with
huggingface_hub (small files, cached in HF_HOME as usual) and returns a `CheckpointSource` that
from then on reads only headers and tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from svd_probe.errors import EntryNotFoundError, SvdProbeError, TransferError
from svd_probe.hub.ranges import HubFiles, LocalFiles, hub_error
from svd_probe.hub.source import INDEX_FILE, LONE_FILE, CheckpointSource
from svd_probe.models import ModelRef, is_commit


def open_checkpoint(
    ref: ModelRef | str,
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    concurrency: int = 8,
    check_config: Callable[[dict], None] | None = None,
    **read_options,
) -> CheckpointSource:
    """Open a Hub repo (pinned to the commit `revision` resolves to) or a local folder.

    `read_options` go to `HubFiles` (max_gap, chunk_size, retries, backoff, timeout).
    `check_config(config)` runs right after config.json is parsed, before the index or any
    shard header is read, so a request the model cannot serve fails early.
    """
    if isinstance(ref, str):
        from svd_probe.models import resolve_model

        ref = resolve_model(ref)
    if ref.is_local:
        return _open_local(ref, check_config)
    return _open_hub(ref, revision or "main", token, endpoint, concurrency, read_options, check_config)


def _fingerprint(folder: Path, files: list[Path]) -> str:
    # Names, sizes and mtimes: cheap, and changes whenever a file is replaced.
    h = hashlib.sha1()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EntryNotFoundError(f"{what} is unreadable: {e}", "Check the checkpoint files.") from None
    if not isinstance(obj, dict):
        raise EntryNotFoundError(f"{what} is not a JSON object", "Check the checkpoint files.")
    return obj


def _weight_map(index: dict, where: str) -> dict[str, str]:
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise EntryNotFoundError(
            f"{INDEX_FILE} of {where} has no valid weight_map", "Check the checkpoint's index file."
        )
    return wm


def _open_local(ref: ModelRef, check_config: Callable[[dict], None] | None = None) -> CheckpointSource:
    folder = ref.local_path
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EntryNotFoundError(
            f"no config.json in {folder}", "Point MODEL at a checkpoint folder (config.json + safetensors)."
        )
    config = _load_json(cfg_path, f"{cfg_path}")
    if check_config is not None:
        check_config(config)
    files = LocalFiles(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if (folder / INDEX_FILE).is_file():
        wm = _weight_map(_load_json(folder / INDEX_FILE, str(folder / INDEX_FILE)), str(folder))
        fp_files = [cfg_path, folder / INDEX_FILE] + shards
        src = CheckpointSource(
            files,
            config=config,
            weight_map=wm,
            commit=_fingerprint(folder, fp_files),
            display=ref.display,
            local_path=folder,
        )
        return src
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


def _map_hf_error(e: Exception, ref: ModelRef, revision: str, endpoint: str, path: str) -> SvdProbeError:
    resp = getattr(e, "response", None)
    if resp is not None:
        err = hub_error(resp, repo_id=ref.repo_id, revision=revision, path=path, endpoint=endpoint)
        if err is not None:
            return err
    return TransferError(
        f"could not fetch {path} of {ref.repo_id} from {endpoint}: {e}", "Check the network, --endpoint / HF_ENDPOINT."
    )


def _resolve_commit(ref: ModelRef, revision: str, token, endpoint: str, retries: int = 5) -> str:
    """The commit `revision` points at, from X-Repo-Commit on a HEAD of config.json."""
    import time
    from urllib.parse import quote, urljoin

    from huggingface_hub.utils import build_hf_headers, get_session

    session = get_session()
    httpx = __import__(type(session).__module__.split(".")[0])
    url = f"{endpoint}/{ref.repo_id}/resolve/{quote(revision, safe='')}/config.json"
    headers = dict(build_hf_headers(token=token))
    headers["Accept-Encoding"] = "identity"
    redirects = 0
    attempt = 0
    while True:
        try:
            r = session.head(url, headers=headers, follow_redirects=False, timeout=30)
        except httpx.TransportError as e:
            attempt += 1
            if attempt > retries:
                raise TransferError(
                    f"cannot reach {endpoint}: {e}",
                    "Check the network, or set --endpoint / HF_ENDPOINT to a reachable mirror.",
                ) from None
            time.sleep(0.2 * 2**attempt)
            continue
        if r.status_code == 429 or r.status_code >= 500:
            attempt += 1
            if attempt > retries:
                raise TransferError(f"{endpoint} answered HTTP {r.status_code} for {ref.repo_id}", "Retry later.")
            time.sleep(0.2 * 2**attempt)
            continue
        if (
            300 <= r.status_code < 400
            and not r.headers.get("X-Repo-Commit")
            and "location" in r.headers
            and redirects < 5
        ):
            # A renamed repo answers with a (relative) redirect to its new name: follow it by hand,
            # so that an LFS-stored file's redirect to a CDN still yields the headers of the Hub.
            redirects += 1
            url = urljoin(url, r.headers["location"])
            continue
        if r.status_code >= 400:
            err = hub_error(r, repo_id=ref.repo_id, revision=revision, path="config.json", endpoint=endpoint)
            raise err or TransferError(f"HTTP {r.status_code} for {url}", "Check --endpoint / HF_ENDPOINT.")
        commit = r.headers.get("X-Repo-Commit")
        if not commit or not is_commit(commit):
            raise TransferError(
                f"{endpoint} did not answer with an X-Repo-Commit header for {ref.repo_id}",
                "The endpoint does not look like a Hugging Face Hub or mirror; check --endpoint / HF_ENDPOINT.",
            )
        return commit


def _open_hub(
    ref: ModelRef,
    revision: str,
    token,
    endpoint: str | None,
    concurrency: int,
    read_options: dict,
    check_config: Callable[[dict], None] | None = None,
) -> CheckpointSource:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    commit = _resolve_commit(ref, revision, token, endpoint)

    def fetch(path: str) -> Path:
        try:
            # Pinned to the commit: a branch moving during the run cannot mix two checkpoints.
            return Path(hf_hub_download(ref.repo_id, path, revision=commit, token=token, endpoint=endpoint))
        except HfHubHTTPError as e:
            raise _map_hf_error(e, ref, revision, endpoint, path) from None
        except Exception as e:  # network down mid-way, offline mode, cache not writable: say so, no traceback
            raise TransferError(
                f"could not fetch {path} of {ref.repo_id} from {endpoint}: {type(e).__name__}: {e}",
                "Check the network, --endpoint / HF_ENDPOINT, and that HF_HOME is writable.",
            ) from e

    config = _load_json(fetch("config.json"), f"config.json of {ref.repo_id}")
    if check_config is not None:
        check_config(config)
    files = HubFiles(
        endpoint, ref.repo_id, commit, token=token, concurrency=concurrency, revision=revision, **read_options
    )
    try:
        index_path = fetch(INDEX_FILE)
    except EntryNotFoundError:
        index_path = None
    if index_path is not None:
        wm = _weight_map(_load_json(index_path, f"{INDEX_FILE} of {ref.repo_id}"), ref.repo_id)
        return CheckpointSource(
            files,
            config=config,
            weight_map=wm,
            commit=commit,
            display=ref.display,
            repo_id=ref.repo_id,
            revision=revision,
        )
    # A single-file checkpoint: its header is the index.
    src = CheckpointSource(
        files, config=config, weight_map={}, commit=commit, display=ref.display, repo_id=ref.repo_id, revision=revision
    )
    try:
        h = src.headers([LONE_FILE])[LONE_FILE]
    except EntryNotFoundError:
        files.close()
        raise EntryNotFoundError(
            f"{ref.repo_id} has neither {INDEX_FILE} nor {LONE_FILE} at revision {revision!r}",
            "svd-probe reads safetensors checkpoints; pick a repo or revision that has them.",
        ) from None
    src.weight_map = {n: LONE_FILE for n in h.tensors}
    src.tensor_names = set(src.weight_map)
    return src
