"""`svd-probe report`: one self-contained HTML page of cached analyses, offline.

    >>> from svd_probe.html_report import write_html_report
    >>> page = write_html_report([CacheQuery("deepseek-v3", cache_dir="cache")], "report.html")
    >>> page.size, page.notes

The page holds, per model: the provenance (model, repo or folder, revision and commit, options,
the versions that computed it and when, from the cache manifest), the summary `analyze` prints
(stacked O and VO ranks at 1% and 0.1% energy error), every figure `svd-probe plot` draws, the
shared-output-latent planner, and the metrics table of `svd-probe export --format csv`. Several
models get a section each and the comparison figure.

Self-contained: figures are PNG files embedded as base64 `data:` URIs, the CSS is inline, and
there is no JavaScript. A Content-Security-Policy meta tag (`default-src 'none'`) makes the
browser refuse any request the page could make, script included. Everything is read from the
cache (`load_analysis`, `make_plots`): no network.

Untrusted text: model names, config values, versions and notes come from the cache manifest, a
file we wrote but do not trust (a user or another tool can edit it). Every such string is `html.escape`d
where it is written into the page, long values are cut to `MAX_TEXT` characters, and the
provenance lists at most `MAX_PROVENANCE_ENTRIES` versions and as many dims.

Page size: the tables grow with layers × kinds, not with heads. The stacked and layer spectra get
one metrics row each; per-head spectra get one summary row per (layer, kind), with the median,
min and max over heads. The per-head rows themselves are added (in a closed `<details>`) only
while a model has at most `max_head_rows` of them (default `MAX_HEAD_ROWS`, about 0.45 MB of
HTML); beyond that the page says how to export them. Measured on a synthetic checkpoint with
DeepSeek-V3's 62 layers and 128 heads (`svd_probe.testing.checkpoints.build_deepseek_v3`): a
1.8 MB page, 0.6 MB of it tables (1,284 rows, about 0.5 KB each) and 1.2 MB the seven figures
at the default 100 dpi (0.08-0.4 MB each as base64); its 55,552 per-head rows would have added
24 MB (0.44 KB a row).

Templating: plain f-strings with `html.escape` on every value. jinja2 is not a dependency of
svd-probe (it arrives only with torch), and one fixed page does not need a template language.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from svd_probe.errors import BadOptionError, utf8_text
from svd_probe.export import check_output_file, write_output_file
from svd_probe.kinds import HEAD, STACKED
from svd_probe.results import Analysis, CacheQuery, load_analysis
from svd_probe.spectra.metrics import DEFAULT_ERRORS, error_column

# Per-head metrics rows a model may put on the page; above it only their summary is shown.
MAX_HEAD_ROWS = 1024
# Characters of one value taken from the manifest (a version, a config field, a note).
MAX_TEXT = 300
# Entries of one manifest mapping (versions, dims) the provenance lists. A manifest records about
# ten of each; a hand-edited one of 9 MB listed 600,000, a provenance table of 27 MB.
MAX_PROVENANCE_ENTRIES = 64
DEFAULT_DPI = 100
# Columns that name a row of the metrics table; every other numeric column is a metric.
ID_COLUMNS = ("layer", "scope", "matrix", "m", "n")
# Per-head metrics summarized over the heads of a (layer, kind) by median, min and max.
HEAD_SUMMARY_METRICS = (
    *(error_column(e) for e in DEFAULT_ERRORS),
    "stable_rank",
    "sigma_max",
    "frobenius",
    "mp_spikes",
)
HEAD_STATS = ("median", "min", "max")

# Column of `Analysis.metrics()` → what the summary table calls it (as `analyze` prints it).
SUMMARY_COLUMNS = (
    ("layer", "layer"),
    ("O_rank_1pct", "O 1%"),
    ("O_rank_0.1pct", "O 0.1%"),
    ("VO_rank_1pct", "VO 1%"),
    ("VO_rank_0.1pct", "VO 0.1%"),
    ("full", "full"),
    ("head_VO_median_rank_1pct", "median head VO 1%"),
)
PLANNER_COLUMNS = (
    "layer",
    "latent",
    "energy_kept_O",
    "energy_kept_VO",
    "params_before",
    "params_after",
    "params_change",
    "flops_per_token_before",
    "flops_per_token_after",
)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 1.2em 3em;color:#1b1b1b;background:#fff}
h1{font-size:1.6em;margin:.8em 0 .2em}h2{font-size:1.3em;border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.4em 0 .4em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.3em 0 1em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.15em .5em;white-space:nowrap}
th{background:#f4f4f4;text-align:left;font-weight:600}
td.num{text-align:right}td.na{color:#999;text-align:center}
table.kv th{width:14em}table.kv td{white-space:normal;word-break:break-all}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
.notes li{color:#7a4b00}
nav a{margin-right:1em}
details summary{cursor:pointer;color:#0645ad}
code{background:#f4f4f4;padding:0 .2em}
"""


