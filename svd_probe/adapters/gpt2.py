"""GPT-2: multi-head attention through Conv1D layers, pre-LayerNorm (docs/reference.md §2-3).

Tensors of layer L (prefix `h.L.`, or `transformer.h.L.` in checkpoints saved from
GPT2LMHeadModel by recent transformers):
    attn.c_attn.weight [H, 3H]   — Conv1D, so stored [in, out], transposed relative to a Linear
                                   weight; its output columns are fused q | k | v, each head-major
    attn.c_proj.weight [H, H]    — Conv1D [in = n·d, out = H]: head h owns rows h·d:(h+1)·d
    ln_1.weight [H]              — LayerNorm before attention
Biases (c_attn.bias, c_proj.bias, ln_1.bias) and the `attn.bias` causal-mask buffer that old
checkpoints carry are never fetched.

Norm folding: LayerNorm computes g ⊙ P·x / std(x) + b, with the centering P = I − 11ᵀ/d.
1/std(x) is a positive scalar per token and b an affine offset, so the fixed linear map between
the residual stream and q/k/v is W·diag(g)·P. By default (`layernorm_fold="exact"`) all of it is
folded, which is what TransformerLens' `fold_ln` plus centering of the reading weights gives;
`layernorm_fold="gain"` folds diag(g) only, as svd-probe 0.1 did (per-head VO and QK spectra then
differ from TransformerLens' by up to 1.1e-2·σ₁). See docs/reference.md §3.
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
    fold,
    fold_layernorm,
    mha_dims,
    projection_roles,
    unread_layers_note,
)

_PROBE = "attn.c_attn.weight"
LAYERNORM_FOLDS = ("exact", "gain")


class GPT2Adapter(RoleNamedAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)
    # A pre-LayerNorm (with centering) folds into q/k/v, so `layernorm_fold` changes its spectra.
    folds_layernorm = True

    def __init__(self, config: dict, tensor_names: set[str] | None = None):
        self.config = config
        self._prefix = find_layers(tensor_names, _PROBE, default="h.")
        f = self._fields = ConfigFields(config)
        # config.json spells these n_embd / n_head / n_layer; accept the generic names too.
        # Both spellings of one field must agree (transformers takes the generic one).
        layers = f.aliased("n_layer", "num_hidden_layers", key="n_layer", maximum=MAX_LAYERS)
        layers_field = "n_layer" if config.get("n_layer") is not None else "num_hidden_layers"
        check_layer_count("gpt2", layers_field, layers, self._prefix, _PROBE)
        d_model = f.aliased("n_embd", "hidden_size", key="n_embd")
        n_heads = f.aliased("n_head", "num_attention_heads", maximum=MAX_HEADS, key="n_head")
        self._dims = mha_dims(
            f,
            str(config.get("model_type", "gpt2")),
            layers,
            d_model,
            n_heads,
            heads_field="n_head",
            hidden_field="n_embd",
        )
        self._dims = replace(self._dims, notes=unread_layers_note(layers, layers_field, self._prefix))

    # --- shapes ------------------------------------------------------------------------------
    def dims(self) -> ModelDims:
        return self._dims

    def supported_kinds(self) -> tuple[str, ...]:
        return MHA_KINDS

    # --- which tensors -----------------------------------------------------------------------
    def _names(self, layer: int) -> dict[str, str]:
        p = self._prefix(layer)
        return {
            "qkv": p + "attn.c_attn.weight",
            "o": p + "attn.c_proj.weight",
            "ln_1": p + "ln_1.weight",
        }

    def _specs(self) -> dict[str, TensorSpec]:
        f = self._fields
        # Conv1D weights are stored [in, out].
        return {"qkv": f.spec("n_embd", "3*n_embd"), "o": f.spec("n_head*head_dim", "n_embd"), "ln_1": f.spec("n_embd")}

    def _roles(self, kinds: set[str], fold_norms: bool) -> set[str]:
        roles = projection_roles(kinds)
        if roles & {"q", "k", "v"}:
            # q, k and v live in one fused tensor: any of them means fetching all three.
            roles = (roles - {"q", "k", "v"}) | {"qkv"} | ({"ln_1"} if fold_norms else set())
        return roles

    # --- slicing into heads --------------------------------------------------------------------
    def factors(
        self,
        layer: int,
        tensors: Mapping[str, torch.Tensor],
        kinds: set[str],
        fold_norms: bool,
        layernorm_fold: str = "exact",
    ) -> AttentionFactors:
        if layernorm_fold not in LAYERNORM_FOLDS:
            raise ValueError(f"layernorm_fold must be one of {LAYERNORM_FOLDS}, not {layernorm_fold!r}")
        d = self.dims()
        t = self.role_tensors(layer, tensors, kinds, fold_norms)
        n, hd, h = d.n_heads, d.d_qk, d.d_model

        q = k = v = o = None
        if "qkv" in t:
            # Conv1D computes x @ W, so W.T is the Linear-oriented [3H out, H in] matrix.
            w = t["qkv"].T
            if fold_norms:
                w = fold_layernorm(w, t["ln_1"]) if layernorm_fold == "exact" else fold(w, t["ln_1"])
            q, k, v = (w[i * h : (i + 1) * h].reshape(n, hd, h) for i in range(3))
        if "o" in t:
            # Linear orientation is c_proj.T [H out, n·d in]; head h's columns are rows of c_proj.
            o = t["o"].reshape(n, hd, h).transpose(1, 2)
        return AttentionFactors(q=q, k=k, v=v, o=o)
