"""`export`, `report` and the `analyze` summary against hostile names and cache manifests: a
model folder whose name holds a carriage return, a negative --at-rank, manifests that list
thousands of versions, dims and notes, and markup in every manifest field the page shows. Each
test but the last failed on the code before its fix; the last holds the page's escaping without a
browser (test_html_report's check of it needs Chromium).

The caches are real: a small Llama-layout checkpoint analyzed once per module (`cache_fixtures`),
copied per test and edited by hand.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from cache_fixtures import copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from test_cache_robustness import run_cli  # the console entry point, stderr's wraps undone

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.errors import BadOptionError
from svd_probe.export import export
from svd_probe.results import CacheQuery


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


class PageParser(HTMLParser):
    """Every start tag with its attributes, and the rows of each `data-table` table."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, tuple[str, ...]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, tuple(sorted(k for k, _ in attrs))))
        if tag == "table":
            self._table = dict(attrs).get("data-table")
            self.tables.setdefault(self._table or "", [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def report_args(model, cache_root: Path, page: Path) -> list:
    return ["report", model, "--cache-dir", cache_root, "--out", page, "--kind", "layerwise", "--dpi", "10"]


def test_csv_export_of_a_name_with_a_carriage_return_keeps_one_row_per_spectrum(llama, tmp_path, monkeypatch, capsys):
    """A local folder named "Icon\\r" (macOS's name for a folder's icon file) is the model name
    of its rows; the csv writer of Python 3.10-3.12 (under pandas' to_csv) left the bare \\r
    unquoted, so every CSV reader (the csv module, pandas) read each row as two: 180 rows of 1 and
    26 cells for 90 spectra. (Python 3.13's writer quotes it: there the old code passes.)"""
    folder = tmp_path / "Icon\r"
    shutil.copytree(llama, folder)
    analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu"))
    table, spectra = tmp_path / "m.csv", tmp_path / "s.jsonl"
    for fmt, path in (("csv", table), ("jsonl", spectra)):
        args = ["export", folder, "--cache-dir", tmp_path / "cache", "--format", fmt, "--out", path]
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, err
    records = [json.loads(line) for line in spectra.read_text().splitlines()]
    with open(table, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert len(rows) == len(records) > 0  # one metrics row per spectrum, as the jsonl has
    assert all(len(row) == len(header) for row in rows)
    model, layer, scope = header.index("model"), header.index("layer"), header.index("scope")
    assert {row[model] for row in rows} == {"Icon\r"}
    assert [(int(r[layer]), r[scope]) for r in rows] == [(r["layer"], r["scope"]) for r in records]


def test_export_refuses_a_negative_at_rank(llama, template, tmp_path, monkeypatch, capsys):
    """`--at-rank -3` wrote a column rel_error_at_-3 holding the error at rank k - 3 (numpy's
    slice from the end), exit 0; the error at rank 0 (a matrix approximated by nothing) is 1."""
    cache = copy(template, tmp_path, llama)
    table = tmp_path / "m.csv"
    args = ["export", llama, "--cache-dir", cache.root, "--format", "csv", "--out", table]
    code, _, err = run_cli([*args, "--at-rank", "-3"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "Invalid value for '--at-rank'" in err and not table.exists()  # the option's own bound
    with pytest.raises(BadOptionError, match="--at-rank must be 0 or more"):  # and the library's
        export(CacheQuery(llama, cache_dir=cache.root), format="csv", out=table, at_rank=-3)
    assert not table.exists()
    code, _, err = run_cli([*args, "--at-rank", "0"], monkeypatch, capsys)
    assert code == 0, err
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["rel_error_at_0"]) == 1.0 for r in rows)


def test_report_provenance_of_a_manifest_listing_thousands_of_versions_is_bounded(
    llama, template, tmp_path, monkeypatch, capsys
):
    """A manifest's versions and dims fields of a "later version" gave the page a provenance row
    each, however many: a 9 MB manifest listing 600,000 made a 27 MB page."""
    cache = copy(template, tmp_path, llama)
    n = 3_000
    real = len(json.loads(cache.manifest_path.read_text())["versions"])  # svd_probe, torch, numpy, ...

    def many(m):
        m["versions"].update({f"v{i:05d}": "1.0" for i in range(n)})
        m["dims"].update({f"later_{i:05d}": "x" for i in range(n)})

    edit_manifest(cache.manifest_path, many)
    page = tmp_path / "r.html"
    code, _, err = run_cli(report_args(llama, cache.root, page), monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    prov = dict(parse_page(page).tables["provenance"])
    listed = [k for k in prov if k.startswith("computed with ")]
    assert "computed with torch" in prov and prov["dims d_model"] == "64"  # the real entries come first
    assert real < len(listed) <= 100 and 0 < sum(k.startswith("dims later_") for k in prov) <= 100
    assert prov["versions …"] == f"{n + real - len(listed):,} more in the cache manifest, not shown"
    assert "dims …" in prov and len(prov) < 250
    assert page.stat().st_size < 1_000_000


def test_analyze_summary_of_a_manifest_with_thousands_of_notes_is_bounded(
    llama, template, tmp_path, monkeypatch, capsys
):
    """The summary under `analyze` printed every note of the manifest's dims: 200,000 hand-added
    notes were 200,000 lines (10 s of printing)."""
    cache = copy(template, tmp_path, llama)
    n = 2_000
    edit_manifest(cache.manifest_path, lambda m: m["dims"].update(notes=[f"planted note {i}" for i in range(n)]))
    code, out, err = run_cli(["analyze", llama, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes[:2] == ["note: planted note 0", "note: planted note 1"] and len(notes) <= 30
    assert notes[-1] == f"note: {n - (len(notes) - 1):,} more notes in the cache manifest, not shown"


EVIL = "\"'><script>alert(1)</script><img src=x onerror=alert(2)></title></style><a href=javascript:x>"


def test_markup_in_every_manifest_field_the_page_shows_stays_text(llama, template, tmp_path, monkeypatch, capsys):
    """The page of a manifest with markup in the model name, config, versions (keys and values),
    dates, local path and a dims field has only the kinds of elements and attributes of the page of the
    clean manifest (more provenance rows), and shows each planted value as text."""
    cache = copy(template, tmp_path, llama)
    clean = tmp_path / "clean.html"
    code, _, err = run_cli(report_args(llama, cache.root, clean), monkeypatch, capsys)
    assert code == 0, err

    def hostile(m):
        m["model"] = "m" + EVIL
        m["local_path"] = EVIL
        m["created"], m["updated"] = EVIL, [EVIL]
        m["versions"].update({EVIL: EVIL, "torch": {"nested": EVIL}})
        for key in ("model_type", "architectures", "_name_or_path", "torch_dtype", "transformers_version"):
            m["config"][key] = EVIL
        m["dims"]["later_field"] = EVIL

    edit_manifest(cache.manifest_path, hostile)
    page = tmp_path / "evil.html"
    code, _, err = run_cli(report_args(llama, cache.root, page), monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    evil, base = parse_page(page), parse_page(clean)

    # No element or attribute came from a value: the planted fields add table rows, nothing else.
    def markup(p: PageParser) -> Counter:
        return Counter(t for t in p.tags if t[0] not in ("tr", "th", "td"))

    assert markup(evil) == markup(base) and set(evil.tags) <= set(base.tags)
    assert not any(tag == "script" or any(a.startswith("on") for a in attrs) for tag, attrs in evil.tags)
    prov = dict(evil.tables["provenance"])
    assert prov["model"] == "m" + EVIL and prov["local folder"] == EVIL and prov["computed"] == EVIL
    assert prov[f"computed with {EVIL}"] == EVIL and prov["dims later_field"] == EVIL
    assert prov["config _name_or_path"] == EVIL and json.loads(prov["computed with torch"]) == {"nested": EVIL}
