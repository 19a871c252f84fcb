"""GPT-2: multi-head attention through Conv1D layers, pre-LayerNorm (docs/reference.md §2-3).

Tensors of layer L (prefix `h.L.`, or `transformer.h.L.` in checkpoints saved from
GPT2LMHeadModel by recent transformers):
    attn.c_attn.weight [H, 3H]   — Conv1D, so stored [in, out], transposed relative to a Linear
                                   weight; its output columns are fused q | k | v, each head-major
    attn.c_proj.weight [H, H]    — Conv1D [in = n·d, out = H]: head h owns rows h·d:(h+1)·d
    ln_1.weight [H]              — LayerNorm before attention
Biases (c_attn.bias, c_proj.bias, ln_1.bias) and the `attn.bias` causal-mask buffer that old
checkpoints carry are never fetched.

Norm folding: LayerNorm computes g ⊙ (x − mean(x)) / std(x) + b. Only g is a fixed linear map
between the residual stream and q/k/v, so only g folds into the columns of q/k/v. The bias b is an
affine offset and the mean-centering is a projection that every head shares; neither is part of
the per-head linear maps analysed here.
"""

from __future__ import annotations

import torch

from svd_probe.adapters.base import AttentionFactors, ModelDims
from svd_probe.adapters.common import (
    MHA_KINDS,
    RoleNamedAdapter,
    decoder_config,
    fold,
    layer_prefix_finder,
    mha_dims,
    projection_roles,
)


class GPT2Adapter(RoleNamedAdapter):
    model_types = ("gpt2",)

    def __init__(self, config: dict, tensor_names: set[str] | None = None):
        self.config = config
        self._prefix = layer_prefix_finder(tensor_names, "attn.c_attn.weight", default="h.")

    # --- shapes ------------------------------------------------------------------------------
    def dims(self, config: dict | None = None) -> ModelDims:
        c = decoder_config(config) if config else self.config
        # config.json spells these n_embd / n_head / n_layer; accept the generic names too.
        return mha_dims(
            c.get("model_type", "gpt2"),
            int(c.get("n_layer") or c["num_hidden_layers"]),
            int(c.get("n_embd") or c["hidden_size"]),
            int(c.get("n_head") or c["num_attention_heads"]),
        )

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

    def _roles(self, kinds: set[str], fold_norms: bool) -> set[str]:
        roles = projection_roles(kinds)
        if roles & {"q", "k", "v"}:
            # q, k and v live in one fused tensor: any of them means fetching all three.
            roles = (roles - {"q", "k", "v"}) | {"qkv"} | ({"ln_1"} if fold_norms else set())
        return roles

    # --- slicing into heads --------------------------------------------------------------------
    def factors(
        self, layer: int, tensors: dict[str, torch.Tensor], kinds: set[str], fold_norms: bool
    ) -> AttentionFactors:
        d = self.dims()
        t = self.role_tensors(layer, tensors, kinds, fold_norms)
        n, hd, h = d.n_heads, d.d_qk, d.d_model

        q = k = v = o = None
        if "qkv" in t:
            # Conv1D computes x @ W, so W.T is the Linear-oriented [3H out, H in] matrix.
            w = fold(t["qkv"].T, t.get("ln_1") if fold_norms else None)
            q, k, v = (w[i * h : (i + 1) * h].reshape(n, hd, h) for i in range(3))
        if "o" in t:
            # Linear orientation is c_proj.T [H out, n·d in]; head h's columns are rows of c_proj.
            o = t["o"].reshape(n, hd, h).transpose(1, 2)
        return AttentionFactors(q=q, k=k, v=v, o=o)
