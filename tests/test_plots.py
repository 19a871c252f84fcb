"""`svd-probe plot`: every figure from a planted cache, its data against the cached metrics and
the planted ranks, the planner's arithmetic against DeepSeek-V3's shapes, and the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from svd_probe.cache.store import LayerSpectra, SpectraCache, SpectraOptions
from svd_probe.errors import BadOptionError, CacheMissError, OutputExistsError
from svd_probe.plots import (
    KIND_COLORS,
    break_even_latent,
    default_error_rank,
    default_latent,
    figures,
    make_plots,
    output_params,
    plan_latent,
)
from svd_probe.plots.output import RECORD
from svd_probe.results import CacheQuery, load_analysis

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"
DPI = 30

# --- planted spectra -----------------------------------------------------------------------------
#
# σ = [1]*r, then 3 values b, then zeros, with b² = 0.002·Σσ²: the last three hold 0.6% of the
# energy (so the rank at 1% error is r) and each holds 0.2% (so the rank at 0.1% error is r + 3).


def planted(r: int, k: int, scale: float = 1.0) -> np.ndarray:
    b2 = 0.002 * r / (1 - 0.006)
    s = np.zeros(k)
    s[:r] = 1.0
    s[r : r + 3] = math.sqrt(b2)
    return s * scale


def planted_rank(r: int, error: float) -> int:
    return r if error == 0.01 else r + 3


MLA_DIMS = dict(
    model_type="deepseek_v3",
    num_layers=4,
    num_mtp_layers=1,
    d_model=64,
    n_heads=8,
    n_kv_groups=8,
    d_qk=16,
    d_rope=8,
    d_v=16,
    q_latent=48,
    kv_latent=32,
)

# kind → (shape of the stacked matrix, k stored, planted r at layer L)
STACKED = {
    "O": ((64, 8 * 16), 64, lambda L: 20 + 4 * L),
    "VO": ((64, 8 * 32), 64, lambda L: 24 + 5 * L),
    "Q": ((8 * 16, 48), 48, lambda L: 10 + 2 * L),
    "K": ((8 * 16, 32), 32, lambda L: 6 + L),
    "V": ((8 * 16, 32), 32, lambda L: 8 + L),
    "QK": ((8 * 48, 32), 32, lambda L: 5 + 2 * L),
}
HEAD = {
    "V": ((16, 32), 16, lambda L, h: 2 + (h + L) % 6),
    "O": ((64, 16), 16, lambda L, h: 3 + (2 * h + L) % 7),
    "VO": ((64, 32), 16, lambda L, h: 1 + (3 * h + 2 * L) % 9),
    "QK": ((48, 32), 16, lambda L, h: 2 + (5 * h + L) % 8),
}


def write_model(root, repo_id, commit, dims, layers, stacked, head, options=None):
    options = options or SpectraOptions()
    repo = "models--" + repo_id.replace("/", "--")
    cache = SpectraCache(root, repo, commit, options)
    for L in layers:
        sigma, shapes = {}, {}
        for kind, (shape, k, r) in stacked.items():
            sigma[f"stacked.{kind}"] = planted(r(L), k, scale=2.0 + L)
            shapes[f"stacked.{kind}"] = shape
        for kind, (shape, k, r) in head.items():
            sigma[f"head.{kind}"] = np.stack([planted(r(L, h), k, scale=1.0 + 0.1 * h) for h in range(dims["n_heads"])])
            shapes[f"head.{kind}"] = shape
        cache.write_layer(LayerSpectra(layer=L, sigma=sigma, shapes=shapes, storage_dtypes={k: "BF16" for k in sigma}))
    SpectraCache.write_ref(root, repo, "main", commit)
    cache.write_manifest({"model": repo_id, "dims": dims, "config": {}, "options": {"fold_norms": options.fold_norms}})
    return cache


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_model(root, "acme/tiny-mla", COMMIT, MLA_DIMS, range(4), STACKED, HEAD)
    # A narrower, shallower model with only stacked O and VO: the head figures must skip, and the
    # comparison must put it beside the first on the fraction-of-full-rank scale.
    narrow = dict(MLA_DIMS, d_model=32, n_heads=4, n_kv_groups=4, d_v=8, num_layers=2, num_mtp_layers=0)
    write_model(
        root,
        "acme/tiny-narrow",
        COMMIT2,
        narrow,
        range(2),
        {"O": ((32, 32), 32, lambda L: 8 + L), "VO": ((32, 128), 32, lambda L: 10 + L)},
        {},
    )
    return root


@pytest.fixture(scope="module")
def mla(cache_root):
    return load_analysis(CacheQuery("acme/tiny-mla", cache_dir=cache_root))


@pytest.fixture(scope="module")
def narrow(cache_root):
    return load_analysis(CacheQuery("acme/tiny-narrow", cache_dir=cache_root))


@pytest.fixture(scope="module")
def metrics(mla):
    return mla.metrics()


# --- figures: data against the metrics table and the planted ranks ------------------------------


def test_layerwise_matches_metrics_and_planted(mla, metrics):
    res = figures.layerwise_ranks(mla, metrics, dpi=DPI)
    d = res.data
    assert list(dict.fromkeys(d["matrix"])) == list(figures.LAYERWISE_KINDS)
    for _, row in d.iterrows():
        shape, _, r = STACKED[row["matrix"]]
        assert row["rank_1pct"] == planted_rank(r(row["layer"]), 0.01)
        assert row["rank_0.1pct"] == planted_rank(r(row["layer"]), 0.001)
        assert row["full_rank"] == min(shape)
    ref = metrics[metrics["scope"] == "stacked"].set_index(["layer", "matrix"])
    for _, row in d.iterrows():
        assert row["rank_1pct"] == ref.loc[(row["layer"], row["matrix"]), "rank_1pct"]
    # The lines drawn are the data returned, in the kind's colour.
    ax = res.figure.axes[0]
    lines = {ly.get_label(): ly for ly in ax.get_lines() if not ly.get_label().startswith("_")}
    assert np.array_equal(lines["VO"].get_ydata(), d.loc[d["matrix"] == "VO", "rank_1pct"].to_numpy())
    assert matplotlib.colors.same_color(lines["VO"].get_color(), KIND_COLORS["VO"])
    title = res.figure._suptitle.get_text()
    assert "acme/tiny-mla" in title and COMMIT[:8] in title and "1% / 0.1%" in title and "norms folded" in title


def test_headwise_sorted_by_vo_with_medians(mla, metrics):
    res = figures.headwise_ranks(mla, 2, metrics, dpi=DPI)
    d = res.data
    assert res.stem == "headwise-L002"
    assert list(d["VO"]) == sorted(d["VO"])
    for _, row in d.iterrows():
        for kind in ("V", "O", "VO"):
            assert row[kind] == HEAD[kind][2](2, row["head"])
    m = metrics[(metrics["scope"] == "head") & (metrics["layer"] == 2) & (metrics["matrix"] == "VO")]
    assert sorted(m["rank_1pct"]) == list(d["VO"])
    assert res.extra["medians"]["O"] == np.median([HEAD["O"][2](2, h) for h in range(8)])


def test_headwise_grid_has_every_layer(mla, metrics):
    res = figures.headwise_grid(mla, metrics, dpi=DPI)
    assert sorted(set(res.data["layer"])) == mla.layers
    assert len(res.data) == 4 * 8
    for _, row in res.data.iterrows():
        assert row["VO"] == HEAD["VO"][2](row["layer"], row["head"])


@pytest.mark.slow
def test_heatmaps_layer_by_head(mla, metrics):
    res = figures.rank_heatmaps(mla, metrics, dpi=DPI)
    grids = res.extra["grids"]
    assert set(grids) == {"VO", "QK"}
    for kind in ("VO", "QK"):
        expected = np.array([[HEAD[kind][2](L, h) for h in range(8)] for L in range(4)])
        assert np.array_equal(grids[kind], expected)
    img = res.figure.axes[0].get_images()[0]
    assert np.array_equal(np.asarray(img.get_array()), grids["VO"])


def test_spectra_normalized(mla):
    res = figures.spectra(mla, layers=[0, 3], kinds=("O", "VO"), dpi=DPI)
    d = res.data
    assert set(d["layer"]) == {0, 3} and set(d["matrix"]) == {"O", "VO"}
    o3 = d[(d["layer"] == 3) & (d["matrix"] == "O")]
    assert np.allclose(o3["sigma"], mla.sigma(3, "O"))
    assert np.allclose(o3["sigma_normalized"], planted(STACKED["O"][2](3), 64))
    assert res.figure.axes[0].get_yscale() == "log"
    assert o3.loc[o3["at_error_rank"], "index"].tolist() == [STACKED["O"][2](3)]


def test_spectra_missing_layer_is_noted(mla):
    res = figures.spectra(mla, layers=[1, 9], dpi=DPI)
    assert set(res.data["layer"]) == {1}
    assert any("--layers 9" in n for n in res.notes)


def test_error_at_rank_matches_metrics(mla):
    r = 22
    res = figures.error_at_rank(mla, r, kinds=figures.LAYERWISE_KINDS, dpi=DPI)
    d = res.data
    # Every kind's full rank (32 or more) exceeds r = 22, so every kind is drawn.
    assert set(d["matrix"]) == set(figures.LAYERWISE_KINDS)
    ref = mla.metrics(at_rank=r)
    ref = ref[ref["scope"] == "stacked"].set_index(["layer", "matrix"])[f"rel_error_at_{r}"]
    for _, row in d.iterrows():
        assert row["rel_error"] == pytest.approx(ref[(row["layer"], row["matrix"])], abs=1e-12)
    # Planted: O of layer 0 has r = 20, so one of the three b's lies beyond rank 22.
    b2 = 0.002 * 20 / 0.994
    row = d[(d["layer"] == 0) & (d["matrix"] == "O")].iloc[0]
    assert row["rel_error"] == pytest.approx(math.sqrt(b2 / (20 + 3 * b2)))


def test_error_at_default_rank_leaves_out_exact_kinds(mla):
    assert set(figures.error_at_rank(mla, dpi=DPI).data["matrix"]) == {"O", "VO"}
    res = figures.error_at_rank(mla, kinds=figures.LAYERWISE_KINDS, dpi=DPI)
    assert res.extra["rank"] == default_error_rank(64) == 37
    assert set(res.data["matrix"]) == {"O", "VO", "Q"}
    assert any("K, V, QK have rank ≤ r = 37" in n for n in res.notes)


def test_planner_energy_on_fixture(mla):
    plan = plan_latent(mla, 22)
    t = plan.table
    b2 = 0.002 * 20 / 0.994
    assert t.loc[t["layer"] == 0, "energy_kept_O"].item() == pytest.approx((20 + 2 * b2) / (20 + 3 * b2))
    # VO of layer 0 has r = 24 > 22: 22 of the 24 unit values are kept.
    b2 = 0.002 * 24 / 0.994
    assert t.loc[t["layer"] == 0, "energy_kept_VO"].item() == pytest.approx(22 / (24 + 3 * b2))
    assert plan.params_before == 8 * 16 * 64 and plan.params_after == 8 * 16 * 22 + 22 * 64
    csv = plan.to_csv_frame()
    assert csv["layer"].iloc[-1] == "total" and csv["params_before"].iloc[-1] == 4 * 8 * 16 * 64


def test_compare_fraction_of_max_rank(mla, narrow):
    res = figures.compare_models([mla, narrow], dpi=DPI)
    d = res.data
    assert set(d["model"]) == {"acme/tiny-mla", "acme/tiny-narrow"}
    n = d[(d["model"] == "acme/tiny-narrow") & (d["matrix"] == "VO")]
    assert list(n["rank"]) == [10, 11] and list(n["fraction_of_max_rank"]) == [10 / 32, 11 / 32]
    assert list(n["depth"]) == [0.0, 1.0]
    m = d[(d["model"] == "acme/tiny-mla") & (d["matrix"] == "O")]
    assert list(m["fraction_of_max_rank"]) == [(20 + 4 * L) / 64 for L in range(4)]
    assert "acme/tiny-narrow" in res.figure._suptitle.get_text()


def test_missing_head_spectra_raise_with_analyze_command(narrow):
    with pytest.raises(figures.MissingFigureData) as e:
        figures.headwise_grid(narrow, dpi=DPI)
    assert "svd-probe analyze acme/tiny-narrow --matrices V,O,VO" in str(e.value)


def test_headwise_gqa_maps_heads_to_their_value_group(tmp_path):
    # 8 query heads reading 2 key/value groups: head h's V is group h // 4's.
    gqa = dict(MLA_DIMS, model_type="llama", n_kv_groups=2, num_mtp_layers=0, num_layers=1)
    write_model(tmp_path, "acme/tiny-gqa", COMMIT, gqa, [0], {}, {"VO": HEAD["VO"], "O": HEAD["O"]})
    repo = SpectraCache(tmp_path, "models--acme--tiny-gqa", COMMIT, SpectraOptions())
    ls = repo.read_layer(0)
    ls.sigma["head.V"] = np.stack([planted(3, 16), planted(7, 16)])
    ls.shapes["head.V"] = (16, 64)
    repo.write_layer(ls)
    res = figures.headwise_ranks(load_analysis(CacheQuery("acme/tiny-gqa", cache_dir=tmp_path)), 0, dpi=DPI)
    for _, row in res.data.iterrows():
        assert row["V"] == (3 if row["head"] < 4 else 7)


def test_option_parsers():
    from svd_probe.options import parse_layers, parse_matrices

    assert parse_layers("0,2-4,2") == [0, 2, 3, 4]
    assert parse_matrices("vo,O", scope="stacked", keep_order=True) == ["VO", "O"]
    with pytest.raises(BadOptionError):
        parse_layers("0-x")
    with pytest.raises(BadOptionError):
        parse_matrices("VO,XY", scope="stacked", keep_order=True)


# --- planner arithmetic against DeepSeek-V3's shapes (computed here independently) ---------------


def test_planner_deepseek_v3_arithmetic(tmp_path):
    n, d_v, H = 128, 128, 7168
    direct = n * d_v * H
    assert output_params(n, d_v, H) == direct == 117_440_512
    assert output_params(n, d_v, H, 3072) == n * d_v * 3072 + 3072 * H
    cut = 1 - (n * d_v * 3072 + 3072 * H) / direct
    assert round(cut * 100) == 38 and cut == pytest.approx(0.3839, abs=1e-4)
    assert break_even_latent(n, d_v, H) == pytest.approx(direct / (n * d_v + H))
    assert 4986 < break_even_latent(n, d_v, H) < 4987
    assert default_latent(H) == 3072 and default_error_rank(H) == 4096

    # The same through a cached analysis with DeepSeek-V3's dims: totals over all 61 layers.
    dims = dict(
        model_type="deepseek_v3",
        num_layers=61,
        num_mtp_layers=1,
        d_model=H,
        n_heads=n,
        n_kv_groups=n,
        d_qk=128,
        d_rope=64,
        d_v=d_v,
        q_latent=1536,
        kv_latent=512,
    )
    write_model(tmp_path, "acme/dsv3-shaped", COMMIT, dims, [0], {"O": ((H, n * d_v), H, lambda L: 3000)}, {})
    plan = plan_latent(load_analysis(CacheQuery("acme/dsv3-shaped", cache_dir=tmp_path)))
    t = plan.totals()
    assert plan.latent == 3072
    assert t["params_before"] == 61 * direct and t["params_change"] == pytest.approx(-cut)
    assert t["flops_per_token_after"] == 2 * 61 * (n * d_v * 3072 + 3072 * H)
    assert t["energy_kept_O_min"] == 1.0  # planted rank 3000 + 3 ≤ 3072
    assert any("1 cached layers of 61" in note for note in plan.notes)


# --- make_plots and the CLI ----------------------------------------------------------------------

ALL_STEMS = [
    "layerwise",
    "headwise-L002",
    "headwise-grid",
    "heatmap-head-ranks",
    "spectra",
    "error-at-rank-37",
    "planner-D27",
]


@pytest.mark.slow
def test_make_plots_writes_every_figure(cache_root, tmp_path):
    report = make_plots(
        [CacheQuery("acme/tiny-mla", cache_dir=cache_root)], tmp_path / "out", formats="png,svg", dpi=DPI
    )
    names = {p.name for p in report.files}
    for stem in ALL_STEMS:
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    assert "planner-D27.csv" in names
    assert all(p.is_file() and p.stat().st_size > 0 for p in report.files)
    assert not report.notes or all("compare" not in n for n in report.notes)
    assert (tmp_path / "out" / "layerwise.png").read_bytes()[:4] == b"\x89PNG"
    assert all(r.figure is None for r in report.results)  # closed after saving


@pytest.mark.slow
def test_make_plots_skips_missing_figures_with_a_note(cache_root, tmp_path):
    report = make_plots(
        [CacheQuery("acme/tiny-mla", cache_dir=cache_root), CacheQuery("acme/tiny-narrow", cache_dir=cache_root)],
        tmp_path,
        dpi=DPI,
        kinds=["layerwise,headwise", "compare"],
    )
    assert (tmp_path / "acme--tiny-mla" / "layerwise.png").is_file()
    assert (tmp_path / "acme--tiny-narrow" / "layerwise.png").is_file()
    assert (tmp_path / "compare.png").is_file()
    assert not list((tmp_path / "acme--tiny-narrow").glob("headwise*"))
    assert any(
        "skipped headwise: acme/tiny-narrow" in n and "svd-probe analyze acme/tiny-narrow" in n for n in report.notes
    )
    # Layer-wise of the narrow model: only O and VO cached, the others are noted.
    lw = report.result("layerwise", "acme/tiny-narrow")
    assert set(lw.data["matrix"]) == {"O", "VO"}


def test_make_plots_rejects_bad_kind(cache_root, tmp_path):
    with pytest.raises(BadOptionError):
        make_plots([CacheQuery("acme/tiny-mla", cache_dir=cache_root)], tmp_path, kinds="layerwise,bogus")


def test_make_plots_other_options_miss_the_cache(cache_root, tmp_path):
    with pytest.raises(CacheMissError) as e:
        make_plots(
            [CacheQuery("acme/tiny-mla", cache_dir=cache_root, options=SpectraOptions(fold_norms=False))], tmp_path
        )
    assert "svd-probe analyze acme/tiny-mla --no-fold-norms" in e.value.hint


@pytest.mark.slow
def test_cli_plot_writes_files(cache_root, tmp_path):
    from svd_probe.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "plot",
            "acme/tiny-mla",
            "--cache-dir",
            str(cache_root),
            "--out",
            str(out),
            "--dpi",
            str(DPI),
            "--layer",
            "1",
            "--latent",
            "22",
            "--rank",
            "22",
            "--kind",
            "headwise,planner",
            "--kind",
            "error",
            "--format",
            "pdf",
        ],
    )
    assert result.exit_code == 0, result.output
    written = ["error-at-rank-22.pdf", "headwise-L001.pdf", "planner-D22.csv", "planner-D22.pdf"]
    assert sorted(p.name for p in out.iterdir()) == [RECORD, *written]
    # The record names each file with the SHA-256 of the bytes on disk.
    record = json.loads((out / RECORD).read_text())
    assert record == {"format": 1, "files": {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in written}}
    assert "Shared output latent" in result.output and "planner-D22.csv" in result.output
    csv = pd.read_csv(out / "planner-D22.csv")
    assert list(csv["layer"]) == ["0", "1", "2", "3", "total"]


def test_cli_missing_cache_names_analyze_command(tmp_path, monkeypatch, capsys):
    from svd_probe import cli

    result = CliRunner().invoke(cli.app, ["plot", "acme/not-cached", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, CacheMissError)
    assert "svd-probe analyze acme/not-cached" in result.exception.hint

    # Through the console-script entry point: a short message and a non-zero exit, no traceback.
    monkeypatch.setattr(sys, "argv", ["svd-probe", "plot", "acme/not-cached", "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "svd-probe analyze acme/not-cached" in err and "Traceback" not in err


def test_cli_nothing_drawable_exits_non_zero_with_note(cache_root, tmp_path):
    from svd_probe.cli import app

    result = CliRunner().invoke(
        app, ["plot", "acme/tiny-narrow", "--cache-dir", str(cache_root), "--out", str(tmp_path), "--kind", "heatmap"]
    )
    assert result.exit_code == 1
    # The hint repeats the --cache-dir given, so the command it names fills the same cache.
    assert f"(run: svd-probe analyze acme/tiny-narrow --matrices VO,QK --cache-dir {cache_root})" in " ".join(
        result.output.split()
    )


# --- what plot may replace in its folder ----------------------------------------------------------


def _plot(cache_root, out, **kw):
    return make_plots([CacheQuery("acme/tiny-mla", cache_dir=cache_root)], out, kinds="layerwise,error", dpi=DPI, **kw)


def _plot_cli(cache_root, out, monkeypatch, capsys, *extra):
    """`svd-probe plot` through the console-script entry point: (exit code, stderr unwrapped)."""
    from svd_probe.cli import main

    argv = ["svd-probe", "plot", "acme/tiny-mla", "--cache-dir", str(cache_root), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--kind", "layerwise,error", "--dpi", str(DPI), *extra])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    return code, " ".join(capsys.readouterr().err.split())


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def test_plot_redraws_its_own_files_and_refuses_a_users_file_without_writing_anything(
    cache_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "plots"
    first = _plot(cache_root, out)
    names = sorted(p.name for p in first.files)
    assert len(names) == 2 and names[0].startswith("error-at-rank-") and names[1] == "layerwise.png"
    # A rerun replaces the files it wrote (same cache: a redraw), and says nothing is in the way.
    again = _plot(cache_root, out, formats="png,svg")
    assert sorted(p.name for p in again.files) == sorted([*names, *(n.replace(".png", ".svg") for n in names)])
    # A user's own file under a figure's name: refused, naming it, before anything is written.
    mine = out / "layerwise.svg"
    mine.write_bytes(b"<svg>my own drawing</svg>")
    before = _snapshot(out)
    with pytest.raises(OutputExistsError) as e:
        _plot(cache_root, out, formats="png,svg")
    assert "layerwise.svg" in e.value.message and "--overwrite" in e.value.hint
    assert _snapshot(out) == before  # not one byte changed, the record included
    code, err = _plot_cli(cache_root, out, monkeypatch, capsys, "--format", "png,svg")
    assert code != 0 and "layerwise.svg" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(out) == before
    # A figure edited after plot wrote it is the user's now.
    mine.unlink()
    _plot(cache_root, out, formats="svg")
    (out / "layerwise.svg").write_bytes((out / "layerwise.svg").read_bytes() + b"<!-- my note -->")
    with pytest.raises(OutputExistsError, match="layerwise.svg"):
        _plot(cache_root, out, formats="svg")
    # --overwrite replaces it, and the record vouches for the new bytes.
    code, err = _plot_cli(cache_root, out, monkeypatch, capsys, "--format", "svg", "--overwrite")
    assert code == 0, err
    assert b"my note" not in (out / "layerwise.svg").read_bytes()
    record = json.loads((out / RECORD).read_text())["files"]
    assert record["layerwise.svg"] == hashlib.sha256((out / "layerwise.svg").read_bytes()).hexdigest()
    _plot(cache_root, out, formats="svg")  # and a plain rerun redraws it again


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_plot_never_writes_through_a_link_or_onto_a_pipe(cache_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "plots"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"keep me")
    (out / "layerwise.png").symlink_to(target)
    with pytest.raises(OutputExistsError, match="layerwise.png"):
        _plot(cache_root, out)
    assert not (out / RECORD).exists() and target.read_bytes() == b"keep me"
    # With --overwrite the link is replaced by the figure, and what it pointed to is untouched.
    _plot(cache_root, out, overwrite=True)
    assert not (out / "layerwise.png").is_symlink() and (out / "layerwise.png").read_bytes()[:4] == b"\x89PNG"
    assert target.read_bytes() == b"keep me"
    # A pipe under a figure's name is refused even with --overwrite, and stays a pipe.
    (out / "layerwise.png").unlink()
    os.mkfifo(out / "layerwise.png")
    code, err = _plot_cli(cache_root, out, monkeypatch, capsys, "--overwrite")
    assert code != 0 and "not a regular file" in err and "Traceback" not in err
    assert (out / "layerwise.png").is_fifo()


@pytest.mark.parametrize(
    "record",
    [b"[" * 4000, b"\xff\xfe not json", b'{"format": 1, "files": []}', b'{"format": 7, "files": {}}'],
    ids=["deep", "bytes", "files-a-list", "format-7"],
)
def test_a_record_plot_cannot_read_vouches_for_nothing(cache_root, tmp_path, record, monkeypatch, capsys):
    out = tmp_path / "plots"
    _plot(cache_root, out)
    (out / RECORD).write_bytes(record)
    before = _snapshot(out)
    code, err = _plot_cli(cache_root, out, monkeypatch, capsys)
    assert code != 0 and "svd-probe plot's record" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(out) == before
    code, err = _plot_cli(cache_root, out, monkeypatch, capsys, "--overwrite")
    assert code == 0, err
    assert sorted(json.loads((out / RECORD).read_text())["files"]) == sorted(_snapshot(out).keys() - {RECORD})


def test_a_record_entry_outside_the_folder_is_ignored(cache_root, tmp_path):
    """Names in the record are plain file names in its own folder: an entry that points elsewhere
    (with the right hash) vouches for nothing, and nothing outside --out is read or written."""
    out = tmp_path / "plots"
    _plot(cache_root, out)
    outside = tmp_path / "layerwise.png"
    outside.write_bytes(b"a user's file beside the folder")
    record = json.loads((out / RECORD).read_text())
    record["files"]["../layerwise.png"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    (out / RECORD).write_text(json.dumps(record))
    _plot(cache_root, out)
    assert outside.read_bytes() == b"a user's file beside the folder"
    assert "../layerwise.png" not in json.loads((out / RECORD).read_text())["files"]


def test_layer_out_of_range_is_a_bad_option(cache_root, tmp_path):
    with pytest.raises(BadOptionError):
        make_plots([CacheQuery("acme/tiny-mla", cache_dir=cache_root)], tmp_path, kinds="headwise", layer=9)


@pytest.mark.parametrize(
    "flag,value,needle",
    [("--spectra-layers", "3-1", "end before start"), ("--spectra-matrices", "QA", "no stacked spectra")],
)
def test_cli_plot_refuses_bad_spectra_options(cache_root, tmp_path, flag, value, needle):
    from svd_probe.cli import app

    result = CliRunner().invoke(
        app, ["plot", "acme/tiny-mla", "--cache-dir", str(cache_root), "--out", str(tmp_path), flag, value]
    )
    assert result.exit_code != 0 and isinstance(result.exception, BadOptionError)
    assert needle in result.exception.message and not list(tmp_path.iterdir())


# --- what a reader sees: text layout, labels, ticks, rank bounds --------------------------------


def _drawn_texts(fig) -> list:
    """Every non-empty text the figure draws, tick labels only for ticks inside the view."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    fig.canvas.draw()
    tick_labels, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) or 1.0
            for ticks, locs in (
                (axis.get_major_ticks(), axis.get_majorticklocs()),
                (axis.get_minor_ticks(), axis.get_minorticklocs()),
            ):
                for tick in ticks:
                    tick_labels.update({id(tick.label1), id(tick.label2)})
                for tick, loc in zip(ticks, locs, strict=False):
                    if ax.get_visible() and lo - 1e-9 * span <= loc <= hi + 1e-9 * span:
                        drawn += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text().strip()]
    for t in fig.findobj(Text):
        if id(t) not in tick_labels and t.get_visible() and t.get_text().strip():
            axes = t.axes
            if axes is None or axes.get_visible():
                drawn.append(t)
    return drawn


