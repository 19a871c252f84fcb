"""`analyze --control gaussian|shuffled`: the spectra of randomized copies of every weight, cached
beside the real analysis, selectable in export and plot.

The checkpoint is a llama layout whose attention projections are planted rank-r matrices. Without
norm folding and with raw stacks, stacked Q is q_proj itself and stacked O is o_proj, so the
expectations are plain facts about those matrices: the real one has r σ above the
Marchenko–Pastur edge of its shape and norm and rank ≤ r; a Gaussian matrix of that shape has
about none above it and nearly full energy rank; a permutation keeps the multiset of entries and
hence the Frobenius norm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from svd_probe.adapters import adapter_for
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.cache.store import SpectraOptions
from svd_probe.cli import app
from svd_probe.errors import BadOptionError
from svd_probe.export import export
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.plots import make_plots
from svd_probe.results import CacheQuery, load_analysis
from svd_probe.spectra.controls import apply_control
from svd_probe.testing.layouts import build_layout, write_layout

RANK = 3
RAW = dict(fold_norms=False, normalize_stacked=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A llama checkpoint whose q, k, v, o projections have rank RANK exactly (float32)."""
    layout = build_layout("llama")
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for name, w in layout.tensors.items():
        if ".self_attn." in name and name.endswith("proj.weight"):
            a = torch.randn(w.shape[0], RANK, generator=gen)
            b = torch.randn(w.shape[1], RANK, generator=gen)
            w = a @ b.T / w.shape[1]
        tensors[name] = w.float()
    return write_layout(tmp_path_factory.mktemp("planted") / "llama", dataclasses.replace(layout, tensors=tensors))


def stacked_row(analysis, layer: int, kind: str) -> pd.Series:
    m = analysis.metrics()
    return m[(m["layer"] == layer) & (m["scope"] == "stacked") & (m["matrix"] == kind)].iloc[0]


def test_default_key_is_unchanged_and_controls_have_their_own():
    # The key every analysis made before the field existed: the option fields, hashed as they were.
    blob = json.dumps({"v": 1, "fold_norms": True, "normalize_stacked": True}, sort_keys=True)
    assert SpectraOptions().key() == "fold-norm-" + hashlib.sha1(blob.encode()).hexdigest()[:10]
    keys = {SpectraOptions(control=c).key() for c in (None, "gaussian", "shuffled")}
    assert len(keys) == 3 and any("ctlgaussian" in k for k in keys)
    with pytest.raises(ValueError):
        SpectraOptions(control="../../etc")  # never a path
    with pytest.raises(BadOptionError):
        analyze(AnalyzeJob("llama-3.1-8b", control="uniform"))  # refused before any request


def test_apply_control_keeps_norms_and_the_entries(planted):
    src = open_checkpoint(str(planted))
    adapter = adapter_for(src.config, src.tensor_names)
    plan = adapter.plan(0, {"Q", "K", "V", "O"}, fold_norms=True)
    real = src.read_tensors(plan)
    weights = {n for names in plan.kind_tensors.values() for n in names}
    norms = set(plan.tensors) - weights
    assert norms == {"model.layers.0.input_layernorm.weight"}
    shuffled = apply_control(real, "shuffled", seed=0)
    gaussian = apply_control(real, "gaussian", seed=0)
    assert apply_control(real, None, seed=0) is real
    for name in norms:
        assert torch.equal(shuffled[name], real[name]) and torch.equal(gaussian[name], real[name])
    for name in weights:
        w, s, g = real[name].double(), shuffled[name].double(), gaussian[name].double()
        assert not torch.equal(s, w)
        assert torch.equal(torch.sort(s.flatten()).values, torch.sort(w.flatten()).values)  # same multiset
        assert torch.isclose(torch.linalg.norm(g), torch.linalg.norm(w), rtol=1e-6)
        # The Gaussian copy has full rank where the weight has rank RANK (beyond float32 rounding).
        assert torch.linalg.matrix_rank(g, rtol=1e-5) == min(g.shape)
        assert torch.linalg.matrix_rank(w, rtol=1e-5) == RANK
    assert shuffled.dtypes == real.dtypes and shuffled.plan is real.plan
    again = apply_control(real, "gaussian", seed=0)
    assert all(torch.equal(again[n], gaussian[n]) for n in weights)  # deterministic


