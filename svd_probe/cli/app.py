"""The shared parts of the command line: the typer app, the two consoles, and the options that
every command reading a checkpoint or the cache takes, declared once."""

from __future__ import annotations

import json
import sys
from enum import Enum

import typer
from rich.console import Console

app = typer.Typer(
    name="svd-probe",
    help="Spectral analysis of attention weights in very large checkpoints, streamed from the Hub, "
    "and a lab that trains MHA, MLA and MLA-o encoders. `svd-probe demo` tries it all offline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
    # Click's plain help: it wraps at any width and never cuts an option name, where rich's panels
    # cut `--normalize-stacked` to `--normalize-stac…` at 80 columns.
    rich_markup_mode=None,
)
out = Console()  # results: tables, JSON, file lists
err = Console(stderr=True)  # progress, notes, messages; silenced by --quiet
alert = Console(stderr=True)  # errors and interrupts: printed even with --quiet


def quiet() -> bool:
    return err.quiet


def _print_version(value: bool) -> None:
    if value:
        from svd_probe import __version__

        sys.stdout.write(f"svd-probe {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    quiet_flag: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="Print only results (tables, JSON, files written) and errors: no progress bars, notes or messages. "
        "Give it before the command: svd-probe -q analyze ...",
    ),
) -> None:
    """Options before the command."""
    # Set on every invocation, so one quiet call (in a test process) does not silence the next.
    err.quiet = quiet_flag


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
    True,
    "--fold-norms/--no-fold-norms",
    help="Fold norm weights (RMSNorm, pre-LayerNorm) into the projections that read them.",
)


class LayerNormFold(str, Enum):
    """`--layernorm-fold`: how a pre-LayerNorm folds into the projections that read it."""

    exact = "exact"
    gain = "gain"


LayerNormFoldOpt = typer.Option(
    LayerNormFold.exact,
    "--layernorm-fold",
    help="How a pre-LayerNorm (GPT-2) folds into q/k/v: exact (W·diag(g)·(I − 11ᵀ/d), as TransformerLens' "
    "fold_ln with centering) or gain (W·diag(g) only, as svd-probe 0.1). RMSNorm models are unaffected.",
)
# The compute and read choices, shared by `analyze`, `align`, `diff` and `demo`.
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda (auto: cuda when available).")
ForceOpt = typer.Option(False, "--force", help="Recompute layers that are already cached.")
ConcurrencyOpt = typer.Option(
    8,
    "--concurrency",
    min=1,
    max=64,
    help="HTTP range requests in flight at most, per checkpoint (2 while one connection streams >= 200 MB/s).",
)

# The figures' choices, shared by `plot` and `report` (one parser, one help text).
HeadLayerOpt = typer.Option(
    None,
    "--layer",
    min=0,
    help="Layer of the head-wise figure (default: the middle cached layer).",
    show_default=False,
)
LatentOpt = typer.Option(
    None,
    "--latent",
    min=1,
    help="Shared output latent width D for the planner (default: 3/7 of d_model capped at 85% of the break-even; 3072 for DeepSeek-V3).",
    show_default=False,
)
RankOpt = typer.Option(
    None,
    "--rank",
    min=1,
    help="Fixed rank r of the error figure, which draws the relative Frobenius error ‖A − A_r‖_F / ‖A‖_F at rank r (default: 4/7 of the largest possible rank, at most d_model; 4096 for DeepSeek-V3).",
    show_default=False,
)
NormStackedOpt = typer.Option(
    True, "--normalize-stacked/--no-normalize-stacked", help="Divide each head by its largest σ before stacking heads."
)


def plural(n: int, one: str, many: str) -> str:
    """`n` and the noun for it: plural(1, "analysis", "analyses") is "1 analysis", 2 gives "2 analyses"."""
    return f"{n} {one if n == 1 else many}"


def print_text(console: Console, text: str, prefix: tuple[str, str] | None = None) -> None:
    """A line holding the user's text (paths, names): never read as markup, with control characters
    shown as escapes (`report.terminal_text`), unwrapped (commands and paths stay copyable), not
    highlighted. `prefix` is (label, style): a styled label of ours before it, as `note:` in yellow."""
    from rich.text import Text

    from svd_probe.report import terminal_text

    line = terminal_text(text)
    if prefix is not None:
        line = Text.assemble(Text(prefix[0], style=prefix[1]), " ", line)
    console.print(line, highlight=False, soft_wrap=True)


def print_json(obj) -> None:
    # Plain stdout, not rich: machine output must not be wrapped or coloured.
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