def assert_text_fits(fig) -> None:
    """No text leaves the figure, and no two texts overlap (1 px of slack)."""
    texts = _drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    fb = fig.bbox
    outside = [s for s, b in boxes if b.x0 < fb.x0 - 1 or b.y0 < fb.y0 - 1 or b.x1 > fb.x1 + 1 or b.y1 > fb.y1 + 1]
    assert not outside, f"texts leave the figure: {outside}"
    overlaps = []
    for i, (s1, b1) in enumerate(boxes):
        for s2, b2 in boxes[i + 1 :]:
            w = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
            h = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
            if w > 1 and h > 1:
                overlaps.append((s1, s2))
    assert not overlaps, f"texts overlap: {overlaps}"


def assert_error_measures_named(fig) -> None:
    """Every text that speaks of an error says which: energy error or relative Frobenius error."""
    vague = [
        t.get_text()
        for t in _drawn_texts(fig)
        if "error" in t.get_text().lower()
        and not all(
            "energy error" in part.lower() or "frobenius error" in part.lower()
            for part in t.get_text().replace("\n", " ").split(" — ")
            if "error" in part.lower()
        )
    ]
    assert not vague, f"texts that do not say which error: {vague}"


def assert_integer_layer_ticks(fig) -> None:
    """Axes of layers or heads carry whole-number ticks only."""
    for ax in fig.axes:
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if not label.startswith(("layer", "head")):
                continue
            lo, hi = sorted(axis.get_view_interval())
            locs = [v for v in axis.get_majorticklocs() if lo <= v <= hi]
            assert locs and all(float(v).is_integer() for v in locs), f"{label!r} ticks {locs}"