@dataclass
class HtmlPage:
    """A rendered report: the page, and what it says it left out.

    `tables` holds, per model display name, the DataFrames the page's tables show (for tests and
    notebooks); `images` counts the embedded figures.
    """

    html: str
    models: list[str]
    images: int = 0
    notes: list[str] = field(default_factory=list)
    tables: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def size(self) -> int:
        """Bytes of the page as written (UTF-8)."""
        return len(self.html.encode())


# --- escaping and formatting ----------------------------------------------------------------------


def _text(value: object, limit: int = MAX_TEXT) -> str:
    """A manifest value as bounded text: scalars as they are, anything else as JSON."""
    if value is None or isinstance(value, (str, int, float, bool, os.PathLike)):
        s = os.fspath(value) if isinstance(value, os.PathLike) else str(value) if value is not None else "—"
    else:
        try:
            s = json.dumps(value, sort_keys=True, default=str)
        except (TypeError, ValueError):
            s = repr(value)
    # A lone surrogate (JSON's "\\ud800", or a file name's undecodable byte) has no UTF-8: the
    # page's encode() ended `report` in a UnicodeEncodeError. Shown as its escape instead.
    s = utf8_text(s)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def esc(value: object, limit: int = MAX_TEXT) -> str:
    """Escaped, bounded text of any value, safe inside an element or a quoted attribute."""
    return html.escape(_text(value, limit), quote=True)


def _is_missing(v: object) -> bool:
    if v is None or v is pd.NA:
        return True
    return isinstance(v, (float, np.floating)) and math.isnan(v)


def format_number(v: object) -> str:
    """A table cell: integers whole, floats to 5 significant digits, missing as an em dash."""
    if _is_missing(v):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return str(int(f)) if f.is_integer() and abs(f) < 1e15 else f"{f:.5g}"
    return _text(v)


def _cell(v: object) -> str:
    if _is_missing(v):
        return '<td class="na">—</td>'
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        return f'<td class="num">{format_number(v)}</td>'
    return f"<td>{esc(v)}</td>"


def html_table(frame: pd.DataFrame, name: str, headers: Sequence[str] | None = None) -> str:
    """A DataFrame as an HTML table (`data-table=name`), every header and cell escaped."""
    # `headers`: markup built by this module, escaped there; a frame's own column names (a cache
    # can name them) are escaped here.
    heads = list(headers) if headers is not None else [esc(str(c)) for c in frame.columns]
    head = "".join(f"<th>{h}</th>" for h in heads)
    rows = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return (
        f'<div class="scroll"><table data-table="{esc(name)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{rows}\n</tbody></table></div>"
    )


def _kv_table(pairs: Iterable[tuple[str, object]], name: str) -> str:
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<div class="scroll"><table class="kv" data-table="{esc(name)}"><tbody>\n{rows}\n</tbody></table></div>'


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n, 4 * MAX_TEXT)}</li>" for n in notes)
    return f'<ul class="notes">{items}</ul>'


def _ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for ly in sorted(layers):
        if runs and runs[-1][1] == ly - 1:
            runs[-1][1] = ly
        else:
            runs.append([ly, ly])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --- the tables -------------------------------------------------------------------------------------


