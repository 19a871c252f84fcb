"""The input-latent planner: planted joint-KV ranks found through the whole pipeline (GQA and MLA
checkpoints), and the cache and weight arithmetic checked by hand on DeepSeek-V3's and
Llama-3.1-8B's real shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from svd_probe.cache.store import LayerSpectra, SpectraCache, SpectraOptions
from svd_probe.errors import BadOptionError, MissingFigureData
from svd_probe.plots import make_plots
from svd_probe.plots.kv_planner import (
    joint_params,
    kv_cache_elements,
    kv_planner_figure,
    kv_planner_rich_table,
    plan_kv_latent,
)
from svd_probe.results import CacheQuery, load_analysis
from svd_probe.testing.layouts import build_layout, write_layout

COMMIT_V3 = "1111111111111111111111111111111111111111"
COMMIT_L8 = "2222222222222222222222222222222222222222"

# --- the arithmetic on real shapes, from a planted cache -------------------------------------------

V3_DIMS = dict(
    model_type="deepseek_v3",
    num_layers=62,
    num_mtp_layers=1,
    d_model=7168,
    n_heads=128,
    n_kv_groups=128,
    d_qk=128,
    d_rope=64,
    d_v=128,
    q_latent=1536,
    kv_latent=512,
)
L8_DIMS = dict(
    model_type="llama",
    num_layers=32,
    num_mtp_layers=0,
    d_model=4096,
    n_heads=32,
    n_kv_groups=8,
    d_qk=128,
    d_rope=0,
    d_v=128,
    q_latent=None,
    kv_latent=None,
)


def planted(r: int, k: int, tail: int = 20, t: float = 0.0095) -> np.ndarray:
    """r equal σ, then `tail` smaller ones holding a share t of Σσ², then zeros: for r from 256 to
    1024 the rank keeping 99% is exactly r ((1 − t)·(r − 1)/r < 0.99 ≤ 1 − t)."""
    s = np.zeros(k)
    s[:r] = 1.0
    s[r : r + tail] = np.sqrt(t / (1 - t) * r / tail)
    return s


def write_cache(root, repo_id, commit, dims, layers, kv, q):
    """Cached layer.KVjoint and layer.Qjoint spectra: kv, q = ((m, n), planted rank)."""
    repo = "models--" + repo_id.replace("/", "--")
    cache = SpectraCache(root, repo, commit, SpectraOptions())
    for L in layers:
        sigma = {"layer.KVjoint": planted(kv[1], min(kv[0])), "layer.Qjoint": planted(q[1], min(q[0]))}
        shapes = {"layer.KVjoint": kv[0], "layer.Qjoint": q[0]}
        cache.write_layer(LayerSpectra(layer=L, sigma=sigma, shapes=shapes))
    SpectraCache.write_ref(root, repo, "main", commit)
    cache.write_manifest({"model": repo_id, "dims": dims, "config": {}})


@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvcache")
    # DeepSeek-V3: KVjoint = kv_b·kv_a (latent rows), [128·(128+128), 7168]; Qjoint = q_b·q_a
    # no-RoPE rows, [128·128, 7168]. Main layers 0-60 cached, not the MTP layer.
    write_cache(
        root, "deepseek-ai/DeepSeek-V3", COMMIT_V3, V3_DIMS, range(61), ((32768, 7168), 256), ((16384, 7168), 768)
    )
    # Llama-3.1-8B: [W_K; W_V] of 8 kv heads of 128, [2048, 4096]; W_Q [4096, 4096].
    write_cache(
        root, "meta-llama/Llama-3.1-8B", COMMIT_L8, L8_DIMS, range(32), ((2048, 4096), 512), ((4096, 4096), 1024)
    )
    return root


def test_planted_spectra_have_the_rank_they_say():
    from svd_probe.spectra.metrics import energy_rank

    for r in (256, 512, 768, 1024):
        assert energy_rank(planted(r, 4096), 0.01) == r


def test_deepseek_v3_by_hand(real_shapes):
    plan = plan_kv_latent(load_analysis(CacheQuery("deepseek-ai/DeepSeek-V3", cache_dir=real_shapes)), energy=0.99)
    row = plan.table.iloc[0]
    assert row["kv_rank"] == 256 and row["q_rank"] == 768
    # Cache per token and layer, BF16: (kv_lora 512 + RoPE 64)·2 = 1152 B → (256 + 64)·2 = 640 B.
    assert (row["kv_cache_bytes_before"], row["kv_cache_bytes_after"], row["kv_cache_saved"]) == (1152, 640, 512)
    assert row["kv_cache_saved_frac"] == pytest.approx(512 / 1152)
    # KV weights: kv_a latent rows 512·7168 = 3,670,016 + kv_b 32768·512 = 16,777,216 → 20,447,232;
    # at r = 256: 256·7168 + 32768·256 = 1,835,008 + 8,388,608 = 10,223,616.
    assert (row["kv_params_before"], row["kv_params_after"]) == (20_447_232, 10_223_616)
    assert row["kv_params_change"] == pytest.approx(-0.5)
    # Query: q_a 1536·7168 = 11,010,048 + q_b no-RoPE rows 16384·1536 = 25,165,824 → 36,175,872;
    # at r = 768: 768·7168 + 16384·768 = 5,505,024 + 12,582,912 = 18,087,936.
    assert (row["q_params_before"], row["q_params_after"]) == (36_175_872, 18_087_936)
    tot = plan.totals()
    # The model's own cache over its 61 main layers: 61·1152 = 70,272 B per token.
    assert (tot["kv_cache_bytes_before"], tot["kv_cache_bytes_after"]) == (70_272, 39_040)
    assert tot["kv_rank"] == 61 * 256
    assert any("61 cached layers of 62" in n for n in plan.notes)
    fp8 = plan_kv_latent(load_analysis(CacheQuery("deepseek-ai/DeepSeek-V3", cache_dir=real_shapes)), kv_dtype="fp8")
    assert fp8.totals()["kv_cache_bytes_before"] == 61 * 576


def test_llama_3_1_8b_by_hand(real_shapes):
    plan = plan_kv_latent(load_analysis(CacheQuery("meta-llama/Llama-3.1-8B", cache_dir=real_shapes)), energy=0.99)
    row = plan.table.iloc[5]
    # Cache: 2·g·d_head·2 B = 2·8·128·2 = 4096 B → r·2 = 1024 B.
    assert (row["kv_rank"], row["kv_cache_bytes_before"], row["kv_cache_bytes_after"]) == (512, 4096, 1024)
    # W_K, W_V: 2048·4096 = 8,388,608 → down 512·4096 + up 2048·512 = 3,145,728 (−62.5%).
    assert (row["kv_params_before"], row["kv_params_after"]) == (8_388_608, 3_145_728)
    assert row["kv_params_change"] == pytest.approx(-0.625)
    # W_Q: 4096·4096 = 16,777,216 → 1024·(4096 + 4096) = 8,388,608.
    assert (row["q_rank"], row["q_params_before"], row["q_params_after"]) == (1024, 16_777_216, 8_388_608)
    tot = plan.totals()
    # 128 KiB per token over 32 layers today, 32 KiB with the latents.
    assert (tot["kv_cache_bytes_before"], tot["kv_cache_bytes_after"]) == (131_072, 32_768)
    assert tot["kv_cache_saved_frac"] == pytest.approx(0.75)
    assert not plan.notes
    frame = plan.to_csv_frame()
    assert list(frame["layer"])[-1] == "total" and len(frame) == 33


def test_the_formulas_alone():
    assert kv_cache_elements(V3_DIMS) == 576 and kv_cache_elements(V3_DIMS, 100) == 164
    assert kv_cache_elements(L8_DIMS) == 2048 and kv_cache_elements(L8_DIMS, 100) == 100
    assert joint_params(2048, 4096) == 2048 * 4096
    assert joint_params(2048, 4096, 1) == 2048 + 4096


def test_the_table_reads_at_80_columns(real_shapes):
    plan = plan_kv_latent(load_analysis(CacheQuery("deepseek-ai/DeepSeek-V3", cache_dir=real_shapes)))
    console = Console(width=80, record=True, color_system=None)
    console.print(kv_planner_rich_table(plan))
    lines = console.export_text().splitlines()
    assert max(len(ln) for ln in lines) <= 80
    body = [ln for ln in lines if ln.strip().split(" ")[0].isdigit()]
    assert len(body) == 61  # one line per layer: no cell wrapped
    assert "1,152→640" in body[0] and "44.4%" in body[0] and "-50.0%" in body[0]
    total = next(ln for ln in lines if ln.strip().startswith("total"))
    assert "70,272→39,040" in total


def test_options_and_missing_spectra(real_shapes, tmp_path):
    a = load_analysis(CacheQuery("meta-llama/Llama-3.1-8B", cache_dir=real_shapes))
    with pytest.raises(BadOptionError):
        plan_kv_latent(a, energy=1.0)
    with pytest.raises(BadOptionError):
        plan_kv_latent(a, kv_dtype="int3")
    # A cache without the joint spectra: the figure is skipped with the analyze command.
    repo = "models--acme--old"
    cache = SpectraCache(tmp_path, repo, COMMIT_V3, a.options)
    cache.write_layer(LayerSpectra(layer=0, sigma={"stacked.O": np.ones(4)}, shapes={"stacked.O": (4, 4)}))
    SpectraCache.write_ref(tmp_path, repo, "main", COMMIT_V3)
    cache.write_manifest({"model": "acme/old", "dims": L8_DIMS, "config": {}})
    old = load_analysis(CacheQuery("acme/old", cache_dir=tmp_path))
    with pytest.raises(MissingFigureData, match="KVjoint"):
        plan_kv_latent(old)
    report = make_plots([old], tmp_path / "p", kinds="kv-planner", dpi=30)
    assert any("skipped kv-planner" in n and "--matrices KVjoint,Qjoint" in n for n in report.notes)


def test_figure_draws_the_table(real_shapes):
    res = kv_planner_figure(load_analysis(CacheQuery("meta-llama/Llama-3.1-8B", cache_dir=real_shapes)), dpi=30)
    assert res.stem == "kv-planner-E0p99"
    ax = res.figure.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "KVjoint rank r")
    np.testing.assert_array_equal(line.get_ydata(), res.data["kv_rank"].iloc[:-1].to_numpy())


# --- planted ranks through analyze ---------------------------------------------------------------------


def _orthonormal(gen, m, k):
    return torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]


def planted_gqa(folder, kv_ranks=(5, 7), q_rank=9):
    """The llama layout (8 query heads, 2 kv heads of 8, d_model 64) in float32 with, per layer L,
    W_K and W_V sharing one rank-r_L input factor: [W_K; W_V]·diag(g) = A·Dᵀ, A [32, r] and
    D [64, r] with orthonormal columns, so the joint map has r equal σ and then zeros. W_Q is
    planted the same way with rank q_rank."""
    gen = torch.Generator().manual_seed(3)
    layout = build_layout("llama")
    t = dict(layout.tensors)
    g_kv, d = 2 * 8, 8
    for L, r in enumerate(kv_ranks):
        p = f"model.layers.{L}."
        g = t[p + "input_layernorm.weight"].to(torch.float64)
        kv = _orthonormal(gen, 2 * g_kv, r) @ _orthonormal(gen, 64, r).T / g  # shared factor D
        t[p + "self_attn.k_proj.weight"] = kv[:g_kv].float()
        t[p + "self_attn.v_proj.weight"] = kv[g_kv:].float()
        q = _orthonormal(gen, 8 * d, q_rank) @ _orthonormal(gen, 64, q_rank).T / g
        t[p + "self_attn.q_proj.weight"] = q.float()
        t[p + "input_layernorm.weight"] = g.float()
    layout.tensors = t
    return write_layout(folder, layout)


@pytest.mark.slow
def test_gqa_checkpoint_with_a_planted_joint_kv_rank(tmp_path):
    from svd_probe.analysis import AnalyzeJob, analyze
    from svd_probe.cli import app

    folder = planted_gqa(tmp_path / "gqa")
    cache = tmp_path / "cache"
    analyze(AnalyzeJob(model=str(folder), cache_dir=cache, device="cpu", matrices="KVjoint,Qjoint"))
    a = load_analysis(CacheQuery(str(folder), cache_dir=cache))
    plan = plan_kv_latent(a, energy=0.99)
    assert list(plan.table["kv_rank"]) == [5, 7] and list(plan.table["q_rank"]) == [9, 9]
    # r equal σ: keeping half the energy takes ceil(r/2) of them.
    assert list(plan_kv_latent(a, energy=0.5).table["kv_rank"]) == [3, 4]
    # 2·2·8·2 = 64 B today → r·2 B; weights 32·64 = 2048 → r·(32 + 64).
    assert list(plan.table["kv_cache_bytes_after"]) == [10, 14]
    assert list(plan.table["kv_params_after"]) == [480, 672]
    assert plan.totals()["kv_cache_bytes_before"] == 128

    out = tmp_path / "plots"
    args = ["plot", str(folder), "--cache-dir", str(cache), "--kind", "kv-planner", "--energy", "0.99"]
    result = CliRunner().invoke(app, [*args, "--data", "--out", str(out), "--dpi", "30"])
    assert result.exit_code == 0, result.output
    assert (out / "kv-planner-E0p99.png").is_file() and (out / "kv-planner-E0p99.csv").is_file()
    import pandas as pd

    csv = pd.read_csv(out / "kv-planner-E0p99.csv")
    assert list(csv["kv_rank"]) == [5, 7, 12] and list(csv["layer"]) == ["0", "1", "total"]
    assert "joint KV / Q latent" in result.output and "64→10" in result.output


@pytest.mark.slow
def test_mla_checkpoint_with_a_planted_latent_use(tmp_path):
    from svd_probe.analysis import AnalyzeJob, analyze

    # DeepSeek-V3 layout: kv_lora_rank 16, of which the keys and values use 6: kv_a's latent rows
    # have rank 6, so kv_b·kv_a has rank 6 whatever kv_b is.
    layout = build_layout("deepseek_v3")
    gen = torch.Generator().manual_seed(4)
    t = dict(layout.tensors)
    for L in range(3):
        name = f"model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight"
        w = t[name].to(torch.float64)
        w[:16] = torch.randn(16, 6, generator=gen, dtype=torch.float64) @ torch.randn(
            6, 64, generator=gen, dtype=torch.float64
        )
        t[name] = w.float()
    layout.tensors = t
    folder = write_layout(tmp_path / "mla", layout)
    run = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu", matrices="KVjoint"))
    plan = plan_kv_latent(run.analysis, energy=1 - 1e-9)
    assert list(plan.table["kv_rank"]) == [6, 6, 6]
    # (16 + 4)·2 = 40 B → (6 + 4)·2 = 20 B per token and layer.
    assert (
        list(plan.table["kv_cache_bytes_before"]) == [40] * 3 and list(plan.table["kv_cache_bytes_after"]) == [20] * 3
    )
    # kv_a latent 16·64 + kv_b 4·(8+6)·16 = 1024 + 896 → 6·(56 + 64).
    assert list(plan.table["kv_params_before"]) == [1920] * 3 and list(plan.table["kv_params_after"]) == [720] * 3
    assert "q_rank" not in plan.table and any("Qjoint" in n for n in plan.notes)
