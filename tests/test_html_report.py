"""`svd-probe report`: the page renders in a real browser, and its tables are the exported numbers.

The browser is Chromium (Debian's `chromium` and `chromium-driver` packages; `.ci/run` installs
them) driven by Selenium through that chromedriver, so Selenium Manager never looks for one on
the network. The tests that need it skip, saying so, when either is missing. The page is written
by the CLI in a subprocess with huggingface_hub offline and HF_ENDPOINT pointing at a closed port,
and its tables are read back from the browser's DOM and compared with `export`'s CSV and JSONL
(per-head summaries against pandas, planner energies against numpy on the exported σ).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.errors import CacheMissError, OutputExistsError
from svd_probe.export import export
from svd_probe.html_report import MAX_HEAD_ROWS, head_rows_frame, html_table, render_html_report, write_html_report
from svd_probe.report import summary_rows
from svd_probe.results import CacheQuery, load_analysis

REPO = "report/deepseek-v3"
ROOT = Path(__file__).resolve().parents[1]
# Headless, and nothing that phones home: this machine refuses outside connections.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")

# Every table of every model section: its name, rows of cell texts, and whether it is laid out.
TABLES_JS = """
const out = {};
for (const sec of document.querySelectorAll('section[data-model]')) {
  const tables = {};
  for (const t of sec.querySelectorAll('table[data-table]')) {
    tables[t.dataset.table] = {
      rows: Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent.trim())),
      visible: t.getClientRects().length > 0 && t.offsetHeight > 0,
    };
  }
  out[sec.dataset.model] = tables;
}
return out;
"""


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: `apt-get install -y chromium chromium-driver` (as .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, fake_hub, deepseek_ckpt, kimi_ckpt):
    """A cache of two analyses: a Hub repo (through the stand-in) and a local folder."""
    root = tmp_path_factory.mktemp("report-cache")
    fake_hub.clear_faults()
    fake_hub.add_repo(REPO, deepseek_ckpt.folder)
    outcomes = [
        analyze(AnalyzeJob(REPO, endpoint=fake_hub.endpoint, cache_dir=root, device="cpu")),
        analyze(AnalyzeJob(str(kimi_ckpt.folder), cache_dir=root, device="cpu")),
    ]
    return {
        "root": root,
        "models": [REPO, str(kimi_ckpt.folder)],
        "configs": [deepseek_ckpt.config, kimi_ckpt.config],
        "outcomes": outcomes,
    }


def offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    # Port 9 (discard) is closed: any request to the Hub would fail, and the report must not need one.
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def page(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-page") / "report.html"
    cmd = [sys.executable, "-m", "svd_probe.cli", "report", *cache["models"], "--cache-dir", str(cache["root"])]
    # Four figure kinds of the eight, at a low resolution: every kind is drawn by `plot`'s tests.
    cmd += ["--kind", "layerwise,headwise,planner,compare", "--dpi", "60"]
    r = subprocess.run([*cmd, "--out", str(out)], env=offline_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0 and f"wrote {out}" in " ".join(r.stdout.split())
    return out


def load(browser, path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
        )
    )


def grid(table: dict) -> pd.DataFrame:
    """A browser table (header row, then rows) as a DataFrame of cell texts."""
    head, *rows = table["rows"]
    return pd.DataFrame(rows, columns=head)


def kv(table: dict) -> dict:
    return {row[0]: row[1] for row in table["rows"]}


def assert_cells(shown: pd.Series, expected: pd.Series, what: str) -> None:
    """Cells printed to 5 significant digits (integers whole, missing as —) equal the numbers."""
    assert len(shown) == len(expected), what
    for i, (text, value) in enumerate(zip(shown, expected, strict=True)):
        where = f"{what}, row {i}"
        if pd.isna(value):
            assert text == "—", where
        elif float(value).is_integer():
            assert text.lstrip("-").isdigit() and int(text) == int(value), f"{where}: {text} != {value}"
        else:
            assert math.isclose(float(text), float(value), rel_tol=1e-4), f"{where}: {text} != {value}"


def exported(cache, model: str, tmp_path: Path, fmt: str = "csv"):
    out = tmp_path / f"{Path(model).name}.{fmt}"
    export(CacheQuery(model, cache_dir=cache["root"]), format=fmt, out=out)
    if fmt == "csv":
        return pd.read_csv(out)
    return [json.loads(line) for line in out.read_text().splitlines()]


# --- the page in the browser ----------------------------------------------------------------------


@pytest.mark.slow
def test_report_loads_every_image_and_requests_nothing(page, browser):
    load(browser, page)
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)])"
    )
    assert len(images) >= 3
    for complete, width, height, src in images:
        assert complete and width > 0 and height > 0
        assert src == "data:image/png;base64,"
    kinds = browser.execute_script(
        "return Array.from(document.querySelectorAll('section')).map(s => [s.id, Array.from(s.querySelectorAll('figure')).map(f => f.dataset.kind)])"
    )
    by_section = dict(kinds)
    assert "compare" in by_section["comparison"]
    model_sections = [figs for sid, figs in kinds if sid.startswith("model-")]
    assert len(model_sections) == 2
    for figs in model_sections:
        assert set(figs) == {"layerwise", "headwise", "planner"}
    # Not blank: text, and every main table laid out with rows.
    assert len(browser.execute_script("return document.body.innerText")) > 3000
    tables = browser.execute_script(TABLES_JS)
    assert len(tables) == 2
    for model_tables in tables.values():
        for name in ("provenance", "summary", "planner", "planner-totals", "metrics", "head-summary"):
            assert model_tables[name]["visible"] and len(model_tables[name]["rows"]) > 1, name
    # Self-contained: no script, no request of any kind (data: URIs are not resources), nothing
    # refused by the page's Content-Security-Policy.
    assert browser.execute_script("return document.scripts.length") == 0
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


@pytest.mark.slow
def test_report_tables_equal_the_export(page, browser, cache, tmp_path):
    load(browser, page)
    tables = browser.execute_script(TABLES_JS)
    names = {REPO: REPO, cache["models"][1]: Path(cache["models"][1]).name}
    for (model, display), config, outcome in zip(names.items(), cache["configs"], cache["outcomes"], strict=True):
        shown = tables[display]
        csv = exported(cache, model, tmp_path)

        # Stacked and layer spectra: one row each, in the export's order, every column it shows.
        matrix = grid(shown["metrics"])
        want = csv[csv["scope"] != "head"].reset_index(drop=True)
        assert list(matrix[["scope", "matrix"]].itertuples(index=False)) == list(
            want[["scope", "matrix"]].itertuples(index=False)
        )
        assert {"layer", "m", "n", "sigma_max", "frobenius", "rank_1pct", "rank_0.1pct", "mp_spikes"} <= set(matrix)
        for col in matrix.columns.drop(["scope", "matrix"]):
            assert_cells(matrix[col], want[col], f"{display} metrics {col}")

        # Per-head spectra: median, min and max over the heads of each (layer, kind), by pandas.
        heads = csv[csv["scope"] == "head"]
        stats = heads.groupby(["layer", "matrix"], sort=False)
        summary = grid(shown["head-summary"])
        assert len(summary) == stats.ngroups
        assert_cells(summary["heads"], stats.size().reset_index(drop=True), f"{display} heads")
        for metric in ("rank_1pct", "rank_0.1pct", "sigma_max", "frobenius", "stable_rank", "mp_spikes"):
            for stat in ("median", "min", "max"):
                expect = getattr(stats[metric], stat)().reset_index(drop=True)
                assert_cells(summary[f"{metric} {stat}"], expect, f"{display} {metric} {stat}")

        # The per-head rows themselves, in a closed <details> (few heads here): open it, compare.
        browser.find_element("css selector", f'section[data-model="{display}"] details > summary').click()
        rows_table = browser.execute_script(TABLES_JS)[display]["head-rows"]
        assert rows_table["visible"]
        rows = grid(rows_table)
        heads = heads.reset_index(drop=True)
        for col in rows.columns:
            if col == "matrix":
                assert list(rows[col]) == list(heads[col])
            else:
                assert_cells(rows[col], heads[col], f"{display} head rows {col}")

        # The summary `analyze` prints: stacked ranks per layer and the median head VO rank.
        top = grid(shown["summary"])
        stacked = csv[csv["scope"] == "stacked"].set_index(["matrix", "layer"])
        layers = sorted(csv["layer"].unique())
        assert_cells(top["layer"], pd.Series(layers), "summary layers")
        for kind in ("O", "VO"):
            for col, label in (("rank_1pct", "1%"), ("rank_0.1pct", "0.1%")):
                assert_cells(top[f"{kind} {label}"], pd.Series([stacked.loc[(kind, ly), col] for ly in layers]), kind)
        assert_cells(top["full"], pd.Series([min(stacked.loc[("O", ly), ["m", "n"]]) for ly in layers]), "full")
        vo = heads[heads["matrix"] == "VO"].groupby("layer")["rank_1pct"].median()
        assert_cells(top["median head VO 1%"], vo.reset_index(drop=True), "median head VO")
        # ... and they are what `analyze` printed when it computed them.
        printed = pd.DataFrame(summary_rows(outcome))
        for key, label in (
            ("O_rank_1pct", "O 1%"),
            ("VO_rank_0.1pct", "VO 0.1%"),
            ("head_VO_median_rank_1pct", "median head VO 1%"),
        ):
            assert_cells(top[label], printed[key], f"analyze's {key}")

        # The planner: energy of the stacked spectra kept at rank D, from the exported σ, and the
        # weights of the output projection from config.json.
        planner = grid(shown["planner"])
        D = int(planner["latent"][0])
        assert set(planner["latent"]) == {str(D)}
        sigma = {
            (r["matrix"], r["layer"]): np.asarray(r["sigma"])
            for r in exported(cache, model, tmp_path, "jsonl")
            if r["scope"] == "stacked"
        }
        for kind in ("O", "VO"):
            kept = [float((sigma[kind, ly][:D] ** 2).sum() / (sigma[kind, ly] ** 2).sum()) for ly in layers]
            assert_cells(planner[f"energy_kept_{kind}"], pd.Series(kept), f"planner {kind}")
        n, d_v, H = config["num_attention_heads"], config["v_head_dim"], config["hidden_size"]
        assert_cells(planner["params_before"], pd.Series([n * d_v * H] * len(layers)), "params before")
        assert_cells(planner["params_after"], pd.Series([n * d_v * D + D * H] * len(layers)), "params after")

        # Provenance, from the cache manifest.
        prov = kv(shown["provenance"])
        import huggingface_hub
        import torch

        assert prov["commit"] == csv["revision"].iloc[0]
        assert prov["computed with torch"] == torch.__version__
        assert prov["computed with numpy"] == np.__version__
        assert prov["computed with huggingface_hub"] == huggingface_hub.__version__
        assert prov["option fold_norms"] == "True" and prov["revision"] == "main"
        assert prov["config model_type"] == config["model_type"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*", prov["computed"])
        if model == REPO:
            assert prov["Hub repo"] == REPO
        else:
            assert prov["local folder"] == str(Path(model).resolve())


# --- untrusted text -----------------------------------------------------------------------------

EVIL_NAME = '<script>window.pwned = 1</script>"><img src=x onerror="window.pwned = 2">'
EVIL_CONFIG = "</td></tr></table><script>window.pwned = 3</script>"
EVIL_VERSION = '\'><svg onload="window.pwned = 4">'


@pytest.mark.slow
def test_report_escapes_model_names_and_config_values(cache, browser, tmp_path):
    # The cache is input we do not control: plant markup in the manifest's model name, a config
    # value and a version string.
    root = tmp_path / "cache"
    shutil.copytree(cache["root"], root)
    (manifest_path,) = (root / "models--report--deepseek-v3").glob("*/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["model"] = EVIL_NAME
    manifest["config"]["_name_or_path"] = EVIL_CONFIG
    manifest["versions"]["torch"] = EVIL_VERSION
    manifest_path.write_text(json.dumps(manifest))

    out = tmp_path / "evil.html"
    page = write_html_report([CacheQuery(REPO, cache_dir=root)], out, kinds="layerwise")
    for evil in (EVIL_NAME, EVIL_CONFIG, EVIL_VERSION):
        assert evil not in page.html
    load(browser, out)
    # No element came from the planted text, so nothing could run even without the page's CSP.
    assert browser.execute_script("return document.scripts.length") == 0
    assert browser.execute_script("return document.querySelectorAll('[onerror], [onload], svg').length") == 0
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.execute_script("return Array.from(document.images).every(i => i.naturalWidth > 0)")
    # The text shows as text.
    prov = kv(browser.execute_script(TABLES_JS)[EVIL_NAME]["provenance"])
    assert prov["model"] == EVIL_NAME
    assert prov["config _name_or_path"] == EVIL_CONFIG
    assert prov["computed with torch"] == EVIL_VERSION
    assert EVIL_NAME in browser.title

    # An existing page is replaced only when asked.
    with pytest.raises(OutputExistsError):
        write_html_report([CacheQuery(REPO, cache_dir=root)], out, kinds="layerwise")
    assert out.read_text() == page.html
    again = write_html_report([CacheQuery(REPO, cache_dir=root)], out, kinds="layerwise", overwrite=True)
    assert out.read_text() == again.html


# --- the bound on the page's size -----------------------------------------------------------------


@pytest.mark.slow
def test_page_size_does_not_grow_with_heads(tmp_path):
    from svd_probe.testing.checkpoints import build_deepseek_v3

    folder = tmp_path / "many-heads"
    build_deepseek_v3(folder, heads=80, layers=2, mtp_layers=0, n_experts=2, n_shards=2)
    analyze(AnalyzeJob(str(folder), cache_dir=tmp_path / "cache", device="cpu"))
    analysis = load_analysis(CacheQuery(str(folder), cache_dir=tmp_path / "cache"))
    head_rows = 2 * 7 * 80  # layers × per-head kinds (Q, Q_pe, K, V, O, VO, QK) × heads
    assert head_rows > MAX_HEAD_ROWS

    page = render_html_report([analysis], kinds="layerwise")
    assert "head-rows" not in page.tables["many-heads"]
    assert any(f"{head_rows:,} per-head metrics rows" in n and "svd-probe export" in n for n in page.notes)
    text = DATA_URI.sub("", page.html)
    # Tables of 2 layers: 22 stacked/layer rows, 14 per-head summaries, 2 summary and planner rows.
    assert len(text.encode()) < 48_000
    assert text.count("<tr>") < 120
    # What the bound leaves out: every per-head row is over 100 bytes of HTML.
    rows = head_rows_frame(analysis.metrics())
    assert len(rows) == head_rows and len(html_table(rows, "head-rows")) > 100 * head_rows


# --- errors ---------------------------------------------------------------------------------------


def test_cli_refuses_an_existing_out_before_any_work(tmp_path, monkeypatch, capsys):
    from svd_probe import cli

    out = tmp_path / "report.html"
    out.write_text("mine")
    # The model is not cached either: the --out check comes first, so it costs nothing.
    args = ["report", "acme/not-cached", "--cache-dir", str(tmp_path), "--out", str(out)]
    result = CliRunner().invoke(cli.app, args)
    assert isinstance(result.exception, OutputExistsError)
    assert out.read_text() == "mine"

    monkeypatch.setattr(sys, "argv", ["svd-probe", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and "Traceback" not in err


def test_cli_uncached_model_names_the_analyze_command(tmp_path, monkeypatch, capsys):
    from svd_probe import cli

    args = ["report", "acme/not-cached", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "r.html")]
    result = CliRunner().invoke(cli.app, args)
    assert isinstance(result.exception, CacheMissError)
    assert "svd-probe analyze acme/not-cached" in result.exception.hint
    monkeypatch.setattr(sys, "argv", ["svd-probe", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "svd-probe analyze acme/not-cached" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_a_tables_own_column_names_are_escaped():
    """html_table took a frame's column names as markup when no headers were passed; every caller
    passed escaped ones, but a column named by a cache would have reached the page as HTML."""
    import pandas as pd

    from svd_probe.html_report import html_table

    page = html_table(pd.DataFrame({"<img src=x onerror=alert(1)>": ["<b>cell</b>"]}), "t")
    assert "<img" not in page and "<b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;b&gt;cell&lt;/b&gt;" in page