def summary_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The summary `analyze` prints (`svd_probe.report.summary_rows`), read off the metrics table:
    per layer, the stacked O and VO ranks at 1% and 0.1%, the full rank, and the median over
    heads of the per-head VO rank at 1%. (summary_rows wants an `AnalyzeOutcome`, whose module
    loads torch: 2-12 s measured, for numbers this table already holds.)"""
    cols = [k for k, _ in SUMMARY_COLUMNS]
    if metrics.empty:
        return pd.DataFrame(columns=cols)
    r1, r01 = (error_column(e) for e in DEFAULT_ERRORS)
    stacked = metrics[metrics["scope"] == STACKED].set_index(["matrix", "layer"])
    head_vo = metrics[(metrics["scope"] == HEAD) & (metrics["matrix"] == "VO")]
    medians = head_vo.groupby("layer")[r1].median()
    rows = []
    for layer in sorted(metrics["layer"].unique()):
        row: dict = {"layer": int(layer)}
        for kind in ("O", "VO"):
            hit = (kind, layer) in stacked.index
            row[f"{kind}_rank_1pct"] = int(stacked.loc[(kind, layer), r1]) if hit else None
            row[f"{kind}_rank_0.1pct"] = int(stacked.loc[(kind, layer), r01]) if hit else None
        full = next((stacked.loc[(k, layer), ["m", "n"]] for k in ("O", "VO") if (k, layer) in stacked.index), None)
        row["full"] = int(min(full)) if full is not None else None
        row["head_VO_median_rank_1pct"] = float(medians[layer]) if layer in medians.index else None
        rows.append(row)
    return pd.DataFrame(rows, columns=cols).astype(object)


def _metric_columns(frame: pd.DataFrame) -> list[str]:
    skip = {"model", "revision", "head", *ID_COLUMNS}
    cols = [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]
    # A column that is NaN on every row of this table (WeightWatcher's metrics outside the layer
    # scope) says nothing: left out of that table, still in the export.
    return [c for c in cols if frame[c].notna().any()]


def matrix_metrics_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """Rows of the stacked and layer spectra: one per (layer, scope, kind), every metric."""
    part = metrics[metrics["scope"] != HEAD]
    return part[[*ID_COLUMNS, *_metric_columns(part)]].reset_index(drop=True)


def head_rows_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """The per-head rows: one per (layer, kind, head), every metric."""
    part = metrics[metrics["scope"] == HEAD]
    return part[["layer", "matrix", "head", "m", "n", *_metric_columns(part)]].reset_index(drop=True)


def head_summary_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, kind) of the per-head spectra: the number of heads, then the median, min and
    max over heads of each of HEAD_SUMMARY_METRICS (columns `<metric> <stat>`)."""
    part = metrics[metrics["scope"] == HEAD]
    names = [m for m in HEAD_SUMMARY_METRICS if m in part.columns and part[m].notna().any()]
    rows = []
    # sort=False keeps the export's order: layers ascending, kinds in canonical order.
    for (layer, kind), g in part.groupby(["layer", "matrix"], sort=False):
        row: dict = {"layer": layer, "matrix": kind, "heads": len(g)}
        for m in names:
            vals = g[m].to_numpy(dtype=np.float64)
            row[f"{m} median"] = float(np.median(vals))
            row[f"{m} min"] = float(vals.min())
            row[f"{m} max"] = float(vals.max())
        rows.append(row)
    cols = ["layer", "matrix", "heads", *(f"{m} {s}" for m in names for s in HEAD_STATS)]
    return pd.DataFrame(rows, columns=cols)


def _split_headers(columns: Sequence[str]) -> list[str]:
    """'rank_1pct median' → 'rank_1pct <small>median</small>' (the header text stays the column name)."""
    out = []
    for c in columns:
        name, _, stat = c.rpartition(" ")
        out.append(f"{esc(name)} <small>{esc(stat)}</small>" if name and stat in HEAD_STATS else esc(c))
    return out


