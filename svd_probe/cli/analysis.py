"""`models`, `analyze`, `export` and `plot`: options here, work in the library."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import typer

from svd_probe.cli.app import (
    CacheDirOpt,
    ConcurrencyOpt,
    DeviceOpt,
    EndpointOpt,
    FoldOpt,
    ForceOpt,
    HeadLayerOpt,
    LatentOpt,
    LayerNormFold,
    LayerNormFoldOpt,
    NormStackedOpt,
    RankOpt,
    RevisionOpt,
    TokenOpt,
    alert,
    app,
    err,
    out,
    plural,
    print_json,
    print_text,
    quiet,
)


class Control(str, Enum):
    """`--control`: which randomized copy of the weights (`svd_probe.spectra.controls`)."""

    gaussian = "gaussian"
    shuffled = "shuffled"


class Reader(str, Enum):
    """`--reader`: where the HTTP client runs (`svd_probe.hub.reader_process.pick_reader`)."""

    auto = "auto"
    thread = "thread"
    process = "process"


AnalyzeControlOpt = typer.Option(
    None,
    "--control",
    help="Analyze a randomized copy of every projection weight instead: gaussian (i.i.d. normal, same Frobenius "
    "norm) or shuffled (its entries permuted). Norm weights are not randomized. Cached beside the real analysis.",
    show_default=False,
)
ReadControlOpt = typer.Option(
    None,
    "--control",
    help="Read the analysis of this randomized control (`analyze --control`) instead of the real one.",
    show_default=False,
)
DiffOpt = typer.Option(
    None,
    "--diff",
    metavar="TUNED",
    help="Read the diff TUNED − MODEL computed by `svd-probe diff MODEL TUNED` instead of MODEL's analysis.",
    show_default=False,
)
TunedRevisionOpt = typer.Option("main", "--tuned-revision", help="Revision of TUNED for --diff, as given to `diff`.")


@app.command("models")
def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List the model aliases: repo id, heads, layers, attention dtype and analysis download size."""
    from svd_probe.known_models import model_table, render_model_table

    rows = model_table()
    if as_json:
        print_json(rows)
    else:
        out.print(render_model_table(rows, width=out.width))


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="Alias (see `svd-probe models`), Hub repo id org/name, or local folder."
    ),
    revision: str = RevisionOpt,
    token: str | None = TokenOpt,
    endpoint: str | None = EndpointOpt,
    cache_dir: Path | None = CacheDirOpt,
    layers: str | None = typer.Option(
        None, "--layers", help="Layers to analyse, e.g. 0-3,10,60 (default: all).", show_default=False
    ),
    matrices: str | None = typer.Option(
        None,
        "--matrices",
        help="Matrix kinds, comma-separated, from Q,Q_pe,K,V,O,VO,QK,KQ,QA,KVA,KVA_pe,Qjoint,KVjoint "
        "(default: all the model has).",
        show_default=False,
    ),
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    layernorm_fold: LayerNormFold = LayerNormFoldOpt,
    mtp: bool = typer.Option(
        True,
        "--mtp/--no-mtp",
        help="Include multi-token-prediction layers (counted only when the checkpoint holds their tensors).",
    ),
    device: str = DeviceOpt,
    force: bool = ForceOpt,
    concurrency: int = ConcurrencyOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    control: Control | None = AnalyzeControlOpt,
    solver: str = typer.Option(
        "auto",
        "--solver",
        help="Eigensolver of the big stacked problems: auto (on a GPU host of 8 or more cores "
        "band-device from a folder and band-hybrid over HTTP, else torch), torch (cuSOLVER syevd; LAPACK on the CPU), band (two-stage: GPU, "
        "then CPU workers), band-hybrid (band, and the GPU takes problems when it is free), "
        "band-device (every stage on the GPU, Triton kernels; band-hybrid where they cannot run), "
        "torch-gesvdj, or cupy, cupy-jacobi, jax, jax-jacobi, jax-polar with the [solvers] extra. "
        "The same spectra to 1e-4·σ₁; only the speed differs.",
    ),
    reader: Reader = typer.Option(
        Reader.auto,
        "--reader",
        help="Where Hub reads run: thread (in this process), process (a child process, off the GPU "
        "launcher's GIL; Linux), or auto (process with --device cuda, else thread).",
    ),
) -> None:
    """Stream a checkpoint's attention layer by layer, compute every spectrum, cache it, summarize."""
    from svd_probe.analysis import AnalyzeJob, analyze
    from svd_probe.options import parse_matrices
    from svd_probe.report import layer_progress, summary_rows

    job = AnalyzeJob(
        model=model,
        revision=revision,
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
        control=control.value if control else None,
        solver=solver,
        reader=reader.value,
    )
    # Progress goes to stderr, so it never mixes with --json on stdout.
    with layer_progress(err, enabled=show_progress()) as progress:
        try:
            outcome = analyze(job, progress=progress)
        except KeyboardInterrupt:
            progress.close()
            from svd_probe.cache.store import default_cache_root

            where = default_cache_root(cache_dir)
            # `where` is the user's --cache-dir: text, never markup, no escape sequence.
            if progress.total is None:  # before the layers were known: nothing of this run is cached
                print_text(alert, f"interrupted before any layer was computed; cache {where}")
            else:
                print_text(
                    alert,
                    f"interrupted: {progress.done} of {progress.total} layers cached in {where}; "
                    "run the same command to resume",
                )
            raise typer.Exit(130) from None
    if outcome.stats.get("rank", 0) != 0:
        return  # under torchrun, rank 0 reports for every rank
    print_notes(outcome.notes)
    rows = summary_rows(outcome, parse_matrices(matrices) if matrices else None)
    if as_json:
        print_json(
            {
                "model": outcome.display,
                "repo_id": outcome.repo_id,
                "commit": outcome.commit,
                "cache": str(outcome.cache_dir),
                "layers": rows,
                "stats": outcome.stats,
                "notes": outcome.notes,
            }
        )
    else:
        print_summary(outcome, rows)


