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

from svd_probe.errors import MissingFigureData
from svd_probe.kinds import STACKED
from svd_probe.plots import style
from svd_probe.plots.planner import PlannerResult, plan_latent
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


def default_error_rank(d_model: int) -> int:
    """4/7 of the residual width, rounded to a multiple of 64: r = 4096 for a 7168-wide model.

    The fixed rank of the public DeepSeek-V3 analyses; for other widths the same fraction.
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
    fig.suptitle(text, ha="left", x=0.01)


def _layer_ticks(ax, layers: Sequence[int], axis: str = "x", max_ticks: int = 16) -> None:
    step = max(1, math.ceil(len(layers) / max_ticks))
    ticks = list(layers)[::step]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)


# --- 1. layer-wise ranks -------------------------------------------------------------------------


def layerwise_ranks(
    analysis,
    metrics: pd.DataFrame | None = None,
    kinds: Sequence[str] = LAYERWISE_KINDS,
    errors: Sequence[float] = DEFAULT_ERRORS,
    dpi: float = 100,
) -> FigureResult:
    """Rank at each error (default 1% and 0.1%) of each stacked kind against layer, with full ranks."""
    metrics = _metrics(analysis, metrics, errors)
    present = _require(analysis, metrics, "stacked", kinds, "the layer-wise figure")
    cols = [error_column(e) for e in errors]
    data = metrics.loc[
        (metrics["scope"] == "stacked") & metrics["matrix"].isin(present),
        ["layer", "matrix", "m", "n", "full_rank", *cols],
    ]
    order = data["matrix"].map({k: i for i, k in enumerate(present)})
    data = data.assign(_order=order).sort_values(["_order", "layer"]).drop(columns="_order").reset_index(drop=True)

    with style.plot_style():
        fig = style.new_figure(5.0 * len(errors), 4.2, dpi)
        axes = fig.subplots(1, len(errors), sharey=True, squeeze=False)[0]
        full = data.groupby("full_rank")["matrix"].apply(lambda s: list(dict.fromkeys(s))).to_dict()
        for ax, e, col in zip(axes, errors, cols, strict=False):
            _mark_mtp(ax, analysis)
            for kind in present:
                d = data[data["matrix"] == kind]
                ax.plot(d["layer"], d[col], color=style.kind_color(kind), marker=".", ms=4, lw=1.3, label=kind)
            for fr, ks in full.items():
                # Kinds sharing a full rank share one line, drawn in their colour when alone.
                color = style.kind_color(ks[0]) if len(ks) == 1 else "0.3"
                ax.axhline(fr, color=color, ls="--", lw=0.9, alpha=0.8)
                ax.annotate(
                    f"full rank {fr:,} ({', '.join(ks)})",
                    (1.0, fr),
                    xycoords=("axes fraction", "data"),
                    xytext=(-2, 2),
                    textcoords="offset points",
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color=color,
                )
            ax.set_title(f"rank at {style.pct(e)} error (stacked heads)")
            ax.set_xlabel("layer")
            _layer_ticks(ax, analysis.layers)
        axes[0].set_ylabel(RANK_UNIT)
        axes[0].set_ylim(bottom=0)
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="stacked")
        _suptitle(
            fig,
            style.title(
                analysis,
                "Layer-wise effective rank of stacked attention matrices",
                "rank at " + " / ".join(style.pct(e) for e in errors) + " error",
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
        fig = style.new_figure(max(5.5, min(14.0, 0.06 * len(frame) + 4)), 4.0, dpi)
        ax = fig.subplots()
        medians = _draw_headwise(ax, frame, present, d_v)
        ax.set_xlabel(f"head, sorted by {'VO' if 'VO' in present else present[0]} rank (of {len(frame)})")
        ax.set_ylabel(f"{RANK_UNIT}, at {style.pct(error)} error")
        ax.set_ylim(bottom=0)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="per head")
        _suptitle(
            fig,
            style.title(analysis, f"Head-wise rank of V, O and VO, layer {layer}", f"rank at {style.pct(error)} error"),
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
        height = 1.45 * nrows + 1.2
        # Fixed margins: constrained layout costs seconds with 60-odd panels and gains nothing here.
        fig = Figure(figsize=(1.9 * ncols + 1.2, height), dpi=dpi)
        fig.subplots_adjust(
            left=0.06, right=0.99, bottom=0.55 / height + 0.04, top=1 - 0.75 / height, wspace=0.12, hspace=0.35
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
            ax.set_ylabel("rank", fontsize=7)
        axes.flat[0].set_ylim(bottom=0)
        axes.flat[0].set_xlim(-0.5, max(len(f) for f in frames) - 0.5)
        handles = [Line2D([], [], color=style.kind_color(k), lw=1.3, label=k) for k in present]
        handles += [
            Line2D([], [], color="0.3", ls=":", label="median"),
            Line2D([], [], color="0.3", ls="--", label="d_v"),
        ]
        fig.legend(handles=handles, loc="lower center", ncols=len(handles), frameon=False)
        _suptitle(
            fig,
            style.title(
                analysis,
                "Head-wise rank of V, O and VO in every layer (y: number of singular values)",
                f"rank at {style.pct(error)} error",
            ),
        )
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
    """Layer × head maps of per-head rank (default VO and QK)."""
    metrics = _metrics(analysis, metrics, [error])
    present = _require(analysis, metrics, "head", kinds, "the heat maps")
    col = error_column(error)
    data = metrics.loc[
        (metrics["scope"] == "head") & metrics["matrix"].isin(present), ["layer", "head", "matrix", col, "full_rank"]
    ]
    data = data.rename(columns={col: "rank"}).astype({"head": int}).reset_index(drop=True)
    grids = {k: data[data["matrix"] == k].pivot(index="layer", columns="head", values="rank") for k in present}
    with style.plot_style():
        n_heads = max(g.shape[1] for g in grids.values())
        n_layers = max(g.shape[0] for g in grids.values())
        fig = style.new_figure(min(16.0, 2.5 + 0.045 * n_heads) * len(present), min(12.0, 2.0 + 0.12 * n_layers), dpi)
        axes = fig.subplots(1, len(present), squeeze=False)[0]
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
            # Rows are the cached layers, which need not be contiguous: label rows by layer number.
            rows = list(range(0, len(g), max(1, math.ceil(len(g) / 16))))
            ax.set_yticks(rows, [str(g.index[i]) for i in rows])
            ax.grid(False)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"per-head {kind} rank at {style.pct(error)} error")
            fig.colorbar(im, ax=ax, label=f"{kind} {RANK_UNIT}", shrink=0.9)
        _suptitle(fig, style.title(analysis, "Per-head rank, layer × head", f"rank at {style.pct(error)} error"))
    return FigureResult(
        "heatmap",
        "heatmap-head-ranks",
        fig,
        data,
        _missing_note(analysis, "head", kinds, present),
        {"grids": {k: g.to_numpy() for k, g in grids.items()}},
    )


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
            ax.set_ylabel("σ_i / σ_1 (log scale)")
        for ax in list(axes.flat)[len(layers) :]:
            ax.set_visible(False)
        axes.flat[0].legend(title=scope)
        _suptitle(
            fig,
            style.title(
                analysis, f"Normalized singular values of {scope} matrices", f"dots: rank at {style.pct(error)} error"
            ),
        )
    return FigureResult("spectra", "spectra", fig, data, notes)


# --- 6. error at a fixed rank --------------------------------------------------------------------


def error_at_rank(
    analysis,
    rank: int | None = None,
    kinds: Sequence[str] = ERROR_KINDS,
    dpi: float = 100,
) -> FigureResult:
    """Relative Frobenius error of the best rank-r approximation of each stacked kind, per layer.

    By default the kinds that write to the residual stream (O, VO), where r is measured against
    d_model. Kinds whose full rank is at most r are exact at rank r and left out with a note.
    """
    d_model = int(analysis.dims.get("d_model") or 0)
    if rank is None:
        if not d_model:
            raise MissingFigureData(
                f"{analysis.display}: no d_model in the cache manifest to choose a default rank; pass a rank"
            )
        rank = default_error_rank(d_model)
    rank = int(rank)
    rows = []
    for ly in analysis.layers:
        ls = analysis.layer_spectra[ly]
        for kind in kinds:
            s = ls.spectrum(STACKED, kind)
            if s is None:
                continue
            full = int(min(ls.matrix_shape(STACKED, kind) or (len(s),) * 2))
            err = relative_error_at_rank(s, rank)
            rows.append(
                {
                    "layer": ly,
                    "matrix": kind,
                    "rank": rank,
                    "full_rank": full,
                    "rel_error": err,
                    "energy_kept": 1.0 - err**2,
                }
            )
    if not rows:
        raise MissingFigureData(
            f"{analysis.display}: no stacked spectra of {', '.join(kinds)} cached",
            analysis.analyze_command(matrices=",".join(kinds)),
        )
    data = pd.DataFrame(rows)
    present = [k for k in kinds if k in set(data["matrix"])]
    notes = _missing_note(analysis, "stacked", kinds, present)
    exact = sorted(set(data.loc[data["full_rank"] <= rank, "matrix"]), key=list(kinds).index)
    if exact:
        notes.append(
            f"{analysis.display}: {', '.join(exact)} have full rank ≤ r = {rank} (exact at that rank), left out of the error figure"
        )
    data = data[~data["matrix"].isin(exact)].reset_index(drop=True)
    drawn = [k for k in present if k not in exact]
    if not drawn:
        raise MissingFigureData(
            f"{analysis.display}: every cached stacked kind has full rank ≤ r = {rank}; choose a smaller rank"
        )
    with style.plot_style():
        fig = style.new_figure(6.5, 4.0, dpi)
        ax = fig.subplots()
        _mark_mtp(ax, analysis)
        for kind in drawn:
            d = data[data["matrix"] == kind]
            full = int(d["full_rank"].iloc[0])
            ax.plot(
                d["layer"],
                d["rel_error"] * 100,
                color=style.kind_color(kind),
                marker=".",
                ms=4,
                lw=1.3,
                label=f"{kind} (full rank {full:,})",
            )
        ax.set_xlabel("layer")
        ax.set_ylabel("relative error ‖A − A_r‖_F / ‖A‖_F (%)")
        ax.set_ylim(bottom=0)
        _layer_ticks(ax, analysis.layers)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="stacked")
        width = f" of {d_model:,}" if d_model else ""
        _suptitle(
            fig,
            style.title(analysis, "Error of the best fixed-rank approximation, per layer", f"rank r = {rank:,}{width}"),
        )
    return FigureResult("error", f"error-at-rank-{rank}", fig, data, notes, {"rank": rank})


# --- 7. shared-output-latent planner -------------------------------------------------------------


def planner_figure(analysis, latent: int | None = None, dpi: float = 100) -> FigureResult:
    """Energy of stacked O and VO kept at rank D per layer, and cost/energy against D."""
    plan = plan_latent(analysis, latent)
    t, sweep = plan.table, plan.sweep
    D = plan.latent
    with style.plot_style():
        fig = style.new_figure(11.0, 4.2, dpi)
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
        _layer_ticks(ax1, analysis.layers)
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
        ax2.axhline(100, color="0.5", lw=0.6)
        ax2.axvline(D, color="0.2", lw=1.0, label=f"D = {D:,} ({plan.param_change * 100:+.1f}% weights)")
        ax2.axvline(plan.break_even, color="0.2", lw=1.0, ls="--", label=f"break-even D = {plan.break_even:,.0f}")
        ax2.set_xlabel("shared latent width D (dimensions)")
        ax2.set_ylabel("% (of direct projection's weights / of energy)")
        ax2.set_title("Cost and energy kept against D")
        ax2.legend(fontsize=7, loc="lower right")
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
    """Several models on shared axes: rank against layer, and fraction of full rank against depth.

    Depth is layer / (layers − 1) so that models of different depth line up; the fraction of
    full rank puts models of different widths on one scale.
    """
    metrics = list(metrics) if metrics is not None else [None] * len(analyses)
    col = error_column(error)
    rows, notes = [], []
    for a, m in zip(analyses, metrics, strict=False):
        m = _metrics(a, m, [error])
        present = _present(m, "stacked", kinds)
        notes += _missing_note(a, "stacked", kinds, present)
        d = m.loc[(m["scope"] == "stacked") & m["matrix"].isin(present), ["layer", "matrix", "full_rank", col]].rename(
            columns={col: "rank"}
        )
        n_layers = int(a.dims.get("num_layers") or (max(a.layers) + 1))
        d.insert(0, "model", a.display)
        d["depth"] = d["layer"] / max(1, n_layers - 1)
        d["fraction_of_full_rank"] = d["rank"] / d["full_rank"]
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
                ax2.plot(d["depth"], d["fraction_of_full_rank"] * 100, **kw)
        ax1.set_xlabel("layer")
        ax1.set_ylabel(f"{RANK_UNIT}, at {style.pct(error)} error")
        ax1.set_ylim(bottom=0)
        ax1.set_title("Rank of stacked matrices")
        ax2.set_xlabel("relative depth: layer / (layers − 1)")
        ax2.set_ylabel("rank / full rank (%)")
        ax2.set_ylim(0, 105)
        ax2.set_title("Fraction of full rank")
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
                f"rank at {style.pct(error)} error",
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
    "planner_figure",
    "rank_heatmaps",
    "spectra",
]
