"""`plot`, `report` and `export` against more hostile names: a model name with `$` (matplotlib's
mathtext) or console markup (the planner tables), a local folder whose name has an undecodable
byte or an escape sequence, paths that need shell quoting in the commands we suggest, a layer
file without the matrix shapes it should record, and a negative `--at-rank`. Each test failed on
the code before its fix.

The caches are real: a small Llama-layout checkpoint analyzed once per module (`cache_fixtures`),
copied per test, or copied under a hostile folder name and analyzed there.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import matplotlib
import pytest
from cache_fixtures import copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from safetensors import safe_open
from safetensors.numpy import save_file
from test_cache_robustness import run_cli  # the console entry point, stderr's wraps undone

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.errors import CacheMissError
from svd_probe.plots import make_plots
from svd_probe.plots.style import model_slug
from svd_probe.results import CacheQuery, load_analysis


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def analyzed_copy(llama: Path, folder: Path, cache_root: Path) -> Path:
    """`llama` copied to `folder` (a hostile name) and analyzed into `cache_root`."""
    shutil.copytree(llama, folder)
    analyze(AnalyzeJob(model=str(folder), cache_dir=cache_root, device="cpu"))
    return folder


@pytest.fixture(name="wide")
def wide_fixture(monkeypatch) -> None:
    """Consoles wide enough that no message wraps or folds a long path (run_cli undoes wraps at
    spaces, not a path folded in two)."""
    from svd_probe.cli.app import alert, err, out

    for console in (alert, err, out):
        monkeypatch.setattr(console, "_width", 10_000)


def svg_text(fig) -> str:
    """The figure as SVG with its text as <text> elements (not glyph paths): what is drawn."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")
    return html.unescape(buf.getvalue())


# --- 1. a `$` in a name is text, not mathtext -------------------------------------------------------


