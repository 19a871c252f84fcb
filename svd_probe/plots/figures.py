"""One function per figure. Each returns a `FigureResult`: the matplotlib Figure and the data it
draws (a pandas DataFrame), so tests and notebooks can check the picture against the metrics.

Every function takes an `Analysis` (see `svd_probe.results.load_analysis`) and, optionally, its
metrics table, so that a caller drawing several figures computes the table once. A figure whose
spectra are not in the cache raises `MissingFigureData`, whose hint is the `analyze` command that
would add them; `make_plots` turns that into a note and goes on with the other figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from svd_probe.errors import MissingFigureData
from svd_probe.kinds import STACKED
from svd_probe.plots import style
from svd_probe.plots.planner import ENERGY_ERROR, PlannerResult, plan_latent
from svd_probe.spectra.metrics import DEFAULT_ERRORS, energy_rank, error_column, relative_error_at_rank

# The stacked kinds of the layer-wise figure, in the order.
LAYERWISE_KINDS = ("O", "VO", "Q", "K", "V", "QK")
HEADWISE_KINDS = ("V", "O", "VO")
HEATMAP_KINDS = ("VO", "QK")
SPECTRA_KINDS = LAYERWISE_KINDS
ERROR_KINDS = ("O", "VO")
RANK_UNIT = "rank (number of singular values)"


@dataclass
class FigureResult:
    """A drawn figure and the data behind it."""

    kind: str  # the `--kind` name that selects it
    stem: str  # file name without extension
    figure: Figure | None
    data: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Names in legends and titles are drawn as they are, never read as mathtext (`style`).
        if self.figure is not None:
            style.draw_literally(self.figure)


def default_error_rank(d_model: int) -> int:
    """4/7 of a width, rounded to a multiple of 64 from 512: r = 4096 for a 7168-wide model.

    The fixed rank of the public DeepSeek-V3 analyses; for other widths the same fraction.
    `error_at_rank` applies it to the smaller of d_model and the largest possible rank of the
    kinds it draws (73 for the demo model, whose stacked O and VO have rank ≤ 128 < d_model = 320).
    """
    q = 64 if d_model >= 512 else 1
    return max(1, int(round(d_model * 4 / 7 / q)) * q)


# --- helpers -------------------------------------------------------------------------------------


def _metrics(analysis, metrics: pd.DataFrame | None, errors: Sequence[float]) -> pd.DataFrame:
    needed = [error_column(e) for e in errors]
    if metrics is None or any(c not in metrics.columns for c in needed):
        metrics = analysis.metrics(errors=tuple(sorted(set(errors) | set(DEFAULT_ERRORS), reverse=True)))
    return metrics


def _present(metrics: pd.DataFrame, scope: str, kinds: Sequence[str]) -> list[str]:
    if metrics.empty:
        return []
    have = set(metrics.loc[metrics["scope"] == scope, "matrix"])
    return [k for k in kinds if k in have]


def _require(analysis, metrics, scope: str, kinds: Sequence[str], what: str) -> list[str]:
    """The kinds of `kinds` that are cached; MissingFigureData if none is."""
    present = _present(metrics, scope, kinds)
    if not present:
        raise MissingFigureData(
            f"{analysis.display}: no {scope} spectra of {', '.join(kinds)} cached, needed for {what}",
            analysis.analyze_command(matrices=",".join(kinds)),
        )
    return present


def _missing_note(analysis, scope: str, kinds: Sequence[str], present: Sequence[str]) -> list[str]:
    missing = [k for k in kinds if k not in present]
    if not missing:
        return []
    return [
        f"{analysis.display}: no {scope} {', '.join(missing)} spectra cached, left out (run: {analysis.analyze_command(matrices=','.join(missing))})"
    ]


def _mtp_layers(analysis) -> list[int]:
    dims = analysis.dims
    n, mtp = dims.get("num_layers"), dims.get("num_mtp_layers") or 0
    if not n or not mtp:
        return []
    return [ly for ly in analysis.layers if ly >= n - mtp]


def _mark_mtp(ax, analysis) -> None:
    mtp = _mtp_layers(analysis)
    if mtp:
        ax.axvspan(min(mtp) - 0.5, max(mtp) + 0.5, color="0.5", alpha=0.12, lw=0, label="MTP layer")


def _kind_cmap(kind: str) -> LinearSegmentedColormap:
    # A heat map of a kind shades from white to that kind's colour, so the colour still names it.
    # It runs on to a dark shade of the colour so that light kinds (QK's sky blue) keep contrast.
    rgb = np.array(to_rgb(style.kind_color(kind)))
    return LinearSegmentedColormap.from_list(f"svdprobe_{kind}", ["#ffffff", tuple(rgb), tuple(rgb * 0.3)])


def _suptitle(fig: Figure, text: str) -> None:
    style.literal_suptitle(fig, text, wrap=True)


def _integer_ticks(ax, axis: str = "x") -> None:
    """Whole-number ticks on a layer, head, index or width axis (never 0.5 of a layer)."""
    # Steps of 1, 2 or 5 × 10^k, as matplotlib's default locator picks, but never a fraction.
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


# --- the largest rank a spectrum can have --------------------------------------------------------

# The inner dimension through which each fused kind is computed (svd_probe/spectra/compute.py's
# table): a per-head product L_h·R_h is a k×k problem, a stack of n heads an n·k-sided one, so at
# most that many of its σ are nonzero; the cache pads the rest with exact zeros up to min(m, n)
# of the full matrix (stacked VO of DeepSeek-V3 is 7168 × 65536 but has rank ≤ 7168; of the demo
# model, 320 × 544 with 320 σ stored, of which at most 4·32 = 128 are nonzero).
_FUSED_INNER = {"VO": "d_v", "QK": "d_qk", "KQ": "d_qk"}


def max_rank(scope: str, kind: str, shape: tuple[int, int] | None, dims: dict) -> int | None:
    """The most nonzero singular values a cached spectrum can have: min(m, n) of the problem solved.

    That is min(m, n) of the matrix itself, and for the fused kinds (VO, QK, KQ) also the size of
    the reduced problem: k per head, n_heads·k for a stack, with k = d_v (VO) or d_qk (QK, KQ).

    Args:
        scope: "head", "stacked" or "layer".
        kind: the matrix kind, e.g. "VO".
        shape: (m, n) of the full matrix as the cache records it; None gives None.
        dims: the cache manifest's model dims (`Analysis.dims`).

    Returns:
        The rank bound, or None without a shape.

    Example:
        >>> max_rank("stacked", "VO", (320, 544), {"n_heads": 4, "d_v": 32})
        128
    """
    if shape is None:
        return None
    bound = int(min(shape))
    inner = int(dims.get(_FUSED_INNER.get(kind, ""), 0) or 0)
    if inner:
        blocks = 1 if scope == "head" else int(dims.get("n_heads") or 0)
        if blocks:
            bound = min(bound, blocks * inner)
    return bound


def _with_max_rank(frame: pd.DataFrame, dims: dict) -> pd.DataFrame:
    """`frame` (rows with scope, matrix, m, n) with a `max_rank` column."""
    keys = frame[["scope", "matrix", "m", "n"]].drop_duplicates()
    bounds = {
        (sc, k, m, n): max_rank(sc, k, (int(m), int(n)), dims)
        for sc, k, m, n in keys.itertuples(index=False, name=None)
    }
    rows = zip(frame["scope"], frame["matrix"], frame["m"], frame["n"], strict=True)
    return frame.assign(max_rank=[bounds[key] for key in rows])


# --- 1. layer-wise ranks -------------------------------------------------------------------------


def layerwise_ranks(
    analysis,
    metrics: pd.DataFrame | None = None,
    kinds: Sequence[str] = LAYERWISE_KINDS,
    errors: Sequence[float] = DEFAULT_ERRORS,
    dpi: float = 100,
) -> FigureResult:
    """Rank at each energy error (default 1% and 0.1%) of each stacked kind against layer.

    A dashed line marks each kind's largest possible rank (`max_rank`: stacked VO of n heads has
    at most n·d_v nonzero σ, whatever its shape). The data has one row per layer and kind.
    """
    metrics = _metrics(analysis, metrics, errors)
    present = _require(analysis, metrics, "stacked", kinds, "the layer-wise figure")
    cols = [error_column(e) for e in errors]
    data = metrics.loc[
        (metrics["scope"] == "stacked") & metrics["matrix"].isin(present),
        ["layer", "scope", "matrix", "m", "n", "full_rank", *cols],
    ]
    data = _with_max_rank(data, analysis.dims).drop(columns="scope")
    order = data["matrix"].map({k: i for i, k in enumerate(present)})
    data = data.assign(_order=order).sort_values(["_order", "layer"]).drop(columns="_order").reset_index(drop=True)

    with style.plot_style():
        fig = style.new_figure(5.0 * len(errors), 4.2, dpi)
        axes = fig.subplots(1, len(errors), sharey=True, squeeze=False)[0]
        bounds = data.groupby("max_rank")["matrix"].apply(lambda s: list(dict.fromkeys(s))).to_dict()
        for ax, e, col in zip(axes, errors, cols, strict=False):
            _mark_mtp(ax, analysis)
            for kind in present:
                d = data[data["matrix"] == kind]
                ax.plot(d["layer"], d[col], color=style.kind_color(kind), marker=".", ms=4, lw=1.3, label=kind)
            for bound, ks in bounds.items():
                # Kinds sharing a bound share one line, drawn in their colour when alone.
                color = style.kind_color(ks[0]) if len(ks) == 1 else "0.3"
                ax.axhline(bound, color=color, ls="--", lw=0.9, alpha=0.8, gid="max-rank")
                ax.annotate(
                    f"max rank {bound:,} ({', '.join(ks)})",
                    (1.0, bound),
                    xycoords=("axes fraction", "data"),
                    xytext=(-2, 2),
                    textcoords="offset points",
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color=color,
                )
            ax.set_title(f"{style.rank_at(e)} (stacked heads)")
            ax.set_xlabel("layer")
            _integer_ticks(ax)
        axes[0].set_ylabel(RANK_UNIT)
        axes[0].set_ylim(bottom=0)
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="stacked")
        _suptitle(
            fig,
            style.title(
                analysis,
                "Layer-wise effective rank of stacked attention matrices",
                "rank at " + " / ".join(style.pct(e) for e in errors) + " energy error",
            ),
        )
    return FigureResult("layerwise", "layerwise", fig, data, _missing_note(analysis, "stacked", kinds, present))


# --- 2. head-wise ranks of one layer, 3. grid of every layer -------------------------------------


def _headwise_frame(analysis, metrics: pd.DataFrame, layer: int, error: float, kinds: Sequence[str]) -> pd.DataFrame:
    """One row per query head: its rank of each kind, in the order the figure draws the heads."""
    col = error_column(error)
    m = metrics[(metrics["scope"] == "head") & (metrics["layer"] == layer)]
    n_heads = (
        int((m["matrix"] == "VO").sum())
        or int(analysis.dims.get("n_heads") or 0)
        or int(m.groupby("matrix").size().max())
    )
    frame = pd.DataFrame({"layer": layer, "head": np.arange(n_heads)})
    for kind in kinds:
        r = m.loc[m["matrix"] == kind].sort_values("head")[col].to_numpy()
        if len(r) == 0:
            continue
        if len(r) != n_heads and n_heads % len(r) == 0:
            # Grouped-query attention: V (and K) are per key/value group; head h reads group h // (n/g).
            r = r[np.arange(n_heads) // (n_heads // len(r))]
        frame[kind] = r.astype(int)
    sort_by = "VO" if "VO" in frame else next((k for k in kinds if k in frame), "head")
    frame = frame.sort_values([sort_by, "head"], kind="stable").reset_index(drop=True)
    frame.insert(2, "position", np.arange(len(frame)))
    return frame


def _draw_headwise(ax, frame: pd.DataFrame, kinds: Sequence[str], d_v: int | None, small: bool = False) -> dict:
    medians = {}
    # hlines over the heads' span, not axhline: axhline re-autoscales every shared axis at once,
    # which makes a 64-panel grid take seconds per panel.
    span = (-0.5, len(frame) - 0.5)
    for kind in kinds:
        if kind not in frame:
            continue
        c = style.kind_color(kind)
        ax.plot(
            frame["position"],
            frame[kind],
            color=c,
            marker="" if small else ".",
            ms=4,
            lw=0.9 if small else 1.3,
            label=kind,
        )
        med = float(np.median(frame[kind]))
        medians[kind] = med
        ax.hlines(
            med, *span, color=c, ls=":", lw=0.8 if small else 1.1, label=None if small else f"{kind} median {med:g}"
        )
    if d_v:
        ax.hlines(d_v, *span, color="0.3", ls="--", lw=0.8, label=None if small else f"d_v = {d_v} (largest possible)")
    if not small:  # grid panels share x: the caller sets it once, as each set propagates to all
        ax.set_xlim(*span)
    return medians


def headwise_ranks(
    analysis,
    layer: int | None = None,
    metrics: pd.DataFrame | None = None,
    error: float = 0.01,
    kinds: Sequence[str] = HEADWISE_KINDS,
    dpi: float = 100,
) -> FigureResult:
    """Per-head rank of V, O and VO in one layer (default: the middle cached layer), heads sorted by VO rank."""
    metrics = _metrics(analysis, metrics, [error])
    layer = analysis.layers[len(analysis.layers) // 2] if layer is None else int(layer)
    if layer not in analysis.layers:
        raise MissingFigureData(
            f"{analysis.display}: layer {layer} is not cached (cached: {_ranges(analysis.layers)})",
            analysis.analyze_command(layers=str(layer), matrices=",".join(kinds)),
        )
    present = _present(metrics[metrics["layer"] == layer], "head", kinds)
    if not present:
        raise MissingFigureData(
            f"{analysis.display}: no per-head {', '.join(kinds)} spectra cached for layer {layer}",
            analysis.analyze_command(layers=str(layer), matrices=",".join(kinds)),
        )
    frame = _headwise_frame(analysis, metrics, layer, error, present)
    d_v = analysis.dims.get("d_v")
    with style.plot_style():
        fig = style.new_figure(max(7.0, min(14.0, 0.06 * len(frame) + 4)), 4.0, dpi)
        ax = fig.subplots()
        medians = _draw_headwise(ax, frame, present, d_v)
        ax.set_xlabel(f"head, sorted by {'VO' if 'VO' in present else present[0]} rank (of {len(frame)})")
        ax.set_ylabel(f"{RANK_UNIT},\nat {style.energy_error(error)}")
        ax.set_ylim(bottom=0)
        _integer_ticks(ax)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="per head")
        _suptitle(
            fig,
            style.title(analysis, f"Head-wise rank of V, O and VO, layer {layer}", style.rank_at(error)),
        )
    return FigureResult(
        "headwise",
        f"headwise-L{layer:03d}",
        fig,
        frame,
        _missing_note(analysis, "head", kinds, present),
        {"medians": medians, "layer": layer},
    )


def headwise_grid(
    analysis,
    metrics: pd.DataFrame | None = None,
    error: float = 0.01,
    kinds: Sequence[str] = HEADWISE_KINDS,
    dpi: float = 100,
) -> FigureResult:
    """Every cached layer's head-wise figure on one page, shared axes."""
    metrics = _metrics(analysis, metrics, [error])
    present = _require(analysis, metrics, "head", kinds, "the head-wise grid")
    # Split the (large) table by layer once instead of filtering it again for every panel.
    heads = metrics[(metrics["scope"] == "head") & metrics["matrix"].isin(present)]
    by_layer = dict(list(heads.groupby("layer")))
    layers = [ly for ly in analysis.layers if ly in by_layer]
    frames = [_headwise_frame(analysis, by_layer[ly], ly, error, present) for ly in layers]
    data = pd.concat(frames, ignore_index=True)
    d_v = analysis.dims.get("d_v")
    ncols = math.ceil(math.sqrt(len(layers)))
    nrows = math.ceil(len(layers) / ncols)
    medians = {}
    with style.plot_style():
        width = max(6.5, 1.9 * ncols + 0.8)
        fig = Figure(figsize=(width, 1.45 * nrows + 0.4), dpi=dpi)
        _suptitle(
            fig,
            style.title(
                analysis,
                "Head-wise rank of V, O and VO, every layer",
                style.rank_at(error),
            ),
        )
        # Fixed margins, in inches: constrained layout costs seconds with 60-odd panels and gains
        # nothing here. Top: the title's lines; bottom: tick labels, x label and the legend row.
        # The title hangs from 2% below the top, 12 pt a line, then the panel titles (~20 pt).
        lines = fig.get_suptitle().count("\n") + 1
        bottom, left = 0.75, 0.5
        top = (0.02 * (fig.get_figheight() + bottom) + (12 * lines + 20) / 72) / 0.98
        fig.set_figheight(fig.get_figheight() + top + bottom)
        height = fig.get_figheight()
        fig.subplots_adjust(
            left=left / width,
            right=1 - 0.1 / width,
            bottom=bottom / height,
            top=1 - top / height,
            wspace=0.12,
            hspace=0.4,
        )
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
        for ax, layer, frame in zip(axes.flat, layers, frames, strict=False):
            medians[layer] = _draw_headwise(ax, frame, present, d_v, small=True)
            ax.set_title(f"layer {layer}", fontsize=7, pad=2)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(layers) :]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("head (sorted by VO)", fontsize=7)
        for ax in axes[:, 0]:
            ax.set_ylabel("rank (number of σ)", fontsize=7)
        axes.flat[0].set_ylim(bottom=0)
        axes.flat[0].set_xlim(-0.5, max(len(f) for f in frames) - 0.5)
        _integer_ticks(axes.flat[0])  # shared axes share their locators
        handles = [Line2D([], [], color=style.kind_color(k), lw=1.3, label=k) for k in present]
        handles += [
            Line2D([], [], color="0.3", ls=":", label="median"),
            Line2D([], [], color="0.3", ls="--", label="d_v"),
        ]
        fig.legend(handles=handles, loc="lower center", ncols=len(handles), frameon=False, borderaxespad=0.2)
    notes = _missing_note(analysis, "head", kinds, present)
    return FigureResult("grid", "headwise-grid", fig, data, notes, {"medians": medians})


