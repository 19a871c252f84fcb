"""The vocabulary of spectra: matrix kinds, scopes, and the `scope.kind` key that names one.

Every spectrum svd-probe computes is named by a scope and a matrix kind, written `scope.kind`:

    head.VO        one σ row per head (per key/value group for K and V)   [n_heads, k]
    stacked.O      the heads side by side (or one above the other)        [k]
    layer.KVA      a whole-layer matrix (MLA's latent projections)        [k]
    layer.KVjoint  the whole layer's map into its keys and values         [k]

That string is the tensor key in the cache's layer files, and the (scope, matrix) pair of an
export record and a metrics row. This module is the one place that spells the kinds, the scopes
and which kind exists in which scope; `SpectrumKey` parses and formats the key, and its `order`
(scope, then kind, as listed here) is the order of tables, exports and figures.

    >>> SpectrumKey.parse("head.VO")
    SpectrumKey(scope='head', kind='VO')
    >>> [str(k) for k in spectrum_keys(["VO", "QA"])]
    ['head.VO', 'stacked.VO', 'layer.QA']
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

# Matrix kinds, exactly as they appear in the cache, in exports and on plots.
HEAD_KINDS = ("Q", "Q_pe", "K", "V", "O", "VO", "QK")
STACKED_KINDS = ("Q", "Q_pe", "K", "V", "O", "VO", "QK", "KQ")
# Qjoint and KVjoint are the maps from the residual stream into every head's queries and into
# every key/value head's keys and values, heads stacked as they are (not normalized); for MLA the
# latent route (q_b·q_a, kv_b·kv_a), no-RoPE rows only (docs/reference.md §3). Their spectra say
# how wide a latent would keep them: the input-latent planner (`svd_probe.plots.kv_planner`).
LAYER_KINDS = ("QA", "KVA", "KVA_pe", "Qjoint", "KVjoint")
ALL_KINDS = ("Q", "Q_pe", "K", "V", "O", "VO", "QK", "KQ", "QA", "KVA", "KVA_pe", "Qjoint", "KVjoint")
JOINT_KINDS = ("Qjoint", "KVjoint")

# Scopes: one spectrum per head, one of the heads stacked, one of a whole-layer matrix.
HEAD, STACKED, LAYER = "head", "stacked", "layer"
SCOPES = (HEAD, STACKED, LAYER)
KINDS_OF_SCOPE: dict[str, tuple[str, ...]] = {HEAD: HEAD_KINDS, STACKED: STACKED_KINDS, LAYER: LAYER_KINDS}


@functools.total_ordering
@dataclass(frozen=True)
class SpectrumKey:
    """One spectrum's name: a scope and a matrix kind that exists in it (`stacked.VO`).

    Raises ValueError for a pair that names no spectrum (`head.KQ`, `layer.VO`, `foo.O`).

    Example:
        >>> k = SpectrumKey("stacked", "VO")
        >>> str(k), SpectrumKey.parse("stacked.VO") == k
        ('stacked.VO', True)
    """

    scope: str
    kind: str

    def __post_init__(self) -> None:
        kinds = KINDS_OF_SCOPE.get(self.scope)
        if kinds is None:
            raise ValueError(f"unknown scope {self.scope!r}: choose from {', '.join(SCOPES)}")
        if self.kind not in kinds:
            where = [s for s in SCOPES if self.kind in KINDS_OF_SCOPE[s]]
            has = f"{self.kind} exists in scope {', '.join(where)}" if where else f"unknown matrix kind {self.kind!r}"
            raise ValueError(f"there is no {self.scope} {self.kind} spectrum: {has}")

    @classmethod
    def parse(cls, text: str) -> SpectrumKey:
        """`"head.VO"` → SpectrumKey("head", "VO"); ValueError for anything else."""
        scope, dot, kind = str(text).partition(".")
        if not dot:
            raise ValueError(f"{text!r} is not a spectrum key `scope.kind` (e.g. stacked.VO)")
        return cls(scope, kind)

    def __str__(self) -> str:
        return f"{self.scope}.{self.kind}"

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: scope (head, stacked, layer), then kind in ALL_KINDS order."""
        return SCOPES.index(self.scope), ALL_KINDS.index(self.kind)

    def __lt__(self, other: SpectrumKey) -> bool:
        if not isinstance(other, SpectrumKey):
            return NotImplemented
        return self.order < other.order


def scopes_of(kind: str) -> list[str]:
    """The scopes a matrix kind has spectra in: VO → [head, stacked], QA → [layer]."""
    return [s for s in SCOPES if kind in KINDS_OF_SCOPE[s]]


def spectrum_keys(kinds: Iterable[str]) -> list[SpectrumKey]:
    """The keys a set of matrix kinds produces, every kind in every scope it exists in, in order.

    Unknown kinds produce nothing.
    """
    return sorted({SpectrumKey(s, k) for k in kinds for s in scopes_of(k)})


def canonical_kinds(kinds: Iterable[str]) -> list[str]:
    """Known matrix kinds in ALL_KINDS order, each once; unknown ones are dropped."""
    chosen = set(kinds)
    return [k for k in ALL_KINDS if k in chosen]


def parse_key(text: str) -> SpectrumKey | None:
    """`SpectrumKey.parse`, or None for a string that names no spectrum (e.g. a newer kind)."""
    try:
        return SpectrumKey.parse(text)
    except ValueError:
        return None


def sort_keys(keys: Iterable[str]) -> list[str]:
    """`scope.kind` strings in SpectrumKey order; strings that name no spectrum go last."""
    last = (len(SCOPES), len(ALL_KINDS))

    def order(text: str) -> tuple[tuple[int, int], str]:
        key = parse_key(text)
        return (key.order if key is not None else last), text

    return sorted(keys, key=order)
