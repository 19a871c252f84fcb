"""Small pieces every adapter uses: validated config fields, where the layers live in the names,
norm folding, and the plan of a layout whose tensors are named by role.

config.json is input we do not control. Every field an adapter reads goes through
`ConfigFields`, which refuses (with `BadConfigError` naming the field) a missing field, anything
but a whole number (`1.5`, `1e9`, `"sixty-four"`, `[4]`, `true`) and values out of range (heads 0
or -4, a layer count far beyond the layers the checkpoint holds). The fields it read, with their
values, then explain each expected tensor shape in error messages.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from svd_probe.adapters.base import LayerPlan, ModelDims, TensorSpec
from svd_probe.errors import BadConfigError, UnsupportedModelError

# Bounds on what a config can ask for. The largest released models have hidden sizes near
# 2^14, 128 heads and fewer than 200 layers; the bounds sit far above that and far below what
# would make an allocation or a loop over layers unreasonable.
MAX_WIDTH = 1 << 20  # hidden sizes, head widths, latent ranks
MAX_HEADS = 1 << 16
MAX_LAYERS = 1 << 14

_MISSING = object()
_FIX = "Fix config.json (compare it with the model's original release), or point MODEL at the matching revision."


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConfigFields:
    """Whole-number fields of config.json, validated on read and remembered for messages.

    >>> f = ConfigFields({"hidden_size": 64, "num_attention_heads": 8})
    >>> f.integer("hidden_size"), f.integer("num_key_value_heads", default=8)
    (64, 8)
    """

    def __init__(self, config: Mapping):
        self.config = config
        self.values: dict[str, int] = {}
        self.derived: dict[str, str] = {}  # name → how it was derived, for fields the config lacks

    def integer(
        self,
        *names: str,
        minimum: int = 1,
        maximum: int = MAX_WIDTH,
        default: object = _MISSING,
        key: str | None = None,
    ) -> int:
        """The first of `names` that config.json sets (not null); `default` if none does.

        `key` is the name it is remembered under (default: the field found, else the first name).
        """
        for name in names:
            value = self.config.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadConfigError(
                    f"config.json: {name} is {_show(value)}, not an integer",
                    _FIX,
                    field=name,
                )
            if not minimum <= value <= maximum:
                raise BadConfigError(
                    f"config.json: {name} is {_show(value)}; svd-probe reads values from {minimum} to {maximum}",
                    _FIX,
                    field=name,
                )
            self.values[key or name] = value
            return value
        if default is _MISSING:
            spelled = " or ".join(names)
            raise BadConfigError(
                f"config.json has no {spelled}",
                f"svd-probe needs it to slice the attention into heads. {_FIX}",
                field=names[0],
            )
        assert isinstance(default, int)
        self.values[key or names[0]] = default
        return default

    def aliased(self, *names: str, key: str, maximum: int = MAX_WIDTH) -> int:
        """`integer(*names, key=key)` for a field config.json may spell several ways (GPT-2's
        `n_head` and `num_attention_heads`), refusing spellings that disagree: transformers reads
        one of them and this would read another, and a head split shapes cannot tell apart."""
        given = {n: self.integer(n, maximum=maximum) for n in names if self.config.get(n) is not None}
        if len(set(given.values())) > 1:
            raise BadConfigError(
                "config.json: " + " but ".join(f"{n} is {v}" for n, v in given.items()) + ", two names of one field",
                f"Keep one of them, or make them agree. {_FIX}",
                field=", ".join(given),
            )
        return self.integer(*names, maximum=maximum, key=key)

    def optional(self, name: str, *, minimum: int = 1, maximum: int = MAX_WIDTH) -> int | None:
        """The field's value, or None when config.json leaves it out or sets it to null."""
        if self.config.get(name) is None:
            return None
        return self.integer(name, minimum=minimum, maximum=maximum)

    def derive(self, name: str, value: int, how: str) -> int:
        """Remember a width the config implies without naming it (e.g. head_dim = hidden/heads)."""
        self.values[name] = value
        self.derived[name] = how
        return value

    def spec(self, *axes: str) -> TensorSpec:
        """The expected shape whose axes are these expressions over remembered fields.

        Axes are sums and products of field names and integers, e.g.
        `spec("num_attention_heads*(qk_nope_head_dim+qk_rope_head_dim)", "hidden_size")`.
        """
        shape, names = [], []
        for axis in axes:
            value, used = _evaluate(axis, self.values)
            shape.append(value)
            names += [n for n in used if n not in names]
        fields = tuple((n, self.values[n], f"= {self.derived[n]}" if n in self.derived else "") for n in names)
        formula = "[" + ", ".join(a.replace("*", "·") for a in axes) + "]"
        return TensorSpec(tuple(shape), formula, fields)


