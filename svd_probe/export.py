"""`export`: cached spectra as jsonl (one record per spectrum) or metrics as csv / parquet.

Reads the cache only, never the network. The output is written atomically (a temporary file in
the same folder, renamed when complete; removed on any failure, a full disk included), and an
existing file is never replaced unless `overwrite` is given.

A damaged layer file stops the export with a `CacheDamagedError` naming it, rather than leaving
its rows out: an export is a data set others read later, and a silently shorter one is wrong
where a missing figure panel is visible (`plot` goes on without the layer, with a note).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from svd_probe.atomic import atomic_write, is_disk_full
from svd_probe.errors import BadOptionError, DiskWriteError, OutputExistsError
from svd_probe.models import ModelRef
from svd_probe.results import Analysis, CacheQuery, load_analysis
from svd_probe.spectra.metrics import DEFAULT_ERRORS

FORMATS = ("jsonl", "csv", "parquet")


def check_output_file(out: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """`out` as a Path if it may be written: not a folder, and not an existing file unless `overwrite`."""
    out = Path(out)
    if out.is_dir():
        raise OutputExistsError(f"{flag} {out} is a folder", f"Name a file, e.g. {flag} {out / 'spectra.jsonl'}.")
    if out.exists() and not out.is_file():  # the atomic rename would put a file in its place
        raise OutputExistsError(
            f"{flag} {out} is not a regular file (a device, pipe or socket)", f"Name a file for {flag}."
        )
    # A link counts as the user's file even when it leads nowhere: exists() follows it, and the
    # atomic rename would silently replace a dangling link.
    if (out.exists() or out.is_symlink()) and not overwrite:
        link = " (a link)" if out.is_symlink() else ""
        raise OutputExistsError(
            f"{flag} {out} exists{link}; svd-probe does not overwrite files", "Pass --overwrite to replace it."
        )
    return out


def write_output_file(out: Path, write, flag: str = "--out", *, overwrite: bool = True) -> None:
    """`atomic_write(out, write)` of a file the user named with `flag`: an OSError (disk full,
    quota, read-only folder) becomes a `DiskWriteError` that names the file and the fix. Without
    `overwrite`, a file that appeared at `out` during the work is kept (`OutputExistsError`)."""
    try:
        atomic_write(out, write, exclusive=not overwrite)
    except OSError as e:
        raise DiskWriteError(
            f"cannot write {out}: {e.strerror or e}",
            f"Free space on that disk, or pick another {flag}." if is_disk_full(e) else f"Pick a writable {flag}.",
        ) from None


def _csv_quoting(df) -> int:
    """How `export` quotes a metrics table: as little as CSV needs (`QUOTE_MINIMAL`), unless a text
    cell holds a bare carriage return, which the csv writer of Python 3.10-3.12 leaves unquoted when
    lines end in \\n (a local folder "Icon\\r" as the model name split each of its rows in two for
    every CSV reader); then every text cell is quoted (`QUOTE_NONNUMERIC`).

    Cells that start with = + - @ are written as they are, not prefixed with ': the table is data
    for pandas, R and DuckDB, which would read the prefix as part of the name."""
    text = df.select_dtypes(exclude="number")
    has_cr = any(text[c].astype(str).str.contains("\r", regex=False).any() for c in text.columns)
    return csv.QUOTE_NONNUMERIC if has_cr else csv.QUOTE_MINIMAL


def export(
    query: CacheQuery | str | ModelRef,
    *,
    format: str,
    out: str | Path,
    at_rank: int | None = None,
    errors: tuple[float, ...] = DEFAULT_ERRORS,
    overwrite: bool = False,
    diff: CacheQuery | str | ModelRef | None = None,
    notes: list[str] | None = None,
) -> int:
    """Write one file from the cache; reads no network.

    Args:
        query: the cached analysis (a model name alone means revision main, default cache and options).
        format: jsonl (one spectrum a line), csv or parquet (the metrics table).
        out: the file to write; refused if it is a folder, or exists and `overwrite` is False.
        at_rank: also export the relative error at this fixed rank.
        errors: energy errors of the rank columns (0.01 → rank_1pct).
        overwrite: replace an existing `out`.
        diff: TUNED: write the cached diff TUNED − `query` (`svd_probe.diff.load_diff`) instead,
            with the same columns plus base_model, base_revision, tuned_model, tuned_revision
            (and base_frobenius, rel_delta_norm in the metrics).
        notes: a list to append the loader's notes to (a layer file left out, a damaged one
            skipped), for a caller that shows them; the file is written either way.

    Returns:
        The number of rows written.

    Example:
        >>> export(CacheQuery("deepseek-v3", cache_dir="cache"), format="csv", out="dsv3.csv")
    """
    fmt = format.lower()
    if fmt not in FORMATS:
        raise BadOptionError(f"unknown --format {format!r}", "Use jsonl, csv or parquet.")
    if at_rank is not None and at_rank < 0:
        # The error at a rank below 0 has no meaning; the table filled rel_error_at_-3 with the
        # error at rank k - 3 (σ[-3:], numpy's slice from the end), exit 0.
        raise BadOptionError(f"--at-rank must be 0 or more, got {at_rank}", "Pass a rank r >= 0, e.g. --at-rank 64.")
    out = check_output_file(out, overwrite)
    analysis: Analysis
    if diff is not None:
        from svd_probe.diff import load_diff

        analysis = load_diff(query, diff)
    else:
        analysis = load_analysis(query)
    if notes is not None:
        notes.extend(analysis.notes)
    n = 0

    def write(tmp: str) -> None:
        nonlocal n
        if fmt == "jsonl":
            with open(tmp, "w") as f:
                for record in analysis.records():
                    f.write(json.dumps(record) + "\n")
                    n += 1
            return
        df = analysis.metrics(errors=errors, at_rank=at_rank)
        if fmt == "csv":
            df.to_csv(tmp, index=False, quoting=_csv_quoting(df))
        else:
            df.to_parquet(tmp, index=False)
        n = len(df)

    write_output_file(out, write, overwrite=overwrite)
    return n
