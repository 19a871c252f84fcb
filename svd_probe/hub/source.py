"""One checkpoint, Hub repo or local folder, read tensor by tensor.

`open_checkpoint` pins a Hub revision to its commit, fetches config.json and the index with
huggingface_hub (small files, cached in HF_HOME as usual), and from then on reads only the
safetensors headers of shards that hold requested tensors and the tensors' own bytes. Shards are
never written to disk. A local folder goes through the same code with memory-mapped reads.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from svd_probe.errors import CorruptShardError, EntryNotFoundError, SvdProbeError, TransferError
from svd_probe.hub.dequant import dequantize_fp8_blocks, to_tensor, widen
from svd_probe.hub.ranges import HubFiles, LocalFiles, hub_error
from svd_probe.hub.safetensors_header import ShardHeader, parse_header, parse_header_length
from svd_probe.models import ModelRef

INDEX_FILE = "model.safetensors.index.json"
LONE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class CheckpointSource:
    """Tensor access to one checkpoint. Build it with `open_checkpoint`.

    Attributes: `commit` (40 hex; for local folders a fingerprint of the files), `config`
    (config.json), `tensor_names`, `bytes_fetched` (payload bytes read: headers + tensors).
    Thread-safe: the layer streamer reads the next layer while the caller works on this one.
    """

    def __init__(
        self,
        files,
        *,
        config: dict,
        weight_map: dict[str, str],
        commit: str,
        display: str,
        repo_id: str | None = None,
        local_path: Path | None = None,
        revision: str | None = None,
    ):
        self._files = files
        self.config = config
        self.weight_map = weight_map
        self.tensor_names: set[str] = set(weight_map)
        self.commit = commit
        self.display = display
        self.repo_id = repo_id
        self.local_path = local_path
        self.revision = revision
        self._headers: dict[str, ShardHeader] = {}
        self._header_lock = threading.Lock()
        q = config.get("quantization_config") or {}
        bs = q.get("weight_block_size") or [128, 128]
        self.block_size = (int(bs[0]), int(bs[1]))

    # -- bookkeeping --------------------------------------------------------------------------------

    @property
    def bytes_fetched(self) -> int:
        return self._files.stats.bytes_fetched

    @property
    def stats(self) -> dict:
        d = self._files.stats.as_dict()
        d["headers_read"] = len(self._headers)
        d["header_bytes"] = sum(h.header_bytes for h in self._headers.values())
        return d

    def close(self) -> None:
        self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- headers ------------------------------------------------------------------------------------

    def shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise EntryNotFoundError(
                f"tensor {name!r} is not in {self.display}",
                "The checkpoint's index does not list it; the model may use another layout or revision.",
            ) from None

    def headers(self, shards: Iterable[str]) -> dict[str, ShardHeader]:
        """Headers of these shards, reading (in parallel) only the ones not seen yet."""
        shards = list(dict.fromkeys(shards))
        with self._header_lock:
            todo = [s for s in shards if s not in self._headers]
            if todo:
                prefixes = self._files.read_many([(s, 0, 8) for s in todo])
                lens = {}
                for s, pre in zip(todo, prefixes, strict=False):
                    size = self._files.known_size(s)
                    if size is None:
                        size = self._files.size(s)
                    lens[s] = (parse_header_length(bytes(pre), s, size), size)
                raws = self._files.read_many([(s, 8, 8 + lens[s][0]) for s in todo])
                for s, raw in zip(todo, raws, strict=False):
                    self._headers[s] = parse_header(raw, s, lens[s][1])
            return {s: self._headers[s] for s in shards}

    def tensor_info(self, name: str):
        shard = self.shard_of(name)
        info = self.headers([shard])[shard].tensors.get(name)
        if info is None:
            raise CorruptShardError(
                "the index places this tensor here but the header does not list it",
                file=shard,
                tensor=name,
                hint="The index and the shards disagree; re-download the checkpoint or check the revision.",
            )
        return info

    def storage_dtype(self, name: str) -> str:
        return self.tensor_info(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensor_info(name).shape

    # -- tensors ------------------------------------------------------------------------------------

    def read_tensors(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """float32 tensors on `device`, FP8 weights dequantized with their `_scale_inv` companions."""
        names = list(dict.fromkeys(names))
        self.headers({self.shard_of(n) for n in names})  # all needed headers in one parallel round
        scales = {}
        for n in names:
            info = self.tensor_info(n)
            if info.dtype.startswith("F8_") and n + SCALE_SUFFIX in self.weight_map:
                scales[n] = n + SCALE_SUFFIX
        self.headers({self.shard_of(s) for s in scales.values()})  # a scale may sit in another shard
        wanted = names + [s for s in scales.values() if s not in names]
        infos = [self.tensor_info(n) for n in wanted]
        bufs = self._files.read_many(
            [(self.weight_map[n], i.begin, i.end) for n, i in zip(wanted, infos, strict=False)]
        )
        raw = {
            n: to_tensor(b, i.dtype, i.shape, device, file=self.weight_map[n], name=n)
            for n, b, i in zip(wanted, bufs, infos, strict=False)
        }
        out = {}
        for n in names:
            if n in scales:
                out[n] = dequantize_fp8_blocks(raw[n], raw[scales[n]], self.block_size, file=self.weight_map[n], name=n)
            else:
                out[n] = widen(raw[n])
        return out


# -- opening ---------------------------------------------------------------------------------------


def open_checkpoint(
    ref: ModelRef | str,
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    concurrency: int = 8,
    **read_options,
) -> CheckpointSource:
    """Open a Hub repo (pinned to the commit `revision` resolves to) or a local folder.

    `read_options` go to `HubFiles` (max_gap, chunk_size, retries, backoff, timeout).
    """
    if isinstance(ref, str):
        from svd_probe.models import resolve_model

        ref = resolve_model(ref)
    if ref.is_local:
        return _open_local(ref)
    return _open_hub(ref, revision or "main", token, endpoint, concurrency, read_options)


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


def _open_local(ref: ModelRef) -> CheckpointSource:
    folder = ref.local_path
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EntryNotFoundError(
            f"no config.json in {folder}", "Point MODEL at a checkpoint folder (config.json + safetensors)."
        )
    config = _load_json(cfg_path, f"{cfg_path}")
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
        if not commit or not _COMMIT.match(commit):
            raise TransferError(
                f"{endpoint} did not answer with an X-Repo-Commit header for {ref.repo_id}",
                "The endpoint does not look like a Hugging Face Hub or mirror; check --endpoint / HF_ENDPOINT.",
            )
        return commit


def _open_hub(
    ref: ModelRef, revision: str, token, endpoint: str | None, concurrency: int, read_options: dict
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
