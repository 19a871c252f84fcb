"""The `svd-probe` command line: parse, call the library, report. No work happens here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from svd_probe.errors import SvdProbeError

app = typer.Typer(
    name="svd-probe",
    help="Spectral analysis of attention weights in very large checkpoints, streamed from the Hub, "
    "and a lab that trains MHA, MLA and MLA-o encoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

# Options shared by every command that reads a checkpoint or the cache.
RevisionOpt = typer.Option("main", "--revision", help="Branch, tag or commit to read; pinned to the commit it resolves to.")
TokenOpt = typer.Option(None, "--token", help="Hub token for gated or private repos (default: $HF_TOKEN or `hf auth login`).", show_default=False)
EndpointOpt = typer.Option(None, "--endpoint", help="Hub endpoint or mirror URL (default: $HF_ENDPOINT, else https://huggingface.co).", show_default=False)
CacheDirOpt = typer.Option(None, "--cache-dir", help="Spectra cache folder (default: $SVD_PROBE_CACHE, else the user cache folder).", show_default=False)
FoldOpt = typer.Option(True, "--fold-norms/--no-fold-norms", help="Fold RMSNorm weights into the projections that read them.")
NormStackedOpt = typer.Option(True, "--normalize-stacked/--no-normalize-stacked", help="Divide each head by its largest σ before stacking heads.")


def _print_json(obj) -> None:
    # Plain stdout, not rich: machine output must not be wrapped or coloured.
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command("models")
def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List the model aliases: repo id, heads, layers, attention dtype and analysis download size."""
    from svd_probe.hub.catalog import model_table, render_model_table

    rows = model_table()
    if as_json:
        _print_json(rows)
    else:
        out.print(render_model_table(rows))


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Argument(..., help="Alias (see `svd-probe models`), Hub repo id org/name, or local folder."),
    revision: str = RevisionOpt,
    token: Optional[str] = TokenOpt,
    endpoint: Optional[str] = EndpointOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to analyse, e.g. 0-3,10,60 (default: all).", show_default=False),
    matrices: Optional[str] = typer.Option(
        None, "--matrices", help="Matrix kinds, comma-separated, from Q,Q_pe,K,V,O,VO,QK,KQ,QA,KVA,KVA_pe (default: all the model has).", show_default=False
    ),
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    mtp: bool = typer.Option(True, "--mtp/--no-mtp", help="Include multi-token-prediction layers."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (auto: cuda when available)."),
    force: bool = typer.Option(False, "--force", help="Recompute layers that are already cached."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, max=64, help="HTTP range requests in flight."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
) -> None:
    """Stream a checkpoint's attention layer by layer, compute every spectrum, cache it, summarize."""
    from svd_probe.analysis import AnalyzeRequest, analyze
    from svd_probe.report import analysis_progress, render_summary, summary_rows

    request = AnalyzeRequest(
        model=model,
        revision=revision,
        token=token,
        endpoint=endpoint,
        cache_dir=cache_dir,
        layers=layers,
        matrices=matrices,
        fold_norms=fold_norms,
        normalize_stacked=normalize_stacked,
        include_mtp=mtp,
        device=device,
        force=force,
        concurrency=concurrency,
    )
    # Progress goes to stderr, so it never mixes with --json on stdout.
    with analysis_progress(err, enabled=err.is_terminal or os.environ.get("SVD_PROBE_PROGRESS") == "1") as progress:
        result = analyze(request, progress=progress)
    rows = summary_rows(result)
    if as_json:
        _print_json({"model": result.display, "repo_id": result.repo_id, "commit": result.commit, "cache": str(result.cache_dir), "layers": rows, "stats": result.stats})
    else:
        out.print(render_summary(result, rows))


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Alias, Hub repo id or local folder, as given to `analyze`."),
    format: str = typer.Option("jsonl", "--format", help="jsonl (one spectrum a line), csv or parquet (metrics table)."),
    out_file: Path = typer.Option(..., "--out", help="File to write."),
    revision: str = RevisionOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    at_rank: Optional[int] = typer.Option(None, "--at-rank", help="Also export the relative error at this fixed rank r.", show_default=False),
) -> None:
    """Write cached spectra (jsonl) or their metrics table (csv, parquet); reads the cache only."""
    from svd_probe.export import export

    n = export(model, format=format, out=out_file, revision=revision, cache_dir=cache_dir, fold_norms=fold_norms, normalize_stacked=normalize_stacked, at_rank=at_rank)
    err.print(f"wrote {n} rows to {out_file}")


# ---- plot (issue 4): options here, work in svd_probe.plots -------------------------------------
# PLOT-COMMAND-PLACEHOLDER


# ---- train / compare (issue 5): options here, work in svd_probe.train -------------------------
# TRAIN-COMMAND-PLACEHOLDER


def main() -> None:
    """Console-script entry point: user errors end with a short message and a non-zero exit."""
    try:
        app()
    except SvdProbeError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        if e.hint:
            err.print(f"[dim]hint:[/] {e.hint}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: every finished layer is cached; rerun the same command to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