def show_progress() -> bool:
    """Live bars on stderr: in a terminal (or with SVD_PROBE_PROGRESS=1), unless --quiet."""
    return (err.is_terminal or os.environ.get("SVD_PROBE_PROGRESS") == "1") and not quiet()


def print_summary(outcome, rows: list[dict]) -> None:
    """The summary table, then the cache folder on a line of its own (unwrapped: it stays copyable)."""
    from svd_probe.report import render_summary, summary_footer

    out.print(render_summary(outcome, rows))
    for line in summary_footer(outcome, rows):  # text already (`terminal_text`), never markup
        out.print(line, highlight=False, soft_wrap=True)


def print_notes(notes: list[str]) -> None:
    for note in notes:
        # unwrapped: commands stay copyable; a note quotes names and paths: text, never markup,
        # and no escape sequence (a folder `x\x1b]0;…\x07` retitled the terminal)
        print_text(err, note, prefix=("note:", "yellow"))


def cache_query(
    model: str,
    revision: str,
    cache_dir: Path | None,
    fold_norms: bool,
    normalize_stacked: bool,
    layernorm_fold: LayerNormFold = LayerNormFold.exact,
    control: Control | None = None,
):
    """The CacheQuery the shared options of export and plot name."""
    from svd_probe.cache.store import SpectraOptions
    from svd_probe.results import CacheQuery

    return CacheQuery(
        model,
        revision,
        cache_dir,
        SpectraOptions(
            fold_norms=fold_norms,
            normalize_stacked=normalize_stacked,
            layernorm_fold=layernorm_fold.value,
            control=control.value if control else None,
        ),
    )


@app.command("export")
def export_cmd(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="Alias, Hub repo id or local folder, as given to `analyze`."
    ),
    format: str = typer.Option(
        "jsonl", "--format", help="jsonl (one spectrum a line), csv or parquet (metrics table)."
    ),
    out_file: Path = typer.Option(..., "--out", help="File to write (an existing file only with --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out file if it exists."),
    revision: str = RevisionOpt,
    cache_dir: Path | None = CacheDirOpt,
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    layernorm_fold: LayerNormFold = LayerNormFoldOpt,
    at_rank: int | None = typer.Option(
        None, "--at-rank", min=0, help="Also export the relative error at this fixed rank r.", show_default=False
    ),
    errors: str = typer.Option(
        "0.01,0.001", "--errors", help="Energy errors for the rank columns, comma-separated (0.01 → rank_1pct)."
    ),
    control: Control | None = ReadControlOpt,
    diff: str | None = DiffOpt,
    tuned_revision: str = TunedRevisionOpt,
) -> None:
    """Write cached spectra (jsonl) or their metrics table (csv, parquet); reads the cache only."""
    from svd_probe.export import export
    from svd_probe.options import parse_errors
    from svd_probe.results import CacheQuery

    query = cache_query(model, revision, cache_dir, fold_norms, normalize_stacked, layernorm_fold, control)
    notes: list[str] = []
    n = export(
        query,
        format=format,
        out=out_file,
        at_rank=at_rank,
        errors=parse_errors(errors),
        overwrite=overwrite,
        diff=CacheQuery(diff, tuned_revision) if diff else None,
        notes=notes,
    )
    # What loading left out ("layer-0007.safetensors left out: the model has layers 0-1"), as
    # `plot` says it: an export silently short of a layer file the cache holds looks whole.
    print_notes(notes)
    print_text(out, f"wrote {plural(n, 'row', 'rows')} to {out_file}")  # a file written: a result, shown under -q too


