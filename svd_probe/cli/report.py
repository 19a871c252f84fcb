"""`report`: one self-contained HTML page of cached analyses; options here, work in
`svd_probe.html_report`."""

from __future__ import annotations

from pathlib import Path

import typer

from svd_probe.cli.analysis import cache_query, print_notes
from svd_probe.cli.app import (
    CacheDirOpt,
    FoldOpt,
    HeadLayerOpt,
    LatentOpt,
    LayerNormFold,
    LayerNormFoldOpt,
    NormStackedOpt,
    RankOpt,
    RevisionOpt,
    app,
    err,
    out,
    plural,
    print_text,
)
from svd_probe.html_report import DEFAULT_DPI, MAX_HEAD_ROWS


@app.command("report")
def report_cmd(
    models: list[str] = typer.Argument(
        ...,
        help="Cached models (alias, Hub repo id or local folder, as given to `analyze`); several add a comparison.",
    ),
    out_file: Path = typer.Option(..., "--out", help="HTML file to write (an existing file only with --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out file if it exists."),
    revision: str = RevisionOpt,
    cache_dir: Path | None = CacheDirOpt,
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    layernorm_fold: LayerNormFold = LayerNormFoldOpt,
    kind: list[str] | None = typer.Option(
        None,
        "--kind",
        help="Figures to embed, as `svd-probe plot --kind` (default: all); repeat or comma-separate.",
        show_default=False,
    ),
    layer: int | None = HeadLayerOpt,
    latent: int | None = LatentOpt,
    rank: int | None = RankOpt,
    dpi: int = typer.Option(DEFAULT_DPI, "--dpi", min=10, max=1200, help="Resolution of the embedded PNG figures."),
    max_head_rows: int = typer.Option(
        MAX_HEAD_ROWS,
        "--max-head-rows",
        min=0,
        help="Per-head metrics rows a model may list on the page; beyond it they are only summarized (median, min, max).",
    ),
) -> None:
    """Write one self-contained HTML page: figures, summary, metrics, planner and provenance (offline)."""
    from svd_probe.html_report import write_html_report

    queries = [cache_query(m, revision, cache_dir, fold_norms, normalize_stacked, layernorm_fold) for m in models]
    with err.status("drawing figures and tables…", spinner="dots") if err.is_terminal else _nothing():
        page = write_html_report(
            queries,
            out_file,
            overwrite=overwrite,
            kinds=kind,
            layer=layer,
            latent=latent,
            rank=rank,
            dpi=dpi,
            max_head_rows=max_head_rows,
        )

    print_notes(page.notes)
    # The --out path is the user's text, never console markup (`[/]` in it ended in MarkupError).
    n_figures, n_models = plural(page.images, "figure", "figures"), plural(len(page.models), "model", "models")
    print_text(out, f"wrote {out_file} ({page.size / 1e6:,.2f} MB, {n_figures}, {n_models})")


def _nothing():
    import contextlib

    return contextlib.nullcontext()
