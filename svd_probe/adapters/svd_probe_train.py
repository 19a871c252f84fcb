"""Adapter for the encoders that `svd-probe train` writes (config.json `model_type: svd_probe_encoder`).

Tensor layout (svd_probe/train/model.py), per layer L, prefix `layers.L.`:

    attn_norm.weight                [d]            RMSNorm before attention
    mha:   attn.qkv.weight          [3·H·D, d]     rows: all q heads | all k heads | all v heads
           attn.o_proj.weight       [d, H·D]       head h = columns h·D:(h+1)·D
    mla:   attn.down.weight         [ql + kvl, d]  rows 0:ql the query latent (QA), ql: the KV latent (KVA)
           attn.q_norm.weight       [ql]
           attn.kv_norm.weight      [kvl]
           attn.q_up.weight         [H·D, ql]
           attn.kv_up.weight        [H·2D, kvl]    per head 2D rows: D key rows, then D value rows
           attn.o_proj.weight       [d, H·D]                      (mla)
           attn.o_down.weight       [ol, H·D], attn.o_up.weight [d, ol]   (mla-o: O_h = o_up · o_down[:, head h])
           attn.o_norm.weight       [ol] (o_norm rms) or [H, ol] (rms-per-head): the output-latent norm

RoPE choice. These models rotate the first `rope_dims` dimensions of every query and key head
(there is no decoupled, shared RoPE key as in DeepSeek's MLA). So:
- partial RoPE (0 < rope_dims < head_dim, e.g. the mla preset's 16 of 32): Q_h is the head's
  last head_dim − rope_dims query rows (position-free), Q_pe_h its first rope_dims rows, and K_h
  the matching last key rows; QK_h = Q_hᵀ·K_h covers the position-free part only, as in
  docs/reference.md §3. The RoPE key rows are not reported (there is no per-head K_pe kind; KVA_pe
  does not exist here).
- full RoPE (rope_dims == head_dim, the mha and mla-o presets) or none: like Llama, Q_h and
  K_h are the whole head and there is no Q_pe.

Norm folding (docs/reference.md §3): attn_norm multiplies the columns of qkv (mha) or of down (mla),
q_norm the columns of q_up, kv_norm the columns of kv_up. On the output side only mla-o's
output-latent norm folds, into o_up's columns: O_h = o_up·diag(g)·o_down[:, head h] for `rms`,
O_h = o_up·diag(g_h)·o_down[:, head h]/√H for `rms-per-head` (each head's latent has its own gain,
and the heads' sum is scaled by 1/√H). The RMS division itself is a data-dependent scalar per
token, not part of the linear map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from svd_probe.adapters.base import AttentionFactors, LayerPlan, ModelDims, TensorSpec
from svd_probe.adapters.common import (
    MAX_HEADS,
    MAX_LAYERS,
    ConfigFields,
    check_layer_count,
    find_layers,
    unread_layers_note,
)
from svd_probe.errors import BadConfigError

_QK_KINDS = {"Q", "Q_pe", "K", "QK", "KQ", "Qjoint"}
_PROBE = "attn_norm.weight"


class SvdProbeTrainAdapter:
    """Reads checkpoints of the training lab (mha, mla, mla-o variants)."""

    model_types: ClassVar[tuple[str, ...]] = ("svd_probe_encoder",)
    folds_layernorm = False  # RMSNorm throughout

    def __init__(self, config: dict, tensor_names: set[str] | None = None):
        self.config = config
        variant = config.get("variant")
        if variant not in ("mha", "mla", "mla-o"):
            raise BadConfigError(
                f"svd_probe_encoder config has unknown variant {str(variant)[:40]!r}",
                hint="expected mha, mla or mla-o",
                field="variant",
            )
        self.variant: str = variant
        self._prefix = find_layers(tensor_names, _PROBE, default="layers.")
        f = self._fields = ConfigFields(config)
        n_layers = f.integer("n_layers", maximum=MAX_LAYERS)
        check_layer_count("svd_probe_encoder", "n_layers", n_layers, self._prefix, _PROBE)
        H, D = f.integer("n_heads", maximum=MAX_HEADS), f.integer("head_dim")
        rope = f.integer("rope_dims", minimum=0, maximum=D, default=0)
        d_model = f.integer("d_model")
        mla = variant != "mha"
        q_latent = f.integer("q_latent") if mla else None
        kv_latent = f.integer("kv_latent") if mla else None
        self.o_norm = "none"
        if variant == "mla-o":
            f.integer("o_latent")
            o_norm = config.get("o_norm", "none")
            if o_norm not in ("none", "rms", "rms-per-head"):
                raise BadConfigError(
                    f"svd_probe_encoder config has unknown o_norm {str(o_norm)[:40]!r}",
                    hint="expected none, rms or rms-per-head",
                    field="o_norm",
                )
            self.o_norm = o_norm
        self.partial_rope = 0 < rope < D
        self.rope = rope
        self._dims = ModelDims(
            model_type=str(config.get("model_type", self.model_types[0])),
            num_layers=n_layers,
            num_mtp_layers=0,
            d_model=d_model,
            n_heads=H,
            n_kv_groups=H,
            d_qk=D - rope if self.partial_rope else D,
            d_rope=rope if self.partial_rope else 0,
            d_v=D,
            q_latent=q_latent,
            kv_latent=kv_latent,
            notes=unread_layers_note(n_layers, "n_layers", self._prefix),
        )

    # -- config ------------------------------------------------------------------------------

    def dims(self) -> ModelDims:
        return self._dims

    def supported_kinds(self) -> tuple[str, ...]:
        kinds = ["Q"] + (["Q_pe"] if self.partial_rope else []) + ["K", "V", "O", "VO", "QK", "KQ"]
        if self.variant != "mha":
            kinds += ["QA", "KVA"]
        return tuple(kinds + ["Qjoint", "KVjoint"])

    # -- tensors -----------------------------------------------------------------------------

    def _specs(self) -> dict[str, TensorSpec]:
        f = self._fields
        specs = {
            "attn_norm.weight": f.spec("d_model"),
            "attn.qkv.weight": f.spec("3*n_heads*head_dim", "d_model"),
            "attn.o_proj.weight": f.spec("d_model", "n_heads*head_dim"),
        }
        if self.variant != "mha":
            specs |= {
                "attn.down.weight": f.spec("q_latent+kv_latent", "d_model"),
                "attn.q_norm.weight": f.spec("q_latent"),
                "attn.kv_norm.weight": f.spec("kv_latent"),
                "attn.q_up.weight": f.spec("n_heads*head_dim", "q_latent"),
                "attn.kv_up.weight": f.spec("2*n_heads*head_dim", "kv_latent"),
            }
        if self.variant == "mla-o":
            specs |= {
                "attn.o_down.weight": f.spec("o_latent", "n_heads*head_dim"),
                "attn.o_up.weight": f.spec("d_model", "o_latent"),
            }
            if self.o_norm == "rms":
                specs["attn.o_norm.weight"] = f.spec("o_latent")
            elif self.o_norm == "rms-per-head":
                specs["attn.o_norm.weight"] = f.spec("n_heads", "o_latent")
        return specs

    def _short_names(self, kinds: set[str], fold_norms: bool) -> list[str]:
        names: list[str] = []
        need_q = bool(kinds & (_QK_KINDS - {"K"}))
        need_k = bool(kinds & {"K", "QK", "KQ", "KVjoint"})
        need_v = bool(kinds & {"V", "VO", "KVjoint"})
        need_o = bool(kinds & {"O", "VO"})
        if self.variant == "mha":
            if need_q or need_k or need_v:
                names.append("attn.qkv.weight")
                if fold_norms:
                    names.append("attn_norm.weight")
        else:
            if need_q:
                names.append("attn.q_up.weight")
                if fold_norms:
                    names.append("attn.q_norm.weight")
            if need_k or need_v:
                names.append("attn.kv_up.weight")
                if fold_norms:
                    names.append("attn.kv_norm.weight")
            if kinds & {"QA", "KVA", "Qjoint", "KVjoint"}:  # the joint maps run through the latents
                names.append("attn.down.weight")
                if fold_norms:
                    names.append("attn_norm.weight")
        if need_o:
            if self.variant == "mla-o":
                names += ["attn.o_down.weight", "attn.o_up.weight"]
                if fold_norms and self.o_norm != "none":
                    names.append("attn.o_norm.weight")
            else:
                names.append("attn.o_proj.weight")
        return list(dict.fromkeys(names))

    def plan(self, layer: int, kinds: set[str], fold_norms: bool) -> LayerPlan:
        p = self._prefix(layer)
        specs = self._specs()
        short = self._short_names(kinds, fold_norms)
        # Every tensor the analysis of all kinds reads has its header shape checked (LayerPlan.checked).
        whole = self._short_names(set(self.supported_kinds()) | set(kinds), fold_norms)
        return LayerPlan(
            layer=layer,
            tensors=tuple(p + n for n in short),
            specs={p + n: specs[n] for n in short},
            kind_tensors={k: tuple(p + n for n in self._short_names({k}, False)) for k in kinds},
            checked={p + n: specs[n] for n in whole},
        )

    def layer_tensor_names(self, layer: int, kinds: set[str], fold_norms: bool) -> list[str]:
        return list(self.plan(layer, kinds, fold_norms).tensors)

    def factors(
        self,
        layer: int,
        tensors: Mapping[str, torch.Tensor],
        kinds: set[str],
        fold_norms: bool,
        layernorm_fold: str = "exact",
    ) -> AttentionFactors:
        variant, H, D = self.variant, self._dims.n_heads, self._dims.d_v
        rope, partial = self.rope, self.partial_rope
        p = self._prefix(layer)
        t = {name[len(p) :]: w for name, w in tensors.items() if name.startswith(p)}

        def folded(weight_name: str, norm_name: str) -> torch.Tensor:
            w = t[weight_name].float()
            return w * t[norm_name].float()[None, :] if fold_norms else w

        q_heads = k_heads = v = None
        layer_mats: dict[str, torch.Tensor] = {}
        if variant == "mha":
            if "attn.qkv.weight" in t:
                qkv = folded("attn.qkv.weight", "attn_norm.weight")
                d = qkv.shape[1]
                q_heads, k_heads, v = qkv.view(3, H, D, d).unbind(0)
        else:
            if "attn.q_up.weight" in t:
                q_heads = folded("attn.q_up.weight", "attn.q_norm.weight").view(H, D, -1)
            if "attn.kv_up.weight" in t:
                kv = folded("attn.kv_up.weight", "attn.kv_norm.weight").view(H, 2, D, -1)
                k_heads, v = kv[:, 0], kv[:, 1]
            if "attn.down.weight" in t:
                down = folded("attn.down.weight", "attn_norm.weight")
                ql = int(self._dims.q_latent or 0)
                layer_mats = {"QA": down[:ql], "KVA": down[ql:]}

        q = q_pe = k = None
        if q_heads is not None:
            q, q_pe = (q_heads[:, rope:], q_heads[:, :rope]) if partial else (q_heads, None)
        if k_heads is not None:
            k = k_heads[:, rope:] if partial else k_heads

        o = None
        if "attn.o_proj.weight" in t:
            w = t["attn.o_proj.weight"].float()
            o = w.view(w.shape[0], H, D).permute(1, 0, 2)  # [H, d, D]
        elif "attn.o_down.weight" in t and "attn.o_up.weight" in t:
            down, up = t["attn.o_down.weight"].float(), t["attn.o_up.weight"].float()
            # O_h = o_up · o_down[:, head h]: rank at most o_latent, shared column space.
            g = t.get("attn.o_norm.weight") if fold_norms else None
            if g is None:
                o = torch.einsum("dl,lhe->hde", up, down.view(down.shape[0], H, D))
            elif self.o_norm == "rms":
                o = torch.einsum("dl,l,lhe->hde", up, g.float(), down.view(down.shape[0], H, D))
            else:  # rms-per-head: gains [H, ol], heads summed with 1/√H
                gh = g.float() * H**-0.5
                o = torch.einsum("dl,hl,lhe->hde", up, gh, down.view(down.shape[0], H, D))

        mats = {k_: v_.contiguous() for k_, v_ in layer_mats.items()}
        return AttentionFactors(
            q=_contig(q),
            k=_contig(k),
            v=_contig(v),
            o=_contig(o),
            q_pe=_contig(q_pe),
            layer=mats,
            q_read=mats.get("QA"),  # mla, mla-o: q and k, v read the latents
            kv_read=mats.get("KVA"),
        )


def _contig(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()