# --- 4. heat maps --------------------------------------------------------------------------------


def rank_heatmaps(
    analysis,
    metrics: pd.DataFrame | None = None,
    error: float = 0.01,
    kinds: Sequence[str] = HEATMAP_KINDS,
    dpi: float = 100,
) -> FigureResult:
    """Layer × head maps of per-head rank (default VO and QK), each cell labelled with its rank
    where the label fits the cell (`extra["annotated"]` says, per kind, whether it did)."""
    metrics = _metrics(analysis, metrics, [error])
    present = _require(analysis, metrics, "head", kinds, "the heat maps")
    col = error_column(error)
    data = metrics.loc[
        (metrics["scope"] == "head") & metrics["matrix"].isin(present),
        ["layer", "head", "scope", "matrix", "m", "n", col, "full_rank"],
    ]
    data = _with_max_rank(data, analysis.dims).drop(columns=["scope", "m", "n"])
    data = data.rename(columns={col: "rank"}).astype({"head": int}).reset_index(drop=True)
    grids = {k: data[data["matrix"] == k].pivot(index="layer", columns="head", values="rank") for k in present}
    bounds = {k: int(data.loc[data["matrix"] == k, "max_rank"].max()) for k in present}
    with style.plot_style():
        n_heads = max(g.shape[1] for g in grids.values())
        n_layers = max(g.shape[0] for g in grids.values())
        # Per panel: the map (cells 0.045 in wide up to 16 in) and its colour bar, at least wide
        # enough for the panel title; the constrained layout places titles, bars and their labels.
        panel = max(3.4, min(16.0, 1.6 + 0.045 * n_heads))
        fig = style.new_figure(panel * len(present), max(3.2, min(12.0, 2.2 + 0.14 * n_layers)), dpi)
        axes = fig.subplots(1, len(present), squeeze=False)[0]
        images = []
        for ax, kind in zip(axes, present, strict=False):
            g = grids[kind]
            im = ax.imshow(
                g.to_numpy(dtype=float),
                aspect="auto",
                interpolation="nearest",
                cmap=_kind_cmap(kind),
                vmin=0,
                extent=(-0.5, g.shape[1] - 0.5, len(g) - 0.5, -0.5),
            )
            images.append(im)
            # Rows are the cached layers, which need not be contiguous: label rows by layer number.
            rows = list(range(0, len(g), max(1, math.ceil(len(g) / 16))))
            ax.set_yticks(rows, [str(g.index[i]) for i in rows])
            _integer_ticks(ax)
            ax.grid(False)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{kind} (max rank {bounds[kind]:,})")
            fig.colorbar(im, ax=ax, label="rank", shrink=0.9)
        _suptitle(
            fig,
            style.title(analysis, "Per-head rank (number of singular values), layer × head", style.rank_at(error)),
        )
        # Cell labels need the cells' final size, known once the layout has run; a layout pass
        # is skipped where even the whole panel width leaves no room (DeepSeek-V3's 128 heads).
        annotated = dict.fromkeys(present, False)
        if panel * 72 / n_heads >= _CELL_FONT_MIN * style.text_width("0", 1.0):
            fig.draw_without_rendering()
            for ax, kind, im in zip(axes, present, images, strict=False):
                annotated[kind] = _annotate_cells(ax, grids[kind].to_numpy(dtype=float), im, dpi)
    return FigureResult(
        "heatmap",
        "heatmap-head-ranks",
        fig,
        data,
        _missing_note(analysis, "head", kinds, present),
        {"grids": {k: g.to_numpy() for k, g in grids.items()}, "max_rank": bounds, "annotated": annotated},
    )


