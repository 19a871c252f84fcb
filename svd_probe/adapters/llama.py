"""Llama-style grouped-query attention: Llama, Mistral, Qwen2, Qwen3 (docs/reference.md §2-3).

Tensors of layer L (prefix `…layers.L.`):
    self_attn.q_proj [n·d, H], self_attn.k_proj [g·d, H], self_attn.v_proj [g·d, H]
    self_attn.o_proj [H, n·d]                — head-major columns
    input_layernorm [H]                      — RMSNorm read by q/k/v
    self_attn.q_norm [d], self_attn.k_norm [d]   — Qwen3 only: RMSNorm of each head's q and k
with n query heads, g key/value heads (`num_key_value_heads`, g = n for plain MHA) and head
width d (`head_dim` where the config gives one: Mistral-Nemo and Qwen3 have d·n ≠ H).
Query head h reads key/value group h // (n/g). Qwen2's q/k/v biases are not part of the
linear maps analysed, so they are never named and never fetched.

RoPE rotates every query/key dimension here (there is no decoupled RoPE part), so QK is the
position-free bilinear form Q_hᵀ·K_g; the model has no Q_pe, and no MLA layer matrices.
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
    mha_dims,
    projection_roles,
    unread_layers_note,
)

_PROBE = "self_attn.o_proj.weight"


class LlamaAdapter(RoleNamedAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, config: dict, tensor_names: set[str] | None = None):
        self.config = config
        self._prefix = find_layers(tensor_names, _PROBE)
        # Qwen3 normalizes each head's query and key before RoPE; other members of the family do not.
        self.has_qk_norm = config.get("model_type") == "qwen3"
        f = self._fields = ConfigFields(config)
        n = f.integer("num_attention_heads", maximum=MAX_HEADS)
        d_model = f.integer("hidden_size")
        g = f.integer("num_key_value_heads", maximum=MAX_HEADS, default=n)
        # Qwen3 and Llama-3.1 give head_dim; Mistral v0.1 leaves it to hidden_size / heads.
        head_dim = f.optional("head_dim")
        layers = f.integer("num_hidden_layers", maximum=MAX_LAYERS)
        check_layer_count(str(config.get("model_type", "llama")), "num_hidden_layers", layers, self._prefix, _PROBE)
        self._dims = mha_dims(f, str(config.get("model_type", "llama")), layers, d_model, n, g, head_dim)
        self._dims = replace(self._dims, notes=unread_layers_note(layers, "num_hidden_layers", self._prefix))

    # --- shapes ------------------------------------------------------------------------------
    def dims(self) -> ModelDims:
        return self._dims

    def supported_kinds(self) -> tuple[str, ...]:
        return MHA_KINDS

    # --- which tensors -----------------------------------------------------------------------
    def _names(self, layer: int) -> dict[str, str]:
        p = self._prefix(layer)
        a = f"{p}self_attn."
        return {
            "input_norm": f"{p}input_layernorm.weight",
            "q": a + "q_proj.weight",
            "k": a + "k_proj.weight",
            "v": a + "v_proj.weight",
            "o": a + "o_proj.weight",
            "q_norm": a + "q_norm.weight",
            "k_norm": a + "k_norm.weight",
        }

    def _specs(self) -> dict[str, TensorSpec]:
        f = self._fields
        return {
            "input_norm": f.spec("hidden_size"),
            "q": f.spec("num_attention_heads*head_dim", "hidden_size"),
            "k": f.spec("num_key_value_heads*head_dim", "hidden_size"),
            "v": f.spec("num_key_value_heads*head_dim", "hidden_size"),
            "o": f.spec("hidden_size", "num_attention_heads*head_dim"),
            "q_norm": f.spec("head_dim"),
            "k_norm": f.spec("head_dim"),
        }

    def _roles(self, kinds: set[str], fold_norms: bool) -> set[str]:
        roles = projection_roles(kinds)
        if fold_norms:
            if roles & {"q", "k", "v"}:
                roles.add("input_norm")
            if self.has_qk_norm:
                roles |= {"q_norm"} if "q" in roles else set()
                roles |= {"k_norm"} if "k" in roles else set()
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
        # RMSNorm has no centering: folding its gain is the exact fold, so layernorm_fold is moot.
        d = self.dims()
        t = self.role_tensors(layer, tensors, kinds, fold_norms)
        n, g, hd = d.n_heads, d.n_kv_groups, d.d_qk
        input_norm = t.get("input_norm") if fold_norms else None

        def heads(role: str, count: int, head_norm: str | None = None) -> torch.Tensor:
            # Rows are head-major: head i owns rows i·d:(i+1)·d. Reading the normalized residual
            # folds input_layernorm into the columns.
            w = fold(t[role], input_norm).reshape(count, hd, -1)
            if head_norm is not None and head_norm in t:
                # Qwen3 applies RMSNorm to each head's *output*, q_h = w ⊙ (W_h·x)/rms(W_h·x), so
                # its weight w scales the head's rows (the same w for every head), not columns.
                # 1/rms is a positive scalar per token: it rescales all singular values of that
                # token's map alike and turns no direction, so the fixed linear map is diag(w)·W_h.
                w = w * t[head_norm].to(w.dtype).reshape(1, hd, 1)
            return w

        q = heads("q", n, "q_norm") if "q" in t else None
        k = heads("k", g, "k_norm") if "k" in t else None
        v = heads("v", g) if "v" in t else None
        o = t["o"].reshape(d.d_model, n, hd).permute(1, 0, 2) if "o" in t else None
        # n/g consecutive query heads share one key/value head (repeat_kv in the reference code).
        device = next((x.device for x in t.values()), torch.device("cpu"))
        kv_group = torch.arange(n, device=device) // (n // g)
        return AttentionFactors(q=q, k=k, v=v, o=o, kv_group=kv_group)
