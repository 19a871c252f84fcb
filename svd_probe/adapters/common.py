"""Small pieces every adapter uses: norm folding and finding where layers live in the names."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from svd_probe.adapters.base import ModelDims
from svd_probe.errors import UnsupportedModelError


def fold(weight: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """Fold a norm's elementwise weight into the projection that reads the normalized vector.

    y = W · (g ⊙ x̂) = (W · diag(g)) · x̂, so g multiplies W's columns.
    """
    if norm_weight is None:
        return weight
    return weight * norm_weight.to(weight.dtype).reshape(1, -1)


def decoder_config(config: dict) -> dict:
    """The part of config.json that describes the decoder.

    Multimodal releases (Kimi-VL, Kimi-K2.5) wrap it: the outer config names the multimodal model
    and nests the language model's own config, with its model_type and shapes, under
    `text_config`. A config that has its own layer count is taken as it is.
    """
    inner = config.get("text_config")
    if isinstance(inner, dict) and inner.get("model_type") and "num_hidden_layers" not in config:
        return inner
    return config


def layer_prefix_finder(
    tensor_names: set[str] | None, probe_suffix: str, default: str = "model.layers."
) -> Callable[[int], str]:
    """Return layer → name prefix, discovering the real prefix from the checkpoint's names.

    Some releases put the decoder under another prefix (e.g. `language_model.model.layers.`).
    We look for `<prefix><L>.<probe_suffix>` and keep `<prefix>`; names are matched by exact
    suffix, so stray tensors such as `rotary_emb.inv_freq` never confuse it.
    """
    base = default
    if tensor_names:
        pattern = re.compile(r"^(.*?)(\d+)\." + re.escape(probe_suffix) + r"$")
        found = sorted({m.group(1) for name in tensor_names if (m := pattern.match(name))}, key=len)
        if found:
            base = found[0]
    return lambda layer: f"{base}{layer}."


class RoleNamedAdapter:
    """Shared by adapters that name a layer's tensors by role (`_names(layer)` → {role: name})
    and pick the roles a set of matrix kinds needs (`_roles(kinds, fold_norms)`): the reader
    is asked for exactly those names, and `factors` gets them back keyed by role."""

    def layer_tensor_names(self, layer: int, kinds: set[str], fold_norms: bool) -> list[str]:
        names = self._names(layer)
        return sorted(names[r] for r in self._roles(kinds, fold_norms))

    def role_tensors(
        self, layer: int, tensors: dict[str, torch.Tensor], kinds: set[str], fold_norms: bool
    ) -> dict[str, torch.Tensor]:
        names = self._names(layer)
        return {r: tensors[names[r]] for r in self._roles(kinds, fold_norms)}


# The kinds of a plain MHA/GQA layout: no decoupled RoPE, no latent projections.
MHA_KINDS = ("Q", "K", "V", "O", "VO", "QK", "KQ")


def projection_roles(kinds: set[str]) -> set[str]:
    """Which of a layer's q, k, v, o projections these matrix kinds read: the fused VO reads v and
    o, QK and KQ read q and k, every other kind its own projection."""
    roles: set[str] = set()
    if kinds & {"Q", "QK", "KQ"}:
        roles.add("q")
    if kinds & {"K", "QK", "KQ"}:
        roles.add("k")
    if kinds & {"V", "VO"}:
        roles.add("v")
    if kinds & {"O", "VO"}:
        roles.add("o")
    return roles


def mha_dims(
    model_type: str,
    num_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_groups: int | None = None,
    head_dim: int | None = None,
) -> ModelDims:
    """ModelDims of a plain MHA/GQA layout (no decoupled RoPE, no latents), once the shapes fit."""
    g = n_kv_groups or n_heads
    hint = "config.json is inconsistent: check these fields against the checkpoint's tensors."
    if head_dim is None:
        if d_model % n_heads:
            raise UnsupportedModelError(f"hidden size {d_model} is not a multiple of {n_heads} attention heads", hint)
        head_dim = d_model // n_heads
    if n_heads % g:
        raise UnsupportedModelError(f"{n_heads} attention heads is not a multiple of {g} key/value heads", hint)
    return ModelDims(
        model_type=model_type,
        num_layers=num_layers,
        num_mtp_layers=0,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_groups=g,
        d_qk=head_dim,
        d_rope=0,
        d_v=head_dim,
    )
