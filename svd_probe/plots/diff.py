"""Figures of a cached diff TUNED − BASE (`svd-probe plot BASE --diff TUNED`), from the cache alone.

- `delta-rank`: the rank at 1% energy error (`--error`) of each delta, per layer: one line per
  stacked and layer kind, and beside it the median over heads of the per-head delta ranks.
- `delta-norm`: ‖ΔW_h‖_F / ‖W_h‖_F per head, a layer × head heat map per head kind (K and V per
  key/value group): which heads the tuning moved, and by how much relative to their size.

Each function returns a `FigureResult` whose data is what it drew, as `plots.figures` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from svd_probe.errors import BadOptionError, MissingFigureData
from svd_probe.kinds import HEAD, LAYER, STACKED
from svd_probe.options import parse_choices
from svd_probe.plots import style
from svd_probe.plots.figures import RANK_UNIT, FigureResult, _integer_ticks, _kind_cmap, _mark_mtp, _suptitle
from svd_probe.plots.output import PlotOutput
from svd_probe.plots.render import DEFAULT_OUT_ROOT, FORMATS, PlotReport, queue_figure
from svd_probe.spectra.metrics import DEFAULT_ERRORS, error_column

DIFF_FIGURE_KINDS = ("delta-rank", "delta-norm")
DELTA_RANK_KINDS = ("O", "VO", "Q", "K", "V", "QK", "QA", "KVA")
DELTA_HEAD_KINDS = ("O", "VO", "V", "QK")
DELTA_NORM_KINDS = ("Q", "K", "V", "O", "VO", "QK")


def _title(diff, what: str, threshold: str | None = None) -> str:
    def side(name: str, revision: str, commit: str) -> str:
        rev = commit[:8] if revision == commit else f"{revision} @ {commit[:8]}"
        return f"{name} ({rev})"

    o = diff.options
    opts = (
        ("norms folded" if o.fold_norms else "norms not folded")
        + ", "
        + ("head deltas ÷ base head σ₁ before stacking" if o.normalize_stacked else "raw head deltas stacked")
    )
    lines = [
        what + (f" — {threshold}" if threshold else ""),
        f"{side(diff.tuned_display, diff.tuned_query.revision, diff.tuned_commit)} − "
        f"{side(diff.base_display, diff.revision, diff.commit)}; {opts}",
    ]
    return "\n".join(lines)


def _metrics(diff, metrics: pd.DataFrame | None, error: float) -> pd.DataFrame:
    if metrics is None or error_column(error) not in metrics.columns or "rel_delta_norm" not in metrics.columns:
        metrics = diff.metrics(errors=tuple(sorted({error, *DEFAULT_ERRORS}, reverse=True)))
    return metrics


def _kinds_in(metrics: pd.DataFrame, scopes: Iterable[str], kinds: Sequence[str]) -> list[str]:
    if metrics.empty:
        return []
    have = set(metrics.loc[metrics["scope"].isin(list(scopes)), "matrix"])
    return [k for k in kinds if k in have]


def delta_ranks(
    diff,
    metrics: pd.DataFrame | None = None,
    error: float = 0.01,
    kinds: Sequence[str] = DELTA_RANK_KINDS,
    head_kinds: Sequence[str] = DELTA_HEAD_KINDS,
    dpi: float = 100,
) -> FigureResult:
    """Rank at `error` energy error of each stacked / layer delta against layer, and the median
    per-head delta rank against layer.

    Returns a `FigureResult` whose data has one row per (layer, scope, matrix): `rank` (for head
    scope, the median over heads) and `full_rank`.
    """
    metrics = _metrics(diff, metrics, error)
    col = error_column(error)
    whole = _kinds_in(metrics, (STACKED, LAYER), kinds)
    heads = _kinds_in(metrics, (HEAD,), head_kinds)
    if not whole and not heads:
        raise MissingFigureData(
            f"{diff.display}: no delta spectra of {', '.join(kinds)} cached, needed for the delta-rank figure",
            diff.analyze_command(matrices=",".join(k for k in kinds if k not in ("QA", "KVA"))),
        )
    sel = metrics["scope"].isin([STACKED, LAYER]) & metrics["matrix"].isin(whole)
    rows = metrics.loc[sel, ["layer", "scope", "matrix", col, "full_rank"]].rename(columns={col: "rank"})
    per_head = metrics[(metrics["scope"] == HEAD) & metrics["matrix"].isin(heads)]
    medians = (
        per_head.groupby(["layer", "matrix"], sort=False)
        .agg(rank=(col, "median"), full_rank=("full_rank", "max"))
        .reset_index()
        .assign(scope=HEAD)
    )
    data = pd.concat([rows, medians[["layer", "scope", "matrix", "rank", "full_rank"]]], ignore_index=True)
    data = data.sort_values(["scope", "matrix", "layer"], kind="stable").reset_index(drop=True)
    panels = [(p, k) for p, k in (("whole", whole), ("head", heads)) if k]
    with style.plot_style():
        fig = style.new_figure(5.0 * len(panels), 4.2, dpi)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (panel, present) in zip(axes, panels, strict=True):
            _mark_mtp(ax, diff)
            scopes = [STACKED, LAYER] if panel == "whole" else [HEAD]
            for kind in present:
                d = data[data["scope"].isin(scopes) & (data["matrix"] == kind)]
                ax.plot(d["layer"], d["rank"], color=style.kind_color(kind), marker=".", ms=4, lw=1.3, label=kind)
            ax.set_title(
                f"rank of the delta at {style.pct(error)} error ("
                + ("stacked heads; layer matrices" if panel == "whole" else "median over heads")
                + ")"
            )
            ax.set_xlabel("layer")
            ax.set_ylabel(RANK_UNIT)
            ax.set_ylim(bottom=0)
            _integer_ticks(ax)
            ax.legend(loc="best", title="Δ stacked / layer" if panel == "whole" else "Δ per head")
        _suptitle(fig, _title(diff, "Rank of the weight difference per layer", f"rank at {style.pct(error)} error"))
    notes = []
    missing = [k for k in kinds if k not in whole and k not in ("QA", "KVA")]
    if missing and whole:
        notes.append(f"{diff.display}: no stacked {', '.join(missing)} deltas cached, left out")
    return FigureResult("delta-rank", "delta-rank", fig, data, notes)


def delta_norms(
    diff,
    metrics: pd.DataFrame | None = None,
    kinds: Sequence[str] = DELTA_NORM_KINDS,
    dpi: float = 100,
) -> FigureResult:
    """Layer × head maps of ‖ΔW_h‖_F / ‖W_h‖_F, one per head kind (K and V: per key/value group).

    Returns a `FigureResult` whose data has one row per (layer, matrix, head): `rel_delta_norm`,
    `frobenius` (‖ΔW_h‖_F) and `base_frobenius` (‖W_h‖_F), and `extra["grids"]`, the arrays drawn.
    """
    metrics = _metrics(diff, metrics, 0.01)
    present = _kinds_in(metrics, (HEAD,), kinds)
    if not present:
        raise MissingFigureData(
            f"{diff.display}: no per-head delta spectra of {', '.join(kinds)} cached, needed for the delta-norm figure",
            diff.analyze_command(matrices=",".join(kinds)),
        )
    data = metrics.loc[
        (metrics["scope"] == HEAD) & metrics["matrix"].isin(present),
        ["layer", "matrix", "head", "rel_delta_norm", "frobenius", "base_frobenius"],
    ]
    data = data.astype({"head": int}).reset_index(drop=True)
    grids = {
        k: data[data["matrix"] == k].pivot(index="layer", columns="head", values="rel_delta_norm") for k in present
    }
    with style.plot_style():
        n_heads = max(g.shape[1] for g in grids.values())
        n_layers = max(g.shape[0] for g in grids.values())
        ncols = min(3, len(present))
        nrows = math.ceil(len(present) / ncols)
        width = min(16.0, 2.5 + 0.045 * n_heads) * ncols
        fig = style.new_figure(min(width, 30.0), min(12.0, 2.0 + 0.12 * n_layers) * nrows, dpi)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, kind in zip(axes.flat, present, strict=False):
            g = grids[kind]
            values = g.to_numpy(dtype=float)
            top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
            im = ax.imshow(
                values,
                aspect="auto",
                interpolation="nearest",
                cmap=_kind_cmap(kind),
                vmin=0,
                vmax=top if top > 0 else 1.0,
                extent=(-0.5, g.shape[1] - 0.5, len(g) - 0.5, -0.5),
            )
            rows = list(range(0, len(g), max(1, math.ceil(len(g) / 16))))
            ax.set_yticks(rows, [str(g.index[i]) for i in rows])
            ax.grid(False)
            ax.set_xlabel("key/value group" if kind in ("K", "V") and g.shape[1] < n_heads else "head")
            ax.set_ylabel("layer")
            ax.set_title(f"‖Δ{kind}_h‖_F / ‖{kind}_h‖_F")
            fig.colorbar(im, ax=ax, label="relative delta norm", shrink=0.9)
        for ax in list(axes.flat)[len(present) :]:
            ax.set_visible(False)
        _suptitle(fig, _title(diff, "Relative size of the weight difference per head, layer × head"))
    missing = [k for k in kinds if k not in present]
    notes = [f"{diff.display}: no per-head {', '.join(missing)} deltas cached, left out"] if missing else []
    return FigureResult(
        "delta-norm", "delta-norm-heads", fig, data, notes, {"grids": {k: g.to_numpy() for k, g in grids.items()}}
    )


def diff_slug(diff) -> str:
    """The default folder name of a diff's figures: `<base>--diff--<tuned>`."""
    tuned = type("Named", (), {"ref": diff.tuned_ref})()  # model_slug reads a `.ref`
    return f"{style.model_slug(diff)}--diff--{style.model_slug(tuned)}"