def planner_totals_pairs(plan) -> list[tuple[str, str]]:
    """The planner's whole-model numbers, as `svd-probe plot` prints them."""
    t = plan.totals()

    def pct_pair(a: float, b: float) -> str:
        return "—" if math.isnan(a) else f"{a * 100:.2f}% / {b * 100:.2f}%"

    return [
        ("n · d_v · H", f"{plan.n_heads} · {plan.d_v} · {plan.d_model:,}"),
        ("latent D", f"{plan.latent:,}"),
        ("break-even D", f"{t['break_even_latent']:,.1f}"),
        ("layers (with spectra)", f"{t['layers']} ({t['layers_with_spectra']})"),
        ("output weights before", f"{t['params_before']:,}"),
        ("output weights after", f"{t['params_after']:,}"),
        ("change", f"{t['params_change'] * 100:+.1f}%"),
        ("FLOP per token, before → after", f"{t['flops_per_token_before']:,} → {t['flops_per_token_after']:,}"),
        ("stacked O energy kept, min / mean", pct_pair(t["energy_kept_O_min"], t["energy_kept_O_mean"])),
        ("stacked VO energy kept, min / mean", pct_pair(t["energy_kept_VO_min"], t["energy_kept_VO_mean"])),
    ]


def provenance_pairs(analysis: Analysis) -> list[tuple[str, object]]:
    """Where the numbers come from, read from the cache manifest (every value untrusted)."""
    m = analysis.manifest
    cfg = analysis.config
    dims = analysis.dims
    pairs: list[tuple[str, object]] = [("model", analysis.display)]
    if analysis.repo_id:
        pairs.append(("Hub repo", analysis.repo_id))
    local = m.get("local_path") or (str(analysis.ref.local_path) if analysis.ref.local_path else None)
    if local:
        pairs.append(("local folder", local))
    pairs += [("revision", analysis.revision), ("commit", analysis.commit)]
    pairs += [(f"option {k}", v) for k, v in asdict(analysis.options).items()]
    for key in ("model_type", "architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version"):
        if key in cfg:
            pairs.append((f"config {key}", cfg[key]))
    dim_pairs: list[tuple[str, object]] = []
    for key, v in dims.items():
        if key != "notes" and (v is None or isinstance(v, (str, int, float, bool))):
            dim_pairs.append((f"dims {key}", v))
    pairs += _first_entries(dim_pairs, "dims")
    n_layers = dims.get("num_layers")
    pairs.append(("layers cached", f"{_ranges(analysis.layers)} ({len(analysis.layers)} of {_text(n_layers)})"))
    versions = m.get("versions")
    if isinstance(versions, dict):
        ordered = sorted(versions.items(), key=lambda kv: str(kv[0]))
        pairs += _first_entries([(f"computed with {k}", v) for k, v in ordered], "versions")
    else:
        pairs.append(("computed with", "versions not recorded in the manifest"))
    pairs += [("computed", m.get("created")), ("last updated", m.get("updated")), ("cache folder", analysis.cache_dir)]
    return pairs


def _first_entries(pairs: list[tuple[str, object]], what: str) -> list[tuple[str, object]]:
    """At most MAX_PROVENANCE_ENTRIES of `pairs`, then one row that counts the rest."""
    if len(pairs) <= MAX_PROVENANCE_ENTRIES:
        return pairs
    rest = len(pairs) - MAX_PROVENANCE_ENTRIES
    return [*pairs[:MAX_PROVENANCE_ENTRIES], (f"{what} …", f"{rest:,} more in the cache manifest, not shown")]


# --- the page ---------------------------------------------------------------------------------------


def _figure(path: Path, kind: str, stem: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure data-kind="{esc(kind)}"><img alt="{esc(kind)} figure ({esc(stem)})" '
        f'src="data:image/png;base64,{data}"><figcaption>{esc(kind)}: {esc(stem)}</figcaption></figure>'
    )


def _section_id(slug: str) -> str:
    return "model-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in slug)


