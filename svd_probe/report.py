"""What `analyze` shows a person: live progress (layers, MB fetched, MB/s, ETA) and a summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
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

from svd_probe.kinds import HEAD, LAYER, STACKED
from svd_probe.spectra.metrics import energy_rank, metrics_batch

if TYPE_CHECKING:
    from svd_probe.analysis import AnalyzeOutcome
    from svd_probe.results import Analysis


def terminal_text(value: object) -> Text:
    """`value` as console text that is only text: never read as rich markup (a model name `[/]`
    in a manifest ended `cache list` in a MarkupError), and with every control character shown as
    an escape (`\\x1b`), so no escape sequence from a cache file reaches the terminal."""
    s = str(value)
    if not s.isprintable():
        s = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in s)
    return Text(s)


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
        self.total: int | None = None  # layers this run covers, once known
        self.done = 0  # of them, cached before the run or finished since

    def bytes_fetched(self) -> int:
        return self._bytes()

    def start(self, total_layers: int, cached_layers: int, bytes_source: Callable[[], int]) -> None:
        self._bytes = bytes_source
        self.t0 = time.perf_counter()
        self.total, self.done = total_layers, cached_layers
        if self._progress is not None:
            self._progress.start()
            # Cached layers count as done at once, so the ETA only reflects work still to do.
            self._task = self._progress.add_task("analyze", total=total_layers, completed=cached_layers)

    def layer_done(self, layer: int) -> None:
        self.done += 1
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


# The summary shows two stacked kinds (at 1% and 0.1%) and one per-head median, chosen from what
# was computed in this order: the defaults O and VO, then the others (`--matrices QK` gives QK).
_SUMMARY_STACKED = ("O", "VO", "QK", "KQ", "V", "K", "Q", "Q_pe")
_SUMMARY_HEAD = ("VO", "QK", "O", "V", "K", "Q", "Q_pe")
_SUMMARY_LAYER = ("QA", "KVA", "KVA_pe", "Qjoint", "KVjoint")
# The model's notes the summary prints: an adapter writes one or two; a hand-edited manifest with
# 200,000 made `analyze` print as many lines (10 s).
MAX_SUMMARY_NOTES = 20


class TqdmLayerProgress:
    """The same sink as `LayerProgress`, drawn by tqdm.auto (a widget in Jupyter, text elsewhere)."""

    def __init__(self):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bar = None
        self._bytes: Callable[[], int] = lambda: 0

    def start(self, total_layers: int, cached_layers: int, bytes_source: Callable[[], int]) -> None:
        self._bytes = bytes_source
        self._bar = self._tqdm(total=total_layers, initial=cached_layers, unit="layer", desc="analyze")

    def layer_done(self, layer: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._bytes() / 1e6:,.1f} MB", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


PROGRESS_CHOICES = ("auto", "rich", "tqdm", "none")


@contextlib.contextmanager
def progress_for(kind: str | None, console: Console | None = None):
    """A progress sink for `analyze(..., progress=kind)`.

    kind: "rich" (a live bar on `console`, default stderr), "tqdm" (tqdm.auto: a Jupyter widget),
    "none" / None (silent), or "auto": rich when stderr is a terminal, else tqdm when it is
    installed (notebooks), else none.
    """
    if kind not in (*PROGRESS_CHOICES, None):
        from svd_probe.errors import BadOptionError

        raise BadOptionError(f"unknown progress {kind!r}", "Pass progress='auto', 'rich', 'tqdm' or None.")
    console = console or Console(stderr=True)
    if kind == "auto":
        if console.is_terminal and not console.is_jupyter:
            kind = "rich"
        else:
            try:
                import tqdm.auto  # noqa: F401
            except ImportError:
                kind = "none"
            else:
                kind = "tqdm"
    sink: LayerProgress | TqdmLayerProgress
    if kind == "tqdm":
        try:
            sink = TqdmLayerProgress()
        except ImportError as e:
            from svd_probe.errors import BadOptionError

            raise BadOptionError("progress='tqdm' needs tqdm", "pip install tqdm, or pass progress='rich'.") from e
    else:
        sink = LayerProgress(console, enabled=kind == "rich")
    try:
        yield sink
    finally:
        sink.close()


def summary_rows(outcome: AnalyzeOutcome, kinds: Iterable[str] | None = None) -> list[dict]:
    """`layer_summary` of the layers one `analyze` call covered."""
    return layer_summary(outcome.analysis, outcome.layers, kinds)


def layer_summary(
    analysis: Analysis, layers: Iterable[int] | None = None, kinds: Iterable[str] | None = None
) -> list[dict]:
    """Per layer (default: every layer of `analysis`): rank at 1% and 0.1% energy error of every stacked kind computed (and of the
    layer-scope latents), with the full rank, and the median per-head rank at 1% of each head kind.

    kinds: only these matrix kinds (what `--matrices` asked for; a layer file can also hold kinds
    an earlier run computed). None: every kind the layers hold.
    """
    a = analysis
    only = set(kinds) if kinds is not None else None
    rows = []
    for layer in a.layers if layers is None else layers:
        ls = a.layer_spectra.get(layer)
        if ls is None:
            continue
        row: dict = {"layer": layer}
        for scope, kinds_of_scope in ((STACKED, _SUMMARY_STACKED), (LAYER, _SUMMARY_LAYER)):
            for kind in kinds_of_scope:
                s = ls.spectrum(scope, kind)
                if s is None or (only is not None and kind not in only):
                    continue
                shape = ls.matrix_shape(scope, kind)
                row[f"{kind}_rank_1pct"] = energy_rank(s, 0.01)
                row[f"{kind}_rank_0.1pct"] = energy_rank(s, 0.001)
                row[f"{kind}_full_rank"] = int(min(shape)) if shape else int(s.shape[-1])
        for kind in _SUMMARY_HEAD:
            heads = ls.spectrum(HEAD, kind)
            if heads is None or (only is not None and kind not in only):
                continue
            head_shape = ls.matrix_shape(HEAD, kind)
            shape = head_shape or (heads.shape[-1], heads.shape[-1])
            row[f"head_{kind}_median_rank_1pct"] = float(np.median(metrics_batch(heads, shape)["rank_1pct"]))
        rows.append(row)
    return rows


def summary_columns(rows: list[dict]) -> tuple[list[str], str | None]:
    """The (at most two) rank kinds and the head kind the summary table shows, from what the rows hold."""
    have = {k for row in rows for k in row}
    ranked = [k for k in (*_SUMMARY_STACKED, *_SUMMARY_LAYER) if f"{k}_rank_1pct" in have][:2]
    head = next((k for k in _SUMMARY_HEAD if f"head_{k}_median_rank_1pct" in have), None)
    return ranked, head


def render_summary(outcome: AnalyzeOutcome, rows: list[dict]) -> Table:
    """The summary table; 7 columns at most, so it fits 80 columns. `summary_footer` gives the
    lines under it (printed unwrapped, so the cache folder can be copied)."""
    a = outcome.analysis
    opts = a.options
    ranked, head = summary_columns(rows)
    scope = "stacked" if any(k in _SUMMARY_STACKED for k in ranked) else "latent"
    # A control's ranks are a baseline, not the model's: said first, before the model's name.
    control = f"{opts.control} CONTROL (randomized weights) of " if opts.control else ""
    title = (
        f"{control}{a.display} @ {a.commit[:12]}  ·  {scope} ranks at 1% / 0.1% energy error"
        f"  ·  norms {'folded' if opts.fold_norms else 'not folded'}, heads {'normalized' if opts.normalize_stacked else 'raw'}"
    )
    table = Table(title=terminal_text(title), title_justify="left")  # the name is the manifest's
    table.add_column("layer", justify="right")
    for kind in ranked:
        table.add_column(f"{kind} 1%", justify="right")
        table.add_column(f"{kind} 0.1%", justify="right")
    if ranked:
        table.add_column("full", justify="right")
    if head:
        table.add_column(f"median head {head} 1%", justify="right")

    def cell(row, key):
        v = row.get(key)
        return "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    for row in rows:
        cells = [str(row["layer"])]
        for kind in ranked:
            cells += [cell(row, f"{kind}_rank_1pct"), cell(row, f"{kind}_rank_0.1pct")]
        if ranked:
            # The full rank of the first kind shown (O's by default: min(d_model, heads × head dim)).
            cells.append(cell(row, f"{ranked[0]}_full_rank"))
        if head:
            cells.append(cell(row, f"head_{head}_median_rank_1pct"))
        table.add_row(*cells)
    return table


# `--control` modes as the summary explains them (`svd_probe.spectra.controls`).
_CONTROL_WHAT = {"gaussian": "i.i.d. normal", "shuffled": "permuted"}


def summary_footer(outcome: AnalyzeOutcome, rows: list[dict]) -> list[Text]:
    """The lines under the summary table: what was done, the model's notes, the cache folder.

    Lines are text (`terminal_text`), never markup: the notes come from the manifest and the
    folder from --cache-dir and the model's name, so a `[/]` in either prints as itself, and a
    control character as its escape (a --cache-dir `c\\x1b]0;…\\x07` retitled the terminal)."""
    s = outcome.stats
    control = outcome.analysis.options.control
    lines: list[Text] = []
    if control:  # first, and short (< 80 columns): a control's ranks are never read as the model's
        what = _CONTROL_WHAT.get(control, "randomized")
        lines.append(Text(f"control: {control} copies of the weights ({what}), not the model's own"))
    lines += [
        Text(
            f"{s['computed']} layers computed, {s['from_cache']} from cache · {s['bytes_fetched'] / 1e6:,.1f} MB fetched · "
            f"{s['seconds']:.1f} s on {s['device']}"
        )
    ]
    # `Analysis.dims` checks what the manifest holds: a `dims` of [1] ended `analyze` in a traceback.
    notes = outcome.analysis.dims.get("notes") or []
    lines += [terminal_text(f"note: {n}") for n in notes[:MAX_SUMMARY_NOTES]]
    if len(notes) > MAX_SUMMARY_NOTES:
        lines.append(Text(f"note: {len(notes) - MAX_SUMMARY_NOTES:,} more notes in the cache manifest, not shown"))
    ranked, head = summary_columns(rows)
    if rows and not ranked and not head:
        lines.append(Text("nothing to summarise: the kinds computed have no stacked, latent or per-head spectrum"))
    lines.append(terminal_text(f"cache {outcome.cache_dir}"))
    return lines
