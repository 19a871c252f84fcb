"""Multi-head latent attention: DeepSeek-V2/V3/V3.2, Kimi-K2, Moonlight (docs/reference.md §1, §3).

Tensors of layer L (prefix `…layers.L.self_attn.`):
    q_a_proj [q_lora, H], q_a_layernorm [q_lora], q_b_proj [n·(d_nope+d_rope), q_lora]
        or, without a query latent (q_lora_rank: null), q_proj [n·(d_nope+d_rope), H]
    kv_a_proj_with_mqa [kv_lora + d_rope, H], kv_a_layernorm [kv_lora]
    kv_b_proj [n·(d_nope + d_v), kv_lora]   — per head [key rows | value rows], interleaved
    o_proj [H, n·d_v]                       — head-major columns
and `…layers.L.input_layernorm.weight` [H]. DeepSeek-V3.2's `self_attn.indexer.*` tensors are
never named, so never fetched.

MTP layers: `num_nextn_predict_layers` layers follow the decoder's (layer 61 of DeepSeek-V3).
They count only when the checkpoint holds their tensors: transformers' `save_pretrained` keeps
the field in config.json but never builds or writes the layer, and the summary says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from svd_probe.adapters.base import AttentionFactors, ModelDims, TensorSpec
from svd_probe.adapters.common import (
    MAX_HEADS,
    MAX_LAYERS,
    ConfigFields,
    RoleNamedAdapter,
    check_layer_count,
    count_mtp_layers,
    find_layers,
    fold,
    unread_layers_note,
)

_PROBE = "self_attn.o_proj.weight"


class MLAAdapter(RoleNamedAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2")

    def __init__(self, config: dict, tensor_names: set[str] | None = None):
        self.config = config
        self._prefix = find_layers(tensor_names, _PROBE)
        f = self._fields = ConfigFields(config)
        model_type = str(config.get("model_type", "deepseek_v3"))
        n_main = f.integer("num_hidden_layers", maximum=MAX_LAYERS)
        check_layer_count(model_type, "num_hidden_layers", n_main, self._prefix, _PROBE)
        declared = f.integer("num_nextn_predict_layers", minimum=0, maximum=MAX_LAYERS, default=0)
        n_mtp, notes = count_mtp_layers(declared, n_main, self._prefix)
        field = "num_hidden_layers" + (" + num_nextn_predict_layers" if declared else "")
        notes += unread_layers_note(n_main + n_mtp, field, self._prefix)
        q_latent = f.optional("q_lora_rank")
        self.has_q_latent = q_latent is not None
        n = f.integer("num_attention_heads", maximum=MAX_HEADS)
        self._dims = ModelDims(
            model_type=model_type,
            num_layers=n_main + n_mtp,
            num_mtp_layers=n_mtp,
            d_model=f.integer("hidden_size"),
            n_heads=n,
            n_kv_groups=n,
            d_qk=f.integer("qk_nope_head_dim"),
            d_rope=f.integer("qk_rope_head_dim", minimum=0),
            d_v=f.integer("v_head_dim"),
            q_latent=q_latent,
            kv_latent=f.integer("kv_lora_rank"),
            notes=notes,
        )

    # --- shapes ------------------------------------------------------------------------------
    def dims(self) -> ModelDims:
        return self._dims

    def supported_kinds(self) -> tuple[str, ...]:
        kinds: tuple[str, ...] = ("Q", "Q_pe", "K", "V", "O", "VO", "QK", "KQ", "KVA", "KVA_pe", "Qjoint", "KVjoint")
        if not self._dims.d_rope:
            # qk_rope_head_dim 0: no decoupled RoPE rows, so Q_pe and KVA_pe would be empty matrices.
            kinds = tuple(k for k in kinds if k not in ("Q_pe", "KVA_pe"))
        return kinds + (("QA",) if self.has_q_latent else ())

    # --- which tensors -----------------------------------------------------------------------
    def _names(self, layer: int) -> dict[str, str]:
        p = self._prefix(layer)
        a = f"{p}self_attn."
        return {
            "input_norm": f"{p}input_layernorm.weight",
            "q_a": a + "q_a_proj.weight",
            "q_a_norm": a + "q_a_layernorm.weight",
            "q_b": a + "q_b_proj.weight",
            "q": a + "q_proj.weight",
            "kv_a": a + "kv_a_proj_with_mqa.weight",
            "kv_a_norm": a + "kv_a_layernorm.weight",
            "kv_b": a + "kv_b_proj.weight",
            "o": a + "o_proj.weight",
        }

    def _specs(self) -> dict[str, TensorSpec]:
        f = self._fields
        qk = "num_attention_heads*(qk_nope_head_dim+qk_rope_head_dim)"
        specs = {
            "input_norm": f.spec("hidden_size"),
            "q": f.spec(qk, "hidden_size"),
            "kv_a": f.spec("kv_lora_rank+qk_rope_head_dim", "hidden_size"),
            "kv_a_norm": f.spec("kv_lora_rank"),
            "kv_b": f.spec("num_attention_heads*(qk_nope_head_dim+v_head_dim)", "kv_lora_rank"),
            "o": f.spec("hidden_size", "num_attention_heads*v_head_dim"),
        }
        if self.has_q_latent:
            specs |= {
                "q_a": f.spec("q_lora_rank", "hidden_size"),
                "q_a_norm": f.spec("q_lora_rank"),
                "q_b": f.spec(qk, "q_lora_rank"),
            }
        return specs

    def _roles(self, kinds: set[str], fold_norms: bool) -> set[str]:
        roles: set[str] = set()
        if kinds & {"Q", "Q_pe", "QK", "KQ", "Qjoint"}:
            if self.has_q_latent:
                roles |= {"q_b"} | ({"q_a_norm"} if fold_norms else set())
            else:
                roles |= {"q"} | ({"input_norm"} if fold_norms else set())
        if kinds & {"K", "V", "VO", "QK", "KQ", "KVjoint"}:
            roles |= {"kv_b"} | ({"kv_a_norm"} if fold_norms else set())
        if kinds & {"O", "VO"}:
            roles.add("o")
        # The joint maps run through the latents: Qjoint = q_b·q_a, KVjoint = kv_b·kv_a (latent rows).
        if kinds & {"QA", "Qjoint"} and self.has_q_latent:
            roles |= {"q_a"} | ({"input_norm"} if fold_norms else set())
        if kinds & {"KVA", "KVA_pe", "KVjoint"}:
            roles |= {"kv_a"} | ({"input_norm"} if fold_norms else set())
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
        d = self.dims()
        t = self.role_tensors(layer, tensors, kinds, fold_norms)
        n, d_qk, d_rope, d_v = d.n_heads, d.d_qk, d.d_rope, d.d_v
        input_norm = t.get("input_norm") if fold_norms else None

        q = q_pe = k = v = o = None
        if "q_b" in t or "q" in t:
            if self.has_q_latent:
                w = fold(t["q_b"], t.get("q_a_norm") if fold_norms else None)
            else:
                w = fold(t["q"], input_norm)
            w = w.reshape(n, d_qk + d_rope, w.shape[1])
            q, q_pe = w[:, :d_qk], (w[:, d_qk:] if d_rope else None)
        if "kv_b" in t:
            w = fold(t["kv_b"], t.get("kv_a_norm") if fold_norms else None).reshape(n, d_qk + d_v, -1)
            # Rows interleave per head: [key rows | value rows] for head 0, then head 1, ...
            k, v = w[:, :d_qk], w[:, d_qk:]
        if "o" in t:
            # o_proj columns are head-major: head h owns columns h·d_v:(h+1)·d_v.
            o = t["o"].reshape(d.d_model, n, d_v).permute(1, 0, 2)

        layer_mats: dict[str, torch.Tensor] = {}
        if "q_a" in t:
            layer_mats["QA"] = fold(t["q_a"], input_norm)
        if "kv_a" in t:
            w = fold(t["kv_a"], input_norm)
            layer_mats["KVA"] = w[: d.kv_latent]
            if d_rope:
                layer_mats["KVA_pe"] = w[d.kv_latent :]
        # q and k, v read the latents, not the residual stream: the joint maps go through these.
        return AttentionFactors(
            q=q,
            k=k,
            v=v,
            o=o,
            q_pe=q_pe,
            layer=layer_mats,
            q_read=layer_mats.get("QA"),
            kv_read=layer_mats.get("KVA"),
        )
