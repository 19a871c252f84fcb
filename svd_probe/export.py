"""`export`: cached spectra as jsonl (one record per spectrum) or metrics as csv / parquet."""

from __future__ import annotations

import json
from pathlib import Path

from svd_probe.errors import BadOptionError
from svd_probe.results import load_analysis
from svd_probe.spectra.metrics import DEFAULT_ERRORS

FORMATS = ("jsonl", "csv", "parquet")


def parse_errors(spec: str) -> tuple[float, ...]:
    """`0.01,0.001` → (0.01, 0.001); each must lie in (0, 1)."""
    try:
        values = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise BadOptionError(
            f"bad --errors value {spec!r}", "Give energy errors between 0 and 1, e.g. --errors 0.01,0.001,0.05."
        )
    return values


def export(
    model: str,
    *,
    format: str,
    out: str | Path,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    fold_norms: bool = True,
    normalize_stacked: bool = True,
    at_rank: int | None = None,
    errors: tuple[float, ...] = DEFAULT_ERRORS,
) -> int:
    """Write one file from the cache; returns the number of rows written. Reads no network."""
    fmt = format.lower()
    if fmt not in FORMATS:
        raise BadOptionError(f"unknown --format {format!r}", "Use jsonl, csv or parquet.")
    analysis = load_analysis(model, revision, cache_dir, fold_norms=fold_norms, normalize_stacked=normalize_stacked)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "jsonl":
        n = 0
        with open(tmp, "w") as f:
            for record in analysis.records():
                f.write(json.dumps(record) + "\n")
                n += 1
    else:
        df = analysis.metrics(errors=errors, at_rank=at_rank)
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
        n = len(df)
    tmp.replace(out)
    return n
