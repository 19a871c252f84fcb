"""Subspace alignment: principal angles against scipy and planted subspaces, then `align` end to
end on checkpoints with planted write and read subspaces, against a float64 numpy reference built
from the shards without svd-probe's code, its cache, export, figure and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from svd_probe.alignment import (
    align,
    cosines,
    export_alignment,
    head_pair_stats,
    left_basis,
    load_alignment,
    principal_angles,
    random_rms_cosine,
)
from svd_probe.errors import BadOptionError, OutputExistsError
from svd_probe.results import CacheQuery
from svd_probe.testing.layouts import build_layout, write_layout


def orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


def scipy_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal cosines by scipy (its angles come largest first): descending."""
    return np.sort(np.cos(scipy.linalg.subspace_angles(a, b)))[::-1]


# --- principal angles ------------------------------------------------------------------------------


def test_equal_subspaces_give_zero_angles():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 6))
    b = a @ rng.standard_normal((6, 6))  # another basis of the same span
    pa = principal_angles(a, b)
    np.testing.assert_allclose(pa.cosines, np.ones(6), atol=1e-12)
    np.testing.assert_allclose(pa.degrees, np.zeros(6), atol=1e-5)
    assert (pa.rank_a, pa.rank_b, pa.dim) == (6, 6, 40)


@pytest.mark.slow
def test_orthogonal_subspaces_give_right_angles():
    q = orthonormal(np.random.default_rng(1), 30, 10)
    pa = principal_angles(q[:, :5] @ np.diag([3, 2, 1, 0.5, 0.1]), q[:, 5:])
    np.testing.assert_allclose(pa.cosines, np.zeros(5), atol=1e-12)
    np.testing.assert_allclose(pa.degrees, np.full(5, 90.0), atol=1e-9)


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_a_planted_partial_overlap_is_found(k):
    rng = np.random.default_rng(2 + k)
    d, r = 50, 8
    q = orthonormal(rng, d, 2 * r)
    a = q[:, :r] @ rng.standard_normal((r, r))
    # k directions shared with a, r − k orthogonal to it, mixed so that no column is a basis vector
    b = np.hstack([q[:, :k], q[:, r : 2 * r - k]]) @ rng.standard_normal((r, r))
    c = principal_angles(a, b, r).cosines
    np.testing.assert_allclose(c[:k], np.ones(k), atol=1e-10)
    np.testing.assert_allclose(c[k:], np.zeros(r - k), atol=1e-10)
    # scipy's cosines near a right angle are only good to about sqrt(eps) = 1.5e-8 (it recovers
    # them from arcsin of a difference of projections; seen: 1.49e-8 for a planted 0, with
    # numpy's OpenBLAS on 2 cores): the planted truth above is the tight check.
    np.testing.assert_allclose(c, scipy_cosines(a, b), atol=1e-7)


@pytest.mark.parametrize(
    "shapes", [((20, 3), (20, 5)), ((64, 16), (64, 16)), ((12, 12), (12, 4)), ((120, 30), (120, 7))]
)
def test_matches_scipy_subspace_angles(shapes):
    rng = np.random.default_rng(sum(shapes[0]) + sum(shapes[1]))
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    np.testing.assert_allclose(principal_angles(a, b).cosines, scipy_cosines(a, b), atol=1e-10)
    # A rank-deficient matrix: both take its numerical rank.
    low = rng.standard_normal((shapes[0][0], 2)) @ rng.standard_normal((2, shapes[0][1]))
    pa = principal_angles(low, b)
    assert pa.rank_a == min(2, shapes[0][1])
    np.testing.assert_allclose(pa.cosines, scipy_cosines(low, b), atol=1e-8)