FIGURES = {
    "layerwise": lambda a, b: figures.layerwise_ranks(a, dpi=72),
    "headwise": lambda a, b: figures.headwise_ranks(a, 2, dpi=72),
    "grid": lambda a, b: figures.headwise_grid(a, dpi=72),
    "heatmap": lambda a, b: figures.rank_heatmaps(a, dpi=72),
    "spectra": lambda a, b: figures.spectra(a, dpi=72),
    "error": lambda a, b: figures.error_at_rank(a, dpi=72),
    "planner": lambda a, b: figures.planner_figure(a, dpi=72),
    # The narrow model has 2 layers: a default locator gives it ticks 0.0, 0.2, ... 1.0.
    "compare": lambda a, b: figures.compare_models([a, b], dpi=72),
    "compare-narrow-first": lambda a, b: figures.compare_models([b, a], dpi=72),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FIGURES))
def test_figure_text_fits_names_its_error_and_counts_layers_in_integers(kind, mla, narrow):
    fig = FIGURES[kind](mla, narrow).figure
    assert_text_fits(fig)
    assert_error_measures_named(fig)
    assert_integer_layer_ticks(fig)


@pytest.mark.slow
def test_heatmap_cells_carry_their_rank_where_it_fits(mla, tmp_path):
    res = figures.rank_heatmaps(mla, dpi=72)
    assert res.extra["annotated"] == {"VO": True, "QK": True}
    ax = res.figure.axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    grid = res.extra["grids"]["VO"]
    assert cells == {(i, j): str(int(grid[i, j])) for i in range(grid.shape[0]) for j in range(grid.shape[1])}
    # 96 heads: a cell is about 0.05 in wide, too narrow for a label.
    wide = dict(MLA_DIMS, n_heads=96, n_kv_groups=96, num_layers=2, num_mtp_layers=0)
    write_model(tmp_path, "acme/many-heads", COMMIT, wide, range(2), {}, {"VO": HEAD["VO"]})
    res = figures.rank_heatmaps(load_analysis(CacheQuery("acme/many-heads", cache_dir=tmp_path)), dpi=72)
    assert res.extra["annotated"] == {"VO": False} and not res.figure.axes[0].texts