@pytest.mark.slow
def test_gaussian_control_loses_the_planted_rank(planted, tmp_path):
    cache = tmp_path / "cache"
    real = analyze(AnalyzeJob(str(planted), cache_dir=cache, device="cpu", **RAW)).analysis
    ctl = analyze(AnalyzeJob(str(planted), cache_dir=cache, device="cpu", control="gaussian", **RAW)).analysis
    assert ctl.cache_dir != real.cache_dir
    for layer in (0, 1):
        for kind in ("Q", "O"):
            r, g = stacked_row(real, layer, kind), stacked_row(ctl, layer, kind)
            full = int(r["full_rank"])
            assert r["mp_spikes"] == RANK and r["rank_1pct"] <= RANK, (layer, kind)
            assert g["mp_spikes"] <= 1 and g["rank_1pct"] >= 0.6 * full, (layer, kind)
            assert np.isclose(g["frobenius"], r["frobenius"], rtol=1e-6)  # same norm, no structure
    assert set(ctl.metrics()["control"]) == {"gaussian"} and set(real.metrics()["control"]) == {"none"}
    # Rerun: nothing computed, and the real analysis is still the real one.
    again = analyze(AnalyzeJob(str(planted), cache_dir=cache, device="cpu", control="gaussian", **RAW))
    assert again.computed == []
    reloaded = load_analysis(CacheQuery(str(planted), cache_dir=cache, options=SpectraOptions(**RAW)))
    assert stacked_row(reloaded, 0, "O")["rank_1pct"] <= RANK


@pytest.mark.slow
def test_shuffled_control_keeps_the_norm_and_export_plot_select_it(planted, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real = analyze(AnalyzeJob(str(planted), cache_dir=cache, device="cpu", matrices="O,Q", **RAW)).analysis
    runner = CliRunner()
    args = ["analyze", str(planted), "--cache-dir", str(cache), "--device", "cpu", "--matrices", "O,Q"]
    r = runner.invoke(app, [*args, "--no-fold-norms", "--no-normalize-stacked", "--control", "shuffled"])
    assert r.exit_code == 0, r.output
    query = CacheQuery(str(planted), cache_dir=cache, options=SpectraOptions(control="shuffled", **RAW))
    shuf = load_analysis(query)
    for layer in (0, 1):
        r_o, s_o = stacked_row(real, layer, "O"), stacked_row(shuf, layer, "O")
        # Stacked raw O is o_proj: a permutation of its entries keeps its Frobenius norm exactly.
        assert np.isclose(s_o["frobenius"], r_o["frobenius"], rtol=1e-9)
        assert s_o["rank_1pct"] > RANK >= r_o["rank_1pct"]
    # export and plot read the control when asked, the real analysis otherwise.
    out = tmp_path / "shuf.csv"
    export(query, format="csv", out=out)
    assert set(pd.read_csv(out)["control"]) == {"shuffled"}
    base = ["export", str(planted), "--cache-dir", str(cache), "--no-fold-norms", "--no-normalize-stacked"]
    r = runner.invoke(app, [*base, "--format", "jsonl", "--out", str(tmp_path / "real.jsonl")])
    assert r.exit_code == 0, r.output
    assert not any("control" in json.loads(line) for line in (tmp_path / "real.jsonl").read_text().splitlines())
    r = runner.invoke(app, [*base, "--control", "shuffled", "--format", "jsonl", "--out", str(tmp_path / "s.jsonl")])
    assert {json.loads(line)["control"] for line in (tmp_path / "s.jsonl").read_text().splitlines()} == {"shuffled"}
    monkeypatch.chdir(tmp_path)
    report = make_plots([query], kinds="layerwise", formats="svg")
    (folder,) = report.out_dirs.values()
    assert folder.name.endswith("-shuffled-control")  # never the real analysis' figures
    assert "shuffled control" in (folder / "layerwise.svg").read_text()
