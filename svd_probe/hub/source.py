"""One checkpoint, Hub repo or local folder, read tensor by tensor.

`CheckpointSource` reads safetensors headers and tensors through one of the two byte-range
backends of `svd_probe.hub.ranges`; `svd_probe.hub.checkpoint.open_checkpoint` builds it.
`open_checkpoint` pins a Hub revision to its commit, fetches config.json and the index with
huggingface_hub (small files, cached in HF_HOME as usual), and from then on reads only the
safetensors headers of shards that hold requested tensors and the tensors' own bytes. Shards are
never written to disk. A local folder goes through the same code with parallel `preadv` reads.

`read_tensors` takes the adapter's `LayerPlan` (or bare names) and, before it reads a byte,
checks every tensor against the plan: the shape config.json implies (of the layer's other
attention tensors too, from their headers: `LayerPlan.checked`), a floating-point dtype, and for
FP8 weights the scale companion and its tile grid. After dequantization it refuses NaN
and Inf. It returns a `LayerTensors`: float32 tensors with their storage dtypes.

FP8 weights (docs/reference.md §1): a weight with a `<name>_scale_inv` companion is dequantized
tile by tile. Without one, a config that declares quantization means the checkpoint is damaged
(its values read unscaled would be off by the scale: σ 8× too small in a measured case), and a
`<name>_scale` companion means another FP8 scheme (compressed-tensors, ModelOpt): both are
refused. An F8 weight with no quantization config and no scale tensor at all is a model cast to
float8 and saved as is: its stored values are the weights, and it is widened unscaled.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svd_probe.adapters.base import LayerPlan, TensorSpec
from svd_probe.errors import BadConfigError, CorruptShardError, EntryNotFoundError, UnsupportedModelError
from svd_probe.hub.dequant import check_finite, dequantize_fp8_blocks, scale_grid, to_tensor, widen
from svd_probe.hub.dtypes import FP8_DTYPES, WEIGHT_DTYPES
from svd_probe.hub.safetensors_header import ShardHeader, TensorInfo, parse_header, parse_header_length

INDEX_FILE = "model.safetensors.index.json"
LONE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
_OTHER_FP8_SCALE = "_scale"  # compressed-tensors / ModelOpt: `<name>.weight_scale`, multiplied in
_MAX_BLOCK = 1 << 16


@dataclass
class LayerTensors(Mapping[str, torch.Tensor]):
    """What `read_tensors` returns: float32 tensors by name, with the storage dtype of each.

    A read-only mapping name → tensor, so `read_tensors(names)[name]` works as a dict does.
    `plan` is the `LayerPlan` the tensors were read for (None when read by bare names).
    """

    tensors: dict[str, torch.Tensor]
    dtypes: dict[str, str]
    plan: LayerPlan | None = field(default=None)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def storage_dtype(self, kind: str) -> str:
        """The coarsest storage dtype among the weights the plan says `kind` is computed from."""
        if self.plan is None:
            raise ValueError("these tensors were read by name, without a LayerPlan")
        return self.plan.storage_dtype(kind, self.dtypes)


def _quantization(config: dict) -> tuple[str | None, tuple[int, int]]:
    """(quant_method or None, FP8 weight block) from config.json, validated."""
    q = config.get("quantization_config")
    if q is None:
        return None, (128, 128)
    if not isinstance(q, dict):
        raise BadConfigError(
            "config.json: quantization_config is not an object",
            "Fix config.json, or point MODEL at the matching revision.",
            field="quantization_config",
        )
    method = q.get("quant_method")
    method = str(method)[:40] if method is not None else "unnamed"
    bs = q.get("weight_block_size")
    if bs is None:
        return method, (128, 128)
    if (
        not isinstance(bs, list)
        or len(bs) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= _MAX_BLOCK for b in bs)
    ):
        raise BadConfigError(
            f"config.json: quantization_config.weight_block_size is {str(bs)[:40]}, not two whole numbers "
            f"from 1 to {_MAX_BLOCK}",
            "DeepSeek's block FP8 uses [128, 128]; fix config.json or point MODEL at the matching revision.",
            field="quantization_config.weight_block_size",
        )
    return method, (bs[0], bs[1])


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
        self.quant_method, self.block_size = _quantization(config)

    # -- bookkeeping --------------------------------------------------------------------------------

    @property
    def bytes_fetched(self) -> int:
        return self._files.stats.bytes_fetched

    @property
    def stats(self) -> dict:
        d = self._files.stats.as_dict()
        if reader := getattr(self._files, "reader", None):  # over HTTP: "thread" or "process"
            d["reader"] = reader
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
                "The checkpoint's index does not list it; the model may use another layout or revision "
                "(for a multi-token-prediction layer, `--no-mtp` skips those layers).",
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

    def read_tensors(self, names: Iterable[str] | LayerPlan, device: torch.device | str = "cpu") -> LayerTensors:
        """float32 tensors on `device`, FP8 weights dequantized with their `_scale_inv` companions.

        Args:
            names: the tensors to read, or the adapter's `LayerPlan` for one layer: then each
                tensor's shard-header shape is checked against the shape config.json implies
                (`BadConfigError` naming tensor and fields) before any byte is read, and so is
                that of every tensor in `plan.checked` the checkpoint holds (the layer's other
                attention tensors: headers only, never their bytes).
            device: where the tensors are widened and returned.
        Returns:
            `LayerTensors`: a mapping name → float32 tensor, with `.dtypes` (storage dtypes) and
            `.plan`.
        Example:
            >>> lt = src.read_tensors(adapter.plan(0, {"VO"}, True), "cpu")
            >>> lt["model.layers.0.self_attn.o_proj.weight"].dtype, lt.storage_dtype("VO")
            (torch.float32, 'F8_E4M3')
        """
        plan = names if isinstance(names, LayerPlan) else None
        names = list(dict.fromkeys(names.tensors if isinstance(names, LayerPlan) else names))
        # The tensors of the layer's full analysis are checked too, where the checkpoint has
        # them (`LayerPlan.checked`): their shapes may refute a head split the read ones fit.
        read = set(names)
        others = [n for n in plan.checked if n in self.weight_map and n not in read] if plan else []
        self.headers({self.shard_of(n) for n in names + others})  # all needed headers in one parallel round
        infos = {n: self.tensor_info(n) for n in names}
        if plan is not None:
            listed = {n: info for n in others if (info := self._listed_info(n)) is not None}
            for n, spec in plan.shape_checks():
                if (info := infos.get(n) or listed.get(n)) is not None:
                    self._check_shape(n, info, spec)
        scales: dict[str, str] = {}
        for n in names:
            info = infos[n]
            if info.dtype not in WEIGHT_DTYPES:
                raise CorruptShardError(
                    f"dtype {info.dtype} is not a floating-point weight dtype svd-probe reads",
                    file=self.weight_map[n],
                    tensor=n,
                )
            if info.dtype in FP8_DTYPES and (scale := self._scale_of(n, info)) is not None:
                scales[n] = scale
        self.headers({self.shard_of(s) for s in scales.values()})  # a scale may sit in another shard
        for n, s in scales.items():
            self._check_scale(n, infos[n], s, self.tensor_info(s))
        wanted = names + [s for s in scales.values() if s not in names]
        infos |= {s: self.tensor_info(s) for s in wanted if s not in infos}
        bufs = self._files.read_many([(self.weight_map[n], infos[n].begin, infos[n].end) for n in wanted])
        raw = {
            n: to_tensor(b, infos[n].dtype, infos[n].shape, device, file=self.weight_map[n], name=n)
            for n, b in zip(wanted, bufs, strict=True)
        }
        out = {}
        for n in names:
            if n in scales:
                s = scales[n]
                check_finite(raw[s], file=self.weight_map[s], name=s)
                out[n] = dequantize_fp8_blocks(raw[n], raw[s], self.block_size, file=self.weight_map[n], name=n)
            else:
                out[n] = widen(raw[n])
            check_finite(out[n], file=self.weight_map[n], name=n)
        return LayerTensors(out, {n: infos[n].dtype for n in names}, plan)

    # -- checks made before reading -------------------------------------------------------------------

    def _listed_info(self, name: str) -> TensorInfo | None:
        """The header entry of a tensor the index lists, None where its header does not list it
        (for a tensor only checked, not read: its absence is not this read's to refuse)."""
        return self.headers([self.weight_map[name]])[self.weight_map[name]].tensors.get(name)

    def _check_shape(self, name: str, info: TensorInfo, spec: TensorSpec) -> None:
        if tuple(info.shape) == tuple(spec.shape):
            return
        raise BadConfigError(
            f"tensor {name} has shape {list(info.shape)} in {self.weight_map[name]}, "
            f"but config.json implies {spec.explain()}",
            "config.json and the checkpoint's tensors disagree: fix the field(s) named, or point MODEL at the "
            "revision whose config.json belongs to these shards.",
            field=", ".join(spec.field_names) or None,
            tensor=name,
        )

    def _scale_of(self, name: str, info: TensorInfo) -> str | None:
        """The `_scale_inv` companion of an FP8 weight, None for an unscaled FP8 tensor, or a
        typed error where the scale is missing or belongs to a scheme svd-probe does not read."""
        if name + SCALE_SUFFIX in self.weight_map:
            return name + SCALE_SUFFIX
        if name + _OTHER_FP8_SCALE in self.weight_map:
            raise UnsupportedModelError(
                f"{name} is {info.dtype} with a {name + _OTHER_FP8_SCALE} companion, an FP8 scheme svd-probe does "
                f"not read (config.json quant_method: {self.quant_method or 'none'})",
                "svd-probe reads DeepSeek-style block FP8 (`weight_scale_inv`) and BF16/F16/F32 weights; "
                "analyse a BF16 release of the model.",
            )
        if self.quant_method is not None:
            raise CorruptShardError(
                f"{info.dtype} weight has no {name + SCALE_SUFFIX}, but config.json declares "
                f"{self.quant_method} quantization: read unscaled, its values would be off by the missing scale",
                file=self.weight_map[name],
                tensor=name,
                hint="The checkpoint is incomplete: re-download it, or check that the index lists every "
                "`*_scale_inv` tensor.",
            )
        return None  # a model cast to float8 and saved as is: the stored values are the weights

    def _check_scale(self, name: str, info: TensorInfo, scale: str, scale_info: TensorInfo) -> None:
        if len(info.shape) != 2:
            raise CorruptShardError(
                f"FP8 weight with block scales must be 2-D, got shape {list(info.shape)}",
                file=self.weight_map[name],
                tensor=name,
            )
        grid = scale_grid(info.shape, self.block_size)
        if tuple(scale_info.shape) != grid:
            bm, bn = self.block_size
            raise CorruptShardError(
                f"scale_inv has shape {list(scale_info.shape)}, expected {list(grid)} for a "
                f"{info.shape[0]}×{info.shape[1]} weight in {bm}×{bn} blocks",
                file=self.weight_map[scale],
                tensor=scale,
            )
        if scale_info.dtype not in WEIGHT_DTYPES:
            raise CorruptShardError(
                f"dtype {scale_info.dtype} is not a floating-point scale dtype svd-probe reads",
                file=self.weight_map[scale],
                tensor=scale,
            )