# --- the largest possible rank: nonzero σ counted in a real analysis of the demo model -----------

# build_deepseek_v3's defaults: hidden 320, 4 heads, d_qk 32 (+16 RoPE), d_v 32, q_lora 200,
# kv_lora 136. (scope, kind) → (shape the cache records, σ stored, σ > 1e-12·σ₁ in its analysis).
DEMO_DIMS = {"d_model": 320, "n_heads": 4, "d_qk": 32, "d_rope": 16, "d_v": 32, "q_latent": 200, "kv_latent": 136}
DEMO_RANKS = {
    ("head", "VO"): ((320, 136), 136, 32),
    ("head", "QK"): ((200, 136), 136, 32),
    ("head", "O"): ((320, 32), 32, 32),
    ("stacked", "VO"): ((320, 544), 320, 128),
    ("stacked", "QK"): ((800, 136), 136, 128),
    ("stacked", "KQ"): ((200, 544), 200, 128),
    ("stacked", "O"): ((320, 128), 128, 128),
    ("stacked", "Q"): ((128, 200), 128, 128),
    ("layer", "KVA"): ((136, 320), 136, 136),
}


def test_max_rank_is_the_count_of_nonzero_sigma_of_the_demo_model():
    for (scope, kind), (shape, _, nonzero) in DEMO_RANKS.items():
        assert figures.max_rank(scope, kind, shape, DEMO_DIMS) == nonzero, (scope, kind)
    assert figures.max_rank("stacked", "VO", None, DEMO_DIMS) is None