def render_html_report(
    models: Sequence[CacheQuery | Analysis | str],
    *,
    kinds: Iterable[str] | str | None = None,
    layer: int | None = None,
    latent: int | None = None,
    rank: int | None = None,
    dpi: float = DEFAULT_DPI,
    max_head_rows: int = MAX_HEAD_ROWS,
) -> HtmlPage:
    """Render the report page of one or more cached analyses (reads the cache only).

    Args:
        models: `CacheQuery`s, MODEL names (default revision, cache and options) or `Analysis`es.
        kinds, layer, latent, rank: the figures and their options, as `svd_probe.plots.make_plots`.
        dpi: resolution of the embedded PNG figures.
        max_head_rows: per-head metrics rows a model may put on the page (then only summarized).

    Returns:
        An `HtmlPage`: the HTML text, the notes (figures skipped, rows left out), the tables shown.

    Raises `CacheMissError` when a model is not cached, `BadOptionError` for a bad option or a
    model named twice.

    Example:
        >>> page = render_html_report([CacheQuery("deepseek-v3", cache_dir="cache")], kinds="layerwise")
        >>> page.tables["deepseek-v3"]["metrics"].head()
    """
    from svd_probe import __version__
    from svd_probe.plots import make_plots
    from svd_probe.plots.style import model_slug

    if not models:
        raise BadOptionError("no model given", "Name at least one cached model, e.g. `svd-probe report deepseek-v3`.")
    if max_head_rows < 0:
        raise BadOptionError(f"--max-head-rows must be 0 or more, got {max_head_rows}")
    if not 10 <= dpi <= 1200:
        raise BadOptionError(f"--dpi must be in 10-1200, got {dpi}")
    analyses = [m if isinstance(m, Analysis) else load_analysis(m, on_damaged="skip") for m in models]
    slugs = [model_slug(a) for a in analyses]
    for i, a in enumerate(analyses):
        twin = next(
            (b for b, s in zip(analyses[:i], slugs[:i], strict=True) if s == slugs[i] or b.display == a.display), None
        )
        if twin is not None:
            raise BadOptionError(
                f"{a.display} is named twice (or two models share the name {slugs[i]!r})",
                "Name each model once; compare two revisions of one model with two reports.",
            )

    page = HtmlPage(html="", models=[a.display for a in analyses])
    with tempfile.TemporaryDirectory(prefix="svd-probe-report-") as tmp:
        plots = make_plots(
            analyses, out_dir=tmp, formats=("png",), kinds=kinds, layer=layer, latent=latent, rank=rank, dpi=dpi
        )
        page.notes += plots.notes

        def figures_of(model: str | None, folder: Path) -> list[str]:
            out = []
            for r in plots.results:
                if r.extra.get("model") != model:
                    continue
                path = folder / f"{r.stem}.png"
                if path.is_file():
                    out.append(_figure(path, r.kind, r.stem))
            return out

        sections = []
        if len(analyses) > 1:
            compare = figures_of(None, Path(tmp))
            page.images += len(compare)
            plans = "".join(
                f"<h3>Output latent: {esc(p.model)}</h3>"
                + _kv_table(planner_totals_pairs(p), f"planner-totals-{p.model}")
                for p in plots.plans
            )
            sections.append(
                '<section id="comparison"><h2>Comparison</h2>'
                + ("".join(compare) or "<p>No comparison figure could be drawn (see the notes).</p>")
                + plans
                + "</section>"
            )
        for a, slug in zip(analyses, slugs, strict=True):
            figs = figures_of(a.display, plots.out_dirs[slug])
            page.images += len(figs)
            plan = next((p for p in plots.plans if p.model == a.display), None)
            sections.append(_model_section(a, slug, figs, plan, max_head_rows, page))

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    names = ", ".join(esc(a.display) for a in analyses)
    nav = "".join(f'<a href="#{_section_id(s)}">{esc(a.display)}</a>' for a, s in zip(analyses, slugs, strict=True))
    if len(analyses) > 1:
        nav = '<a href="#comparison">comparison</a>' + nav
    page.html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="svd-probe {esc(__version__)}">
