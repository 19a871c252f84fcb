"""`cache list` and `cache rm`: what the spectra cache holds, and removing a model from it
(`svd_probe.cache.listing`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from svd_probe.cli.app import CacheDirOpt, app, err, out, plural, print_json, print_text
from svd_probe.errors import BadOptionError

cache_app = typer.Typer(help="See what the spectra cache holds, and remove models from it.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


@cache_app.command("list")
def list_cmd(
    cache_dir: Path | None = CacheDirOpt,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List cached analyses: model, revision → commit, options, layers, size and when last written."""
    from svd_probe.cache.listing import list_cache, options_text
    from svd_probe.cache.store import default_cache_root
    from svd_probe.options import format_layers
    from svd_probe.report import terminal_text

    root = default_cache_root(cache_dir)
    entries = list_cache(root)
    if as_json:
        print_json({"cache": str(root), "analyses": [e.to_json() for e in entries]})
        return
    if not entries:
        print_text(out, f"the cache {root} is empty")
        return
    # The commit is cut to 12 hex; below 100 columns the date goes first (it stays in --json).
    with_date = out.width >= 100
    # Names, revisions and folder names come from the cache's files: shown as text, never as
    # markup, and with no escape sequence reaching the terminal (`report.terminal_text`).
    table = Table(title=terminal_text(f"cache {root}"), title_justify="left")
    table.add_column("model", overflow="fold", min_width=min(24, max(len(e.model) for e in entries)))
    table.add_column("revision → commit", overflow="fold")
    table.add_column("options", no_wrap=True)
    table.add_column("layers", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    if with_date:
        table.add_column("written", no_wrap=True)
    for e in entries:
        revs = ",".join(e.revisions) or "-"
        table.add_row(
            terminal_text(e.model),
            terminal_text(f"{revs} → {e.commit[:12]}"),
            terminal_text(options_text(e.options)),
            format_layers(e.layers) or "-",
            _size(e.bytes),
            *([e.updated[:10]] if with_date else []),
        )
    out.print(table)
    err.print(
        f"{plural(len(entries), 'analysis', 'analyses')}, {_size(sum(e.bytes for e in entries))}; `svd-probe cache rm MODEL` removes one"
    )


def _confirmed(question: str) -> bool:
    """The user's yes; no answer (stdin closed, as in a script or `< /dev/null`, or Ctrl-C at the
    question: click tells them apart from neither) is a usage error that deletes nothing (it
    ended in click's bare "Aborted!")."""
    import click

    try:
        return typer.confirm(question, default=False)
    except (typer.Abort, click.Abort):  # typer >= 0.29 raises its own
        raise BadOptionError(
            "cache rm asks before deleting and got no answer (stdin closed, or interrupted): nothing deleted",
            "Pass --yes to delete without asking (scripts), or run it in a terminal.",
        ) from None


@cache_app.command("rm")
def rm_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="Model as `cache list` shows it (alias, repo id or name)."),
    revision: str | None = typer.Option(
        None,
        "--revision",
        help="Remove the commit this revision (or commit) resolved to, with its refs.  [default: main]",
        show_default=False,
    ),
    everything: bool = typer.Option(False, "--all", help="Remove every cached revision of MODEL."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    cache_dir: Path | None = CacheDirOpt,
) -> None:
    """Remove a model's cached analyses (every option set of the chosen commits); asks first unless --yes."""
    from svd_probe.cache.listing import plan_removal, remove
    from svd_probe.cache.store import default_cache_root

    plan = plan_removal(default_cache_root(cache_dir), model, revision, everything)
    out.print(f"will delete {_size(plan.bytes)}:", highlight=False)
    for path in (*plan.folders, *plan.refs):  # folder names are the cache's: text, not markup
        print_text(out, f"  {path}")
    if not yes and not _confirmed("delete these?"):
        err.print("nothing deleted")
        raise typer.Exit(1)
    freed = remove(plan)
    out.print(f"deleted {_size(freed)}", highlight=False)