# Cell labels: at most this size, and not below the smallest that stays legible.
_CELL_FONT_MAX, _CELL_FONT_MIN = 7.0, 5.0


def _annotate_cells(ax, values: np.ndarray, image, dpi: float) -> bool:
    """Write each cell's value in it when the longest label fits a cell; True if it did."""
    n_rows, n_cols = values.shape
    box = ax.get_window_extent()
    cell_w, cell_h = box.width / n_cols * 72 / dpi, box.height / n_rows * 72 / dpi  # points
    labels = [["" if np.isnan(v) else f"{v:.0f}" for v in row] for row in values]
    longest = max((s for row in labels for s in row), key=len, default="")
    if not longest:
        return False
    # Glyphs of a number are about 0.6 em wide; a label needs ~1.2 em of height and a margin.
    size = min(_CELL_FONT_MAX, 0.8 * cell_h / 1.2, 0.85 * cell_w / style.text_width(longest, 1.0))
    if size < _CELL_FONT_MIN:
        return False
    for i in range(n_rows):
        for j in range(n_cols):
            if not labels[i][j]:
                continue
            r, g, b, _ = image.cmap(image.norm(values[i, j]))
            dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5  # relative luminance of the cell
            t = ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=size, color="white" if dark else "black")
            t.set_in_layout(False)
    return True