def _evaluate(expr: str, values: Mapping[str, int]) -> tuple[int, list[str]]:
    """Evaluate `a*(b+c)`-style arithmetic over field names (the adapters' own strings)."""
    used: list[str] = []

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        if isinstance(node, ast.Name):
            used.append(node.id)
            return values[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported shape expression {expr!r}")

    return walk(ast.parse(expr, mode="eval").body), used


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


@dataclass(frozen=True)
class LayerNames:
    """Where a checkpoint's layers live: `prefix + str(layer) + "."`, and which layers it holds.

    `present` is None when the tensor names are not known (a config alone, as in `svd-probe models`).
    """

    prefix: str
    present: frozenset[int] | None

    def __call__(self, layer: int) -> str:
        return f"{self.prefix}{layer}."


# Words that name the towers multimodal releases keep beside the language model (vision_tower,
# visual, audio_tower, multi_modal_projector, ...): never the decoder itself.
_OTHER_TOWER = re.compile(r"vision|visual|audio|speech|image|video|projector|adapter|adaptor", re.IGNORECASE)


_DIGITS = frozenset("0123456789")
# A layer number longer than this is no layer any model has (MAX_LAYERS has 5 digits).
_MAX_LAYER_DIGITS = 6


def _layer_of(name: str, probe_suffix: str) -> tuple[str, int] | None:
    """`("model.layers.", 12)` for `model.layers.12.<probe_suffix>`; None for any other name.

    Names come from shard headers and the index, which we do not control: this takes time
    independent of the name's length (a regex `^(.*?)(\\d+)\\.suffix$` backtracks quadratically
    over a long run of digits, a minute for a 100,000-digit name) and never converts more than a
    few digits (`int` refuses more than 4300 with a ValueError).
    """
    end = len(name) - len(probe_suffix) - 1
    if end <= 0 or name[end] != "." or not name.endswith(probe_suffix):
        return None
    start = end
    while start > 0 and name[start - 1] in _DIGITS:
        start -= 1
        if end - start > _MAX_LAYER_DIGITS:
            return None
    if start == end:
        return None
    return name[:start], int(name[start:end])


def find_layers(tensor_names: Iterable[str] | None, probe_suffix: str, default: str = "model.layers.") -> LayerNames:
    """Discover where the layers live from the checkpoint's names, and which layers are there.

    Some releases put the decoder under another prefix (e.g. `language_model.model.layers.`).
    We look for `<prefix><L>.<probe_suffix>`; names are matched by exact suffix, so stray tensors
    such as `rotary_emb.inv_freq` never confuse it. Some multimodal releases have another tower
    whose layers carry the same names, often under a shorter prefix (GLM-ASR's
    `audio_tower.layers.L.self_attn.o_proj` beside `language_model.model.layers.`, Fun-ASR-Nano's
    audio tower and adaptor): a prefix that names such a tower loses to one that does not, and
    among the rest the shortest wins.
    """
    if tensor_names is None:
        return LayerNames(default, None)
    found: dict[str, set[int]] = {}
    for name in tensor_names:
        parsed = _layer_of(name, probe_suffix)
        if parsed is not None:
            found.setdefault(parsed[0], set()).add(parsed[1])
    if not found:
        return LayerNames(default, frozenset())
    base = min(found, key=lambda prefix: (_OTHER_TOWER.search(prefix) is not None, len(prefix)))
    return LayerNames(base, frozenset(found[base]))


def check_layer_count(model_type: str, field: str, num_layers: int, layers: LayerNames, probe_suffix: str) -> None:
    """Refuse a layer count the checkpoint cannot back, before any header is read (nothing to
    check when the tensor names are not known, as for the `models` table)."""
    if layers.present is None:
        return
    if not layers.present:
        raise UnsupportedModelError(
            f"the checkpoint has no tensor named like {layers.prefix}<layer>.{probe_suffix}: "
            f"it does not look like a {model_type} checkpoint",
            "Check that config.json belongs to these safetensors files.",
        )
    have = max(layers.present) + 1
    if num_layers > have:
        raise BadConfigError(
            f"config.json: {field} is {num_layers}, but the checkpoint holds attention tensors "
            f"for layers 0-{have - 1} only ({layers.prefix}<layer>.{probe_suffix})",
            _FIX,
            field=field,
        )


def unread_layers_note(analysed: int, field: str, layers: LayerNames) -> tuple[str, ...]:
    """A note for the summary where the checkpoint holds attention tensors for layers past the
    `analysed` ones config.json declares (`field`): those are not analysed, and the summary must
    not read as the whole checkpoint's (for MLA, the first of them would be taken for the MTP
    layer where config.json declares one)."""
    if not layers.present:
        return ()
    have = max(layers.present) + 1
    if have <= analysed:
        return ()
    extra = f"layer {analysed}" if have == analysed + 1 else f"layers {analysed}-{have - 1}"
    return (
        f"the checkpoint also holds attention tensors for {extra}, past the {analysed} that "
        f"config.json declares ({field}): not analysed; check that config.json belongs to it",
    )


def count_mtp_layers(declared: int, first: int, layers: LayerNames) -> tuple[int, tuple[str, ...]]:
    """How many of the `declared` MTP layers (numbered from `first`) the checkpoint holds, and a
    note for the summary when that is fewer: transformers' `save_pretrained` keeps
    `num_nextn_predict_layers` in config.json but never builds or writes the MTP layer."""
    if layers.present is None or declared == 0:
        return declared, ()
    held = 0
    while held < declared and first + held in layers.present:
        held += 1
    if held == declared:
        return declared, ()
    s = "s" if declared > 1 else ""
    if held == 0:
        note = (
            f"config declares {declared} MTP layer{s}; the checkpoint has no tensors for "
            f"{'them' if declared > 1 else 'it'} (transformers drops {'them' if declared > 1 else 'it'})"
        )
    else:
        note = f"config declares {declared} MTP layer{s}; the checkpoint holds tensors for the first {held} only"
    return held, (note,)


# --- folding --------------------------------------------------------------------------------------


def fold(weight: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """Fold a norm's elementwise weight into the projection that reads the normalized vector.

    y = W · (g ⊙ x̂) = (W · diag(g)) · x̂, so g multiplies W's columns.
    """
    if norm_weight is None:
        return weight
    return weight * norm_weight.to(weight.dtype).reshape(1, -1)


def fold_layernorm(weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Fold LayerNorm's whole linear part into the projection that reads it: W·diag(g)·P.

    LayerNorm(x) = g ⊙ P·x / std(x) + b with the centering P = I − 11ᵀ/d. 1/std is a positive
    scalar per token and b an offset, so the fixed linear map from the residual stream is
    W·diag(g)·P (TransformerLens' `fold_ln` followed by centering the reading weights). Right-
    multiplying by P subtracts each row's mean.
    """
    w = fold(weight, gain)
    return w - w.mean(dim=1, keepdim=True)


# --- layouts whose tensors are named by role ---------------------------------------------------------


class RoleNamedAdapter:
    """Shared by adapters that name a layer's tensors by role (`_names(layer)` → {role: name}),
    give each role's expected shape (`_specs()` → {role: TensorSpec}) and pick the roles a set of
    matrix kinds needs (`_roles(kinds, fold_norms)`): the plan lists exactly those names, and
    `factors` gets them back keyed by role. A kind's weights are its roles without folding."""

    folds_layernorm = False  # True for pre-LayerNorm layouts, where `layernorm_fold` matters

    def _names(self, layer: int) -> dict[str, str]:
        raise NotImplementedError

    def _specs(self) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def _roles(self, kinds: set[str], fold_norms: bool) -> set[str]:
        raise NotImplementedError

    def supported_kinds(self) -> tuple[str, ...]:
        raise NotImplementedError

    def plan(self, layer: int, kinds: set[str], fold_norms: bool) -> LayerPlan:
        names, specs = self._names(layer), self._specs()
        roles = self._roles(kinds, fold_norms)
        tensors = tuple(sorted(names[r] for r in roles))
        # Every tensor the analysis of all kinds reads has its header shape checked (LayerPlan.checked).
        whole = self._roles(set(self.supported_kinds()) | set(kinds), fold_norms)
        return LayerPlan(
            layer=layer,
            tensors=tensors,
            specs={names[r]: specs[r] for r in roles},
            kind_tensors={k: tuple(sorted(names[r] for r in self._roles({k}, False))) for k in kinds},
            checked={n: specs[r] for n, r in sorted((names[r], r) for r in whole)},
        )

    def layer_tensor_names(self, layer: int, kinds: set[str], fold_norms: bool) -> list[str]:
        return list(self.plan(layer, kinds, fold_norms).tensors)

    def role_tensors(
        self, layer: int, tensors: Mapping[str, torch.Tensor], kinds: set[str], fold_norms: bool
    ) -> dict[str, torch.Tensor]:
        names = self._names(layer)
        return {r: tensors[names[r]] for r in self._roles(kinds, fold_norms)}


# The kinds of a plain MHA/GQA layout: no decoupled RoPE, no latent projections.
MHA_KINDS = ("Q", "K", "V", "O", "VO", "QK", "KQ", "Qjoint", "KVjoint")


def projection_roles(kinds: set[str]) -> set[str]:
    """Which of a layer's q, k, v, o projections these matrix kinds read: the fused VO reads v and
    o, QK and KQ read q and k, the joint KVjoint reads k and v, every other kind its own projection."""
    roles: set[str] = set()
    if kinds & {"Q", "QK", "KQ", "Qjoint"}:
        roles.add("q")
    if kinds & {"K", "QK", "KQ", "KVjoint"}:
        roles.add("k")
    if kinds & {"V", "VO", "KVjoint"}:
        roles.add("v")
    if kinds & {"O", "VO"}:
        roles.add("o")
    return roles


def mha_dims(
    f: ConfigFields,
    model_type: str,
    num_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_groups: int | None = None,
    head_dim: int | None = None,
    *,
    heads_field: str = "num_attention_heads",
    hidden_field: str = "hidden_size",
) -> ModelDims:
    """ModelDims of a plain MHA/GQA layout (no decoupled RoPE, no latents), once the shapes fit.

    Remembers `head_dim` in `f` (derived as hidden/heads when the config has none) for the specs.
    """
    g = n_kv_groups or n_heads
    if head_dim is None:
        if d_model % n_heads:
            raise BadConfigError(
                f"config.json: {hidden_field} {d_model} is not a multiple of {heads_field} {n_heads}",
                _FIX,
                field=heads_field,
            )
        head_dim = f.derive("head_dim", d_model // n_heads, f"{hidden_field}/{heads_field}")
    if n_heads % g:
        raise BadConfigError(
            f"config.json: {heads_field} {n_heads} is not a multiple of num_key_value_heads {g}",
            _FIX,
            field="num_key_value_heads",
        )
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
