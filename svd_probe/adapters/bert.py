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

from collections.abc import Mapping
from dataclasses import replace
from typing import ClassVar

import torch

from svd_probe.adapters.base import AttentionFactors, ModelDims, TensorSpec
from svd_probe.adapters.common import (
    MAX_HEADS,
    MAX_LAYERS,
    MHA_KINDS,
    ConfigFields,
    RoleNamedAdapter,
    check_layer_count,
    find_layers,
    mha_dims,
    projection_roles,
    unread_layers_note,
)

_PROBE = "attention.self.query.weight"


class BertAdapter(RoleNamedAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("bert",)

    def __init__(self, config: dict, tensor_names: set[str] | None = None):
        self.config = config
        self._prefix = find_layers(tensor_names, _PROBE, default="encoder.layer.")
        f = self._fields = ConfigFields(config)
        layers = f.integer("num_hidden_layers", maximum=MAX_LAYERS)
        check_layer_count("bert", "num_hidden_layers", layers, self._prefix, _PROBE)
        self._dims = mha_dims(
            f,
            str(config.get("model_type", "bert")),
            layers,
            f.integer("hidden_size"),
            f.integer("num_attention_heads", maximum=MAX_HEADS),
        )
        self._dims = replace(self._dims, notes=unread_layers_note(layers, "num_hidden_layers", self._prefix))

    # --- shapes ------------------------------------------------------------------------------
    def dims(self) -> ModelDims:
        return self._dims

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

    def _specs(self) -> dict[str, TensorSpec]:
        f = self._fields
        inner = f.spec("num_attention_heads*head_dim", "hidden_size")
        return {"q": inner, "k": inner, "v": inner, "o": f.spec("hidden_size", "num_attention_heads*head_dim")}

    def _roles(self, kinds: set[str], fold_norms: bool = False) -> set[str]:
        # Post-LN: no norm reads into these projections, so fold_norms changes nothing.
        return projection_roles(kinds)

    # --- slicing into heads --------------------------------------------------------------------
    def factors(
        self,
        layer: int,
        tensors: Mapping[str, torch.Tensor],
        kinds: set[str],
        fold_norms: bool,
        layernorm_fold: str = "exact",
    ) -> AttentionFactors:
        d = self.dims()
        t = self.role_tensors(layer, tensors, kinds, fold_norms)
        n, hd = d.n_heads, d.d_qk
        q, k, v = (t[r].reshape(n, hd, -1) if r in t else None for r in ("q", "k", "v"))
        o = t["o"].reshape(d.d_model, n, hd).permute(1, 0, 2) if "o" in t else None
        return AttentionFactors(q=q, k=k, v=v, o=o)