# --- 5. spectra ----------------------------------------------------------------------------------


def default_spectra_layers(layers: Sequence[int], count: int = 4) -> list[int]:
    """First, last and evenly spaced cached layers in between."""
    layers = sorted(layers)
    if len(layers) <= count:
        return layers
    idx = np.linspace(0, len(layers) - 1, count).round().astype(int)
    return [layers[i] for i in dict.fromkeys(idx)]


def spectra(
    analysis,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] = SPECTRA_KINDS,
    scope: str = "stacked",
    error: float = 0.01,
    dpi: float = 100,
) -> FigureResult:
    """σ_i / σ_1 against i (log scale), one panel per layer, one line per kind; a dot marks the rank at `error`."""
    layers = default_spectra_layers(analysis.layers) if not layers else [int(ly) for ly in layers]
    missing_layers = [ly for ly in layers if ly not in analysis.layers]
    layers = [ly for ly in layers if ly in analysis.layers]
    notes = []
    if missing_layers:
        notes.append(
            f"{analysis.display}: layers {_ranges(missing_layers)} not cached, left out "
            f"(run: {analysis.analyze_command(layers=','.join(map(str, missing_layers)))})"
        )
    rows = []
    for ly in layers:
        ls = analysis.layer_spectra[ly]
        for kind in kinds:
            s = ls.spectrum(scope, kind)
            if s is None or s.ndim != 1 or s.size == 0:
                continue
            s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
            norm = s / s[0] if s[0] > 0 else np.zeros_like(s)
            frame = pd.DataFrame(
                {"layer": ly, "matrix": kind, "index": np.arange(1, len(s) + 1), "sigma": s, "sigma_normalized": norm}
            )
            frame["at_error_rank"] = frame["index"] == energy_rank(s, error)
            rows.append(frame)
    if not rows:
        raise MissingFigureData(
            f"{analysis.display}: no {scope} spectra of {', '.join(kinds)} cached for layers {_ranges(layers) or '(none)'}",
            analysis.analyze_command(
                layers=",".join(map(str, missing_layers or layers)) or None, matrices=",".join(kinds)
            ),
        )
    data = pd.concat(rows, ignore_index=True)
    present = [k for k in kinds if k in set(data["matrix"])]
    notes += _missing_note(analysis, scope, kinds, present)
    ncols = min(len(layers), 2)
    nrows = math.ceil(len(layers) / ncols)
    with style.plot_style():
        fig = style.new_figure(4.6 * ncols + 1.0, 3.3 * nrows + 0.8, dpi)
        axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
        for ax, ly in zip(axes.flat, layers, strict=False):
            d = data[data["layer"] == ly]
            for kind in present:
                dk = d[d["matrix"] == kind]
                # Exact zeros have no place on a log axis; they end the line instead.
                y = dk["sigma_normalized"].where(dk["sigma_normalized"] > 0)
                ax.plot(dk["index"], y, color=style.kind_color(kind), lw=1.2, label=kind)
                mark = dk[dk["at_error_rank"]]
                ax.plot(
                    mark["index"],
                    mark["sigma_normalized"],
                    "o",
                    color=style.kind_color(kind),
                    ms=4,
                    mec="white",
                    mew=0.6,
                )
            ax.set_yscale("log")
            ax.set_title(f"layer {ly}" + (" (MTP)" if ly in _mtp_layers(analysis) else ""))
            ax.set_xlabel("singular value index i")
            _integer_ticks(ax)
            ax.set_ylabel("σ_i / σ_1 (log scale)")
        for ax in list(axes.flat)[len(layers) :]:
            ax.set_visible(False)
        axes.flat[0].legend(title=scope)
        _suptitle(
            fig,
            style.title(analysis, f"Normalized singular values of {scope} matrices", f"dots: {style.rank_at(error)}"),
        )
    return FigureResult("spectra", "spectra", fig, data, notes)


