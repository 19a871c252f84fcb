"""`svd-probe diff BASE TUNED`: spectra of weight differences, against float64 numpy.

The test checkpoints are generated layouts (`svd_probe.testing.layouts`) whose weights sit on a
dyadic grid, and a copy with a planted rank-r delta added to every attention projection weight.
On that grid every sum and every norm fold is exact in float32, so each stored difference has
exactly rank r, and the fused differences O_t·V_t − O_b·V_b and Q_tᵀK_t − Q_bᵀK_b rank ≤ 2r.
The expectations slice heads with the independent reference of tests/test_adapters_layouts.py,
materialize every difference and take float64 `numpy.linalg.svd`; they never call svd-probe.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from test_adapters_layouts import in_memory, reference_factors, sv
from typer.testing import CliRunner

from svd_probe.cli import app
from svd_probe.diff import CheckpointMismatchError, DiffAnalysis, DiffJob, diff, load_diff
from svd_probe.errors import CacheMissError
from svd_probe.kinds import JOINT_KINDS
from svd_probe.plots import make_plots
from svd_probe.results import CacheQuery, load_analysis
from svd_probe.testing.layouts import build_layout, write_layout

RANK = 2
# Projection weights that get the planted delta, per layout.
PLANTED = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "deepseek_v3": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
}


def _grid(t: torch.Tensor, bits: int) -> torch.Tensor:
    return (t.float() * 2**bits).round() / 2**bits


def planted_pair(folder, name: str, *, seed: int = 1, scale: float = 1 / 32):
    """(base layout, tuned layout, base folder, tuned folder): tuned = base + rank-RANK deltas."""
    layout = build_layout(name)
    # Weights on a 2⁻¹² grid, norm gains on a 2⁻⁶ grid: products and sums stay exact in float32.
    base = {k: _grid(v, 6 if "norm" in k else 12) for k, v in layout.tensors.items()}
    gen = torch.Generator().manual_seed(seed)
    tuned = dict(base)
    for k, w in base.items():
        if ".self_attn." in k and k.endswith(tuple(f"{p}.weight" for p in PLANTED[name])):
            a = torch.randint(-2, 3, (w.shape[0], RANK), generator=gen).float()
            b = torch.randint(-2, 3, (w.shape[1], RANK), generator=gen).float()
            tuned[k] = w + (a @ b.T) * scale
    lb, lt = dataclasses.replace(layout, tensors=base), dataclasses.replace(layout, tensors=tuned)
    return lb, lt, write_layout(folder / "base", lb), write_layout(folder / "tuned", lt)


def expected_deltas(lb, lt, layer: int, fold: bool = True, normalize: bool = True) -> dict:
    """{key: (σ, shape)} of every delta and {key: ‖ΔW‖_F/‖W‖_F per row} from float64 numpy."""
    fb = reference_factors(lb, in_memory(lb), layer, fold)
    ft = reference_factors(lt, in_memory(lt), layer, fold)
    groups = fb["group"]

    def fused(f):
        return {
            "VO": [o @ f["v"][groups[h]] for h, o in enumerate(f["o"])],
            "QK": [q.T @ f["k"][groups[h]] for h, q in enumerate(f["q"])],
        }

    heads_b = {k.upper() if k != "q_pe" else "Q_pe": v for k, v in fb.items() if k in ("q", "q_pe", "k", "v", "o")}
    heads_t = {k.upper() if k != "q_pe" else "Q_pe": v for k, v in ft.items() if k in ("q", "q_pe", "k", "v", "o")}
    heads_b.update(fused(fb))
    heads_t.update(fused(ft))
    sigma, rel = {}, {}
    for kind, mats_b in heads_b.items():
        deltas = [t - b for t, b in zip(heads_t[kind], mats_b, strict=True)]
        sigma[f"head.{kind}"] = (np.stack([sv(d) for d in deltas]), deltas[0].shape)
        rel[f"head.{kind}"] = np.array(
            [np.linalg.norm(d) / np.linalg.norm(b) for d, b in zip(deltas, mats_b, strict=True)]
        )
        s1 = [sv(b)[0] if normalize else 1.0 for b in mats_b]
        scaled = [d / s for d, s in zip(deltas, s1, strict=True)]
        base_scaled = [b / s for b, s in zip(mats_b, s1, strict=True)]
        stacks = {"O": np.hstack, "VO": np.hstack}.get(kind, np.vstack)
        stacked = stacks(scaled)
        sigma[f"stacked.{kind}"] = (sv(stacked), stacked.shape)
        rel[f"stacked.{kind}"] = np.array([np.linalg.norm(stacked) / np.linalg.norm(stacks(base_scaled))])
        if kind == "QK":
            kq = np.hstack(scaled)
            sigma["stacked.KQ"] = (sv(kq), kq.shape)
            rel["stacked.KQ"] = np.array([np.linalg.norm(kq) / np.linalg.norm(np.hstack(base_scaled))])
    for kind, w in fb.get("layer", {}).items():
        d = ft["layer"][kind] - w
        sigma[f"layer.{kind}"] = (sv(d), d.shape)
        rel[f"layer.{kind}"] = np.array([np.linalg.norm(d) / np.linalg.norm(w)])
    return {"sigma": sigma, "rel": rel}


def run(base, tuned, cache, **kw) -> DiffAnalysis:
    return diff(DiffJob(str(base), str(tuned), cache_dir=cache, device="cpu", **kw))


# --- the numbers ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "deepseek_v3"])
def test_planted_rank_r_deltas_match_float64(tmp_path, name):
    lb, lt, fb, ft = planted_pair(tmp_path, name)
    outcome = run(fb, ft, tmp_path / "cache")
    a = outcome.analysis
    layers = list(range(lt.text_config["num_hidden_layers"] + int(lt.text_config.get("num_nextn_predict_layers") or 0)))
    assert outcome.computed == layers and a.layers == layers
    metrics = a.metrics()
    for layer in layers:
        expected = expected_deltas(lb, lt, layer)
        cached = a.layer_spectra[layer]
        assert set(cached.sigma) == set(expected["sigma"])
        for key, (ref, shape) in expected["sigma"].items():
            got = np.atleast_2d(cached.sigma[key])
            ref = np.atleast_2d(ref)
            assert got.shape == ref.shape, key
            assert tuple(cached.shapes[key]) == tuple(shape), key
            s1 = ref[:, :1]
            assert (np.abs(got - ref) / s1).max() < 1e-6, f"layer {layer} {key}"
            scope, kind = key.split(".")
            if scope == "head":
                # Exactly r nonzero σ per head for a plain delta, 2r for a fused one.
                r = 2 * RANK if kind in ("VO", "QK") else RANK
                assert (got[:, r - 1] > 1e-3 * got[:, 0]).all(), f"layer {layer} {key}: fewer than {r} σ"
                assert (got[:, r] < 1e-6 * got[:, 0]).all(), f"layer {layer} {key}: more than {r} σ"
            elif scope == "layer":
                assert got[0, RANK] < 1e-6 * got[0, 0] < got[0, RANK - 1] * 1e3, f"layer {layer} {key}"
            rows = metrics[(metrics["layer"] == layer) & (metrics["scope"] == scope) & (metrics["matrix"] == kind)]
            np.testing.assert_allclose(rows["rel_delta_norm"].to_numpy(), expected["rel"][key], rtol=1e-6)


@pytest.mark.slow
def test_raw_stacks_and_unfolded_norms(tmp_path):
    lb, lt, fb, ft = planted_pair(tmp_path, "llama")
    a = run(fb, ft, tmp_path / "cache", fold_norms=False, normalize_stacked=False).analysis
    expected = expected_deltas(lb, lt, 1, fold=False, normalize=False)
    for key in ("stacked.O", "stacked.VO", "stacked.QK", "stacked.KQ", "stacked.K"):
        ref = expected["sigma"][key][0]
        got = a.layer_spectra[1].sigma[key]
        assert np.abs(got - ref).max() < 1e-6 * ref[0], key
    # A raw stack of plain deltas of one planted rank-r matrix is that matrix: rank r.
    s = a.layer_spectra[1].sigma["stacked.O"]
    assert s[RANK] < 1e-6 * s[0]
    m = a.metrics()
    rel = m[(m["layer"] == 1) & (m["scope"] == "stacked") & (m["matrix"] == "VO")]["rel_delta_norm"]
    np.testing.assert_allclose(rel.to_numpy(), expected["rel"]["stacked.VO"], rtol=1e-6)


def test_same_checkpoint_twice_has_zero_deltas(tmp_path):
    folder = write_layout(tmp_path / "m", "llama")
    a = run(folder, folder, tmp_path / "cache", matrices="O,VO", layers="0").analysis
    sigma = a.layer_spectra[0].sigma
    # Every spectrum asked for is there (the llama layout: 8 heads), and all of it is zero.
    heads = build_layout("llama").config["num_attention_heads"]
    assert set(sigma) == {"head.O", "head.VO", "stacked.O", "stacked.VO"}
    assert sigma["head.O"].shape[0] == sigma["head.VO"].shape[0] == heads
    for key, s in sigma.items():
        assert s.size and not np.any(s), key
    m = a.metrics()
    assert len(m) == 2 * heads + 2  # a row per head of O and VO, one per stack
    assert (m["rel_delta_norm"] == 0).all() and (m["rank_1pct"] == 0).all()


# --- reads, cache, resume ---------------------------------------------------------------------------


@pytest.mark.slow
def test_each_checkpoint_read_once_rerun_computes_nothing(tmp_path):
    _, _, fb, ft = planted_pair(tmp_path, "llama")
    # What analyze reads of each, alone: the same adapter plan, so the diff reads exactly the sum.
    alone = sum(
        load_and_bytes(m, tmp_path / f"alone-{i}") for i, m in enumerate((fb, ft))
    )  # headers + attention tensors of both
    first = diff(DiffJob(str(fb), str(ft), cache_dir=tmp_path / "cache", device="cpu", matrices="O,VO,QK"))
    assert first.stats["bytes_fetched"] == alone
    again = diff(DiffJob(str(fb), str(ft), cache_dir=tmp_path / "cache", device="cpu", matrices="O,VO,QK"))
    assert again.computed == [] and again.from_cache == [0, 1]
    assert again.stats["bytes_fetched"] == 0
    for layer in (0, 1):
        for key, s in first.analysis.layer_spectra[layer].sigma.items():
            np.testing.assert_array_equal(again.analysis.layer_spectra[layer].sigma[key], s)
    # More kinds later: only those are added, the cached ones kept.
    more = diff(DiffJob(str(fb), str(ft), cache_dir=tmp_path / "cache", device="cpu", matrices="V"))
    assert more.computed == [0, 1]
    assert {"head.O", "head.V", "stacked.VO"} <= set(
        load_diff(CacheQuery(str(fb), cache_dir=tmp_path / "cache"), str(ft)).layer_spectra[0].sigma
    )


def load_and_bytes(model, cache) -> int:
    from svd_probe.analysis import AnalyzeJob, analyze

    return analyze(AnalyzeJob(str(model), cache_dir=cache, device="cpu", matrices="O,VO,QK")).stats["bytes_fetched"]


class _StopAfterFirstLayer:
    """A progress sink that presses Ctrl-C once the first layer is done (as a user would)."""

    def start(self, **kw):
        pass

    def layer_done(self, layer):
        raise KeyboardInterrupt


def test_ctrl_c_keeps_finished_layers_and_resumes(tmp_path):
    folder_b = write_layout(tmp_path / "b", "llama")
    folder_t = write_layout(tmp_path / "t", "llama", seed=3)
    job = DiffJob(str(folder_b), str(folder_t), cache_dir=tmp_path / "cache", device="cpu", matrices="O")
    with pytest.raises(KeyboardInterrupt):
        diff(job, progress=_StopAfterFirstLayer())
    assert load_diff(CacheQuery(str(folder_b), cache_dir=tmp_path / "cache"), str(folder_t)).layers == [0]
    resumed = diff(job)
    assert resumed.computed == [1] and resumed.from_cache == [0]


def test_load_diff_without_a_diff_names_the_command(tmp_path):
    folder = write_layout(tmp_path / "m", "llama")
    with pytest.raises(CacheMissError) as ei:
        load_diff(CacheQuery(str(folder), cache_dir=tmp_path / "cache"), str(folder))
    assert "svd-probe diff" in ei.value.hint


# --- mismatches: typed errors before any tensor byte --------------------------------------------------


@pytest.fixture
def hub():
    from svd_probe.testing.fake_hub import FakeHub

    with FakeHub() as h:
        yield h


def diff_over_hub(hub, tmp_path, base_folder, tuned_folder):
    hub.add_repo("test/base", base_folder)
    hub.add_repo("test/tuned", tuned_folder)
    hub.reset_records()
    job = DiffJob("test/base", "test/tuned", endpoint=hub.endpoint, cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(CheckpointMismatchError) as ei:
        diff(job)
    return ei.value


def shard_bytes(hub) -> int:
    return sum(r.body_bytes for r in hub.records if r.file and r.file.endswith(".safetensors"))


def tensor_bytes_read(hub) -> int:
    """Bytes served from the shards beyond their headers (8-byte length + JSON header)."""
    total = 0
    for rec in hub.records:
        if not (rec.file and rec.file.endswith(".safetensors") and rec.method == "GET" and rec.body_bytes):
            continue
        folder = hub.repos[rec.repo_id].folder
        with open(folder / rec.file, "rb") as f:
            header_end = 8 + int.from_bytes(f.read(8), "little")
        first, _, last = (rec.range or "bytes=0-").removeprefix("bytes=").partition("-")
        start, end = int(first), int(last) + 1 if last else (folder / rec.file).stat().st_size
        total += max(0, end - max(start, header_end))
    return total


def test_model_type_mismatch_is_a_typed_error(tmp_path, hub):
    a = write_layout(tmp_path / "llama", "llama")
    b = write_layout(tmp_path / "mla", "deepseek_v3")
    err = diff_over_hub(hub, tmp_path, a, b)
    assert "model_type 'llama' vs 'deepseek_v3'" in err.message
    assert shard_bytes(hub) == 0  # found from the configs alone


def test_shape_mismatch_in_config_is_a_typed_error(tmp_path, hub):
    a = write_layout(tmp_path / "llama", "llama")
    wide = build_layout("llama")
    wide.config = {**wide.config, "num_key_value_heads": 4}
    shape = (4 * wide.config["head_dim"], wide.config["hidden_size"])
    wide.tensors = {
        k: torch.zeros(shape, dtype=v.dtype) if k.endswith(("k_proj.weight", "v_proj.weight")) else v
        for k, v in wide.tensors.items()
    }
    err = diff_over_hub(hub, tmp_path, a, write_layout(tmp_path / "wide", wide))
    assert "n_kv_groups 2 vs 4" in err.message
    assert shard_bytes(hub) == 0


def test_tensor_shape_mismatch_in_headers_is_a_typed_error(tmp_path, hub):
    a = write_layout(tmp_path / "a", "llama")
    odd = build_layout("llama")
    name = "model.layers.1.self_attn.o_proj.weight"
    odd.tensors = {**odd.tensors, name: torch.zeros(64, 72, dtype=torch.bfloat16)}
    err = diff_over_hub(hub, tmp_path, a, write_layout(tmp_path / "b", odd))
    assert name in err.message and "[64, 64]" in err.message and "[64, 72]" in err.message
    assert shard_bytes(hub) > 0 and tensor_bytes_read(hub) == 0  # headers only


def test_mismatch_through_the_cli_exits_without_traceback(tmp_path, monkeypatch, capsys):
    from svd_probe.cli import main

    a = write_layout(tmp_path / "llama", "llama")
    b = write_layout(tmp_path / "mla", "deepseek_v3")
    argv = ["svd-probe", "diff", str(a), str(b), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as ei:
        main()
    assert ei.value.code == 2
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    assert "not the same architecture" in cap.err and "hint:" in cap.err


# --- export and plot ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_and_plot_of_a_diff(tmp_path):
    lb, lt, fb, ft = planted_pair(tmp_path, "llama")
    expected = {layer: expected_deltas(lb, lt, layer) for layer in (0, 1)}
    cache = tmp_path / "cache"
    runner = CliRunner()
    r = runner.invoke(app, ["diff", str(fb), str(ft), "--cache-dir", str(cache), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert [row["layer"] for row in summary["layers"]] == [0, 1]
    # Stacked planted-rank deltas of O: exactly rank r; fused VO per head ≤ 2r.
    assert all(row["O_rank_1pct"] <= RANK for row in summary["layers"])
    # A normal analysis of BASE, to compare export columns against.
    from svd_probe.analysis import AnalyzeJob, analyze

    analyze(AnalyzeJob(str(fb), cache_dir=cache, device="cpu"))
    for fmt in ("jsonl", "csv", "parquet"):
        plain, delta = tmp_path / f"plain.{fmt}", tmp_path / f"diff.{fmt}"
        base_args = ["export", str(fb), "--cache-dir", str(cache), "--format", fmt]
        assert runner.invoke(app, [*base_args, "--out", str(plain)]).exit_code == 0
        r = runner.invoke(app, [*base_args, "--out", str(delta), "--diff", str(ft)])
        assert r.exit_code == 0, r.output
        if fmt == "jsonl":
            # A diff leaves out the joint input maps (Qjoint, KVjoint): they plan one model's latent.
            rows_plain = [json.loads(line) for line in plain.read_text().splitlines()]
            rows_plain = [row for row in rows_plain if row["matrix"] not in JOINT_KINDS]
            rows_diff = [json.loads(line) for line in delta.read_text().splitlines()]
            ids = {"base_model", "base_revision", "tuned_model", "tuned_revision"}
            assert set(rows_diff[0]) == set(rows_plain[0]) | ids
            assert len(rows_diff) == len(rows_plain)
            assert rows_diff[0]["tuned_model"] == "tuned" and rows_diff[0]["base_model"] == "base"
            continue
        df_plain = pd.read_csv(plain) if fmt == "csv" else pd.read_parquet(plain)
        df = pd.read_csv(delta) if fmt == "csv" else pd.read_parquet(delta)
        extra = {"base_model", "base_revision", "tuned_model", "tuned_revision", "base_frobenius", "rel_delta_norm"}
        assert set(df.columns) == set(df_plain.columns) | extra
        vo = df[(df["layer"] == 0) & (df["scope"] == "head") & (df["matrix"] == "VO")].sort_values("head")
        np.testing.assert_allclose(vo["rel_delta_norm"], expected[0]["rel"]["head.VO"], rtol=1e-6)
    # Plot: the two figures and the data they drew.
    report = make_plots([CacheQuery(str(fb), cache_dir=cache)], out_dir=tmp_path / "plots", diff=str(ft), dpi=50)
    assert sorted(p.name for p in report.files) == ["delta-norm-heads.png", "delta-rank.png"]
    ranks = report.result("delta-rank").data
    for layer in (0, 1):
        sigma = expected[layer]["sigma"]
        for key in ("stacked.O", "stacked.VO", "head.VO"):
            scope, kind = key.split(".")
            s = np.atleast_2d(sigma[key][0])
            energy = np.cumsum(s**2, axis=1) / (s**2).sum(axis=1, keepdims=True)
            want = np.median((energy < 0.99 - 1e-12).sum(axis=1) + 1)
            got = ranks[(ranks["layer"] == layer) & (ranks["scope"] == scope) & (ranks["matrix"] == kind)]["rank"]
            assert float(got.iloc[0]) == want, (layer, key)
    grids = report.result("delta-norm").extra["grids"]
    for layer in (0, 1):
        np.testing.assert_allclose(grids["VO"][layer], expected[layer]["rel"]["head.VO"], rtol=1e-6)
    plot_args = ["plot", str(fb), "--cache-dir", str(cache), "--diff", str(ft), "--kind", "delta-rank"]
    r = runner.invoke(app, [*plot_args, "--format", "svg", "--out", str(tmp_path / "p2")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == [".svd-probe-plot.json", "delta-rank.svg"]
    # The base's own analysis is untouched by the diff.
    assert load_analysis(CacheQuery(str(fb), cache_dir=cache)).layers == [0, 1]


@pytest.mark.slow
def test_offline_diff_answers_from_the_cache(tmp_path, hub, monkeypatch):
    from huggingface_hub import constants

    from svd_probe.errors import OfflineCacheMissError

    hub.add_repo("test/base", write_layout(tmp_path / "b", "llama"))
    hub.add_repo("test/tuned", write_layout(tmp_path / "t", "llama", seed=5))
    job = DiffJob("test/base", "test/tuned", endpoint=hub.endpoint, cache_dir=tmp_path / "c", device="cpu")
    online = diff(dataclasses.replace(job, layers="0", matrices="VO"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.reset_records()
    offline = diff(dataclasses.replace(job, layers="0", matrices="VO"))
    assert hub.records == [] and offline.stats["offline"] and offline.computed == []
    assert "offline mode" in offline.notes[0]
    np.testing.assert_array_equal(
        offline.analysis.layer_spectra[0].sigma["head.VO"], online.analysis.layer_spectra[0].sigma["head.VO"]
    )
    with pytest.raises(OfflineCacheMissError) as ei:
        diff(dataclasses.replace(job, layers="0-1", matrices="VO"))
    assert "cannot compute layer 1" in ei.value.message
