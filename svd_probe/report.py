"""What `analyze` shows a person: live progress (layers, MB fetched, MB/s, ETA) and a summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from svd_probe.kinds import HEAD, STACKED
from svd_probe.spectra.metrics import energy_rank, metrics_batch

if TYPE_CHECKING:
    from svd_probe.analysis import AnalyzeOutcome


class _BytesColumn(ProgressColumn):
    """MB fetched and the mean MB/s since the first fetch, read live from the source's counter."""

    def __init__(self, tracker: LayerProgress):
        super().__init__()
        self.tracker = tracker

    def render(self, task) -> Text:
        fetched = self.tracker.bytes_fetched()
        elapsed = max(time.perf_counter() - self.tracker.t0, 1e-9)
        return Text(f"{fetched / 1e6:,.1f} MB  {fetched / 1e6 / elapsed:,.1f} MB/s", style="cyan")


class LayerProgress:
    """Progress sink for `svd_probe.analysis.analyze`; a silent one when disabled."""

    def __init__(self, console: Console, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._bytes: Callable[[], int] = lambda: 0
        self._progress = (
            Progress(
                TextColumn("[bold]layer {task.completed}/{task.total}"),
                BarColumn(),
                TaskProgressColumn(),
                _BytesColumn(self),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            if enabled
            else None
        )
        self._task: TaskID | None = None

    def bytes_fetched(self) -> int:
        return self._bytes()

    def start(self, total_layers: int, cached_layers: int, bytes_source: Callable[[], int]) -> None:
        self._bytes = bytes_source
        self.t0 = time.perf_counter()
        if self._progress is not None:
            self._progress.start()
            # Cached layers count as done at once, so the ETA only reflects work still to do.
            self._task = self._progress.add_task("analyze", total=total_layers, completed=cached_layers)

    def layer_done(self, layer: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextlib.contextmanager
def layer_progress(console: Console, enabled: bool = True):
    p = LayerProgress(console, enabled)
    try:
        yield p
    finally:
        p.close()


def summary_rows(outcome: AnalyzeOutcome) -> list[dict]:
    """Per layer: rank at 1% and 0.1% of stacked O and VO, median per-head VO rank at 1%."""
    a = outcome.analysis
    rows = []
    for layer in outcome.layers:
        ls = a.layer_spectra.get(layer)
        if ls is None:
            continue
        row: dict = {"layer": layer}
        for kind in ("O", "VO"):
            s = ls.spectrum(STACKED, kind)
            shape = ls.matrix_shape(STACKED, kind)
            if s is not None:
                row[f"{kind}_rank_1pct"] = energy_rank(s, 0.01)
                row[f"{kind}_rank_0.1pct"] = energy_rank(s, 0.001)
                row[f"{kind}_full_rank"] = int(min(shape)) if shape else int(s.shape[-1])
        heads = ls.spectrum(HEAD, "VO")
        head_shape = ls.matrix_shape(HEAD, "VO")
        if heads is not None:
            shape = head_shape or (heads.shape[-1], heads.shape[-1])
            row["head_VO_median_rank_1pct"] = float(np.median(metrics_batch(heads, shape)["rank_1pct"]))
        rows.append(row)
    return rows


def render_summary(outcome: AnalyzeOutcome, rows: list[dict]) -> Table:
    a = outcome.analysis
    opts = a.options
    title = (
        f"{a.display} @ {a.commit[:12]}  ·  stacked ranks at 1% / 0.1% energy error"
        f"  ·  norms {'folded' if opts.fold_norms else 'not folded'}, heads {'normalized' if opts.normalize_stacked else 'raw'}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    for kind in ("O", "VO"):
        table.add_column(f"{kind} 1%", justify="right")
        table.add_column(f"{kind} 0.1%", justify="right")
    table.add_column("full", justify="right")
    table.add_column("median head VO 1%", justify="right")

    def cell(row, key):
        v = row.get(key)
        return "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    for row in rows:
        full = row.get("O_full_rank") or row.get("VO_full_rank")
        table.add_row(
            str(row["layer"]),
            cell(row, "O_rank_1pct"),
            cell(row, "O_rank_0.1pct"),
            cell(row, "VO_rank_1pct"),
            cell(row, "VO_rank_0.1pct"),
            "-" if full is None else str(full),
            cell(row, "head_VO_median_rank_1pct"),
        )
    s = outcome.stats
    table.caption = (
        f"{s['computed']} layers computed, {s['from_cache']} from cache · {s['bytes_fetched'] / 1e6:,.1f} MB fetched · "
        f"{s['seconds']:.1f} s on {s['device']} · cache {outcome.cache_dir}"
    ) + "".join(f"\nnote: {n}" for n in (outcome.analysis.manifest.get("dims") or {}).get("notes") or ())
    table.caption_justify = "left"
    return table