# --- 6. error at a fixed rank --------------------------------------------------------------------


def error_at_rank(
    analysis,
    rank: int | None = None,
    kinds: Sequence[str] = ERROR_KINDS,
    dpi: float = 100,
) -> FigureResult:
    """Relative Frobenius error ‖A − A_r‖_F / ‖A‖_F of the best rank-r approximation of each
    stacked kind, per layer (not the energy error, which is its square).

    By default the kinds that write to the residual stream (O, VO), and r = `default_error_rank`
    of the smaller of d_model and the kinds' largest possible rank (`max_rank`: 4096 for
    DeepSeek-V3, whose stacked O and VO have rank ≤ 7168). Kinds whose largest possible rank is at
    most r are exact at rank r and left out with a note.
    """
    rows = []
    for ly in analysis.layers:
        ls = analysis.layer_spectra[ly]
        for kind in kinds:
            s = ls.spectrum(STACKED, kind)
            if s is None:
                continue
            shape = ls.matrix_shape(STACKED, kind) or (len(s),) * 2
            rows.append(
                {
                    "layer": ly,
                    "matrix": kind,
                    "full_rank": int(min(shape)),
                    "max_rank": max_rank(STACKED, kind, shape, analysis.dims),
                    "sigma": s,
                }
            )
    if not rows:
        raise MissingFigureData(
            f"{analysis.display}: no stacked spectra of {', '.join(kinds)} cached",
            analysis.analyze_command(matrices=",".join(kinds)),
        )
    if rank is None:
        d_model = int(analysis.dims.get("d_model") or 0)
        if not d_model:
            raise MissingFigureData(
                f"{analysis.display}: no d_model in the cache manifest to choose a default rank; pass a rank"
            )
        rank = default_error_rank(min(d_model, max(int(r["max_rank"]) for r in rows)))
    rank = int(rank)
    for r in rows:
        err = relative_error_at_rank(r.pop("sigma"), rank)
        r.update(rank=rank, rel_error=err, energy_kept=1.0 - err**2)
    data = pd.DataFrame(rows)[["layer", "matrix", "rank", "full_rank", "max_rank", "rel_error", "energy_kept"]]
    present = [k for k in kinds if k in set(data["matrix"])]
    notes = _missing_note(analysis, "stacked", kinds, present)
    exact = sorted(set(data.loc[data["max_rank"] <= rank, "matrix"]), key=list(kinds).index)
    if exact:
        notes.append(
            f"{analysis.display}: {', '.join(exact)} have rank ≤ r = {rank} (exact at that rank), left out of the error figure"
        )
    data = data[~data["matrix"].isin(exact)].reset_index(drop=True)
    drawn = [k for k in present if k not in exact]
    if not drawn:
        raise MissingFigureData(
            f"{analysis.display}: every cached stacked kind has rank ≤ r = {rank}; choose a smaller rank"
        )
    with style.plot_style():
        fig = style.new_figure(7.5, 4.0, dpi)
        ax = fig.subplots()
        _mark_mtp(ax, analysis)
        for kind in drawn:
            d = data[data["matrix"] == kind]
            bound = int(d["max_rank"].max())
            ax.plot(
                d["layer"],
                d["rel_error"] * 100,
                color=style.kind_color(kind),
                marker=".",
                ms=4,
                lw=1.3,
                label=f"{kind} (max rank {bound:,})",
            )
        ax.set_xlabel("layer")
        ax.set_ylabel("relative Frobenius error (%)\n‖A − A_r‖_F / ‖A‖_F")
        ax.set_ylim(bottom=0)
        _integer_ticks(ax)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="stacked")
        widest = int(data["max_rank"].max())
        _suptitle(
            fig,
            style.title(
                analysis,
                "Relative Frobenius error of the best rank-r approximation, per layer",
                f"rank r = {rank:,} (max rank {widest:,})",
            ),
        )
    return FigureResult("error", f"error-at-rank-{rank}", fig, data, notes, {"rank": rank})


