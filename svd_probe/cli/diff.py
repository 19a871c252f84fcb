"""`diff`: options here, work in `svd_probe.diff`."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from svd_probe.cli.app import (
    CacheDirOpt,
    ConcurrencyOpt,
    DeviceOpt,
    EndpointOpt,
    FoldOpt,
    ForceOpt,
    LayerNormFold,
    LayerNormFoldOpt,
    RevisionOpt,
    TokenOpt,
    app,
    err,
    out,
    print_json,
)

TunedRevisionOpt = typer.Option(
    "main", "--tuned-revision", help="Branch, tag or commit of TUNED; pinned to the commit it resolves to."
)

# The summary's columns: stacked delta ranks at 1% energy error, and the median per-head
# relative delta norm ‖ΔW_h‖_F / ‖W_h‖_F of the fused kinds.
_RANK_KINDS = ("O", "VO", "QK")
_NORM_KINDS = ("VO", "QK")


@app.command("diff")
def diff_cmd(
    base: str = typer.Argument(
        ..., metavar="BASE", help="The checkpoint tuned from: alias, Hub repo id or local folder."
    ),
    tuned: str = typer.Argument(..., metavar="TUNED", help="The tuned checkpoint, of the same architecture as BASE."),
    revision: str = RevisionOpt,
    tuned_revision: str = TunedRevisionOpt,
    token: str | None = TokenOpt,
    endpoint: str | None = EndpointOpt,
    cache_dir: Path | None = CacheDirOpt,
    layers: str | None = typer.Option(
        None, "--layers", help="Layers to diff, e.g. 0-3,10,60 (default: all).", show_default=False
    ),
    matrices: str | None = typer.Option(
        None,
        "--matrices",
        help="Matrix kinds, comma-separated, from Q,Q_pe,K,V,O,VO,QK,KQ,QA,KVA,KVA_pe (default: all the model has).",
        show_default=False,
    ),
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = typer.Option(
        True,
        "--normalize-stacked/--no-normalize-stacked",
        help="Divide each head's delta by the BASE head's largest σ before stacking heads.",
    ),
    layernorm_fold: LayerNormFold = LayerNormFoldOpt,
    mtp: bool = typer.Option(True, "--mtp/--no-mtp", help="Include multi-token-prediction layers held by both."),
    device: str = DeviceOpt,
    force: bool = ForceOpt,
    concurrency: int = ConcurrencyOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
) -> None:
    """Spectra of the weight difference TUNED − BASE, layer by layer: per head, stacked, per layer.

    Each checkpoint is streamed once, attention tensors only; VO and QK deltas come through factors.

    Cached like `analyze` (Ctrl-C keeps finished layers); read by `export/plot BASE --diff TUNED`.
    """
    from svd_probe.cli.analysis import print_notes, show_progress
    from svd_probe.diff import DiffJob, diff
    from svd_probe.report import layer_progress

    job = DiffJob(
        base=base,
        tuned=tuned,
        base_revision=revision,
        tuned_revision=tuned_revision,
        token=token,
        endpoint=endpoint,
        cache_dir=cache_dir,
        layers=layers,
        matrices=matrices,
        fold_norms=fold_norms,
        normalize_stacked=normalize_stacked,
        layernorm_fold=layernorm_fold.value,
        include_mtp=mtp,
        device=device,
        force=force,
        concurrency=concurrency,
    )
    with layer_progress(err, enabled=show_progress()) as progress:
        outcome = diff(job, progress=progress)
    print_notes(outcome.notes)
    rows = diff_summary_rows(outcome.analysis)
    a = outcome.analysis
    if as_json:
        print_json(
            {
                "model": a.display,
                "base": {"model": a.base_display, "commit": a.commit},
                "tuned": {"model": a.tuned_display, "commit": a.tuned_commit},
                "cache": str(a.cache_dir),
                "layers": rows,
                "stats": outcome.stats,
                "notes": outcome.notes,
            }
        )
        return
    out.print(render_diff_summary(outcome, rows))


def diff_summary_rows(analysis) -> list[dict]:
    """Per layer: stacked delta ranks at 1% of O, VO, QK, and the median per-head ‖ΔW‖/‖W‖ of VO, QK."""
    df = analysis.metrics()
    rows = []
    for layer in analysis.layers:
        at = df[df["layer"] == layer]
        row: dict = {"layer": layer}
        for kind in _RANK_KINDS:
            hit = at[(at["scope"] == "stacked") & (at["matrix"] == kind)]
            if len(hit):
                row[f"{kind}_rank_1pct"] = int(hit["rank_1pct"].iloc[0])
                row[f"{kind}_full_rank"] = int(hit["full_rank"].iloc[0])
        for kind in _NORM_KINDS:
            hit = at[(at["scope"] == "head") & (at["matrix"] == kind)]["rel_delta_norm"].dropna()
            if len(hit):
                row[f"head_{kind}_median_rel_delta"] = float(hit.median())
        rows.append(row)
    return rows


def render_diff_summary(outcome, rows: list[dict]) -> Table:
    from svd_probe.report import terminal_text

    a = outcome.analysis
    table = Table(  # the names are the manifest's: text, never markup
        title=terminal_text(f"{a.display} ({a.commit[:8]}..{a.tuned_commit[:8]})  ·  delta ranks at 1% energy error"),
        title_justify="left",
    )
    table.add_column("layer", justify="right")
    for kind in _RANK_KINDS:
        table.add_column(f"Δ{kind} 1%", justify="right")
    table.add_column("full", justify="right")
    for kind in _NORM_KINDS:
        table.add_column(f"‖Δ{kind}‖/‖{kind}‖ med", justify="right")

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3g}"
        return str(value)

    for row in rows:
        full = next((row[f"{k}_full_rank"] for k in _RANK_KINDS if f"{k}_full_rank" in row), None)
        table.add_row(
            str(row["layer"]),
            *(cell(row.get(f"{k}_rank_1pct")) for k in _RANK_KINDS),
            cell(full),
            *(cell(row.get(f"head_{k}_median_rel_delta")) for k in _NORM_KINDS),
        )
    s = outcome.stats
    table.caption = terminal_text(
        f"{s['computed']} layers computed, {s['from_cache']} from cache · {s['bytes_fetched'] / 1e6:,.1f} MB fetched "
        f"from both · {s['seconds']:.1f} s on {s['device']} · cache {a.cache_dir}"
    )
    table.caption_justify = "left"
    return table
