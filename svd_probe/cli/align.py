"""`svd-probe align`: principal angles between heads' output and later layers' read subspaces."""

from __future__ import annotations

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
    LayerNormFold,
    LayerNormFoldOpt,
    NormStackedOpt,
    RevisionOpt,
    TokenOpt,
    app,
    err,
    out,
    plural,
    print_json,
    print_text,
)


class WriteKind(str, Enum):
    """`--write`: which per-head map's column space is a head's output subspace."""

    O = "O"  # noqa: E741 - the matrix kind's name
    VO = "VO"


@app.command("align")
def align_cmd(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="Alias (see `svd-probe models`), Hub repo id org/name, or local folder."
    ),
    layers: str | None = typer.Option(
        None,
        "--layers",
        help="Layers, e.g. 0-3 (default: all but MTP layers); L → L+1 is measured for consecutive ones.",
        show_default=False,
    ),
    rank: int = typer.Option(
        64, "--rank", min=1, help="Dimension r of every subspace compared: below d_model (heads: at most d_v)."
    ),
    write: WriteKind = typer.Option(
        WriteKind.O, "--write", help="A head's output subspace: the column space of O_h or of the fused VO_h."
    ),
    revision: str = RevisionOpt,
    token: str | None = TokenOpt,
    endpoint: str | None = EndpointOpt,
    cache_dir: Path | None = CacheDirOpt,
    fold_norms: bool = FoldOpt,
    normalize_stacked: bool = NormStackedOpt,
    layernorm_fold: LayerNormFold = LayerNormFoldOpt,
    mtp: bool = typer.Option(False, "--mtp/--no-mtp", help="Include multi-token-prediction layers (never paired)."),
    device: str = DeviceOpt,
    force: bool = ForceOpt,
    concurrency: int = ConcurrencyOpt,
    out_dir: Path | None = typer.Option(
        None, "--out", help="Folder of the figure (default: plots/<model>/).", show_default=False
    ),
    format: list[str] = typer.Option(["png"], "--format", help="Figure format: png, svg or pdf; repeatable."),
    no_figure: bool = typer.Option(False, "--no-figure", help="Draw no figure."),
    layer: int | None = typer.Option(
        None, "--layer", min=0, help="Layer of the head × head heat map (default: the middle one).", show_default=False
    ),
    export: Path | None = typer.Option(
        None, "--export", help="Write the table to this .csv or .jsonl file.", show_default=False
    ),
    export_format: str | None = typer.Option(
        None, "--export-format", help="csv or jsonl (default: from the --export suffix).", show_default=False
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace the --export file if it exists, and a file under the figure's name that svd-probe did not write (or that changed since). Figures it wrote are redrawn either way.",
    ),
    dpi: int = typer.Option(150, "--dpi", min=10, max=1200, help="Resolution of png files."),
    as_json: bool = typer.Option(False, "--json", help="Print the L → L+1 table as JSON instead of a table."),
) -> None:
    """Do heads write where later heads read? Principal angles between output and read subspaces.

    Streams attention weights layer by layer, computes in float64, caches beside the spectra; reruns add what is missing.
    """
    from svd_probe.alignment import align, export_alignment
    from svd_probe.cli.analysis import print_notes, show_progress
    from svd_probe.options import parse_choices
    from svd_probe.plots.render import FORMATS
    from svd_probe.report import layer_progress

    formats = parse_choices(format, FORMATS, "format")
    if export is not None:
        from svd_probe.export import check_output_file

        check_output_file(export, overwrite, flag="--export")  # refused before anything is fetched
    with layer_progress(err, enabled=show_progress()) as progress:
        result = align(
            model,
            layers=layers,
            rank=rank,
            write=write.value,
            revision=revision,
            token=token,
            endpoint=endpoint,
            cache_dir=cache_dir,
            fold_norms=fold_norms,
            normalize_stacked=normalize_stacked,
            layernorm_fold=layernorm_fold.value,
            include_mtp=mtp,
            device=device,
            force=force,
            concurrency=concurrency,
            progress=progress,
        )

    nxt, notes = result.next_frame(), list(result.notes)
    if nxt.empty:  # `--json` printed `[]` and said nothing
        from svd_probe.options import format_layers

        notes.append(
            f"no layer L → L+1 among layers {format_layers(result.layers)}: only consecutive layers are compared "
            "(never the last layer with an MTP layer), so the L → L+1 table is empty; ask for some, e.g. --layers 0-1"
        )
    print_notes(notes)
    if as_json:
        print_json(nxt.to_dict("records"))
    else:
        out.print(alignment_table(result))
    if export is not None:
        n = export_alignment(result, export, export_format, overwrite=overwrite)
        print_text(out, f"wrote {plural(n, 'row', 'rows')} to {export}")  # a result: shown under -q too
    if not no_figure:
        from svd_probe.plots.alignment import alignment_figure
        from svd_probe.plots.output import PlotOutput
        from svd_probe.plots.render import DEFAULT_OUT_ROOT, queue_figure
        from svd_probe.plots.style import model_slug

        folder = out_dir or DEFAULT_OUT_ROOT / model_slug(model)
        fig = alignment_figure(result, layer=layer, dpi=dpi)
        output = PlotOutput(overwrite)
        queue_figure(output, fig, folder, formats, dpi, write_data=False)
        for path in output.write_all():
            print_text(out, f"wrote {path}")


def alignment_table(result):
    """Per layer pair L → L+1: RMS principal cosine per read target, the random baseline, and per
    layer the mean head-pair and head → layer cosines; readable at 80 columns."""
    import numpy as np
    from rich import box
    from rich.table import Table

    from svd_probe.alignment import TARGETS
    from svd_probe.report import terminal_text

    nxt, hl = result.next_frame(), result.head_layer_frame()
    targets = [t for t in TARGETS if len(nxt) and t in set(nxt["target"])]
    table = Table(  # the model's name can be a cached manifest's: text, never markup
        title=terminal_text(
            f"{result.model}: RMS principal cosines at rank {result.rank} ({result.write} output subspaces)"
        ),
        caption="pairs: two heads · h→L: a head vs its layer's stacked output\n"
        "→Q …: the layer before's output vs this layer's reads · rand: √(r/d)",
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("pairs", justify="right", no_wrap=True)
    table.add_column("h→L", justify="right", no_wrap=True)
    for t in targets:
        table.add_column(f"→{t}", justify="right", no_wrap=True)
    table.add_column("rand", justify="right", no_wrap=True)
    for ly in sorted(result.layers):
        la = result.layers[ly]
        n = la.pairs["rms"].shape[0]
        off = la.pairs["rms"][~np.eye(n, dtype=bool)]
        pairs = f"{off.mean():.3f}" if off.size else "—"
        rows = hl[hl["layer"] == ly]
        head_layer = f"{rows['rms_cos'].mean():.3f}" if len(rows) else "—"
        cells = []
        here = nxt[nxt["other_layer"] == ly] if len(nxt) else nxt
        for t in targets:
            hit = here[here["target"] == t] if len(here) else here
            cells.append(f"{float(hit['rms_cos'].iloc[0]):.3f}" if len(hit) else "—")
        base = f"{float(here['random_rms_cos'].iloc[0]):.3f}" if len(here) else "—"
        name = f"{la.prev_layer}→{ly}" if la.prev_layer is not None else str(ly)
        table.add_row(name, pairs, head_layer, *cells, base)
    return table
