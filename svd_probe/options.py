"""Command-line values parsed once, for the CLI and the Python API alike.

Each option that several commands take has one parser here, so `analyze`, `plot`, `export`
and `train` accept and refuse exactly the same values with the same message. Parsers check the
syntax only, so a bad value is refused before anything is fetched; what depends on the model
(`select_layers`, the `supported` kinds of `parse_matrices`) is checked once its config is known.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from svd_probe.errors import BadOptionError, shown
from svd_probe.kinds import ALL_KINDS, KINDS_OF_SCOPE, canonical_kinds, scopes_of

if TYPE_CHECKING:
    import torch

    from svd_probe.adapters.base import ModelDims

# No checkpoint has more than a few hundred layers; this bound keeps `--layers 0-99999999999`
# from building a list of 10^11 integers before the model is even known.
MAX_LAYER = 100_000


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`.

    Raises `BadOptionError` for anything else, and for CUDA on a machine without one.
    """
    import torch  # here, so that `plot` and `export`, which parse options too, never load torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise BadOptionError(f"bad --device {name!r}", "Use auto, cpu or cuda (or cuda:N).")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadOptionError(
            "--device cuda asked for, but torch sees no CUDA GPU",
            "Use --device cpu, or install the CUDA build of torch (see README).",
        )
    return torch.device(name)


