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

import hashlib

import torch

CONTROL_MODES = ("gaussian", "shuffled")


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
