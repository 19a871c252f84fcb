"""The contract between architecture adapters, the streaming reader and the spectra math.

An adapter knows one checkpoint layout: which tensors a layer's attention needs (so the reader
fetches only those) and how to slice them into heads. It turns the raw tensors of one layer into
`AttentionFactors`: per-head factor matrices in one canonical orientation, so the spectra code
never needs to know where a matrix came from (docs/reference.md §3).

Orientation: every matrix maps its *input* (columns) to its *output* (rows), like a Linear
weight. Per head h:

    q[h]    : [d_qk,   in_q]   query rows without RoPE (MLA: the q_b_proj no-RoPE rows)
    q_pe[h] : [d_rope, in_q]   the decoupled RoPE query rows (MLA only)
    k[g]    : [d_qk,   in_k]   key rows of key/value group g (MLA: W_UK of head g; GQA: a kv head)
    v[g]    : [d_v,    in_v]   value rows of group g
    o[h]    : [d_model, d_v]   the head's columns of the output projection

and query head h reads group `kv_group[h]` (MHA/MLA: kv_group[h] == h). The fused maps follow:

    VO_h = o[h] @ v[kv_group[h]]          : [d_model, in_v]
    QK_h = q[h].T @ k[kv_group[h]]        : [in_q, in_k]   (RoPE parts excluded)

Whole-layer matrices (MLA's QA, KVA, KVA_pe) go in `layer`, oriented [out, in].
All tensors are float32 on the analysis device, with norms already folded when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

# Matrix kinds live in svd_probe.kinds (the one vocabulary); re-exported for the adapters.
from svd_probe.kinds import ALL_KINDS, HEAD_KINDS, LAYER_KINDS, STACKED_KINDS  # noqa: F401


@dataclass
class AttentionFactors:
    """One layer's attention as per-head factors (see the module docstring for shapes)."""

    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None
    o: torch.Tensor | None
    q_pe: torch.Tensor | None = None
    kv_group: torch.Tensor | None = None  # [n_heads] long; None means head h uses group h
    layer: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_heads(self) -> int:
        for t in (self.q, self.o):
            if t is not None:
                return int(t.shape[0])
        raise ValueError("AttentionFactors has neither q nor o")

    def groups(self) -> torch.Tensor:
        """Index of the key/value group each query head reads."""
        if self.kv_group is not None:
            return self.kv_group
        device = (self.q if self.q is not None else self.o).device
        return torch.arange(self.n_heads, device=device)


@dataclass(frozen=True)
class ModelDims:
    """The shapes an analysis and its plots need, read from config.json by the adapter."""

    model_type: str
    num_layers: int  # layers with attention, including MTP layers
    num_mtp_layers: int
    d_model: int
    n_heads: int
    n_kv_groups: int
    d_qk: int  # per-head query/key width without RoPE dims (MLA: qk_nope_head_dim)
    d_rope: int  # decoupled RoPE width (MLA: qk_rope_head_dim), 0 otherwise
    d_v: int
    q_latent: int | None = None  # MLA q_lora_rank
    kv_latent: int | None = None  # MLA kv_lora_rank


class ArchitectureAdapter(Protocol):
    """What the analysis needs from a layout. Implementations live beside this module.

    Constructed as `Adapter(config, tensor_names)`: the names let an adapter find where the
    layers live (e.g. under a `language_model.` prefix) without a hard-coded prefix.
    """

    model_types: tuple[str, ...]

    def dims(self, config: dict | None = None) -> ModelDims: ...

    def layer_tensor_names(self, layer: int, kinds: set[str], fold_norms: bool) -> list[str]:
        """Names of the weights (and norm weights) layer `layer` needs for these matrix kinds.

        Only the weights: the reader adds FP8 `*_scale_inv` companions itself.
        """
        ...

    def factors(
        self, layer: int, tensors: dict[str, torch.Tensor], kinds: set[str], fold_norms: bool
    ) -> AttentionFactors:
        """Slice one layer's dequantized float32 tensors into heads (and fold norms)."""
        ...

    def supported_kinds(self) -> tuple[str, ...]:
        """The matrix kinds this layout has (e.g. no QA without a query latent)."""
        ...
