"""One checkpoint, Hub repo or local folder, read tensor by tensor.

`CheckpointSource` reads safetensors headers and tensors through one of the two byte-range
backends of `svd_probe.hub.ranges`; `svd_probe.hub.checkpoint.open_checkpoint` builds it.
`open_checkpoint` pins a Hub revision to its commit, fetches config.json and the index with
huggingface_hub (small files, cached in HF_HOME as usual), and from then on reads only the
safetensors headers of shards that hold requested tensors and the tensors' own bytes. Shards are
never written to disk. A local folder goes through the same code with memory-mapped reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from svd_probe.errors import CorruptShardError, EntryNotFoundError
from svd_probe.hub.dequant import dequantize_fp8_blocks, to_tensor, widen
from svd_probe.hub.safetensors_header import ShardHeader, parse_header, parse_header_length

INDEX_FILE = "model.safetensors.index.json"
LONE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


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