# --- 7. shared-output-latent planner -------------------------------------------------------------


def planner_figure(analysis, latent: int | None = None, dpi: float = 100) -> FigureResult:
    """Energy of stacked O and VO kept at rank D per layer, and cost/energy against D."""
    plan = plan_latent(analysis, latent)
    t, sweep = plan.table, plan.sweep
    D = plan.latent
    with style.plot_style():
        fig = style.new_figure(12.0, 4.2, dpi)
        ax1, ax2 = fig.subplots(1, 2)
        _mark_mtp(ax1, analysis)
        for kind in ("O", "VO"):
            col = f"energy_kept_{kind}"
            if t[col].notna().any():
                ax1.plot(
                    t["layer"],
                    t[col] * 100,
                    color=style.kind_color(kind),
                    marker=".",
                    ms=4,
                    lw=1.3,
                    label=f"stacked {kind}",
                )
        ax1.set_xlabel("layer")
        ax1.set_ylabel(f"energy kept at rank D = {D:,} (%)")
        ax1.set_title(f"Energy kept by a {D:,}-dim shared output latent")
        _integer_ticks(ax1)
        ax1.legend()

        ax2.plot(sweep["latent"], sweep["params_ratio"] * 100, color="black", lw=1.5, label="output weights vs direct")
        for kind in ("O", "VO"):
            if f"energy_kept_{kind}_min" in sweep:
                c = style.kind_color(kind)
                ax2.plot(
                    sweep["latent"],
                    sweep[f"energy_kept_{kind}_min"] * 100,
                    color=c,
                    lw=1.3,
                    label=f"{kind} energy kept, worst layer",
                )
                ax2.plot(
                    sweep["latent"],
                    sweep[f"energy_kept_{kind}_median"] * 100,
                    color=c,
                    lw=1.0,
                    ls=":",
                    label=f"{kind} energy kept, median layer",
                )
        for kind, needed in plan.latent_for_energy.items():
            keeps = f"{100 * (1 - ENERGY_ERROR):g}%"
            ax2.axvline(
                needed,
                color=style.kind_color(kind),
                lw=0.9,
                ls="-.",
                label=f"D = {needed:,}: {kind} keeps {keeps} in every layer",
            )
        ax2.axhline(100, color="0.5", lw=0.6)
        saves = "" if plan.param_change < 0 else ", no saving"
        ax2.axvline(D, color="0.2", lw=1.0, label=f"D = {D:,} ({plan.param_change * 100:+.1f}% weights{saves})")
        ax2.axvline(plan.break_even, color="0.2", lw=1.0, ls="--", label=f"break-even D = {plan.break_even:,.1f}")
        ax2.set_xlabel("shared latent width D (dimensions)")
        ax2.set_ylabel("% (of direct projection's weights / of energy)")
        ax2.set_title("Cost and energy kept against D")
        _integer_ticks(ax2)
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        what = f"Shared output latent: n·d_v·H → n·d_v·D + D·H (n={plan.n_heads}, d_v={plan.d_v}, H={plan.d_model:,})"
        _suptitle(fig, style.title(analysis, what, f"D = {D:,}"))
    return FigureResult("planner", f"planner-D{D}", fig, t, list(plan.notes), {"plan": plan})


