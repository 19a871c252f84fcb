"""BERT encoders: multi-head attention with post-LayerNorm (docs/reference.md §2).

Tensors of layer L (prefix `encoder.layer.L.`, or `bert.encoder.layer.L.` in checkpoints saved
from BertForMaskedLM / BertForPreTraining and most fine-tunes):
    attention.self.query.weight [H, H], attention.self.key.weight [H, H],
    attention.self.value.weight [H, H]   — head-major rows, n heads of width d = H/n
    attention.output.dense.weight [H, H] — head-major columns
Every Linear has a bias; biases are affine offsets, not part of the linear maps analysed, so
they are never fetched.

No norm folding: BERT normalizes *after* each residual sum, so the vector attention reads is the
residual stream itself, with no LayerNorm in between whose weight could fold into q/k/v. (The
`attention.output.LayerNorm` acts on the sum after o, outside the attention map.)
"""

from __future__ import annotations

import torch

from svd_probe.adapters.base import AttentionFactors, ModelDims
from svd_probe.adapters.common import (
    MHA_KINDS,
    RoleNamedAdapter,
    decoder_config,
    layer_prefix_finder,
    mha_dims,
    projection_roles,
)


class BertAdapter(RoleNamedAdapter):
    model_types = ("bert",)

    def __init__(self, config: dict, tensor_names: set[str] | None = None):
        self.config = config
        self._prefix = layer_prefix_finder(tensor_names, "attention.self.query.weight", default="encoder.layer.")

    # --- shapes ------------------------------------------------------------------------------
    def dims(self, config: dict | None = None) -> ModelDims:
        c = decoder_config(config) if config else self.config
        return mha_dims(
            c.get("model_type", "bert"),
            int(c["num_hidden_layers"]),
            int(c["hidden_size"]),
            int(c["num_attention_heads"]),
        )

    def supported_kinds(self) -> tuple[str, ...]:
        return MHA_KINDS

    # --- which tensors -----------------------------------------------------------------------
    def _names(self, layer: int) -> dict[str, str]:
        p = self._prefix(layer)
        return {
            "q": p + "attention.self.query.weight",
            "k": p + "attention.self.key.weight",
            "v": p + "attention.self.value.weight",
            "o": p + "attention.output.dense.weight",
        }

    def _roles(self, kinds: set[str], fold_norms: bool = False) -> set[str]:
        # Post-LN: no norm reads into these projections, so fold_norms changes nothing.
        return projection_roles(kinds)

    # --- slicing into heads --------------------------------------------------------------------
    def factors(
        self, layer: int, tensors: dict[str, torch.Tensor], kinds: set[str], fold_norms: bool
    ) -> AttentionFactors:
        d = self.dims()
        t = self.role_tensors(layer, tensors, kinds, fold_norms)
        n, hd = d.n_heads, d.d_qk
        q, k, v = (t[r].reshape(n, hd, -1) if r in t else None for r in ("q", "k", "v"))
        o = t["o"].reshape(d.d_model, n, hd).permute(1, 0, 2) if "o" in t else None
        return AttentionFactors(q=q, k=k, v=v, o=o)
