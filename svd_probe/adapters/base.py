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

Where q (or k and v) read a latent rather than the residual stream, `q_read` (`kv_read`) is the
map from the residual stream into that latent, [in_q, d_model] ([in_kv, d_model]): MLA's q_a_proj
and kv_a_proj_with_mqa's latent rows, input norm folded. The joint maps into every head's queries
and into every key/value head's keys and values follow (docs/reference.md §3):

    Qjoint  = [q_0; q_1; ...] @ q_read              : [n·d_qk, d_model]
    KVjoint = [k_0; ...; v_0; ...] @ kv_read        : [g·(d_qk + d_v), d_model]

with `q_read` / `kv_read` None meaning the identity (q, k, v already read the residual stream).
All tensors are float32 on the analysis device, with norms already folded when asked.

Before any byte is read, the adapter says once per layer what it will read: a `LayerPlan` with
the tensor names, the shape config.json implies for each (checked against the shard headers by
the reader) and the weights behind each matrix kind (whose storage dtypes the cache records).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from svd_probe.hub.dtypes import coarsest

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
    # The residual stream → latent maps that q and k, v read through; None: they read it directly.
    q_read: torch.Tensor | None = None
    kv_read: torch.Tensor | None = None

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
        ref = self.q if self.q is not None else self.o
        return torch.arange(self.n_heads, device=ref.device if ref is not None else None)


@dataclass(frozen=True)
class ModelDims:
    """The shapes an analysis and its plots need, read from config.json by the adapter."""

    model_type: str
    num_layers: int  # layers with attention, including the MTP layers the checkpoint holds
    num_mtp_layers: int
    d_model: int
    n_heads: int
    n_kv_groups: int
    d_qk: int  # per-head query/key width without RoPE dims (MLA: qk_nope_head_dim)
    d_rope: int  # decoupled RoPE width (MLA: qk_rope_head_dim), 0 otherwise
    d_v: int
    q_latent: int | None = None  # MLA q_lora_rank
    kv_latent: int | None = None  # MLA kv_lora_rank
    # What the adapter noticed about config.json against the checkpoint and the summary should
    # say, e.g. an MTP layer the config declares but the checkpoint does not hold.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorSpec:
    """The shape config.json implies for one tensor, and the fields it comes from."""

    shape: tuple[int, ...]
    formula: str  # e.g. "[num_key_value_heads·head_dim, hidden_size]"
    # (field, value, how it was derived: "" for a field config.json sets itself)
    fields: tuple[tuple[str, int, str], ...] = ()

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.fields)

    def explain(self) -> str:
        """`[32, 64] = [num_key_value_heads·head_dim, hidden_size] with num_key_value_heads=4, ...`"""
        values = ", ".join(f"{k}={v}" + (f" ({how})" if how else "") for k, v, how in self.fields)
        return f"{list(self.shape)} = {self.formula}" + (f" with {values}" if values else "")


@dataclass(frozen=True)
class LayerPlan:
    """What one layer's analysis reads, said once by the adapter (`adapter.plan`).

    `tensors`: the names to read, weights and the norm weights folded into them, in read order
    (the reader adds FP8 `*_scale_inv` companions itself). `specs`: the shape config.json implies
    for each of them; the reader checks it against the shard header before it reads a byte.
    `kind_tensors`: for each requested matrix kind, the projection weights it is computed from
    (norm weights excluded); their storage dtypes bound that kind's meaningful rank.

    `checked`: the expected shape of every tensor the analysis of all the layer's kinds would read
    (same `fold_norms`), in that plan's read order: the reader checks each header shape, read or
    not, before it reads a byte. A head split is often refuted only by a tensor a narrower analysis
    does not read (o_proj is square: 16 heads of 4 fit it as well as 8 of 8; k_proj's rows do not),
    so `--matrices O` refuses what the full analysis refuses, with the same message. Of these,
    only `tensors` must be in the checkpoint; the others are checked where the checkpoint has them
    (and its header lists them). No byte of them is read; where one lies in a shard none of
    `tensors` does (the layer's attention spans two shards), that shard's header is fetched in
    the same parallel round, once per checkpoint, as the full analysis of the layer would.
    """

    layer: int
    tensors: tuple[str, ...]
    specs: Mapping[str, TensorSpec]
    kind_tensors: Mapping[str, tuple[str, ...]]
    checked: Mapping[str, TensorSpec] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every tensor in `tensors`."""
        return {n: self.specs[n].shape for n in self.tensors}

    def shape_checks(self) -> list[tuple[str, TensorSpec]]:
        """(name, expected shape) of each tensor whose header the reader checks, in the order the
        full analysis checks them (so the first disagreement named is the one it names), then
        any read tensor `checked` lacks."""
        out = list(self.checked.items())
        return out + [(n, self.specs[n]) for n in self.tensors if n not in self.checked]

    def storage_dtype(self, kind: str, dtypes: Mapping[str, str]) -> str:
        """The coarsest storage dtype among the weights behind `kind`, from `dtypes` {name: dtype}."""
        names = self.kind_tensors.get(kind, ())
        found = [dtypes[n] for n in names if n in dtypes]
        return coarsest(found) or (found[0] if found else "F32")


class ArchitectureAdapter(Protocol):
    """What the analysis needs from a layout. Implementations live beside this module.

    Constructed as `Adapter(config, tensor_names)`: the names let an adapter find where the
    layers live (e.g. under a `language_model.` prefix) without a hard-coded prefix, and which
    layers the checkpoint really holds. The constructor validates config.json (typed
    `BadConfigError` naming the field) so nothing downstream sees a malformed field.
    """

    model_types: ClassVar[tuple[str, ...]]
    # True where a pre-LayerNorm (with its centering) folds into q/k/v (GPT-2): only there does
    # `layernorm_fold` change a spectrum. RMSNorm has no centering; BERT's LayerNorm comes after.
    folds_layernorm: bool

    def dims(self) -> ModelDims: ...

    def plan(self, layer: int, kinds: set[str], fold_norms: bool) -> LayerPlan:
        """The tensors layer `layer` reads for these matrix kinds, their expected shapes, and
        which weights each kind is computed from."""
        ...

    def layer_tensor_names(self, layer: int, kinds: set[str], fold_norms: bool) -> list[str]:
        """`list(plan(layer, kinds, fold_norms).tensors)`."""
        ...

    def factors(
        self,
        layer: int,
        tensors: Mapping[str, torch.Tensor],
        kinds: set[str],
        fold_norms: bool,
        layernorm_fold: str = "exact",
    ) -> AttentionFactors:
        """Slice one layer's dequantized float32 tensors into heads (and fold norms).

        `layernorm_fold` matters only to pre-LayerNorm layouts (GPT-2): "exact" folds the whole
        linear part of LayerNorm, diag(g)·(I − 11ᵀ/d); "gain" folds diag(g) alone.
        """
        ...

    def supported_kinds(self) -> tuple[str, ...]:
        """The matrix kinds this layout has (e.g. no QA without a query latent)."""
        ...


class AdapterClass(Protocol):
    """An adapter class as the registry holds it: its model types, and its constructor."""

    model_types: tuple[str, ...]

    def __call__(self, config: dict, tensor_names: set[str] | None = None) -> ArchitectureAdapter: ...