@pytest.mark.slow
def test_demo_model_figures_draw_each_kind_at_its_real_maximum_rank(deepseek_ckpt, tmp_path):
    from svd_probe.analysis import AnalyzeJob, analyze

    a = analyze(AnalyzeJob(str(deepseek_ckpt.folder), cache_dir=tmp_path, device="cpu")).analysis
    ls = a.layer_spectra[0]
    for (scope, kind), (shape, stored, nonzero) in DEMO_RANKS.items():
        s = ls.spectrum(scope, kind)
        assert ls.matrix_shape(scope, kind) == shape and s.shape[-1] == stored
        assert np.all((s > 1e-12 * s.max(axis=-1, keepdims=True)).sum(axis=-1) == nonzero), (scope, kind)
    lw = figures.layerwise_ranks(a, dpi=72)
    vo = lw.data[lw.data["matrix"] == "VO"]
    assert set(vo["max_rank"]) == {128} and set(vo["full_rank"]) == {320}
    # One dashed bound line: every stacked kind of the demo model has rank ≤ 128.
    bounds = [ln.get_ydata()[0] for ln in lw.figure.axes[0].get_lines() if ln.get_gid() == "max-rank"]
    assert bounds == [128]
    assert any(t.get_text().startswith("max rank 128 (") for t in lw.figure.axes[0].texts)
    assert not any("320" in t.get_text() for t in lw.figure.axes[0].texts)
    # The error figure: r = 4/7 of 128, and VO is not "exact" there (its 128 σ go past r).
    err = figures.error_at_rank(a, dpi=72)
    assert err.extra["rank"] == 73 and set(err.data["matrix"]) == {"O", "VO"}
    assert (err.data["rel_error"] > 0).all()
    assert_text_fits(figures.rank_heatmaps(a, dpi=72).figure)


