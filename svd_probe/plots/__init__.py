"""Figures of cached analyses (`svd-probe plot`): drawn from the cache alone, headless.

    >>> from svd_probe.plots import make_plots
    >>> report = make_plots(["deepseek-v3"], kinds=["layerwise", "planner"], latent=3072)
    >>> report = make_plots([CacheQuery("deepseek-v3", revision="v1", cache_dir="cache")])
    >>> report.files, report.notes, report.plans[0].totals()

One function per figure lives in `svd_probe.plots.figures` (each returns the Figure and the data
it draws); the shared-output-latent arithmetic in `svd_probe.plots.planner`; colours and titles
in `svd_probe.plots.style`.
"""

from svd_probe.plots.figures import (
    FigureResult,
    MissingFigureData,
    compare_models,
    default_error_rank,
    error_at_rank,
    headwise_grid,
    headwise_ranks,
    layerwise_ranks,
    planner_figure,
    rank_heatmaps,
    spectra,
)
from svd_probe.plots.planner import (
    PlannerResult,
    break_even_latent,
    default_latent,
    output_params,
    plan_latent,
    planner_rich_table,
)
from svd_probe.plots.render import FIGURE_KINDS, FORMATS, PlotReport, make_plots
from svd_probe.plots.style import KIND_COLORS

__all__ = [
    "FIGURE_KINDS",
    "FORMATS",
    "KIND_COLORS",
    "FigureResult",
    "MissingFigureData",
    "PlannerResult",
    "PlotReport",
    "break_even_latent",
    "compare_models",
    "default_error_rank",
    "default_latent",
    "error_at_rank",
    "headwise_grid",
    "headwise_ranks",
    "layerwise_ranks",
    "make_plots",
    "output_params",
    "plan_latent",
    "planner_figure",
    "planner_rich_table",
    "rank_heatmaps",
    "spectra",
]