# --- 8. comparison of models ---------------------------------------------------------------------


def compare_models(
    analyses: Sequence,
    metrics: Sequence[pd.DataFrame | None] | None = None,
    kinds: Sequence[str] = ("O", "VO"),
    error: float = 0.01,
    dpi: float = 100,
) -> FigureResult:
    """Several models on shared axes: rank against layer, and fraction of the largest possible
    rank (`max_rank`) against depth.

    Depth is layer / (layers − 1) so that models of different depth line up; the fraction of
    the largest possible rank puts models of different widths on one scale.
    """
    metrics = list(metrics) if metrics is not None else [None] * len(analyses)
    col = error_column(error)
    rows, notes = [], []
    for a, m in zip(analyses, metrics, strict=False):
        m = _metrics(a, m, [error])
        present = _present(m, "stacked", kinds)
        notes += _missing_note(a, "stacked", kinds, present)
        d = m.loc[
            (m["scope"] == "stacked") & m["matrix"].isin(present),
            ["layer", "scope", "matrix", "m", "n", "full_rank", col],
        ].rename(columns={col: "rank"})
        d = _with_max_rank(d, a.dims).drop(columns=["scope", "m", "n"])
        n_layers = int(a.dims.get("num_layers") or (max(a.layers) + 1))
        d.insert(0, "model", a.display)
        d["depth"] = d["layer"] / max(1, n_layers - 1)
        d["fraction_of_max_rank"] = d["rank"] / d["max_rank"]
        d["d_model"] = a.dims.get("d_model")
        rows.append(d)
    data = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if data.empty:
        raise MissingFigureData(
            f"no stacked {', '.join(kinds)} spectra cached for any of {', '.join(a.display for a in analyses)}",
            "; ".join(a.analyze_command(matrices=",".join(kinds)) for a in analyses),
        )
    models = list(dict.fromkeys(data["model"]))
    drawn_kinds = [k for k in kinds if k in set(data["matrix"])]
    with style.plot_style():
        fig = style.new_figure(11.0, 4.4, dpi)
        ax1, ax2 = fig.subplots(1, 2)
        for i, model in enumerate(models):
            ls = style.MODEL_LINESTYLES[i % len(style.MODEL_LINESTYLES)]
            mk = style.MODEL_MARKERS[i % len(style.MODEL_MARKERS)]
            for kind in drawn_kinds:
                d = data[(data["model"] == model) & (data["matrix"] == kind)]
                if d.empty:
                    continue
                kw = dict(color=style.kind_color(kind), ls=ls, marker=mk, ms=3, lw=1.2)
                ax1.plot(d["layer"], d["rank"], **kw)
                ax2.plot(d["depth"], d["fraction_of_max_rank"] * 100, **kw)
        ax1.set_xlabel("layer")
        ax1.set_ylabel(f"{RANK_UNIT},\nat {style.energy_error(error)}")
        ax1.set_ylim(bottom=0)
        _integer_ticks(ax1)
        ax1.set_title("Rank of stacked matrices")
        ax2.set_xlabel("relative depth: layer / (layers − 1)")
        ax2.set_ylabel("rank / max rank (%)")
        ax2.set_ylim(0, 105)
        ax2.set_title("Fraction of the largest possible rank")
        handles = [Line2D([], [], color=style.kind_color(k), lw=2, label=f"stacked {k}") for k in drawn_kinds]
        for i, model in enumerate(models):
            w = data.loc[data["model"] == model, "d_model"].iloc[0]
            label = model + (f" (H = {int(w):,})" if pd.notna(w) else "")
            handles.append(
                Line2D(
                    [],
                    [],
                    color="0.2",
                    ls=style.MODEL_LINESTYLES[i % 4],
                    marker=style.MODEL_MARKERS[i % 6],
                    ms=3,
                    label=label,
                )
            )
        fig.legend(handles=handles, loc="outside right center")
        _suptitle(
            fig,
            style.title(
                list(analyses),
                "Comparison of models: effective rank of stacked matrices",
                style.rank_at(error),
            ),
        )
    return FigureResult("compare", "compare", fig, data.reset_index(drop=True), notes)


def _ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5' (the `--layers` syntax)."""
    out, layers = [], sorted(set(int(ly) for ly in layers))
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(out)


__all__ = [
    "FigureResult",
    "MissingFigureData",
    "PlannerResult",
    "compare_models",
    "default_error_rank",
    "error_at_rank",
    "headwise_grid",
    "headwise_ranks",
    "layerwise_ranks",
    "max_rank",
    "planner_figure",
    "rank_heatmaps",
    "spectra",
]