# --- the planner's default latent, notes and units -----------------------------------------------


def test_si_units_keep_three_significant_digits():
    from svd_probe.plots.style import si

    assert si(163_840) == "164 k" and si(327_680, "FLOP") == "328 kFLOP"
    assert si(117_440_512) == "117 M" and si(2 * 61 * 117_440_512, "FLOP") == "14.3 GFLOP"
    assert si(999_999) == "1.00 M" and si(1234) == "1.23 k" and si(12) == "12.0"


def test_default_latent_is_below_the_break_even():
    # Demo model: 3/7·320 = 137 is above the break-even 4·32·320/(128 + 320) = 91.4.
    assert break_even_latent(4, 32, 320) == pytest.approx(40960 / 448)
    assert default_latent(320, 4, 32) == 77  # ⌊0.85 · 91.43⌋
    assert default_latent(7168, 128, 128) == 3072 and default_latent(7168, 64, 128) == 3072  # DeepSeek-V3, Kimi-K2
    assert default_latent(256, 8, 32) == 108  # MHA encoder: break-even 128, 3/7·256 = 110 > 108.8


DEMO_PLAN_DIMS = dict(MLA_DIMS, d_model=320, n_heads=4, n_kv_groups=4, d_v=32, num_layers=4, num_mtp_layers=1)