def test_rank_r_compares_the_top_r_left_singular_vectors():
    rng = np.random.default_rng(7)
    d, r = 40, 4
    u, v = orthonormal(rng, d, 10), orthonormal(rng, 10, 10)
    a = u @ np.diag(np.geomspace(10, 0.1, 10)) @ v.T
    b = rng.standard_normal((d, 9))
    ub = np.linalg.svd(b)[0][:, :r]
    np.testing.assert_allclose(principal_angles(a, b, r).cosines, scipy_cosines(u[:, :r], ub), atol=1e-10)
    # The torch helper's bases of a batch are orthonormal and span the same top-r spaces.
    x = torch.from_numpy(np.stack([a, a @ np.diag(np.arange(1, 11))]))
    basis = left_basis(x, r)
    np.testing.assert_allclose((basis.mT @ basis).numpy(), np.broadcast_to(np.eye(r), (2, r, r)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(basis[0].mT.numpy() @ u[:, :r])[1], np.ones(r), atol=1e-10)


def test_random_subspaces_give_the_baseline():
    # E[mean cos²] = max(a, b)/d for independent random subspaces (the module docstring); the
    # batched helpers are what `align` runs on heads.
    gen = torch.Generator().manual_seed(11)
    d, a, b, trials = 48, 6, 10, 500
    qa = left_basis(torch.randn(trials, d, a, generator=gen, dtype=torch.float64), a)
    qb = left_basis(torch.randn(trials, d, b, generator=gen, dtype=torch.float64), b)
    mean_sq = (cosines(qa, qb) ** 2).mean(-1)
    assert abs(float(mean_sq.mean()) - b / d) < 0.03 * b / d  # ≈ 4.5 standard errors
    assert random_rms_cosine(a, b, d) == pytest.approx(np.sqrt(b / d))
    assert random_rms_cosine(64, 64, 7168) == pytest.approx(0.09449, abs=1e-5)


@pytest.mark.slow
def test_head_pair_stats_are_the_pairwise_principal_angles():
    rng = np.random.default_rng(5)
    u = torch.from_numpy(np.stack([orthonormal(rng, 20, 3) for _ in range(3)]))
    stats = head_pair_stats(u)
    for i in range(3):
        for j in range(3):
            c = principal_angles(u[i].numpy(), u[j].numpy()).cosines
            assert stats["mean"][i, j] == pytest.approx(c.mean(), abs=1e-12)
            assert stats["rms"][i, j] == pytest.approx(np.sqrt((c**2).mean()), abs=1e-12)
            assert stats["max"][i, j] == pytest.approx(c[0], abs=1e-12)
            assert stats["min"][i, j] == pytest.approx(c[-1], abs=1e-12)


def test_bad_arguments_are_refused_before_anything_is_read(tmp_path):
    with pytest.raises(BadOptionError, match="--rank"):
        align("no/such-repo", rank=0, cache_dir=tmp_path)
    with pytest.raises(BadOptionError, match="--write"):
        align("no/such-repo", write="QK", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        principal_angles(np.ones((3, 2)), np.ones((4, 2)))


# --- a GQA checkpoint with planted write and read subspaces ----------------------------------------------

H, N, G, D = 64, 8, 2, 8  # the llama layout's shapes
S_DIM = 12  # every layer writes into one 12-dim subspace S of the residual stream


def planted_llama(folder, n_layers: int = 3, seed: int = 0):
    """The llama layout (GQA, 4 query heads per kv head) in float32, every layer with:

    - o_proj: head 0 writes into S[:, 0:8], head 1 into S[:, 4:12] (4 shared directions), the
      other heads into random 8-dim subspaces of S; so the stacked output subspace is S;
    - k_proj: rows spanning S once input_layernorm is folded in (k_proj = A·Sᵀ·diag(1/g));
    - v_proj: rows in S's orthogonal complement; q_proj: random.
    Returns (folder, S).
    """
    rng = np.random.default_rng(seed)
    layout = build_layout("llama", seed=seed)
    layout.config["num_hidden_layers"] = n_layers
    t = {k: v for k, v in layout.tensors.items() if not k.startswith("model.layers.")}
    basis = orthonormal(rng, H, H)
    s, s_perp = basis[:, :S_DIM], basis[:, S_DIM:]
    for L in range(n_layers):
        p = f"model.layers.{L}."
        for name, v in layout.tensors.items():
            if name.startswith("model.layers.1."):
                t[p + name[len("model.layers.1.") :]] = v
        g = 0.25 + 1.75 * rng.random(H)
        t[p + "input_layernorm.weight"] = torch.tensor(g, dtype=torch.float32)
        heads = [s[:, 0:8], s[:, 4:12]] + [s @ orthonormal(rng, S_DIM, D) for _ in range(N - 2)]
        mix = [orthonormal(rng, D, D) @ np.diag(np.linspace(1.0, 2.0, D)) for _ in range(N)]
        o = np.hstack([h @ m for h, m in zip(heads, mix, strict=True)])
        k = rng.standard_normal((G * D, S_DIM)) @ s.T / g
        v = rng.standard_normal((G * D, H - S_DIM)) @ s_perp.T / g
        q = rng.standard_normal((N * D, H)) / np.sqrt(H)
        for name, w in (("o_proj", o), ("k_proj", k), ("v_proj", v), ("q_proj", q)):
            t[p + f"self_attn.{name}.weight"] = torch.tensor(w, dtype=torch.float32)
    layout.tensors = t
    return write_layout(folder, layout), s


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    folder, s = planted_llama(root / "planted-llama")
    return folder, s, root / "cache"


@pytest.mark.slow
def test_align_finds_the_planted_subspaces(planted, tmp_path):
    folder, _, cache = planted
    res = align(str(folder), rank=S_DIM, cache_dir=cache, device="cpu", layers="0-1")
    assert res.computed == [0, 1] and sorted(res.layers) == [0, 1]
    la = res.layers[1]
    assert la.ranks["head"] == D and la.ranks["layer"] == S_DIM and la.ranks["read"]["K"] == S_DIM
    # Heads 0 and 1 share 4 of their 8 directions: mean 1/2, max 1, min 0.
    assert la.pairs["mean"][0, 1] == pytest.approx(0.5, abs=1e-6)
    assert la.pairs["max"][0, 1] == pytest.approx(1.0, abs=1e-6)
    assert la.pairs["min"][0, 1] == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(np.diag(la.pairs["min"]), np.ones(N), atol=1e-6)
    # Every head writes inside the layer's stacked subspace S.
    np.testing.assert_allclose(la.head_layer, np.ones((N, D)), atol=1e-6)
    # Layer 0 writes S; layer 1's keys read S, its values read only S's complement.
    assert la.prev_layer == 0
    np.testing.assert_allclose(la.prev["K"], np.ones(S_DIM), atol=1e-6)
    np.testing.assert_allclose(la.prev["V"], np.zeros(S_DIM), atol=1e-5)
    assert 0.05 < la.prev["Q"].mean() < 0.95  # random queries: neither
    nxt = res.next_frame().set_index("target")
    assert list(nxt.index) == ["Q", "K", "V"]
    assert nxt.loc["K", "rms_cos"] == pytest.approx(1.0, abs=1e-6)
    assert nxt.loc["K", "random_rms_cos"] == pytest.approx(np.sqrt(S_DIM / H))
    assert res.layers[0].prev == {} and res.layers[0].prev_layer is None

    # A rerun reads the cache; export and reload give the same numbers.
    again = align(str(folder), rank=S_DIM, cache_dir=cache, device="cpu", layers="0-1")
    assert again.computed == []
    np.testing.assert_array_equal(again.layers[1].prev["K"], la.prev["K"])
    csv = tmp_path / "align.csv"
    n = export_alignment(again, csv)
    pairs = N * (N - 1) // 2
    assert n == 2 * pairs + 2 * N + 3
    jsonl = tmp_path / "align.jsonl"
    assert export_alignment(again, jsonl) == n
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    k_row = next(r for r in rows if r["comparison"] == "layer_next" and r["target"] == "K")
    assert (k_row["layer"], k_row["other_layer"], k_row["k"]) == (0, 1, S_DIM)
    np.testing.assert_allclose(k_row["cosines"], la.prev["K"])
    with pytest.raises(OutputExistsError):
        export_alignment(again, csv)
    cached = load_alignment(CacheQuery(str(folder), cache_dir=cache))
    assert sorted(cached.layers) == [0, 1] and cached.rank == S_DIM
    np.testing.assert_array_equal(cached.layers[1].pairs["mean"], la.pairs["mean"])


@pytest.mark.slow
def test_align_resumes_and_repairs(planted):
    folder, _, cache = planted
    first = align(str(folder), rank=4, cache_dir=cache, device="cpu", layers="0-1")
    assert first.computed == [0, 1]
    # Layer 2 is new: only it is computed, reading layer 1's output projection again for its basis.
    more = align(str(folder), rank=4, cache_dir=cache, device="cpu", layers="0-2")
    assert more.computed == [2] and more.layers[2].prev_layer == 1
    # A damaged layer file is recomputed, with a note.
    path = more.cache_dir / "layer-0002.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    repaired = align(str(folder), rank=4, cache_dir=cache, device="cpu", layers="0-2")
    assert repaired.computed == [2] and any("layer 2" in note for note in repaired.notes)
    np.testing.assert_allclose(repaired.layers[2].prev["K"], more.layers[2].prev["K"], atol=1e-12)
    # Asked alone, a layer whose predecessor is not in the set needs no comparison, and shows
    # none (`LayerAlignment.prev` is empty when that layer was not asked), though its file keeps it.
    alone = align(str(folder), rank=4, cache_dir=cache, device="cpu", layers="1")
    assert alone.computed == [] and alone.layers[1].prev_layer is None and alone.layers[1].prev == {}
    assert alone.next_frame().empty
    both = align(str(folder), rank=4, cache_dir=cache, device="cpu", layers="0-1")
    assert both.computed == [] and both.layers[1].prev_layer == 0


# --- an MLA checkpoint against an independent float64 reference ---------------------------------------------


def _read(folder) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).to(torch.float64).numpy()
    return out


def _unit(ms):
    return [m / np.linalg.svd(m, compute_uv=False)[0] for m in ms]


def _top_left(m, r):
    return np.linalg.svd(m, full_matrices=False)[0][:, :r]


@pytest.mark.slow
def test_align_matches_a_float64_reference_on_mla(tmp_path):
    layout = build_layout("deepseek_v3")
    folder = write_layout(tmp_path / "dsv3", layout)
    r = 6
    res = align(str(folder), rank=r, cache_dir=tmp_path / "cache", device="cpu", layers="0-1")
    c = layout.config
    n, dn, dr, dv, kvl = (
        c[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
    )
    t = _read(folder)

    def w(layer, name):
        return t[f"model.layers.{layer}.{name}"]

    # Layer 0's stacked output subspace: heads normalized, side by side.
    o = w(0, "self_attn.o_proj.weight")
    heads = [o[:, h * dv : (h + 1) * dv] for h in range(n)]
    write = _top_left(np.hstack(_unit(heads)), r)
    # Layer 1's read maps in the residual stream, every norm folded, heads normalized, RoPE rows in.
    g_in = w(1, "input_layernorm.weight")
    qa = w(1, "self_attn.q_a_proj.weight") * g_in
    qb = w(1, "self_attn.q_b_proj.weight") * w(1, "self_attn.q_a_layernorm.weight")
    kva = w(1, "self_attn.kv_a_proj_with_mqa.weight") * g_in
    kvb = w(1, "self_attn.kv_b_proj.weight") * w(1, "self_attn.kv_a_layernorm.weight")
    q_heads = [qb[h * (dn + dr) : (h + 1) * (dn + dr)] @ qa for h in range(n)]
    k_heads = [kvb[h * (dn + dv) : h * (dn + dv) + dn] @ kva[:kvl] for h in range(n)] + [kva[kvl:]]
    v_heads = [kvb[h * (dn + dv) + dn : (h + 1) * (dn + dv)] @ kva[:kvl] for h in range(n)]
    reads = {
        "Q": np.vstack(_unit(q_heads)),
        "K": np.vstack(_unit(k_heads)),
        "V": np.vstack(_unit(v_heads)),
        "QA": qa,
        "KVA": kva[:kvl],
    }
    got = res.layers[1].prev
    assert set(got) == set(reads)
    for target, m in reads.items():
        ref = scipy_cosines(write, _top_left(m.T, r))
        np.testing.assert_allclose(got[target], ref, atol=1e-8, err_msg=target)
    # Heads against their layer, and head pairs.
    heads1 = [w(1, "self_attn.o_proj.weight")[:, h * dv : (h + 1) * dv] for h in range(n)]
    stacked1 = _top_left(np.hstack(_unit(heads1)), r)
    for h in range(n):
        np.testing.assert_allclose(res.layers[1].head_layer[h], scipy_cosines(heads1[h], stacked1), atol=1e-8)
    pair = scipy_cosines(_top_left(heads1[0], r), _top_left(heads1[2], r))
    assert res.layers[1].pairs["mean"][0, 2] == pytest.approx(pair.mean(), abs=1e-8)


@pytest.mark.slow
def test_align_vo_write_spaces_match_the_fused_maps(tmp_path):
    layout = build_layout("qwen2")  # GQA: 7 query heads share each kv head
    folder = write_layout(tmp_path / "qwen2", layout)
    r = 3
    res = align(str(folder), rank=r, write="VO", cache_dir=tmp_path / "cache", device="cpu", layers="0")
    c = layout.config
    n, g, hd = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"]
    t = _read(folder)
    p = "model.layers.0."
    o = t[p + "self_attn.o_proj.weight"]
    v = t[p + "self_attn.v_proj.weight"] * t[p + "input_layernorm.weight"]
    vo = [o[:, h * hd : (h + 1) * hd] @ v[(h // (n // g)) * hd : (h // (n // g) + 1) * hd] for h in range(n)]
    stacked = _top_left(np.hstack(_unit(vo)), r)
    for h in range(n):
        ref = scipy_cosines(_top_left(vo[h], r), stacked)
        np.testing.assert_allclose(res.layers[0].head_layer[h], ref, atol=1e-8)


# --- figure and command line ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_align_prints_exports_and_draws(planted, tmp_path):
    from svd_probe.cli import app
    from svd_probe.plots import make_plots

    folder, _, cache = planted
    out = tmp_path / "fig"
    export = tmp_path / "a.csv"
    args = ["align", str(folder), "--layers", "0-1", "--rank", str(S_DIM), "--cache-dir", str(cache), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--dpi", "30", "--export", str(export)])
    assert result.exit_code == 0, result.output
    assert "0→1" in result.output and (out / f"alignment-O-r{S_DIM}.png").is_file() and export.is_file()
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert max(len(ln) for ln in lines[:8]) <= 80
    # An existing export is refused before anything is read.
    again = CliRunner().invoke(app, [*args, "--export", str(export), "--no-figure"])
    assert isinstance(again.exception, OutputExistsError) and "exists" in again.exception.message
    # `plot --kind alignment` draws the cached run beside the model's spectra.
    from svd_probe.analysis import AnalyzeJob, analyze

    analyze(AnalyzeJob(model=str(folder), cache_dir=cache, device="cpu", layers="0", matrices="O"))
    report = make_plots([CacheQuery(str(folder), cache_dir=cache)], tmp_path / "p", kinds="alignment", dpi=30)
    fig = report.result("alignment")
    assert fig.extra["alignment"].rank in (4, S_DIM)
    heat = fig.data[fig.data["comparison"] == "head_pair"]
    assert len(heat) == N * N
