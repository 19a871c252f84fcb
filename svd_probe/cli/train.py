"""`train` and `compare`: options here, work in svd_probe.train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from svd_probe.cli.app import (
    app,
    err,
    out,
    print_json,
)


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
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start over in an --out folder that holds another run or other files (replaces only the run's own files).",
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
    from svd_probe.errors import TrainingInputError
    from svd_probe.train.config import build_config, build_train_config, read_config_file
    from svd_probe.train.loop import DataSources, run
    from svd_probe.train.model import dry_run_summary

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
            print_json(summary)
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
    with RichTrainProgress(err, bar=progress and err.is_terminal and not as_json, echo=not as_json) as reporter:
        metrics = run(model_cfg, train_cfg, sources, out_dir, reporter, overwrite=overwrite)
    if metrics.get("stopped"):
        err.print(f"stopped early; checkpoint in {out_dir}. Rerun the same command to resume.")
    elif as_json:
        print_json(metrics)
    else:
        acc = metrics["sst2_dev_accuracy"]
        out.print(
            f"{metrics['variant']}: MLM acc {metrics['mlm_accuracy']:.4f} (loss {metrics['mlm_loss']:.3f}), SST-2 dev acc {'—' if acc is None else f'{acc:.4f}'}; wrote {out_dir}"
        )


class RichTrainProgress:
    """The library's TrainProgress drawn with rich: a bar per phase on a terminal, else the log
    lines on stderr (none with --json, whose stdout is for the metrics)."""

    def __init__(self, console, bar: bool, echo: bool):
        self.console, self.echo = console, echo
        self.bar = None
        self._tasks: dict[str, Any] = {}
        if bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}"),
                TextColumn("{task.fields[sps]:,.0f} samples/s"),
                TimeRemainingColumn(),
                console=console,
            )

    def __enter__(self) -> RichTrainProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def phase_started(self, phase: str, total: int, done: int) -> None:
        if self.bar is not None:
            self._tasks[phase] = self.bar.add_task(phase, total=total, completed=done, loss=float("nan"), sps=0.0)

    def phase_step(self, phase: str, done: int, loss: float, samples_per_s: float) -> None:
        if self.bar is not None and phase in self._tasks:
            self.bar.update(self._tasks[phase], completed=done, loss=loss, sps=samples_per_s)

    def message(self, line: str) -> None:
        if self.bar is None and self.echo:
            self.console.print(line, highlight=False, markup=False)


@app.command("compare")
def compare_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of `svd-probe train` (or folders of run folders)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table."),
) -> None:
    """One table over training runs: variant, latents, parameters, MLM and SST-2 accuracy (mean ± std), samples/s."""
    from svd_probe.train.compare import load_runs, render_table, summarize

    rows = summarize(load_runs(run_dirs))
    if as_json:
        print_json(rows)
    else:
        out.print(render_table(rows))
