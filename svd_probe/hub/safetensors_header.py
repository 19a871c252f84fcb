"""Parse and validate safetensors headers ourselves (docs/reference.md §5).

We never hand a remote shard to the `safetensors` library: it wants the whole file, and the
point of svd-probe is to read a few hundred MB out of a 4 GB shard. So the header is parsed
here, and every check that protects the range reads is done up front: a bad offset in a header
would otherwise turn into a wrong tensor or a huge request, not an error.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from svd_probe.errors import CorruptShardError

# Real shard headers exceed 100 kB; 100 MB is far beyond any honest header and keeps a corrupt
# length field from making us allocate or download gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Bytes per element of every dtype the safetensors format defines that has a whole-byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_HINT = "The file is damaged or not a safetensors file; re-download it or check the mirror serving it."


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file (8 + N + data_offsets[0])
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    file: str
    file_size: int
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict

    @property
    def header_bytes(self) -> int:
        """Bytes a reader fetches for the header: the 8-byte length plus the JSON."""
        return 8 + self.header_len


def parse_header_length(prefix: bytes, file: str, file_size: int) -> int:
    """Decode and check the 8-byte little-endian header length."""
    if len(prefix) < 8 or file_size < 8:
        raise CorruptShardError(f"file is {file_size} bytes, too short for a safetensors header", file=file, hint=_HINT)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CorruptShardError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit", file=file, hint=_HINT)
    if n < 2:
        raise CorruptShardError(f"header length {n} is too small for a JSON object", file=file, hint=_HINT)
    if 8 + n > file_size:
        raise CorruptShardError(
            f"header length {n} runs past the end of the {file_size}-byte file", file=file, hint=_HINT
        )
    return n


def parse_header(raw: bytes, file: str, file_size: int) -> ShardHeader:
    """Validate the JSON header `raw` (without the 8-byte prefix) of a file of `file_size` bytes."""
    n = len(raw)
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptShardError(f"header is not valid JSON ({e})", file=file, hint=_HINT) from None
    if not isinstance(obj, dict):
        raise CorruptShardError(f"header is a JSON {type(obj).__name__}, not an object", file=file, hint=_HINT)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptShardError("__metadata__ is not an object", file=file, hint=_HINT)
    data_start = 8 + n
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if not isinstance(entry, dict):
            raise CorruptShardError("entry is not an object", file=file, tensor=name, hint=_HINT)
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise CorruptShardError(f"unknown dtype {dtype!r}", file=file, tensor=name, hint=_HINT)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CorruptShardError(f"bad shape {shape!r}", file=file, tensor=name, hint=_HINT)
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CorruptShardError(f"bad data_offsets {offs!r}", file=file, tensor=name, hint=_HINT)
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != expected:
            raise CorruptShardError(
                f"shape {shape} × {dtype} is {expected} bytes but data_offsets span {offs[1] - offs[0]}",
                file=file,
                tensor=name,
                hint=_HINT,
            )
        if offs[1] > data_len:
            raise CorruptShardError(
                f"data_offsets {offs} end past the file's {data_len} data bytes", file=file, tensor=name, hint=_HINT
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
    # Overlapping tensors mean a damaged header: two names would read the same bytes.
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CorruptShardError(f"bytes overlap those of {n0}", file=file, tensor=n1, hint=_HINT)
    return ShardHeader(file=file, file_size=file_size, header_len=n, tensors=tensors, metadata=metadata)
