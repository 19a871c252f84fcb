"""Randomized controls: copies of a weight that keep its scale and lose its structure.

A spectrum means little without a baseline. Analysing, beside each real matrix, a copy that
keeps what is trivially inherited and destroys the learned structure tells which features of
the spectrum are learned:

- "gaussian": i.i.d. normal entries with the same shape, rescaled to exactly the same Frobenius
  norm. Its spectrum is the Marchenko–Pastur bulk that `metrics.mp_edge` predicts.
- "shuffled": the same entries, permuted uniformly at random. It keeps the entry distribution
  (heavy tails, outlier entries, quantization levels) and destroys the row/column structure.
  WeightWatcher's `shuf_matrix` draws with replacement instead (a bootstrap); a permutation
  keeps the Frobenius norm exactly.

Both are pure and deterministic: the randomness comes from a CPU `torch.Generator` seeded with
`seed`, so a copy is the same on every device and in every process. Give each tensor its own
seed with `control_seed(seed, name)` (stable across runs, unlike Python's `hash`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

import torch

from svd_probe.errors import BadOptionError

if TYPE_CHECKING:
    from svd_probe.hub.source import LayerTensors

CONTROL_MODES = ("gaussian", "shuffled")
# The run seed of `svd-probe analyze --control`: fixed, so a control analysis is reproducible and
# its cache key needs no seed (each tensor still draws its own, `control_seed(CONTROL_SEED, name)`).
CONTROL_SEED = 0


def control_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor, from a run's seed and the tensor's name.

    Example:
        >>> control_seed(0, "model.layers.0.self_attn.o_proj.weight") == control_seed(0, "model.layers.0.self_attn.o_proj.weight")
        True
    """
    digest = hashlib.blake2b(f"{int(seed)}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def randomized_copy(w: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """A randomized copy of `w` with its shape, dtype and device.

    Args:
        w: a weight tensor (dequantized: FP8 weights should be multiplied by their scales first,
            so that the copy has the weight's scale, not the raw codes').
        mode: "gaussian" (i.i.d. normal, same Frobenius norm) or "shuffled" (entries permuted).
        seed: the generator's seed; the same seed gives the same copy.

    Returns:
        A new tensor; `w` is not modified.

    Example:
        >>> w = torch.arange(6.0).reshape(2, 3)
        >>> sorted(randomized_copy(w, "shuffled", seed=1).flatten().tolist())
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    if mode not in CONTROL_MODES:
        raise ValueError(f"control mode must be one of {', '.join(CONTROL_MODES)}, got {mode!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if mode == "shuffled":
        perm = torch.randperm(w.numel(), generator=gen).to(w.device)
        return w.reshape(-1)[perm].reshape(w.shape)
    # float32 draws (a 7168 × 16384 weight is 470 MB of them), norms accumulated in float64.
    g = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    g_norm = float(torch.linalg.vector_norm(g, dtype=torch.float64))
    w_norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    return (g.to(w.device) * (w_norm / g_norm if g_norm > 0 else 0.0)).to(w.dtype)


def check_control(mode: str | None) -> str | None:
    """`mode` if it is None or one of CONTROL_MODES, else `BadOptionError` (the `--control` value)."""
    if mode is not None and mode not in CONTROL_MODES:
        raise BadOptionError(f"bad --control value {mode!r}", f"Use --control {' or '.join(CONTROL_MODES)}.")
    return mode


def apply_control(tensors: LayerTensors, mode: str | None, seed: int) -> LayerTensors:
    """One layer's tensors with every projection weight replaced by its randomized copy.

    The weights randomized are those the read's `LayerPlan` lists behind the matrix kinds
    (`kind_tensors`), each as stored (a fused tensor such as GPT-2's c_attn or MLA's kv_b_proj as
    a whole), each with its own seed `control_seed(seed, name)`; they are dequantized already,
    and norms fold and heads fuse afterwards, as for the real weights. Norm weights are kept as
    they are: a control randomizes the learned maps, not the per-channel gains that scale them,
    so the real and the control spectra see the same folded norms.

    Args:
        tensors: what `CheckpointSource.read_tensors` returned for a `LayerPlan`.
        mode: a CONTROL_MODES entry, or None for the tensors themselves (returned as they are).
        seed: the run's seed.

    Returns:
        A `LayerTensors` with the same names, storage dtypes and plan.

    Example:
        >>> lt = src.read_tensors(adapter.plan(0, {"VO"}, True))  # doctest: +SKIP
        >>> apply_control(lt, "gaussian", 0)["model.layers.0.self_attn.o_proj.weight"]  # doctest: +SKIP
    """
    if mode is None:
        return tensors
    check_control(mode)
    if tensors.plan is None:
        raise ValueError("a control needs tensors read for a LayerPlan, which says which are projection weights")
    weights = {name for names in tensors.plan.kind_tensors.values() for name in names}
    out = {
        name: randomized_copy(t, mode, control_seed(seed, name)) if name in weights else t
        for name, t in tensors.items()
    }
    return dataclasses.replace(tensors, tensors=out)
