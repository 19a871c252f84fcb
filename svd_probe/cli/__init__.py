"""The `svd-probe` command line: parse, call the library, report. No work happens here.

Commands live in the modules beside this one, grouped by the part of the library they drive;
`app` collects them all.
"""

from __future__ import annotations

import sys

from svd_probe.cli import align as _align  # noqa: F401  (registers align)
from svd_probe.cli import analysis as _analysis  # noqa: F401  (registers models, analyze, export, plot)
from svd_probe.cli import demo as _demo  # noqa: F401  (registers demo)
from svd_probe.cli import diff as _diff  # noqa: F401  (registers diff)
from svd_probe.cli import report as _report  # noqa: F401  (registers report)
from svd_probe.cli import train as _train  # noqa: F401  (registers train, compare)
from svd_probe.cli.app import app, err, out
from svd_probe.errors import SvdProbeError

__all__ = ["app", "err", "main", "out"]


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
