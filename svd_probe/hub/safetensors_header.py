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
from svd_probe.hub.dtypes import DTYPES

# Real shard headers exceed 100 kB; 100 MB is far beyond any honest header and keeps a corrupt
# length field from making us allocate or download gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# A tensor's element count times its element size must fit a signed 64-bit byte count: torch
# sizes storage in int64, and `torch.empty((2**63, 0))` fails even though it holds no element.
_MAX_TENSOR_BYTES = 2**63 - 1

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


def _show(value: object, limit: int = 40) -> str:
    """A header value for an error message, cut short: a hostile header may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cut(text: str, limit: int = 200) -> str:
    """A name from the header for an error message, cut short."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; two definitions of one tensor mean the header
    # is damaged, and picking one of them silently would analyse whichever came last.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def parse_header_length(prefix: bytes, file: str, file_size: int) -> int:
    """Decode and check the 8-byte little-endian header length.

    The messages never print the decoded number: for a file that is not a safetensors file it is
    the file's first eight bytes, which are none of the user's business to see as an integer.
    """
    if len(prefix) < 8 or file_size < 8:
        raise CorruptShardError(f"file is {file_size} bytes, too short for a safetensors header", file=file, hint=_HINT)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CorruptShardError(
            f"the header length in its first 8 bytes exceeds the {MAX_HEADER_BYTES}-byte limit: "
            "this is not a safetensors file, or a damaged one",
            file=file,
            hint=_HINT,
        )
    if n < 2:
        raise CorruptShardError(
            "the header length in its first 8 bytes is too small for a JSON object", file=file, hint=_HINT
        )
    if 8 + n > file_size:
        raise CorruptShardError(
            f"the header length in its first 8 bytes runs past the end of the {file_size}-byte file",
            file=file,
            hint=_HINT,
        )
    return n


def parse_header(raw: bytes, file: str, file_size: int) -> ShardHeader:
    """Validate the JSON header `raw` (without the 8-byte prefix) of a file of `file_size` bytes.

    Every way the header can be wrong ends in `CorruptShardError` naming the file (and the tensor
    where there is one): invalid UTF-8 or JSON, nesting too deep for the parser, integers too long
    to convert, a key defined twice, unknown dtypes, shapes whose byte size overflows a 64-bit
    count or disagrees with the offsets, offsets past the end of the file, overlapping tensors.
    """
    n = len(raw)
    try:
        obj = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise CorruptShardError(f"header is not UTF-8 (bad byte at offset {e.start})", file=file, hint=_HINT) from None
    except _DuplicateKey as e:
        raise CorruptShardError(
            "the header defines this key twice", file=file, tensor=_cut(e.key), hint=_HINT
        ) from None
    except json.JSONDecodeError as e:
        raise CorruptShardError(
            f"header is not valid JSON ({e.msg} at offset {e.pos})", file=file, hint=_HINT
        ) from None
    except (ValueError, RecursionError) as e:
        # ValueError: an integer longer than Python converts (4300 digits); RecursionError: arrays
        # or objects nested deeper than the parser's stack.
        what = "nested too deeply" if isinstance(e, RecursionError) else "holds a number too long to read"
        raise CorruptShardError(
            f"header is not a valid safetensors header (JSON {what})", file=file, hint=_HINT
        ) from None
    if not isinstance(obj, dict):
        raise CorruptShardError(f"header is a JSON {type(obj).__name__}, not an object", file=file, hint=_HINT)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptShardError("__metadata__ is not an object", file=file, hint=_HINT)
    data_start = 8 + n
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        shown = _cut(name)
        if not isinstance(entry, dict):
            raise CorruptShardError("entry is not an object", file=file, tensor=shown, hint=_HINT)
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CorruptShardError(f"unknown dtype {_show(dtype)}", file=file, tensor=shown, hint=_HINT)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CorruptShardError(f"bad shape {_show(shape)}", file=file, tensor=shown, hint=_HINT)
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CorruptShardError(f"bad data_offsets {_show(offs)}", file=file, tensor=shown, hint=_HINT)
        size = DTYPES[dtype].size
        if math.prod(d for d in shape if d) * size > _MAX_TENSOR_BYTES:
            raise CorruptShardError(
                f"shape {_show(shape)} × {dtype} overflows a 64-bit byte count", file=file, tensor=shown, hint=_HINT
            )
        expected = math.prod(shape) * size
        if offs[1] - offs[0] != expected:
            raise CorruptShardError(
                f"shape {_show(shape)} × {dtype} is {expected} bytes but data_offsets span {offs[1] - offs[0]}",
                file=file,
                tensor=shown,
                hint=_HINT,
            )
        if offs[1] > data_len:
            raise CorruptShardError(
                f"data_offsets {_show(offs)} end past the file's {data_len} data bytes",
                file=file,
                tensor=shown,
                hint=_HINT,
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
    # Overlapping tensors mean a damaged header: two names would read the same bytes.
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CorruptShardError(f"bytes overlap those of {_cut(n0)}", file=file, tensor=_cut(n1), hint=_HINT)
    return ShardHeader(file=file, file_size=file_size, header_len=n, tensors=tensors, metadata=metadata)
