"""`demo`: the whole path offline in one folder (`svd_probe.demo`); options here, work there."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from svd_probe.cli.app import DeviceOpt, app, err, out, plural, print_text


@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(
        Path("svd-probe-demo"),
        "--out",
        help="Folder for the checkpoint, cache, exports and figures; a non-empty folder the demo did not "
        "make is refused. Rerunning reuses it (the analysis then comes from the cache).",
    ),
    device: str = DeviceOpt,
) -> None:
    """Try everything offline: build a small DeepSeek-V3-layout checkpoint, serve it on loopback with the
    Hub stand-in, analyze it through the Hub protocol, export and plot; the stand-in stops at the end."""
    from svd_probe.cli.analysis import print_notes, print_summary, show_progress
    from svd_probe.demo import DEMO_REPO, run_demo
    from svd_probe.report import layer_progress, summary_rows

    with layer_progress(err, enabled=show_progress()) as progress:
        result = run_demo(out_dir, progress=progress, device=device)
    outcome = result.outcome
    print_summary(outcome, summary_rows(outcome))
    p = result.paths
    # The folders are the user's --out: text, never markup, no escape sequence (`print_text`);
    # in a command each one is shell-quoted where it needs it (`shlex.quote`, as
    # `results.analyze_command` does): an --out `my demo` pasted as two words. Plain paths stay bare.
    cache, checkpoint = shlex.quote(str(p.cache)), shlex.quote(str(p.checkpoint))
    lines = [
        f"checkpoint  {p.checkpoint}  (served as {DEMO_REPO} on {result.endpoint}, now stopped)",
        f"cache root  {p.cache}  (pass --cache-dir {cache} to export, plot, report)",
        *(f"export      {f}  ({plural(n, 'row', 'rows')})" for f, n in result.rows.items()),
        f"figures     {p.plots}/  ({plural(len(result.figures), 'file', 'files')})",
    ]
    for line in lines:
        print_text(out, line)
    for line in (
        "next, offline from the cache:",
        f"  svd-probe plot {DEMO_REPO} --cache-dir {cache} --kind spectra --format svg",
        f"  svd-probe analyze {checkpoint} --matrices QK --cache-dir {cache}   # a local folder",
    ):
        print_text(err, line)
    print_notes(result.notes)