# ---- plot: options here, work in svd_probe.plots -------------------------------------
@app.command("plot")
def plot_cmd(
    models: list[str] = typer.Argument(
        ..., help="Cached models (alias, Hub repo id or local folder, as given to `analyze`); several add a comparison."
    ),
    out_dir: Path | None = typer.Option(
        None,
        "--out",
        help="Output folder (default: plots/<model>/; with several models DIR/<model>/ each and the comparison in DIR/).",
        show_default=False,
    ),
    format: list[str] = typer.Option(
        ["png"], "--format", help="png, svg or pdf; repeat or comma-separate for several."
    ),
    kind: list[str] | None = typer.Option(
        None,
        "--kind",
        help="Figures: layerwise, headwise, grid, heatmap, spectra, error, planner, kv-planner, alignment, compare; "
        "with --diff: delta-rank, delta-norm; repeat or comma-separate (default: all; alignment when "
        "`svd-probe align` ran).",
        show_default=False,
    ),
    revision: str = RevisionOpt,
    cache_dir: Path | None = CacheDirOpt,
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    layernorm_fold: LayerNormFold = LayerNormFoldOpt,
    layer: int | None = HeadLayerOpt,
    latent: int | None = LatentOpt,
    rank: int | None = RankOpt,
    error: float = typer.Option(
        0.01,
        "--error",
        help="Energy-error threshold e of the head-wise, grid, heat-map and comparison figures: they draw the smallest rank r whose energy error Σ_{i>r} σ_i² / Σ σ_i² is ≤ e (0.01 = rank at 1% energy error; not the Frobenius error, its square root).",
    ),
    spectra_layers: str | None = typer.Option(
        None,
        "--spectra-layers",
        help="Layers of the spectra figure, e.g. 0,30,60 (default: 4 spread over the cached ones).",
        show_default=False,
    ),
    spectra_matrices: str | None = typer.Option(
        None,
        "--spectra-matrices",
        help="Stacked kinds of the spectra figure (default: O,VO,Q,K,V,QK).",
        show_default=False,
    ),
    energy: float = typer.Option(
        0.99, "--energy", help="Share of Σσ² the kv-planner's latent keeps (0.99: rank at 1% error)."
    ),
    kv_dtype: str = typer.Option(
        "bf16", "--kv-dtype", help="KV-cache dtype the kv-planner prices: bf16, fp16, fp8, fp32."
    ),
    dpi: int = typer.Option(150, "--dpi", min=10, max=1200, help="Resolution of png files."),
    data: bool = typer.Option(False, "--data", help="Also write each figure's data as CSV beside it."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace files in the output folder that svd-probe plot did not write (or that changed since). Figures it wrote there are redrawn either way; without this, any other file under a figure's name stops the run before anything is written.",
    ),
    control: Control | None = ReadControlOpt,
    diff: str | None = DiffOpt,
    tuned_revision: str = TunedRevisionOpt,
) -> None:
    """Draw effective-rank figures of cached analyses (offline): layer-wise, head-wise, heat maps, spectra, planners."""
    from svd_probe.options import parse_layers, parse_matrices
    from svd_probe.plots import make_plots, planner_rich_table
    from svd_probe.results import CacheQuery

    # Parsed before any cache is read, so a typo costs nothing.
    layers_of_spectra = parse_layers(spectra_layers, flag="--spectra-layers")
    kinds_of_spectra = (
        parse_matrices(spectra_matrices, scope="stacked", keep_order=True, flag="--spectra-matrices")
        if spectra_matrices
        else None
    )
    report = make_plots(
        [cache_query(m, revision, cache_dir, fold_norms, normalize_stacked, layernorm_fold, control) for m in models],
        out_dir=out_dir,
        formats=format,
        kinds=kind,
        layer=layer,
        latent=latent,
        rank=rank,
        error=error,
        spectra_layers=layers_of_spectra,
        spectra_kinds=kinds_of_spectra,
        dpi=dpi,
        write_data=data,
        energy=energy,
        kv_dtype=kv_dtype,
        diff=CacheQuery(diff, tuned_revision) if diff else None,
        overwrite=overwrite,
    )
    if report.plans:
        out.print(planner_rich_table(report.plans))
    if report.kv_plans:
        from svd_probe.plots.kv_planner import kv_planner_rich_table

        for plan in report.kv_plans:
            out.print(kv_planner_rich_table(plan))
    print_notes(report.notes)
    if not report.files:
        err.print("no figure could be drawn from the cache (see the notes above)")
        raise typer.Exit(1)

    out.print(f"wrote {plural(len(report.files), 'file', 'files')}:")
    for path in report.files:
        print_text(out, f"  {path}")