def make_diff_plots(
    base,
    tuned,
    out_dir: str | Path | None = None,
    formats: Sequence[str] | str = ("png",),
    kinds: Iterable[str] | str | None = None,
    *,
    error: float = 0.01,
    dpi: float = 150,
    write_data: bool = False,
    keep_figures: bool = False,
    overwrite: bool = False,
) -> PlotReport:
    """Draw the figures of a cached diff TUNED − BASE and write them (`make_plots(..., diff=TUNED)`).

    Args:
        base: BASE as a `CacheQuery` or model name (its revision, cache folder and options are
            the diff's), or a loaded `DiffAnalysis` (then `tuned` is ignored).
        tuned: TUNED as a model name or `CacheQuery` (its model and revision).
        out_dir: the folder (default `plots/<base>--diff--<tuned>/`).
        formats: png, svg and/or pdf.
        kinds: from DIFF_FIGURE_KINDS (default: both).
        error: the energy error of the delta-rank figure.
        dpi, write_data, keep_figures, overwrite: as `make_plots`.

    Returns:
        A `PlotReport`.

    Example:
        >>> make_diff_plots(CacheQuery("deepseek-v3-base", cache_dir="cache"), "deepseek-r1").files
    """
    from svd_probe.diff import DiffAnalysis, load_diff

    formats = parse_choices(formats, FORMATS, "format")
    kinds = parse_choices(kinds, DIFF_FIGURE_KINDS, "diff figure kind")
    if not 0 < error < 1:
        raise BadOptionError(f"error threshold must be in (0, 1), got {error}")
    diff = base if isinstance(base, DiffAnalysis) else load_diff(base, tuned, on_damaged="skip")
    folder = Path(out_dir) if out_dir else DEFAULT_OUT_ROOT / diff_slug(diff)
    report = PlotReport(out_dirs={diff_slug(diff): folder})
    report.notes += diff.notes
    metrics = diff.metrics(errors=tuple(sorted({error, *DEFAULT_ERRORS}, reverse=True)))
    output = PlotOutput(overwrite)
    draw = {
        "delta-rank": lambda: delta_ranks(diff, metrics, error=error, dpi=dpi),
        "delta-norm": lambda: delta_norms(diff, metrics, dpi=dpi),
    }
    for kind in kinds:
        try:
            result = draw[kind]()
        except MissingFigureData as e:
            report.notes.append(f"skipped {kind}: {e}")
            continue
        result.extra["model"] = diff.display
        queue_figure(output, result, folder, formats, dpi, write_data)
        report.notes += result.notes
        report.results.append(result)
    report.files = output.write_all()
    if not keep_figures:
        for r in report.results:
            r.figure = None
    return report
