"""The `svd-probe` command line: parse, call the library, report. No work happens here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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
RevisionOpt = typer.Option(
    "main", "--revision", help="Branch, tag or commit to read; pinned to the commit it resolves to."
)
TokenOpt = typer.Option(
    None,
    "--token",
    help="Hub token for gated or private repos (default: $HF_TOKEN or `hf auth login`).",
    show_default=False,
)
EndpointOpt = typer.Option(
    None,
    "--endpoint",
    help="Hub endpoint or mirror URL (default: $HF_ENDPOINT, else https://huggingface.co).",
    show_default=False,
)
CacheDirOpt = typer.Option(
    None,
    "--cache-dir",
    help="Spectra cache folder (default: $SVD_PROBE_CACHE, else the user cache folder).",
    show_default=False,
)
FoldOpt = typer.Option(
    True, "--fold-norms/--no-fold-norms", help="Fold RMSNorm weights into the projections that read them."
)
NormStackedOpt = typer.Option(
    True, "--normalize-stacked/--no-normalize-stacked", help="Divide each head by its largest σ before stacking heads."
)


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
        help="Matrix kinds, comma-separated, from Q,Q_pe,K,V,O,VO,QK,KQ,QA,KVA,KVA_pe (default: all the model has).",
        show_default=False,
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
        _print_json(
            {
                "model": result.display,
                "repo_id": result.repo_id,
                "commit": result.commit,
                "cache": str(result.cache_dir),
                "layers": rows,
                "stats": result.stats,
            }
        )
    else:
        out.print(render_summary(result, rows))


@app.command("export")
def export_cmd(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="Alias, Hub repo id or local folder, as given to `analyze`."
    ),
    format: str = typer.Option(
        "jsonl", "--format", help="jsonl (one spectrum a line), csv or parquet (metrics table)."
    ),
    out_file: Path = typer.Option(..., "--out", help="File to write."),
    revision: str = RevisionOpt,
    cache_dir: Path | None = CacheDirOpt,
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    at_rank: int | None = typer.Option(
        None, "--at-rank", help="Also export the relative error at this fixed rank r.", show_default=False
    ),
    errors: str = typer.Option(
        "0.01,0.001", "--errors", help="Energy errors for the rank columns, comma-separated (0.01 → rank_1pct)."
    ),
) -> None:
    """Write cached spectra (jsonl) or their metrics table (csv, parquet); reads the cache only."""
    from svd_probe.export import export, parse_errors

    n = export(
        model,
        format=format,
        out=out_file,
        revision=revision,
        cache_dir=cache_dir,
        fold_norms=fold_norms,
        normalize_stacked=normalize_stacked,
        at_rank=at_rank,
        errors=parse_errors(errors),
    )
    err.print(f"wrote {n} rows to {out_file}")


# ---- plot (issue 4): options here, work in svd_probe.plots -------------------------------------
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
        help="Figures: layerwise, headwise, grid, heatmap, spectra, error, planner, compare; repeat or comma-separate (default: all).",
        show_default=False,
    ),
    revision: str = RevisionOpt,
    cache_dir: Path | None = CacheDirOpt,
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    layer: int | None = typer.Option(
        None,
        "--layer",
        min=0,
        help="Layer of the head-wise figure (default: the middle cached layer).",
        show_default=False,
    ),
    latent: int | None = typer.Option(
        None,
        "--latent",
        min=1,
        help="Shared output latent width D for the planner (default: 3/7 of d_model, 3072 for DeepSeek-V3).",
        show_default=False,
    ),
    rank: int | None = typer.Option(
        None,
        "--rank",
        min=1,
        help="Fixed rank r of the error figure (default: 4/7 of d_model, 4096 for DeepSeek-V3).",
        show_default=False,
    ),
    error: float = typer.Option(
        0.01,
        "--error",
        help="Error threshold of the head-wise, grid, heat-map and comparison figures (0.01 = rank at 1% error).",
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
    dpi: int = typer.Option(150, "--dpi", min=10, max=1200, help="Resolution of png files."),
    data: bool = typer.Option(False, "--data", help="Also write each figure's data as CSV beside it."),
) -> None:
    """Draw effective-rank figures of cached analyses (offline): layer-wise, head-wise, heat maps, spectra, planner."""
    from svd_probe.plots import make_plots, parse_layers, planner_rich_table
    from svd_probe.plots.render import parse_matrices

    report = make_plots(
        models,
        out_dir=out_dir,
        formats=format,
        kinds=kind,
        layer=layer,
        latent=latent,
        rank=rank,
        revision=revision,
        cache_dir=cache_dir,
        fold_norms=fold_norms,
        normalize_stacked=normalize_stacked,
        error=error,
        spectra_layers=parse_layers(spectra_layers),
        spectra_kinds=parse_matrices(spectra_matrices),
        dpi=dpi,
        write_data=data,
    )
    if report.plans:
        out.print(planner_rich_table(report.plans))
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)  # unwrapped: commands stay copyable
    if not report.files:
        err.print("no figure could be drawn from the cache (see the notes above)")
        raise typer.Exit(1)
    out.print(f"wrote {len(report.files)} files:")
    for path in report.files:
        out.print(f"  {path}", highlight=False, soft_wrap=True)


# ---- train / compare (issue 5): options here, work in svd_probe.train -------------------------
@app.command("train")
def train_cmd(
    variant: str | None = typer.Option(
        None, "--variant", help="mha, mla or mla-o (default: the --config file's, else mha).", show_default=False
    ),
    size: str = typer.Option(
        "small", "--size", help="Size preset: small (the issue's 256-wide model) or tiny (CPU smoke runs)."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="JSON file of model fields and/or training keys; flags override it.", show_default=False
    ),
    d_model: int | None = typer.Option(None, "--d-model", show_default=False),
    n_layers: int | None = typer.Option(None, "--n-layers", show_default=False),
    n_heads: int | None = typer.Option(None, "--n-heads", show_default=False),
    head_dim: int | None = typer.Option(None, "--head-dim", show_default=False),
    ffn_dim: int | None = typer.Option(None, "--ffn-dim", show_default=False),
    rope_dims: int | None = typer.Option(
        None, "--rope-dims", help="RoPE on the first N dims of each q/k head.", show_default=False
    ),
    q_latent: int | None = typer.Option(None, "--q-latent", help="mla, mla-o: query latent width.", show_default=False),
    kv_latent: int | None = typer.Option(None, "--kv-latent", help="mla, mla-o: KV latent width.", show_default=False),
    o_latent: int | None = typer.Option(
        None, "--o-latent", help="mla-o: shared output latent width.", show_default=False
    ),
    tokenizer: str = typer.Option(
        "bert-base-uncased", "--tokenizer", help="WordPiece vocab.txt, tokenizer.json, or a Hub name (online)."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Folder with wiki.train.tokens and wiki.valid.tokens.", show_default=False
    ),
    dataset: str | None = typer.Option(
        None, "--dataset", help="wikitext-103 through `datasets` (online) instead of --data-dir.", show_default=False
    ),
    sst2_dir: Path | None = typer.Option(
        None,
        "--sst2-dir",
        help="Folder with GLUE SST-2 train.tsv and dev.tsv (no fine-tuning without it).",
        show_default=False,
    ),
    out_dir: Path | None = typer.Option(
        None,
        "--out",
        help="Run folder: checkpoint, model.safetensors, config.json, metrics.json, train.log.",
        show_default=False,
    ),
    pretrain_steps: int | None = typer.Option(None, "--pretrain-steps", help="[default: 2000]", show_default=False),
    finetune_steps: int | None = typer.Option(
        None, "--finetune-steps", help="[default: one epoch]", show_default=False
    ),
    finetune_epochs: float | None = typer.Option(None, "--finetune-epochs", show_default=False),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Pretraining batch [default: 128].", show_default=False
    ),
    finetune_batch_size: int | None = typer.Option(
        None, "--finetune-batch-size", help="[default: 32]", show_default=False
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak pretraining lr [default: 1e-3].", show_default=False),
    finetune_lr: float | None = typer.Option(None, "--finetune-lr", help="[default: 1e-4]", show_default=False),
    warmup_frac: float | None = typer.Option(None, "--warmup-frac", help="[default: 0.06]", show_default=False),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="[default: 0.01]", show_default=False),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Pretraining sequence length (and fine-tuning cap) [default: 128].", show_default=False
    ),
    seed: int | None = typer.Option(None, "--seed", help="[default: 0]", show_default=False),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="[default: 500]", show_default=False),
    log_every: int | None = typer.Option(None, "--log-every", help="[default: 50]", show_default=False),
    stop_after: int | None = typer.Option(
        None,
        "--stop-after",
        help="Stop the current phase after N steps (checkpointed); rerun to resume.",
        show_default=False,
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (auto: cuda when available)."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model."),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Rich progress bar (off when stderr is not a terminal)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print parameters and shapes, train nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the dry-run summary, or metrics.json)."),
) -> None:
    """Pretrain an encoder (MLM), fine-tune it on SST-2, write model + metrics; reruns resume."""
    import contextlib

    from svd_probe.errors import TrainingInputError
    from svd_probe.train.config import build_config, read_config_file
    from svd_probe.train.loop import DataSources, Reporter, build_train_config, dry_run_summary, rich_progress, run

    file_values = read_config_file(config) if config is not None else {}
    overrides = dict(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        head_dim=head_dim,
        ffn_dim=ffn_dim,
        rope_dims=rope_dims,
        q_latent=q_latent,
        kv_latent=kv_latent,
        o_latent=o_latent,
    )
    model_cfg = build_config(variant, size, file_values, overrides)
    if dry_run:
        summary = dry_run_summary(model_cfg)
        if as_json:
            _print_json(summary)
        else:
            out.print(
                f"{model_cfg.variant}: {summary['parameters']:,} parameters ({summary['non_embedding_parameters']:,} without embeddings)"
            )
        return
    train_cfg = build_train_config(
        file_values,
        dict(
            pretrain_steps=pretrain_steps,
            finetune_steps=finetune_steps,
            finetune_epochs=finetune_epochs,
            batch_size=batch_size,
            finetune_batch_size=finetune_batch_size,
            lr=lr,
            finetune_lr=finetune_lr,
            warmup_frac=warmup_frac,
            weight_decay=weight_decay,
            seq_len=seq_len,
            seed=seed,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            stop_after=stop_after,
            device=device,
            compile=compile_,
        ),
    )
    if out_dir is None:
        raise TrainingInputError("--out is required to train", hint="e.g. --out runs/mla-o-seed0")
    sources = DataSources(tokenizer=tokenizer, data_dir=data_dir, dataset=dataset, sst2_dir=sst2_dir)
    show = progress and err.is_terminal and not as_json
    bar = rich_progress(err) if show else None
    reporter = Reporter(
        progress=bar, echo=None if show or as_json else (lambda line: err.print(line, highlight=False, markup=False))
    )
    with bar if bar is not None else contextlib.nullcontext():
        metrics = run(model_cfg, train_cfg, sources, out_dir, reporter)
    if metrics.get("stopped"):
        err.print(f"stopped early; checkpoint in {out_dir}. Rerun the same command to resume.")
    elif as_json:
        _print_json(metrics)
    else:
        acc = metrics["sst2_dev_accuracy"]
        out.print(
            f"{metrics['variant']}: MLM acc {metrics['mlm_accuracy']:.4f} (loss {metrics['mlm_loss']:.3f}), SST-2 dev acc {'—' if acc is None else f'{acc:.4f}'}; wrote {out_dir}"
        )


@app.command("compare")
def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of `svd-probe train` (or folders of run folders)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table."),
) -> None:
    """One table over training runs: variant, latents, parameters, MLM and SST-2 accuracy (mean ± std), samples/s."""
    from svd_probe.train.compare import load_runs, render_table, summarize

    rows = summarize(load_runs(run_dirs))
    if as_json:
        _print_json(rows)
    else:
        out.print(render_table(rows))


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
        # Work is saved as it finishes (a spectra file per layer, training checkpoints), so an
        # interrupt loses at most the layer or the steps in progress.
        err.print("interrupted: finished work is saved; rerun the same command to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