<title>svd-probe report: {names}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>svd-probe report: {names}</h1>
<p>Written {esc(now)} by svd-probe {esc(__version__)} from the spectra cache (no network).
Ranks are the fewest singular values that keep all but 1% (or 0.1%) of a matrix's energy; the metric
columns are those of <code>svd-probe export --format csv</code> (docs/reference.md §4).</p>
<nav>{nav}</nav></header>
{"".join(sections)}
<section id="notes"><h2>Notes</h2>{_notes(page.notes) or "<p>None.</p>"}</section>
</body></html>
"""
    return page


def _model_section(a: Analysis, slug: str, figures: list[str], plan, max_head_rows: int, page: HtmlPage) -> str:
    metrics = a.metrics()  # the defaults of `svd-probe export --format csv`
    summary = summary_frame(metrics)
    matrix = matrix_metrics_frame(metrics) if not metrics.empty else pd.DataFrame()
    head_summary = head_summary_frame(metrics) if not metrics.empty else pd.DataFrame()
    tables: dict[str, pd.DataFrame] = {"summary": summary, "metrics": matrix, "head-summary": head_summary}
    key = esc(a.display)
    parts = [f'<section id="{_section_id(slug)}" data-model="{key}"><h2>{key}</h2>']
    parts.append("<h3>Provenance</h3>" + _kv_table(provenance_pairs(a), "provenance"))
    parts.append(
        "<h3>Summary: stacked ranks at 1% / 0.1% energy error</h3>"
        + html_table(summary, "summary", [esc(label) for _, label in SUMMARY_COLUMNS])
    )
    parts.append("<h3>Figures</h3>" + ("".join(figures) or "<p>No figure could be drawn (see the notes).</p>"))
    if plan is not None:
        frame = plan.table[[c for c in PLANNER_COLUMNS if c in plan.table.columns]]
        tables["planner"] = frame.reset_index(drop=True)
        parts.append(
            f"<h3>Shared output latent D = {plan.latent:,}: output projection n·d_v·H → n·d_v·D + D·H</h3>"
            + _kv_table(planner_totals_pairs(plan), "planner-totals")
            + html_table(tables["planner"], "planner", [esc(c) for c in frame.columns])
            + _notes(plan.notes)
        )
    if not matrix.empty:
        parts.append(
            "<h3>Metrics of the stacked and layer spectra</h3>"
            + html_table(matrix, "metrics", [esc(c) for c in matrix.columns])
        )
    if not head_summary.empty:
        parts.append(
            "<h3>Metrics of the per-head spectra: median, min and max over heads</h3>"
            + html_table(head_summary, "head-summary", _split_headers(head_summary.columns))
        )
        n_rows = int((metrics["scope"] == HEAD).sum())
        if n_rows <= max_head_rows:
            heads = head_rows_frame(metrics)
            tables["head-rows"] = heads
            parts.append(
                f"<details><summary>All {n_rows:,} per-head rows</summary>"
                + html_table(heads, "head-rows", [esc(c) for c in heads.columns])
                + "</details>"
            )
        else:
            # export takes the options analyze does (revision, folds, cache folder).
            export_cmd = a.analyze_command().replace("svd-probe analyze", "svd-probe export", 1)
            note = (
                f"{a.display}: {n_rows:,} per-head metrics rows are more than this page holds "
                f"({max_head_rows:,}, --max-head-rows); they are summarized above. All rows: "
                f"{export_cmd} --format csv --out {slug}-metrics.csv"
            )
            page.notes.append(note)
            parts.append(f"<p>{esc(note, 4 * MAX_TEXT)}</p>")
    parts.append("</section>")
    page.tables[a.display] = tables
    return "\n".join(parts)


def write_html_report(
    models: Sequence[CacheQuery | Analysis | str],
    out: str | Path,
    *,
    overwrite: bool = False,
    **options,
) -> HtmlPage:
    """Render the report (`render_html_report`, same keyword options) and write it to `out`.

    Args:
        models: the cached analyses.
        out: the HTML file; refused if it is a folder, or exists and `overwrite` is False.
        overwrite: replace an existing `out`.

    Returns:
        The `HtmlPage`, with `path` set.

    Example:
        >>> write_html_report(["deepseek-v3", "kimi-k2"], "report.html").size
    """
    path = check_output_file(out, overwrite)  # before any work: a refused --out costs nothing
    page = render_html_report(models, **options)
    data = page.html.encode()
    write_output_file(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)
    page.path = path
    return page