def test_a_dollar_in_a_model_name_is_drawn_as_text_not_mathtext(llama, template, tmp_path, monkeypatch, capsys):
    """A manifest's model `m$\\bad$x` (and a folder `my$\\x$model`) was read by matplotlib as
    mathtext: `plot` and `report` ended in its ValueError traceback (Unknown symbol), exit 1."""
    cache = copy(template, tmp_path, llama)
    name = "m$\\bad$x^$y"
    edit_manifest(cache.manifest_path, lambda m: m.update(model=name))
    folder = analyzed_copy(llama, tmp_path / "my$\\x$model", cache.root)
    out = tmp_path / "plots"
    kinds = "layerwise,heatmap,spectra,compare"
    args = ["plot", llama, folder, "--cache-dir", cache.root, "--out", out, "--kind", kinds, "--dpi", "10"]
    code, _, err = run_cli([*args, "--format", "png,svg"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert (out / model_slug(folder.name) / "layerwise.svg").is_file() and (out / "compare.png").is_file()
    page = tmp_path / "r.html"
    args = ["report", llama, "--cache-dir", cache.root, "--out", page, "--kind", "layerwise", "--dpi", "10"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err

    # What is drawn is the name, `$` and all: each figure's SVG text holds it whole.
    queries = [CacheQuery(str(llama), cache_dir=cache.root), CacheQuery(str(folder), cache_dir=cache.root)]
    report = make_plots(queries, out_dir=tmp_path / "lib", kinds=kinds, dpi=10, keep_figures=True)
    for kind in ("layerwise", "heatmap", "spectra"):
        fig = report.result(kind, name).figure
        assert name in fig.get_suptitle()
        assert name in svg_text(fig)
    # Tick labels stay matplotlib's: a log axis still writes 10^k as mathtext.
    ticks = report.result("spectra", name).figure.axes[0].get_yticklabels()
    assert any(t.get_text().startswith("$\\mathdefault{10^") and t.get_parse_math() for t in ticks), ticks
    compare = report.result("compare").figure
    legend = [t.get_text() for t in compare.legends[0].texts]
    assert any(t.startswith(folder.name) for t in legend) and any(t.startswith(name) for t in legend), legend
    drawn = svg_text(compare)
    assert folder.name in drawn and name in drawn
    compare.savefig(io.BytesIO(), format="png")


def test_a_model_name_with_console_markup_prints_in_the_planner_tables(llama, template, tmp_path, monkeypatch, capsys):
    """The planner tables `plot` prints named the model in rich markup: a manifest's model
    `m[/]x[bold]` ended `plot --kind planner` (and kv-planner) in a MarkupError traceback."""
    cache = copy(template, tmp_path, llama)
    name = "m[/]x[bold]"
    edit_manifest(cache.manifest_path, lambda m: m.update(model=name))
    for kind in ("planner", "kv-planner"):
        args = ["plot", llama, "--cache-dir", cache.root, "--out", tmp_path / kind, "--kind", kind, "--dpi", "10"]
        code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, err
        assert name in out and list((tmp_path / kind).glob("*.png")), out


# --- 2. a folder name with an undecodable byte ------------------------------------------------------


@pytest.fixture(name="undecodable")
def undecodable_fixture(llama, tmp_path) -> tuple[Path, Path]:
    try:
        folder = tmp_path / os.fsdecode(b"bad\xffname")
        folder.mkdir()
        folder.rmdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses a name that is not UTF-8")
    return analyzed_copy(llama, folder, tmp_path / "cache"), tmp_path / "cache"


def test_a_folder_name_with_an_undecodable_byte_exports_plots_and_reports(undecodable, tmp_path, monkeypatch, capsys):
    """A local folder `bad\\xffname` (Linux; Python reads the byte as the lone surrogate \\udcff)
    ended `export --format csv/parquet`, `plot` and `report` in pyarrow's UnicodeEncodeError
    traceback: the metrics table could not hold the model name. Shown as its escape instead, as
    the report page shows such text."""
    folder, root = undecodable
    shown = "bad\\udcffname"  # the byte's escape, as text
    tables = {fmt: tmp_path / f"m.{fmt}" for fmt in ("csv", "parquet", "jsonl")}
    for fmt, path in tables.items():
        args = ["export", folder, "--cache-dir", root, "--format", fmt, "--out", path]
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, (fmt, err)
    spectra = len(tables["jsonl"].read_text().splitlines())
    with open(tables["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == spectra > 0 and {r["model"] for r in rows} == {shown}
    pq = pytest.importorskip("pyarrow.parquet")
    assert set(pq.read_table(tables["parquet"]).column("model").to_pylist()) == {shown}

    page = tmp_path / "r.html"
    args = ["report", folder, "--cache-dir", root, "--out", page, "--kind", "layerwise,compare", "--dpi", "10"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert shown in page.read_text(encoding="utf-8")
    args = ["plot", folder, "--cache-dir", root, "--out", tmp_path / "p", "--kind", "layerwise,heatmap", "--dpi", "10"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    query = CacheQuery(str(folder), cache_dir=root)
    report = make_plots([query], out_dir=tmp_path / "q", kinds="layerwise", dpi=10, keep_figures=True)
    assert shown in svg_text(report.results[0].figure)


# --- 3. notes print no escape sequence ------------------------------------------------------------------


def test_notes_naming_a_folder_with_an_escape_sequence_print_it_escaped(llama, tmp_path, monkeypatch, capsys):
    """A folder `x\\x1b]0;pwned\\x07y` (an OSC sequence: it retitles the terminal) reached the
    terminal raw in the notes of `plot` and `report` (escaped for console markup only), and in
    matplotlib's missing-glyph warning for the figure title that drew it."""
    root = tmp_path / "cache"
    folder = tmp_path / "x\x1b]0;pwned\x07y"
    shutil.copytree(llama, folder)
    analyze(AnalyzeJob(model=str(folder), cache_dir=root, device="cpu", matrices="O"))  # VO etc. missing: a note
    for command, out_name in (("plot", "p"), ("report", "r.html")):
        args = [
            command,
            folder,
            "--cache-dir",
            root,
            "--out",
            tmp_path / out_name,
            "--kind",
            "layerwise",
            "--dpi",
            "10",
        ]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, err
        notes = [n for n in re.split(r"(?=note: )", err) if n.startswith("note: ")]
        assert any("x\\x1b]0;pwned\\x07y" in n and "no stacked" in n for n in notes), (command, err)
        assert not any(c in out + err for c in "\x1b\x07"), (command, out, err)
        assert not any("\x1b" in str(w.message) for w in caught), [str(w.message) for w in caught]


# --- 4. suggested commands are shell-quoted -------------------------------------------------------------


def test_suggested_commands_quote_the_model_and_cache_folder(llama, tmp_path, monkeypatch, capsys, wide):
    """The `analyze` command in a hint (and the `export` command on the report page) joined the
    model folder and --cache-dir unquoted: a folder `my model` pasted as two words, and one
    holding `$(touch pwned)` ran it. Plain names stay unquoted."""
    folder = tmp_path / "my model $(touch pwned) it's"
    root = tmp_path / "cache dir $HOME"
    shutil.copytree(llama, folder)
    args = ["export", folder, "--cache-dir", root, "--format", "csv", "--out", tmp_path / "m.csv"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "no cached analysis" in err, err
    assert shlex.split(err.split("Run: ", 1)[1]) == ["svd-probe", "analyze", str(folder), "--cache-dir", str(root)]

    analyze(AnalyzeJob(model=str(folder), cache_dir=root, device="cpu"))
    page = tmp_path / "r.html"
    args = ["report", folder, "--cache-dir", root, "--out", page, "--kind", "layerwise", "--dpi", "10"]
    code, _, err = run_cli([*args, "--max-head-rows", "0"], monkeypatch, capsys)
    assert code == 0, err
    text = html.unescape(re.sub(r"<[^>]+>", "\n", page.read_text(encoding="utf-8")))
    (line,) = {ln for ln in text.splitlines() if "All rows: " in ln}  # the page's notes, and its section
    slug = model_slug(load_analysis(CacheQuery(str(folder), cache_dir=root)))
    assert shlex.split(line.split("All rows: ", 1)[1]) == [
        "svd-probe", "export", str(folder), "--cache-dir", str(root), "--format", "csv", "--out", f"{slug}-metrics.csv",
    ]  # fmt: skip

    plain = tmp_path / "plain-cache"
    code, _, err = run_cli(["export", llama, "--cache-dir", plain, "--out", tmp_path / "x.csv"], monkeypatch, capsys)
    assert code == 2 and err.split("Run: ", 1)[1] == f"svd-probe analyze {llama} --cache-dir {plain}", err


# --- 5. a layer file without its matrix shapes is damaged --------------------------------------------------


def drop_shape(path: Path, key: str) -> tuple[int, int]:
    """Remove `key`'s recorded (m, n) from a layer file; returns what it was."""
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shapes = json.loads(meta["shapes"])
    shape = shapes.pop(key)
    meta["shapes"] = json.dumps(shapes)
    save_file(tensors, str(path), metadata=meta)
    return tuple(shape)


def test_a_layer_file_without_a_matrix_shape_is_damaged_and_recomputed(
    llama, template, tmp_path, monkeypatch, capsys, wide
):
    """A layer file recording no (m, n) for stacked.VO was read as a k × k matrix: export wrote
    m = n = 64 (and the rank bound of a square matrix), exit 0; `Analysis.shape` raised a bare
    KeyError. Every writer records the shapes, so the file is damaged: export stops naming it,
    plot leaves the layer out with a note, analyze recomputes it."""
    cache = copy(template, tmp_path, llama)
    path = cache.layer_path(1)
    m, n = drop_shape(path, "stacked.VO")
    table = tmp_path / "m.csv"
    args = ["export", llama, "--cache-dir", cache.root, "--format", "csv", "--out", table]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"damaged cache file {path}" in err and "records no matrix shape for stacked.VO" in err
    assert "--layers 1" in err and not table.exists()

    plot = ["plot", llama, "--cache-dir", cache.root, "--out", tmp_path / "p", "--kind", "layerwise", "--dpi", "10"]
    code, _, err = run_cli(plot, monkeypatch, capsys)
    assert code == 0 and "note:" in err and "records no matrix shape" in err, err
    a = load_analysis(CacheQuery(str(llama), cache_dir=cache.root), on_damaged="skip")
    assert a.layers == [0]
    with pytest.raises(CacheMissError):  # a typed error naming the command, not a KeyError
        a.shape(1, "VO")

    code, _, err = run_cli(["analyze", llama, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "recomputing damaged layer 1" in err, err
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["layer"] == "1" and r["scope"] == "stacked" and r["matrix"] == "VO"]
    assert [(int(r["m"]), int(r["n"])) for r in rows] == [(m, n)] and m != n


# --- 6. --at-rank is checked where it is parsed ---------------------------------------------------------


def test_at_rank_below_zero_is_refused_by_the_option_itself(llama, tmp_path, monkeypatch, capsys):
    """`--at-rank` took any int; a negative one reached the library's check, after the option
    parser: the help did not say its range."""
    args = ["export", llama, "--cache-dir", tmp_path / "empty", "--format", "csv", "--out", tmp_path / "m.csv"]
    code, _, err = run_cli([*args, "--at-rank", "-1"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "Invalid value for '--at-rank'" in err and not (tmp_path / "m.csv").exists()
    code, out, _ = run_cli(["export", "--help"], monkeypatch, capsys)
    assert code == 0 and re.search(r"--at-rank <int range>[^[]*\[x>=0\]", out), out
