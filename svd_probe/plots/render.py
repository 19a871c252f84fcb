"""`make_plots`: load cached analyses, draw the selected figures, write them to disk.

Everything is read from the cache, so this works offline. A model that is not cached at all
raises `CacheMissError` (from `load_analysis`) before anything is drawn; a figure whose spectra
are missing is skipped with a note that names the `analyze` command that would add them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from svd_probe.errors import BadOptionError
from svd_probe.options import parse_choices
from svd_probe.plots import figures
from svd_probe.plots.kv_planner import DEFAULT_ENERGY, DEFAULT_KV_DTYPE, KVPlan, kv_planner_figure
from svd_probe.plots.output import PlotOutput
from svd_probe.plots.planner import PlannerResult
from svd_probe.plots.style import model_slug, plot_style
from svd_probe.results import Analysis, CacheQuery, load_analysis

# `--kind` names, in drawing order. `compare` needs two models or more; `alignment` a cached
# `svd-probe align` run (drawn by default only when there is one).
FIGURE_KINDS = (
    "layerwise",
    "headwise",
    "grid",
    "heatmap",
    "spectra",
    "error",
    "planner",
    "kv-planner",
    "alignment",
    "compare",
)
FORMATS = ("png", "svg", "pdf")
DEFAULT_OUT_ROOT = Path("plots")


@dataclass
class PlotReport:
    """What `make_plots` did: files written, figures skipped (with why), the data drawn."""

    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: list[figures.FigureResult] = field(default_factory=list)
    plans: list[PlannerResult] = field(default_factory=list)
    kv_plans: list[KVPlan] = field(default_factory=list)
    out_dirs: dict[str, Path] = field(default_factory=dict)

    def result(self, kind: str, model: str | None = None) -> figures.FigureResult:
        """The first drawn figure of a kind (of one model, by display name), for tests and notebooks."""
        for r in self.results:
            if r.kind == kind and (model is None or r.extra.get("model") == model):
                return r
        raise KeyError(kind)


def output_dirs(analyses: Sequence, out_dir: str | Path | None) -> tuple[dict[str, Path], Path | None]:
    """Per-model folders and the comparison folder.

    One model: `--out DIR` itself, default `plots/<model>/`. Several: `DIR/<model>/` for each
    and `DIR/` for the comparison, default `plots/<model>/` and `plots/compare-<a>-vs-<b>/`.
    """
    slugs = [model_slug(a) for a in analyses]
    # One folder per model: two models of one name (two local folders `ck`, a model named twice)
    # shared it, and the second one's figures were silently not drawn.
    for i, slug in enumerate(slugs):
        if slug in slugs[:i]:
            raise BadOptionError(
                f"{getattr(analyses[i], 'display', slug)} is named twice (or two models share the name {slug!r})",
                "Name each model once; to compare two folders of one name, rename one of them.",
            )
    if len(analyses) == 1:
        return {slugs[0]: Path(out_dir) if out_dir else DEFAULT_OUT_ROOT / slugs[0]}, None
    root = Path(out_dir) if out_dir else DEFAULT_OUT_ROOT
    compare_dir = Path(out_dir) if out_dir else DEFAULT_OUT_ROOT / ("compare-" + "-vs-".join(slugs))
    return {s: root / s for s in slugs}, compare_dir


def queue_figure(
    output: PlotOutput, result: figures.FigureResult, folder: Path, formats: Sequence[str], dpi: float, write_data: bool
) -> list[Path]:
    """Queue `result`'s files in `output` (one per format, and its data as CSV with
    `write_data`): written by `output.write_all()`, after every path has been checked."""
    fig = result.figure
    if fig is None:
        raise ValueError(f"the {result.kind} figure was already closed")
    paths = []
    for fmt in formats:
        # No creation date in vector files, so rerunning on the same cache gives the same bytes.
        meta = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else None

        def save(tmp: str, fmt: str = fmt, meta: dict | None = meta) -> None:
            with plot_style():  # savefig.* and svg.* settings are read when saving, not drawing
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)

        paths.append(output.add(folder / f"{result.stem}.{fmt}", save))
    if write_data:
        paths.append(output.add(folder / f"{result.stem}.csv", _csv_writer(result.data)))
    return paths


def _csv_writer(table) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        table.to_csv(tmp, index=False)

    return write


def make_plots(
    models: Sequence[CacheQuery | Analysis | str],
    out_dir: str | Path | None = None,
    formats: Sequence[str] | str = ("png",),
    kinds: Iterable[str] | str | None = None,
    layer: int | None = None,
    latent: int | None = None,
    rank: int | None = None,
    *,
    error: float = 0.01,
    spectra_layers: Sequence[int] | None = None,
    spectra_kinds: Sequence[str] | None = None,
    dpi: float = 150,
    write_data: bool = False,
    keep_figures: bool = False,
    energy: float = DEFAULT_ENERGY,
    kv_dtype: str = DEFAULT_KV_DTYPE,
    diff: CacheQuery | str | None = None,
    overwrite: bool = False,
) -> PlotReport:
    """Draw the selected figures of one or more cached models and write them to disk.

    Args:
        models: `CacheQuery`s (model, revision, cache folder, options), MODEL names (alias, repo
            id, local folder: the default revision, cache and options), or loaded `Analysis` objects.
        out_dir: see `output_dirs`.
        formats: png, svg and/or pdf.
        kinds: figures from FIGURE_KINDS (default: all; `compare` only with several models).
        layer: the head-wise figure's layer (default: the middle cached layer).
        latent: the planner's D (default `planner.default_latent`: 3072 for DeepSeek-V3).
        rank: the fixed rank of the error figure (default 4/7 of the largest possible rank; 4096 for DeepSeek-V3).
        error: the energy-error threshold of the head-wise, grid, heat-map and comparison figures.
        spectra_layers, spectra_kinds: what the spectra figure draws (`options.parse_layers`,
            `options.parse_matrices(..., scope="stacked")`).
        dpi: resolution of png files.
        write_data: also write every figure's data as CSV beside it (the planner's always is).
        keep_figures: keep the matplotlib Figures in the report (closed after saving otherwise).
        energy, kv_dtype: the kv-planner's energy kept (0.99) and KV-cache dtype (bf16, fp16, fp8, fp32).
        diff: TUNED: draw the figures of the cached diff TUNED − models[0] instead
            (`svd_probe.plots.diff.make_diff_plots`; kinds from its DIFF_FIGURE_KINDS).
        overwrite: replace files in the output folders that plot did not write (or that changed
            since it did); without it those raise OutputExistsError before anything is written
            (`svd_probe.plots.output`). Files plot wrote there before are replaced either way.

    Returns:
        A `PlotReport`: files written, notes (figures skipped and why, damaged layers left out),
        the data drawn.

    Example:
        >>> make_plots([CacheQuery("deepseek-v3", cache_dir="cache")], kinds="layerwise,planner").files
    """
    if not models:
        raise BadOptionError("no model given", "Name at least one cached model, e.g. `svd-probe plot deepseek-v3`.")
    if diff is not None:
        from svd_probe.plots.diff import make_diff_plots

        if len(models) != 1:
            raise BadOptionError("--diff takes one BASE model", "Run e.g. `svd-probe plot BASE --diff TUNED`.")
        return make_diff_plots(
            models[0],
            diff,
            out_dir,
            formats,
            kinds,
            error=error,
            dpi=dpi,
            write_data=write_data,
            keep_figures=keep_figures,
            overwrite=overwrite,
        )
    formats = parse_choices(formats, FORMATS, "format")
    kinds_asked = kinds is not None and parse_choices(kinds, FIGURE_KINDS, "figure kind") != list(FIGURE_KINDS)
    kinds = parse_choices(kinds, FIGURE_KINDS, "figure kind")
    if error <= 0 or error >= 1:
        raise BadOptionError(f"error threshold must be in (0, 1), got {error}")
    # A damaged layer file is left out with a note: the figure shows which layers it has.
    analyses = [m if isinstance(m, Analysis) else load_analysis(m, on_damaged="skip") for m in models]
    for a in analyses:
        n_layers = a.dims.get("num_layers")
        if layer is not None and n_layers and not 0 <= layer < n_layers:
            raise BadOptionError(f"--layer {layer}: {a.display} has layers 0-{n_layers - 1}")
    dirs, compare_dir = output_dirs(analyses, out_dir)
    report = PlotReport(out_dirs=dict(dirs))
    report.notes += [note for a in analyses for note in a.notes]
    errors = tuple(sorted({0.01, 0.001, error}, reverse=True))

    output = PlotOutput(overwrite)

    def emit(result: figures.FigureResult, folder: Path, model: str | None) -> None:
        result.extra["model"] = model
        queue_figure(output, result, folder, formats, dpi, write_data)
        report.notes += result.notes
        report.results.append(result)

    all_metrics = []
    for a, folder in zip(analyses, dirs.values(), strict=False):
        metrics = a.metrics(errors=errors)
        # Kept only for the comparison figure: a big model's table is tens of thousands of rows.
        all_metrics.append(metrics if "compare" in kinds and len(analyses) > 1 else None)
        draw = {
            "layerwise": lambda: figures.layerwise_ranks(a, metrics, dpi=dpi),
            "headwise": lambda: figures.headwise_ranks(a, layer, metrics, error=error, dpi=dpi),
            "grid": lambda: figures.headwise_grid(a, metrics, error=error, dpi=dpi),
            "heatmap": lambda: figures.rank_heatmaps(a, metrics, error=error, dpi=dpi),
            "spectra": lambda: figures.spectra(
                a, spectra_layers, spectra_kinds or figures.SPECTRA_KINDS, error=error, dpi=dpi
            ),
            "error": lambda: figures.error_at_rank(a, rank, dpi=dpi),
            "planner": lambda: figures.planner_figure(a, latent, dpi=dpi),
            "kv-planner": lambda: kv_planner_figure(a, energy, kv_dtype, dpi=dpi),
            "alignment": lambda: _alignment_figure(a, layer, dpi),
        }
        for kind in kinds:
            if kind not in draw:
                continue
            try:
                result = draw[kind]()
            except figures.MissingFigureData as e:
                if kind != "alignment" or kinds_asked:
                    report.notes.append(f"skipped {kind}: {e}")
                continue
            emit(result, folder, a.display)
            if kind == "planner":
                plan = result.extra["plan"]
                report.plans.append(plan)
                output.add(folder / f"planner-D{plan.latent}.csv", _csv_writer(plan.to_csv_frame()))
            if kind == "kv-planner":
                report.kv_plans.append(result.extra["plan"])

    if "compare" in kinds:
        if len(analyses) < 2:
            if kinds_asked:
                report.notes.append("skipped compare: it needs two models or more")
        elif compare_dir is not None:
            try:
                emit(figures.compare_models(analyses, all_metrics, error=error, dpi=dpi), compare_dir, None)
            except figures.MissingFigureData as e:
                report.notes.append(f"skipped compare: {e}")
    report.files = output.write_all()
    if not keep_figures:
        for r in report.results:
            r.figure = None
    return report


def _alignment_figure(analysis: Analysis, layer: int | None, dpi: float) -> figures.FigureResult:
    """The figure of the `svd-probe align` run cached beside this analysis (MissingFigureData if none)."""
    from svd_probe.alignment import load_alignment
    from svd_probe.plots.alignment import alignment_figure

    return alignment_figure(load_alignment(analysis.query), layer=layer, dpi=dpi)