def parse_layers(spec: str | Sequence[int] | None, flag: str = "--layers") -> list[int] | None:
    """`0-3,10,60` → [0, 1, 2, 3, 10, 60]: layers in the order given, each once; None → None (all).

    Args:
        spec: comma-separated layers and inclusive ranges `a-b`, a list of ints, or None / "all"
            for every layer.
        flag: the option's name, for the message.

    Returns:
        The layers, or None for "all"; which layers the model has is `select_layers`' business.

    Raises `BadOptionError` for a part that is not a layer or a range, a range that ends before it
    starts, layers beyond MAX_LAYER, and a spec with no layer in it: `--layers ""` (a shell
    variable left unset) asked for every layer of the model, 61 of DeepSeek-V3 for none.

    Example:
        >>> parse_layers("0,2-4,2")
        [0, 2, 3, 4]
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    wanted: list[int] = []
    example = f"Use e.g. {flag} 0-3,10,60."
    if isinstance(spec, str):
        # Each layer once, as it first appears: `taken` marks the layers already in `wanted`, so
        # repeated ranges (`0-100000,0-100000,...`) add nothing and memory stays O(MAX_LAYER).
        taken = bytearray(MAX_LAYER + 1)
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not m:
                raise BadOptionError(
                    f"bad {flag} value {shown(spec)}: {shown(part)} is not a layer or a range", example
                )
            # More digits than any layer number has: beyond any model, and too long for int().
            if any(len(g) > len(str(MAX_LAYER)) for g in m.groups() if g):
                raise BadOptionError(f"bad {flag} value {shown(spec)}: {shown(part)} is beyond any model", example)
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise BadOptionError(f"bad {flag} range {part!r}: end before start", f"Use e.g. {flag} 0-3.")
            if hi > MAX_LAYER:
                raise BadOptionError(f"bad {flag} value {shown(spec)}: layer {hi} is beyond any model", example)
            i = taken.find(0, lo, hi + 1)
            while i != -1:
                taken[i] = 1
                wanted.append(i)
                i = taken.find(0, i + 1, hi + 1)
    else:
        for x in spec:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_LAYER:
                raise BadOptionError(f"bad {flag} value {x!r}: a layer is an integer from 0", example)
            wanted.append(int(x))
    if not wanted:
        raise BadOptionError(f"bad {flag} value {shown(str(spec))}: no layer in it", example)
    return list(dict.fromkeys(wanted))


def select_layers(layers: list[int] | None, dims: ModelDims, include_mtp: bool) -> list[int]:
    """The layers to analyze, sorted: all of the model's (None) or those asked, which it must have.

    Raises `BadOptionError` naming the model's layer range (and its MTP layers) otherwise.
    """
    n_main = dims.num_layers - dims.num_mtp_layers
    available = list(range(n_main if not include_mtp else dims.num_layers))
    if layers is None:
        return available
    have = set(available)
    missing = sorted({ly for ly in layers if ly not in have})
    if missing:
        mtp_span = f"s {n_main}-{dims.num_layers - 1}" if dims.num_mtp_layers > 1 else f" {n_main}"
        mtp = f" and MTP layer{mtp_span}" if dims.num_mtp_layers else ""
        skipped = " (MTP layers are excluded by --no-mtp)" if dims.num_mtp_layers and not include_mtp else ""
        raise BadOptionError(
            f"the model has no layer {', '.join(map(str, missing))}: it has layers 0-{n_main - 1}{mtp}{skipped}",
            f"Pick layers from that range, e.g. --layers 0-{min(3, n_main - 1)}.",
        )
    return sorted(set(layers))


def layers_in_model(
    layers: list[int], num_layers: int | None, path_of: Callable[[int], object]
) -> tuple[list[int], str]:
    """The cached `layers` a model of `num_layers` layers has (0 to num_layers - 1, MTP layers
    included; None: unknown, all kept), and a note naming the files of the others ("" if none):
    such a file holds nothing of this model (one copied in from a larger model was shown as its).
    `path_of(layer)` is the file of a layer, for the note."""
    past = [ly for ly in layers if num_layers is not None and ly >= num_layers]
    if not past or num_layers is None:
        return layers, ""
    more = f" (and {len(past) - 1} more)" if len(past) > 1 else ""
    note = (
        f"{path_of(past[0])}{more} left out: the model has layers 0-{num_layers - 1} "
        "(its manifest says so); delete the file"
    )
    gone = set(past)
    return [ly for ly in layers if ly not in gone], note


def parse_matrices(
    spec: str | Iterable[str] | None,
    supported: Sequence[str] | None = None,
    *,
    scope: str | None = None,
    keep_order: bool = False,
    flag: str = "--matrices",
) -> list[str]:
    """`vo,O` → ['O', 'VO']: matrix kinds, any case, each once.

    Args:
        spec: comma-separated kinds (or a list of them); None / "" / "all" means every kind
            allowed.
        supported: the kinds this model has (an adapter's `supported_kinds()`); None accepts
            every known kind, for a check before the model is known.
        scope: only kinds that have spectra in this scope (e.g. "stacked" for a figure of
            stacked spectra).
        keep_order: return the kinds in the order given instead of the canonical ALL_KINDS order.
        flag: the option's name, for the message.

    Raises `BadOptionError` for an unknown kind, a kind without spectra in `scope`, and a kind
    the model lacks, each listing what to choose from.

    Example:
        >>> parse_matrices("vo,O,qa")
        ['O', 'VO', 'QA']
        >>> parse_matrices("vo,O", scope="stacked", keep_order=True)
        ['VO', 'O']
    """
    allowed = [k for k in ALL_KINDS if scope is None or k in KINDS_OF_SCOPE[scope]]
    if supported is not None:
        allowed = [k for k in allowed if k in supported]
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return allowed
    items = [s.strip() for item in ([spec] if isinstance(spec, str) else spec) for s in str(item).split(",")]
    items = [s for s in items if s]
    by_lower = {k.lower(): k for k in ALL_KINDS}
    unknown = [s for s in items if s.lower() not in by_lower]
    if unknown:
        choices = [k for k in ALL_KINDS if scope is None or k in KINDS_OF_SCOPE[scope]]
        raise BadOptionError(
            f"unknown matrix kind {', '.join(map(repr, unknown))}", "Choose from " + ",".join(choices) + "."
        )
    chosen = list(dict.fromkeys(by_lower[s.lower()] for s in items))
    if scope is not None:
        wrong = [k for k in chosen if k not in KINDS_OF_SCOPE[scope]]
        if wrong:
            raise BadOptionError(
                f"{flag}: {', '.join(wrong)} has no {scope} spectra (only {', '.join(scopes_of(wrong[0]))})",
                "Choose from " + ",".join(KINDS_OF_SCOPE[scope]) + ".",
            )
    if supported is not None:
        lacking = [k for k in canonical_kinds(chosen) if k not in supported]
        if lacking:
            raise BadOptionError(
                f"this model has no {', '.join(lacking)} matrices", "It has " + ",".join(allowed) + "."
            )
    if not chosen:
        return allowed
    return chosen if keep_order else canonical_kinds(chosen)


def parse_errors(spec: str, flag: str = "--errors") -> tuple[float, ...]:
    """`0.01,0.001` → (0.01, 0.001): energy errors, each in (0, 1), in the order given.

    Example:
        >>> parse_errors("0.01,0.001")
        (0.01, 0.001)
    """
    try:
        values = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise BadOptionError(
            f"bad {flag} value {spec!r}", f"Give energy errors between 0 and 1, e.g. {flag} 0.01,0.001,0.05."
        )
    return values


def parse_choices(values: Iterable[str] | str | None, allowed: Sequence[str], what: str) -> list[str]:
    """Repeatable and/or comma-separated option values, lower-cased and checked against `allowed`;
    None → all of them.

    Example:
        >>> parse_choices(["png,SVG", "png"], ("png", "svg", "pdf"), "format")
        ['png', 'svg']
    """
    if values is None:
        return list(allowed)
    if isinstance(values, str):
        values = [values]
    picked = [v.strip().lower() for item in values for v in str(item).split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad:
        raise BadOptionError(f"unknown {what} {', '.join(map(repr, bad))}", f"Choose from: {', '.join(allowed)}.")
    return list(dict.fromkeys(picked)) or list(allowed)


def format_layers(layers: Iterable[int]) -> str:
    """The inverse of `parse_layers`: [0, 1, 2, 5, 7, 8] → '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for ly in sorted(set(layers)):
        if runs and runs[-1][1] == ly - 1:
            runs[-1][1] = ly
        else:
            runs.append([ly, ly])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