@pytest.fixture(scope="module")
def demo_shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-shaped")
    # Stacked O of rank 100 + 3 small values (rank at 1% energy error 100 > break-even 91.4).
    write_model(root, "acme/demo-shaped", COMMIT, DEMO_PLAN_DIMS, range(4), {"O": ((320, 128), 128, lambda L: 100)}, {})
    return load_analysis(CacheQuery("acme/demo-shaped", cache_dir=root))


def test_planner_default_saves_and_says_when_no_latent_keeps_the_energy(demo_shaped):
    from rich.console import Console

    from svd_probe.plots import planner_rich_table

    plan = plan_latent(demo_shaped)
    assert plan.latent == 77 and plan.param_change == pytest.approx(77 / (40960 / 448) - 1)
    assert plan.latent_for_energy == {"O": 100}
    assert any(
        "no latent that saves weights keeps 99% of the stacked O energy" in n and "D ≥ 100" in n for n in plan.notes
    )
    assert not any("saves nothing" in n for n in plan.notes)
    console = Console(record=True, width=100)
    console.print(planner_rich_table([plan]))
    text = console.export_text()
    # 4 layers × 4·32·320 = 163,840 weights; after: 4 × (4·32·77 + 77·320) = 137,984.
    assert "164 k" in text and "138 k" in text and "328 kFLOP → 276 kFLOP" in text and "-15.8%" in text
    assert " M" not in text and "GFLOP" not in text

    above = plan_latent(demo_shaped, 137)
    assert above.param_change == pytest.approx(0.498, abs=1e-3)
    assert any("a 137-dim latent saves nothing" in n and "+49.8%" in n for n in above.notes)
    console = Console(record=True, width=100)
    console.print(planner_rich_table([above]))
    assert "+49.8% (no saving)" in console.export_text()


def test_planner_figure_sweeps_up_to_the_largest_rank(demo_shaped):
    res = figures.planner_figure(demo_shaped, dpi=72)
    sweep = res.extra["plan"].sweep
    assert sweep["latent"].max() == 128 and sweep["latent"].min() == 1  # min(H, n·d_v)
    left = res.figure.axes[0]
    kept = [ln for ln in left.get_lines() if ln.get_label() == "stacked O"][0].get_ydata()
    b2 = 0.002 * 100 / 0.994
    assert np.allclose(kept, 100 * 77 / (100 + 3 * b2))  # 77 of the 100 unit σ kept


def test_plot_help_names_the_two_error_measures():
    import typer

    from svd_probe.cli import app

    params = {p.name: p.help for p in typer.main.get_command(app).commands["plot"].params}
    assert "energy error" in params["error"] and "Σ_{i>r} σ_i² / Σ σ_i²" in params["error"]
    assert "relative Frobenius error" in params["rank"]
