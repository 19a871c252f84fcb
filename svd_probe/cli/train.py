"""`train` and `compare`: options here, work in svd_probe.train."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from svd_probe.cli.app import (
    app,
    err,
    out,
    print_json,
)
from svd_probe.train.config import KERNELS_DEFAULT, ModelConfig, TrainConfig, preset

if TYPE_CHECKING:
    from svd_probe.train.loop import DataSources

_T = TrainConfig()  # the recipe's defaults, shown in --help
_SMALL, _TINY = preset("mla-o", "small"), preset("mla-o", "tiny")


def _default(text: str) -> str:
    """ "[default: text]" for a flag whose None means "not given" (the --config file or the preset
    decides). Help is click's plain text (`cli.app`), so the brackets need no escaping."""
    return f"  [default: {text}]"


def _from_size(field: str) -> str:
    """The [default: ...] text of a shape flag: the --size preset's value."""
    return f"{getattr(_SMALL, field)} small, {getattr(_TINY, field)} tiny"


MODEL, DATA, RECIPE, RUN = "Model", "Data", "Recipe", "Run"


@app.command("train")
def train_cmd(
    variant: str | None = typer.Option(
        None,
        "--variant",
        help="Attention: mha, mla or mla-o (shared output latent)." + _default("the --config file's, else mha"),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    size: str = typer.Option(
        "small",
        "--size",
        help="Preset: small (256 wide, 6 layers, 8 heads) or tiny (64 wide, 2 layers: CPU smoke runs).",
        rich_help_panel=MODEL,
    ),
    objective: str | None = typer.Option(
        None,
        "--objective",
        help="mlm (masked LM, bidirectional) or clm (causal LM, next token; perplexity on valid and test)."
        + _default("mlm"),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    o_norm: str | None = typer.Option(
        None,
        "--o-norm",
        help="mla-o: norm on the shared output latent: none, rms (after the heads are summed) or "
        "rms-per-head (each head's latent, own weights, sum / sqrt(H))." + _default("none"),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help="Start mla-o from an mha or mla run folder whose pretraining finished (its model.safetensors; "
        "fine-tuning need not have run): W_O by truncated SVD into the shared latent, the rest copied; "
        "shapes come from that run.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="JSON file of model fields and/or recipe keys; flags override it.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
    d_model: int | None = typer.Option(
        None,
        "--d-model",
        help="Model width." + _default(_from_size("d_model")),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    n_layers: int | None = typer.Option(
        None, "--n-layers", help="Blocks." + _default(_from_size("n_layers")), show_default=False, rich_help_panel=MODEL
    ),
    n_heads: int | None = typer.Option(
        None,
        "--n-heads",
        help="Attention heads." + _default(_from_size("n_heads")),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    head_dim: int | None = typer.Option(
        None,
        "--head-dim",
        help="Width of each head." + _default(_from_size("head_dim")),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    ffn_dim: int | None = typer.Option(
        None,
        "--ffn-dim",
        help="SwiGLU hidden width." + _default(_from_size("ffn_dim")),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    rope_dims: int | None = typer.Option(
        None,
        "--rope-dims",
        help="RoPE on the first N dims of each q/k head." + _default("head_dim; mla: head_dim/2"),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    q_latent: int | None = typer.Option(
        None,
        "--q-latent",
        help="mla, mla-o: query latent." + _default(_from_size("q_latent")),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    kv_latent: int | None = typer.Option(
        None,
        "--kv-latent",
        help="mla, mla-o: KV latent." + _default(_from_size("kv_latent")),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    o_latent: int | None = typer.Option(
        None,
        "--o-latent",
        help="mla-o: shared output latent." + _default(_from_size("o_latent")),
        show_default=False,
        rich_help_panel=MODEL,
    ),
    tokenizer: str = typer.Option(
        "bert-base-uncased",
        "--tokenizer",
        help="WordPiece vocab.txt, tokenizer.json, or a Hub name (online).",
        rich_help_panel=DATA,
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Folder with wiki.train.tokens, wiki.valid.tokens and (optional) wiki.test.tokens: WikiText-2 or -103.",
        show_default=False,
        rich_help_panel=DATA,
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="wikitext-103 or wikitext-2 through `datasets` (online), instead of --data-dir.",
        show_default=False,
        rich_help_panel=DATA,
    ),
    sst2_dir: Path | None = typer.Option(
        None,
        "--sst2-dir",
        help="Folder with GLUE SST-2 train.tsv and dev.tsv; without it, no fine-tuning.",
        show_default=False,
        rich_help_panel=DATA,
    ),
    pretrain_steps: int | None = typer.Option(
        None,
        "--pretrain-steps",
        help="Pretraining steps." + _default(str(_T.pretrain_steps)),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    finetune_steps: int | None = typer.Option(
        None,
        "--finetune-steps",
        help="Fine-tuning steps (overrides --finetune-epochs)." + _default("--finetune-epochs"),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    finetune_epochs: float | None = typer.Option(
        None,
        "--finetune-epochs",
        help="Fine-tuning epochs over train.tsv." + _default("1"),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="Pretraining batch." + _default(str(_T.batch_size)),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    finetune_batch_size: int | None = typer.Option(
        None,
        "--finetune-batch-size",
        help="Fine-tuning batch." + _default(str(_T.finetune_batch_size)),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Peak pretraining learning rate." + _default(f"{_T.lr:g}"),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    finetune_lr: float | None = typer.Option(
        None,
        "--finetune-lr",
        help="Peak fine-tuning learning rate." + _default(f"{_T.finetune_lr:g}"),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    warmup_frac: float | None = typer.Option(
        None,
        "--warmup-frac",
        help="Share of each phase's steps in linear warmup (then linear decay to 0)." + _default(f"{_T.warmup_frac:g}"),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    weight_decay: float | None = typer.Option(
        None,
        "--weight-decay",
        help="AdamW weight decay (not on biases and norms)." + _default(f"{_T.weight_decay:g}"),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    seq_len: int | None = typer.Option(
        None,
        "--seq-len",
        help="Pretraining sequence length; fine-tuning truncates to it. At most 8,192, and batch size x seq len at most 524,288 tokens."
        + _default(str(_T.seq_len)),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    seed: int | None = typer.Option(
        None,
        "--seed",
        help="Seed of initialization, batch order and masks." + _default(str(_T.seed)),
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="Several seeds, one run each in OUT/seed-N, one after another (e.g. 0,1,2,3,4 or 0-4).",
        show_default=False,
        rich_help_panel=RECIPE,
    ),
    out_dir: Path | None = typer.Option(
        None,
        "--out",
        help="Run folder (created): checkpoint.pt, model.safetensors, config.json, metrics.json, train.log. "
        "Rerunning the same command resumes it.",
        show_default=False,
        rich_help_panel=RUN,
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start over in an --out that holds another run or other files (replaces only the run's files).",
        rich_help_panel=RUN,
    ),
    checkpoint_every: int | None = typer.Option(
        None,
        "--checkpoint-every",
        help="Checkpoint every N steps." + _default(str(_T.checkpoint_every)),
        show_default=False,
        rich_help_panel=RUN,
    ),
    checkpoint_minutes: float | None = typer.Option(
        None,
        "--checkpoint-minutes",
        help="Also checkpoint every M minutes (0: off)." + _default(f"{_T.checkpoint_minutes:g}"),
        show_default=False,
        rich_help_panel=RUN,
    ),
    log_every: int | None = typer.Option(
        None,
        "--log-every",
        help="Log the mean loss every N steps." + _default(str(_T.log_every)),
        show_default=False,
        rich_help_panel=RUN,
    ),
    stop_after: int | None = typer.Option(
        None,
        "--stop-after",
        help="Stop the current phase after N steps, with a checkpoint; rerun to resume." + _default("run to the end"),
        show_default=False,
        rich_help_panel=RUN,
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (cuda when available), cpu, cuda or cuda:N.", rich_help_panel=RUN
    ),
    compile_: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile pretraining; on CUDA each step runs as one CUDA graph (forward, backward, clipping, AdamW). Fine-tuning stays eager.",
        rich_help_panel=RUN,
    ),
    kernels: str = typer.Option(
        KERNELS_DEFAULT,
        "--kernels",
        help="triton: on CUDA, the step's hand-written Triton kernels (RoPE + attention up to 128 tokens, the tied head over a padded vocabulary), each checked once on the GPU first; +6.9% samples/s for mha in the compiled step on an H100, 30,965 against 28,955 (benchmarks/README.md, 2026-12-07). torch: the torch code only. The CPU always runs the torch code.",
        rich_help_panel=RUN,
    ),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="Progress bar on a terminal; else log lines on stderr.",
        rich_help_panel=RUN,
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print parameter counts (and shapes with --json); train nothing.", rich_help_panel=RUN
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: the dry-run summary, or metrics.json.", rich_help_panel=RUN
    ),
) -> None:
    """Pretrain a small transformer (MLM or CLM), fine-tune it on SST-2, write model + metrics.

    Ctrl-C or SIGTERM stops after the step in progress and saves a checkpoint; rerunning the same command resumes.
    """
    params = dict(locals())  # the parsed options by name, as `sweep` hands them over too
    from svd_probe.errors import TrainingInputError
    from svd_probe.train.loop import dry_run as dry_run_of
    from svd_probe.train.loop import run, run_seeds

    file_values = read_config(params)
    model_cfg = model_config_from(params, file_values)
    if dry_run:
        summary = dry_run_of(model_cfg, tokenizer)
        if as_json:
            print_json(summary)
        else:
            out.print(
                f"{model_cfg.variant} {model_cfg.objective}: {summary['parameters']:,} parameters "
                f"({summary['non_embedding_parameters']:,} without embeddings)"
            )
        return
    if seed is not None and seeds is not None:
        raise TrainingInputError("--seed and --seeds both given", hint="pass one: --seed N, or --seeds 0,1,2")
    seed_list = parse_seeds(seeds) if seeds is not None else None
    train_cfg = train_config_from(params, file_values)
    if out_dir is None:
        raise TrainingInputError("--out is required to train", hint="e.g. --out runs/mla-o-seed0")
    sources = sources_from(params)
    with RichTrainProgress(err, bar=progress and err.is_terminal and not as_json, echo=not as_json) as reporter:
        if seed_list is None:
            results = [run(model_cfg, train_cfg, sources, out_dir, reporter, overwrite=overwrite)]
        else:
            results = run_seeds(model_cfg, train_cfg, sources, out_dir, seed_list, reporter, overwrite=overwrite)
    if as_json and _main_rank():
        print_json(results[0] if seed_list is None else results)
    elif _main_rank():
        for metrics in results:
            if not metrics.get("stopped"):
                out.print(summary_line(metrics), highlight=False)
    for metrics in results:
        if metrics.get("stopped"):
            report_stop(metrics)


# ---- from the train options to the library's configs (also used by `sweep`, which parses each
# run's command line with this command's own parser: cli/sweep.py)


def read_config(p: dict[str, Any]) -> dict[str, Any]:
    from svd_probe.train.config import read_config_file

    return read_config_file(Path(p["config"])) if p.get("config") is not None else {}


def model_config_from(p: dict[str, Any], file_values: dict[str, Any]) -> ModelConfig:
    """The model of a `train` command line (its parsed options, by parameter name)."""
    from svd_probe.errors import TrainingInputError
    from svd_probe.train.config import build_config

    shapes = {k: p[k] for k in ("d_model", "n_layers", "n_heads", "head_dim", "ffn_dim")}
    if p.get("init_from") is not None:
        from dataclasses import fields

        from svd_probe.errors import shown
        from svd_probe.train.init_from import derive_config, load_source

        # The --config file's model fields rank under the flags here too (they were ignored: its
        # o_norm rms trained none, its d_model went unchecked): the latents and o_norm it sets
        # are this run's, every other field must agree with the source.
        file_model = {k: v for k, v in file_values.items() if k in {f.name for f in fields(ModelConfig)}}
        chosen = ("o_latent", "o_norm", "q_latent", "kv_latent")
        variant = p["variant"] if p["variant"] is not None else file_model.get("variant")
        if variant not in (None, "mla-o"):
            where = "--variant" if p["variant"] is not None else f"variant from {p['config']}"
            raise TrainingInputError(f"--init-from builds mla-o, not {shown(variant)}", hint=f"drop {where}")
        source = load_source(Path(p["init_from"]))
        for k, v in sorted(file_model.items()):
            if k in chosen or k == "variant" or p.get(k) is not None:
                continue
            if getattr(source.cfg, k) != v:
                raise TrainingInputError(
                    f"--init-from takes {k} from the source run ({getattr(source.cfg, k)}), "
                    f"not {shown(v)} (the --config file's)",
                    hint=f"drop {k} from {p['config']}, or start from another run",
                )
        pick = {k: p[k] if p[k] is not None else file_model.get(k) for k in chosen}
        return derive_config(
            source.cfg,
            pick["o_latent"],
            pick["o_norm"],
            pick["q_latent"],
            pick["kv_latent"],
            {**shapes, "rope_dims": p["rope_dims"], "objective": p["objective"]},
        )
    overrides = dict(
        **shapes, **{k: p[k] for k in ("rope_dims", "q_latent", "kv_latent", "o_latent", "o_norm", "objective")}
    )
    return build_config(p["variant"], p["size"], file_values, overrides)


def train_config_from(p: dict[str, Any], file_values: dict[str, Any]) -> TrainConfig:
    """The recipe of a `train` command line (its parsed options, by parameter name)."""
    from svd_probe.train.config import TRAIN_KEYS, build_train_config

    # The recipe keys a --config file may set, plus the run's own flags (not in a config file).
    keys = sorted(TRAIN_KEYS | {"log_every", "stop_after", "device"})
    overrides = {k: p[k] for k in keys}
    overrides["compile"] = p["compile_"]
    overrides["kernels"] = p["kernels"]
    overrides["init_from"] = None if p.get("init_from") is None else str(p["init_from"])
    return build_train_config(file_values, overrides)


def sources_from(p: dict[str, Any]) -> DataSources:
    from svd_probe.train.loop import DataSources

    def path(k: str) -> Path | None:
        return None if p.get(k) is None else Path(p[k])

    return DataSources(
        tokenizer=p["tokenizer"], data_dir=path("data_dir"), dataset=p["dataset"], sst2_dir=path("sst2_dir")
    )


def _main_rank() -> bool:
    """Under torchrun every rank returns the metrics; rank 0 prints them."""
    import os

    return os.environ.get("RANK", "0") == "0"


MAX_SEEDS = 1000


def parse_seeds(text: str) -> list[int]:
    """`0,1,2`, `0-4` or a mix (`0-2,7`): distinct non-negative integers, in the order given."""
    from svd_probe.errors import TrainingInputError

    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise TrainingInputError(f"bad --seeds {text!r}", hint="e.g. --seeds 0,1,2,3,4 or --seeds 0-4") from None
        seeds += range(first, min(last, first + MAX_SEEDS) + 1)  # past the limit fails below
        if len(seeds) > MAX_SEEDS:
            break
    if not seeds or len(seeds) > MAX_SEEDS or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise TrainingInputError(
            f"bad --seeds {text if len(text) <= 60 else text[:60] + '...'!r}: distinct seeds >= 0 (at most {MAX_SEEDS})",
            hint="e.g. --seeds 0,1,2,3,4",
        )
    return seeds


def summary_line(m: dict) -> str:
    acc = m["sst2_dev_accuracy"]
    sst2 = "—" if acc is None else f"{acc:.4f}"
    if m.get("objective") == "clm":
        test = m.get("clm_test_perplexity")
        pre = f"CLM ppl {m['clm_perplexity']:.2f} valid, {'—' if test is None else f'{test:.2f}'} test"
    else:
        pre = f"MLM acc {m['mlm_accuracy']:.4f} (loss {m['mlm_loss']:.3f})"
    return f"{m['variant']} seed {m['seed']}: {pre}, SST-2 dev acc {sst2}"


def report_stop(stopped: dict) -> None:
    """How a run stopped early, and how to go on; an interrupt exits 130 (SIGINT) or 143 (SIGTERM)."""
    where = f"{stopped['phase']} step {stopped['step']}"
    if stopped["reason"] == "interrupted":
        err.print(
            f"interrupted at {where}; checkpoint saved in {stopped['out']}; run the same command to resume",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(143 if stopped.get("signal") == "SIGTERM" else 130)
    err.print(
        f"stopped after {where} (--stop-after); checkpoint saved in {stopped['out']}; run the same command to resume",
        highlight=False,
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
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command("compare")
def compare_cmd(
    run_dirs: list[Path] = typer.Argument(
        ..., help="Run folders of `svd-probe train`, or folders of run folders (e.g. the --out of --seeds)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"configs": [...], "differences": [...]} as JSON instead of tables.'
    ),
) -> None:
    """Tables of training runs: per configuration mean ± std over seeds, and for each pair of configurations the difference with a 95% interval (paired t over seeds)."""
    from svd_probe.train.compare import comparison, load_runs, render_tables

    comp = comparison(load_runs(run_dirs))
    if as_json:
        print_json(comp)
        return
    for table in render_tables(comp):
        out.print(table)
