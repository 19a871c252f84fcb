"""The safetensors dtypes: one table for the header parser, dequantization, the models table and
the test writers (safetensors' own `torch.py` keeps one `_TYPES` table the same way).

Every dtype the safetensors format defines with a whole-byte element is listed, so that the
header parser can validate any honest shard; `WEIGHT_DTYPES` are the floating-point ones
svd-probe turns into float32 (docs/reference.md §5).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dtype:
    name: str  # as safetensors spells it
    size: int  # bytes per element
    torch: torch.dtype


DTYPES: dict[str, Dtype] = {
    d.name: d
    for d in [
        Dtype("BOOL", 1, torch.bool),
        Dtype("U8", 1, torch.uint8),
        Dtype("I8", 1, torch.int8),
        Dtype("F8_E4M3", 1, torch.float8_e4m3fn),
        Dtype("F8_E5M2", 1, torch.float8_e5m2),
        Dtype("F8_E8M0", 1, torch.float8_e8m0fnu),
        Dtype("I16", 2, torch.int16),
        Dtype("U16", 2, torch.uint16),
        Dtype("F16", 2, torch.float16),
        Dtype("BF16", 2, torch.bfloat16),
        Dtype("I32", 4, torch.int32),
        Dtype("U32", 4, torch.uint32),
        Dtype("F32", 4, torch.float32),
        Dtype("I64", 8, torch.int64),
        Dtype("U64", 8, torch.uint64),
        Dtype("F64", 8, torch.float64),
    ]
}

# The weight dtypes svd-probe reads and widens to float32. F8_E8M0 is a scale format (a bare
# exponent), never a weight.
WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "F64")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")

_BY_TORCH: dict[torch.dtype, str] = {d.torch: d.name for d in DTYPES.values()}


def safetensors_name(dtype: torch.dtype | str) -> str:
    """`torch.bfloat16` or config.json's `"bfloat16"` → `"BF16"`; KeyError for anything else."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)  # type: ignore[assignment]
        if not isinstance(dtype, torch.dtype):
            raise KeyError(dtype)
    return _BY_TORCH[dtype]


def coarsest(names: Iterable[str]) -> str | None:
    """The weight dtype with the largest machine epsilon among `names` (F8_E5M2 > F8_E4M3 > BF16 >
    F16 > F32 > F64): the one that bounds the numerical rank of a product of these weights."""
    floats = [n for n in names if n in WEIGHT_DTYPES]
    if not floats:
        return None
    return max(floats, key=lambda n: torch.finfo(DTYPES[n].torch).eps)
