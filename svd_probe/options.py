"""Command-line values parsed once, for the CLI and the Python API alike.

Each option that several commands take has one parser here, so `analyze`, `plot`, `export`
and `train` accept and refuse exactly the same values with the same message.
"""

from __future__ import annotations

import torch

from svd_probe.errors import BadOptionError


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`.

    Raises `BadOptionError` for anything else, and for CUDA on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise BadOptionError(f"bad --device {name!r}", "Use auto, cpu or cuda (or cuda:N).")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadOptionError(
            "--device cuda asked for, but torch sees no CUDA GPU",
            "Use --device cpu, or install the CUDA build of torch (see README).",
        )
    return torch.device(name)
