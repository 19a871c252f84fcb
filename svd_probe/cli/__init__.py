"""The `svd-probe` command line: parse, call the library, report. No work happens here.

Commands live in the modules beside this one, grouped by the part of the library they drive;
`app` collects them all.
"""

from __future__ import annotations

import sys

from svd_probe.cli import align as _align  # noqa: F401  (registers align)
from svd_probe.cli import analysis as _analysis  # noqa: F401  (registers models, analyze, export, plot)
from svd_probe.cli import cache as _cache  # noqa: F401  (registers cache list, cache rm)
from svd_probe.cli import demo as _demo  # noqa: F401  (registers demo)
from svd_probe.cli import diff as _diff  # noqa: F401  (registers diff)
from svd_probe.cli import report as _report  # noqa: F401  (registers report)
from svd_probe.cli import sweep as _sweep  # noqa: F401  (registers sweep)
from svd_probe.cli import train as _train  # noqa: F401  (registers train, compare)
from svd_probe.cli.app import alert, app, err, out, print_text
from svd_probe.errors import SvdProbeError

__all__ = ["app", "err", "main", "out"]


# Exit codes (README "Exit codes"): 0 done; 1 the command ran but failed for a reason outside its
# input (a file system error, nothing could be drawn) or a bug (the only case with a traceback);
# 2 bad input or usage; 3 the network or the Hub could not be reached; 130 interrupted (Ctrl-C);
# 143 train stopped by SIGTERM.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NETWORK, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _is_network_error(e: BaseException) -> bool:
    """A connection, DNS or timeout failure that no layer below turned into a `TransferError`."""
    import socket

    if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    import httpx2  # huggingface_hub 2.x's HTTP client (the declared floor)

    return isinstance(e, httpx2.TransportError)


def _fail(message: str, hint: str | None, code: int) -> None:
    # Messages quote paths and names the user or a file gave, so they print as `print_text` prints
    # them: text, never markup (a path with `[/]` in it ended in rich's MarkupError traceback
    # instead of the message); control characters as escapes (a local folder `x\x1b]0;…\x07` in
    # "no cached analysis of …" retitled the terminal); and unwrapped, as the notes are: rich
    # folded a long path or the hint's `Run: svd-probe analyze …` at 80 columns with a newline
    # in it, so a copied path or command came out in two pieces. The terminal wraps it instead.
    print_text(alert, message, prefix=("error:", "bold red"))
    if hint:
        print_text(alert, hint, prefix=("hint:", "dim"))
    sys.exit(code)


def main() -> None:
    """Console-script entry point: known errors end with a short message, a hint and the exit code
    above, never a traceback."""
    try:
        app()
    except SvdProbeError as e:
        _fail(e.message, e.hint, e.exit_code)
    except KeyboardInterrupt:
        # Work is saved as it finishes (a spectra file per layer, training checkpoints), so an
        # interrupt loses at most the layer or the steps in progress.
        alert.print("interrupted: finished work is saved; rerun the same command to resume.")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if _is_network_error(e):
            _fail(
                f"network error: {e}",
                "Check the connection and --endpoint / $HF_ENDPOINT; cached analyses still export and plot offline.",
                EXIT_NETWORK,
            )
        if isinstance(e, OSError):  # disk full, permission denied, read-only file system
            where = f" ({e.filename})" if e.filename else ""
            _fail(
                f"{e.strerror or e}{where}",
                "Free space or pick a folder you can write (--out, --cache-dir).",
                EXIT_FAILED,
            )
        raise  # a bug: the traceback is what a report needs


if __name__ == "__main__":
    main()
