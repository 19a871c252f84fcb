"""Every supported layout, end to end: generated checkpoint → `analyze` → cached spectra.

The expectations never go through the adapters or the spectra code. The test reads the written
shards with `safetensors`, dequantizes FP8 itself, slices heads with its own index arithmetic
(one function per layout family, written from docs/reference.md §1-3 and the layouts' docs), folds
norms with explicit diagonal matrices, materializes VO_h = O_h·V_g(h) and QK_h = Q_hᵀ·K_g(h),
stacks normalized heads, and takes float64 `numpy.linalg.svd`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from svd_probe.adapters import adapter_for, supported_model_types
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.errors import UnsupportedModelError
from svd_probe.results import CacheQuery, load_analysis
from svd_probe.testing.layouts import LAYOUTS, build_layout, write_layout

# The spectra contract: every σ within 1e-4·σ₁ of float64 truth (docs/reference.md §3).
TOL = 1e-4

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
MLA_LAYOUTS = ("deepseek_v3", "deepseek_v32", "deepseek_v2_lite", "moonlight", "kimi_k2", "kimi_multimodal")


# --- reading the checkpoint independently ---------------------------------------------------------


def read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder as float64 numpy, FP8 weights dequantized by their tile scales."""
    config = json.loads((folder / "config.json").read_text())
    block = ((config.get("quantization_config") or {}).get("weight_block_size")) or [128, 128]
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                raw[name] = f.get_tensor(name)
    out: dict[str, np.ndarray] = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        w = t.to(torch.float64).numpy()
        if t.dtype == torch.float8_e4m3fn:
            scale = raw[name + "_scale_inv"].to(torch.float64).numpy()
            tiles = np.kron(scale, np.ones(block))  # one scale per bm×bn tile, edge tiles cut
            w = w * tiles[: w.shape[0], : w.shape[1]]
        out[name] = w
    return out


def in_memory(layout) -> dict[str, np.ndarray]:
    return {k: v.to(torch.float64).numpy() for k, v in layout.tensors.items()}


# --- per-layout slicing, from the documented layouts ------------------------------------------------


def _diag_or_eye(t, name, size, fold):
    return np.diag(t[name]) if fold else np.eye(size)


def ref_llama(c, t, layer, fold):
    h_dim, n, g = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h_dim // n
    p = f"model.layers.{layer}."
    ln = _diag_or_eye(t, p + "input_layernorm.weight", h_dim, fold)
    qk_norm = c["model_type"] == "qwen3" and fold
    # Qwen3 RMS-normalizes each head's q and k: its weight scales the head's rows (output side).
    qn = np.diag(t[p + "self_attn.q_norm.weight"]) if qk_norm else np.eye(d)
    kn = np.diag(t[p + "self_attn.k_norm.weight"]) if qk_norm else np.eye(d)
    wq, wk, wv, wo = (t[p + f"self_attn.{m}_proj.weight"] for m in "qkvo")
    return {
        "q": [qn @ wq[h * d : (h + 1) * d] @ ln for h in range(n)],
        "k": [kn @ wk[j * d : (j + 1) * d] @ ln for j in range(g)],
        "v": [wv[j * d : (j + 1) * d] @ ln for j in range(g)],
        "o": [wo[:, h * d : (h + 1) * d] for h in range(n)],
        "group": [h // (n // g) for h in range(n)],
    }


def ref_bert(c, t, layer, fold, prefix="bert."):
    h_dim, n = c["hidden_size"], c["num_attention_heads"]
    d = h_dim // n
    p = f"{prefix}encoder.layer.{layer}.attention."
    wq, wk, wv = (t[p + f"self.{m}.weight"] for m in ("query", "key", "value"))
    wo = t[p + "output.dense.weight"]
    return {
        "q": [wq[h * d : (h + 1) * d] for h in range(n)],
        "k": [wk[h * d : (h + 1) * d] for h in range(n)],
        "v": [wv[h * d : (h + 1) * d] for h in range(n)],
        "o": [wo[:, h * d : (h + 1) * d] for h in range(n)],
        "group": list(range(n)),
    }


def ref_gpt2(c, t, layer, fold, prefix="", layernorm_fold="exact"):
    h_dim, n = c["n_embd"], c["n_head"]
    d = h_dim // n
    p = f"{prefix}h.{layer}."
    conv = t[p + "attn.c_attn.weight"]  # [H in, 3H out]: y = x @ conv
    proj = t[p + "attn.c_proj.weight"]  # [n·d in, H out]
    ln = _diag_or_eye(t, p + "ln_1.weight", h_dim, fold)
    if fold and layernorm_fold == "exact":
        # LayerNorm centers first: LN(x) = diag(ln)·P·x / std with P = I − 11ᵀ/d. As a row vector
        # xᵀ·P·diag(ln) is what meets conv, so P multiplies from the left here.
        ln = (np.eye(h_dim) - np.ones((h_dim, h_dim)) / h_dim) @ ln
    # y = (ln ⊙ x̂) @ conv, so the Linear-oriented map is convᵀ·diag(ln)(·P); take the head's columns.
    block = lambda which, h: (ln @ conv[:, which * h_dim + h * d : which * h_dim + (h + 1) * d]).T  # noqa: E731
    return {
        "q": [block(0, h) for h in range(n)],
        "k": [block(1, h) for h in range(n)],
        "v": [block(2, h) for h in range(n)],
        "o": [proj[h * d : (h + 1) * d].T for h in range(n)],
        "group": list(range(n)),
    }


def ref_mla(c, t, layer, fold, prefix="model.layers."):
    h_dim, n = c["hidden_size"], c["num_attention_heads"]
    nope, rope, dv, kvl = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    p = f"{prefix}{layer}."
    a = p + "self_attn."
    ln = _diag_or_eye(t, p + "input_layernorm.weight", h_dim, fold)
    out: dict = {"layer": {}}
    if c.get("q_lora_rank") is None:
        wq = t[a + "q_proj.weight"] @ ln
    else:
        ql = c["q_lora_rank"]
        wq = t[a + "q_b_proj.weight"] @ _diag_or_eye(t, a + "q_a_layernorm.weight", ql, fold)
        out["layer"]["QA"] = t[a + "q_a_proj.weight"] @ ln
    wkv = t[a + "kv_b_proj.weight"] @ _diag_or_eye(t, a + "kv_a_layernorm.weight", kvl, fold)
    wo = t[a + "o_proj.weight"]
    step_q, step_kv = nope + rope, nope + dv
    out.update(
        q=[wq[h * step_q : h * step_q + nope] for h in range(n)],
        q_pe=[wq[h * step_q + nope : (h + 1) * step_q] for h in range(n)],
        k=[wkv[h * step_kv : h * step_kv + nope] for h in range(n)],
        v=[wkv[h * step_kv + nope : (h + 1) * step_kv] for h in range(n)],
        o=[wo[:, h * dv : (h + 1) * dv] for h in range(n)],
        group=list(range(n)),
    )
    kv_a = t[a + "kv_a_proj_with_mqa.weight"] @ ln
    out["layer"]["KVA"], out["layer"]["KVA_pe"] = kv_a[:kvl], kv_a[kvl:]
    return out


def reference_factors(layout, tensors, layer, fold):
    name, c = layout.name, layout.text_config
    if name in LLAMA_FAMILY:
        return ref_llama(c, tensors, layer, fold)
    if name == "bert":
        return ref_bert(c, tensors, layer, fold, prefix=layout.layer_prefix[: -len("encoder.layer.")])
    if name == "gpt2":
        return ref_gpt2(c, tensors, layer, fold, prefix=layout.layer_prefix[: -len("h.")])
    return ref_mla(c, tensors, layer, fold, prefix=layout.layer_prefix)


# --- spectra of the materialized matrices --------------------------------------------------------


def sv(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(m, compute_uv=False)


def reference_spectra(f: dict, normalize: bool = True) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """{"head.VO": (σ [heads, k], shape), "stacked.QK": (σ, shape), "layer.KVA": ...}."""
    groups = f["group"]
    per_head = {
        "Q": f["q"],
        "Q_pe": f.get("q_pe"),
        "K": f["k"],
        "V": f["v"],
        "O": f["o"],
        "VO": [o @ f["v"][groups[h]] for h, o in enumerate(f["o"])],
        "QK": [q.T @ f["k"][groups[h]] for h, q in enumerate(f["q"])],
    }
    out = {}
    for kind, mats in per_head.items():
        if mats is None:
            continue
        out[f"head.{kind}"] = (np.stack([sv(m) for m in mats]), mats[0].shape)
        scaled = [m / sv(m)[0] if normalize else m for m in mats]
        if kind in ("Q", "Q_pe", "K", "V"):  # heads share the input side: stack rows
            stacked = np.vstack(scaled)
        elif kind in ("O", "VO"):  # heads write into the residual stream: side by side
            stacked = np.hstack(scaled)
        else:  # QK shares the key side (rows stacked); KQ the query side (columns side by side)
            stacked = np.vstack(scaled)
            kq = np.hstack(scaled)
            out["stacked.KQ"] = (sv(kq), kq.shape)
        out[f"stacked.{kind}"] = (sv(stacked), stacked.shape)
    for kind, m in f.get("layer", {}).items():
        out[f"layer.{kind}"] = (sv(m), m.shape)
    # The joint maps: heads' rows stacked as they are, through the latent where q, k, v read one.
    lay = f.get("layer", {})
    q, kv = np.vstack(f["q"]), np.vstack(f["k"] + f["v"])
    q = q @ lay["QA"] if "QA" in lay else q
    kv = kv @ lay["KVA"] if "KVA" in lay else kv
    out["layer.Qjoint"], out["layer.KVjoint"] = (sv(q), q.shape), (sv(kv), kv.shape)
    return out


def assert_spectra_match(analysis, layer: int, expected: dict) -> None:
    cached = analysis.layer_spectra[layer]
    assert set(cached.sigma) == set(expected), f"layer {layer}: cached keys differ"
    for key, (ref, shape) in expected.items():
        scope, matrix = key.split(".")
        got = np.asarray(analysis.sigma(layer, matrix, scope))
        assert got.shape == ref.shape, f"layer {layer} {key}: {got.shape} σ, expected {ref.shape}"
        assert tuple(cached.shapes[key]) == tuple(int(x) for x in shape), f"layer {layer} {key}: shape"
        sigma1 = np.atleast_2d(ref)[:, :1]
        err = np.abs(np.atleast_2d(got) - np.atleast_2d(ref)) / sigma1
        assert err.max() <= TOL, f"layer {layer} {key}: max error {err.max():.2e}·σ₁"


def n_attention_layers(layout) -> int:
    c = layout.text_config
    return int(c.get("num_hidden_layers") or c["n_layer"]) + int(c.get("num_nextn_predict_layers") or 0)


# --- unit: the adapters' factors against independent slices ---------------------------------------


def _torch_tensors(layout) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in layout.tensors.items()}


def _layout_cases():
    yield "bert", {}
    yield "bert", {"prefix": ""}
    yield "gpt2", {}
    yield "gpt2", {"prefix": "transformer."}
    yield "kimi_multimodal", {"nested_config": False}
    for name in LAYOUTS:
        if name not in ("bert", "gpt2"):
            yield name, {}


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "nofold"])
@pytest.mark.parametrize(
    "name,options",
    list(_layout_cases()),
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v!r}" for k, v in x.items()),
)
def test_factors_match_independent_slices(name, options, fold):
    layout = build_layout(name, **options)
    tensors = _torch_tensors(layout)
    ad = adapter_for(layout.config, set(tensors))
    kinds = set(ad.supported_kinds())
    expected_np = in_memory(layout)
    for layer in range(n_attention_layers(layout)):
        names = ad.layer_tensor_names(layer, kinds, fold)
        assert set(names) <= set(tensors), f"adapter asks for tensors the checkpoint lacks: {set(names) - set(tensors)}"
        f = ad.factors(layer, {k: tensors[k] for k in names}, kinds, fold)
        ref = reference_factors(layout, expected_np, layer, fold)
        for role in ("q", "q_pe", "k", "v", "o"):
            got = getattr(f, role)
            if role not in ref:
                assert got is None, f"{role} should not exist for {name}"
                continue
            want = np.stack(ref[role])
            assert tuple(got.shape) == want.shape, f"{role}: {tuple(got.shape)} vs {want.shape}"
            np.testing.assert_allclose(
                got.double().numpy(), want, rtol=1e-6, atol=1e-7, err_msg=f"{name} layer {layer} {role}"
            )
        assert f.groups().tolist() == ref["group"]
        assert set(f.layer) == set(ref.get("layer", {}))
        for kind, m in f.layer.items():
            np.testing.assert_allclose(m.double().numpy(), ref["layer"][kind], rtol=1e-6, atol=1e-7)


# --- unit: each layout declares exactly the tensors it reads ------------------------------------


@pytest.mark.parametrize(
    "name,kinds,fold,expected",
    [
        ("llama", {"V"}, True, ["input_layernorm.weight", "self_attn.v_proj.weight"]),
        ("llama", {"O"}, True, ["self_attn.o_proj.weight"]),
        ("llama", {"VO"}, False, ["self_attn.o_proj.weight", "self_attn.v_proj.weight"]),
        ("qwen3", {"Q"}, True, ["input_layernorm.weight", "self_attn.q_norm.weight", "self_attn.q_proj.weight"]),
        ("qwen3", {"QK"}, False, ["self_attn.k_proj.weight", "self_attn.q_proj.weight"]),
        (
            "qwen2",
            {"Q", "K", "V", "O"},
            True,
            ["input_layernorm.weight"] + [f"self_attn.{m}_proj.weight" for m in "qkvo"],
        ),
        ("gpt2", {"O"}, True, ["attn.c_proj.weight"]),
        ("gpt2", {"K"}, True, ["attn.c_attn.weight", "ln_1.weight"]),
        (
            "bert",
            {"Q", "VO"},
            True,
            ["attention.output.dense.weight", "attention.self.query.weight", "attention.self.value.weight"],
        ),
    ],
)
def test_layer_tensor_names_are_only_what_the_kinds_need(name, kinds, fold, expected):
    layout = build_layout(name)
    ad = adapter_for(layout.config, set(layout.tensors))
    assert ad.layer_tensor_names(1, kinds, fold) == sorted(f"{layout.layer_prefix}1.{e}" for e in expected)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_no_layout_fetches_biases_indexers_or_other_towers(name):
    layout = build_layout(name)
    ad = adapter_for(layout.config, set(layout.tensors))
    for layer in range(n_attention_layers(layout)):
        names = ad.layer_tensor_names(layer, set(ad.supported_kinds()), True)
        assert names and set(names) <= set(layout.tensors)
        assert all(n.startswith(f"{layout.layer_prefix}{layer}.") for n in names)
        assert not [n for n in names if n.endswith(".bias") or ".indexer." in n or "vision_tower" in n]


def test_model_types_and_kinds():
    assert {"llama", "mistral", "qwen2", "qwen3", "bert", "gpt2", "deepseek_v32"} <= set(supported_model_types())
    gqa = adapter_for(build_layout("llama").config)
    assert "Q_pe" not in gqa.supported_kinds() and not {"QA", "KVA", "KVA_pe"} & set(gqa.supported_kinds())
    dims = gqa.dims()
    assert (dims.n_heads, dims.n_kv_groups, dims.d_qk, dims.d_rope, dims.d_v) == (8, 2, 8, 0, 8)
    # Qwen3: head_dim is its own field, n·d ≠ hidden_size.
    q3 = adapter_for(build_layout("qwen3").config).dims()
    assert (q3.d_model, q3.n_heads, q3.d_qk) == (32, 4, 16)
    assert adapter_for(build_layout("bert").config).dims().d_rope == 0
    g2 = adapter_for(build_layout("gpt2").config).dims()
    assert (g2.d_model, g2.n_heads, g2.num_layers) == (48, 4, 2)
    lite = adapter_for(build_layout("deepseek_v2_lite").config)
    assert "QA" not in lite.supported_kinds() and lite.dims().q_latent is None
    # A multimodal wrapper resolves to its decoder's config.
    mm = build_layout("kimi_multimodal")
    ad = adapter_for(mm.config, set(mm.tensors))
    assert ad.dims().num_layers == 2 and ad.dims().model_type == "kimi_k2"


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    with pytest.raises(UnsupportedModelError) as e:
        adapter_for({"model_type": "mamba"})
    for t in ("llama", "qwen3", "bert", "gpt2", "deepseek_v3", "deepseek_v32", "kimi_k2"):
        assert t in e.value.hint
    # Through the real pipeline, from a folder, before anything but the config and index is read.
    layout = build_layout("llama")
    folder = write_layout(tmp_path / "m", layout)
    (folder / "config.json").write_text(json.dumps({**layout.config, "model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache"))
    # A wrapper whose decoder is unknown names both types.
    with pytest.raises(UnsupportedModelError, match="llava.*mistral_v9"):
        adapter_for({"model_type": "llava", "text_config": {"model_type": "mistral_v9"}})


# --- end to end: analyze from a folder, compare with float64 numpy ---------------------------------


def _check_analysis(layout, folder: Path, analysis, fold: bool = True, normalize: bool = True) -> None:
    tensors = read_checkpoint(folder)
    assert analysis.layers == list(range(n_attention_layers(layout)))
    for layer in analysis.layers:
        assert_spectra_match(
            analysis, layer, reference_spectra(reference_factors(layout, tensors, layer, fold), normalize)
        )


E2E_CASES = [
    ("llama", {}, 2),
    ("mistral", {}, 3),
    ("qwen2", {}, 2),
    ("qwen3", {}, 2),
    ("bert", {}, 1),
    ("bert", {"prefix": ""}, 1),
    ("gpt2", {}, 1),
    ("gpt2", {"prefix": "transformer."}, 1),
    ("deepseek_v3", {"fp8": True}, 3),
    ("deepseek_v32", {}, 3),
    ("deepseek_v2_lite", {}, 2),
    ("moonlight", {}, 2),
    ("kimi_k2", {}, 4),
    ("kimi_multimodal", {}, 3),
    ("kimi_multimodal", {"nested_config": False}, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,options,n_shards",
    E2E_CASES,
    ids=[f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in o.items()) if o else ''}" for n, o, _ in E2E_CASES],
)
def test_analyze_matches_float64_reference(tmp_path, name, options, n_shards):
    layout = build_layout(name, **options)
    folder = write_layout(tmp_path / name, layout, n_shards=n_shards)
    run = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu"))
    _check_analysis(layout, folder, run.analysis)
    # The cache reads back the same, offline.
    again = load_analysis(CacheQuery(str(folder), cache_dir=tmp_path / "cache"))
    assert again.layers == run.analysis.layers
    np.testing.assert_array_equal(again.sigma(0, "VO", "head"), run.analysis.sigma(0, "VO", "head"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "gpt2", "deepseek_v2_lite"])
def test_analyze_without_folding_or_normalizing(tmp_path, name):
    layout = build_layout(name)
    folder = write_layout(tmp_path / name, layout)
    run = analyze(
        AnalyzeJob(
            model=str(folder), cache_dir=tmp_path / "cache", device="cpu", fold_norms=False, normalize_stacked=False
        )
    )
    _check_analysis(layout, folder, run.analysis, fold=False, normalize=False)
    # Folding matters: the norms are far from 1, so the folded spectra differ.
    folded = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu", matrices="Q"))
    assert not np.allclose(folded.analysis.sigma(0, "Q", "head"), run.analysis.sigma(0, "Q", "head"), rtol=1e-3)


@pytest.mark.slow
def test_gqa_export_has_one_record_per_group_for_k_and_v(tmp_path):
    from svd_probe.export import export

    layout = build_layout("qwen2")
    folder = write_layout(tmp_path / "qwen2", layout)
    analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu", layers="1"))
    out = tmp_path / "qwen2.jsonl"
    n_rows = export(CacheQuery(str(folder), cache_dir=tmp_path / "cache"), format="jsonl", out=out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    n, g = layout.config["num_attention_heads"], layout.config["num_key_value_heads"]
    heads = {
        m: sum(1 for r in records if r["scope"] == "head" and r["matrix"] == m)
        for m in ("Q", "K", "V", "O", "VO", "QK")
    }
    assert heads == {"Q": n, "K": g, "V": g, "O": n, "VO": n, "QK": n}
    assert n_rows == len(records) == 4 * n + 2 * g + 7 + 2  # 7 stacked, layer.Qjoint and layer.KVjoint
    csv = tmp_path / "qwen2.csv"
    assert export(CacheQuery(str(folder), cache_dir=tmp_path / "cache"), format="csv", out=csv) == n_rows


@pytest.mark.slow
def test_plots_draw_for_gqa_and_conv1d_layouts(tmp_path):
    from svd_probe.plots.render import make_plots

    for name in ("qwen2", "gpt2"):
        folder = write_layout(tmp_path / name, name)
        run = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu", layers="0"))
        report = make_plots(
            [run.analysis], out_dir=tmp_path / "plots" / name, formats="png", kinds="layerwise,headwise,spectra", dpi=30
        )
        assert {p.name for p in report.files if p.suffix == ".png"} >= {"layerwise.png", "spectra.png"}


# --- over the loopback Hub stand-in ---------------------------------------------------------------


@pytest.fixture(scope="module")
def layout_hub():
    """A loopback Hub of our own: the shared `fake_hub` fixture first builds checkpoints these
    tests do not need."""
    from svd_probe.testing.fake_hub import FakeHub

    with FakeHub() as hub:
        yield hub


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("deepseek_v32", {"fp8": True}), ("qwen3", {}), ("kimi_multimodal", {})])
def test_analyze_over_the_fake_hub(tmp_path, layout_hub, name, options):
    fake_hub = layout_hub
    layout = build_layout(name, **options)
    folder = write_layout(tmp_path / name, layout, n_shards=3)
    repo = f"layouts/{name}"
    fake_hub.add_repo(repo, folder)
    fake_hub.reset_records()
    run = analyze(AnalyzeJob(model=repo, endpoint=fake_hub.endpoint, cache_dir=tmp_path / "cache", device="cpu"))
    _check_analysis(layout, folder, run.analysis)
    # Only attention is read: the shards' other tensors (experts, embeddings, the V3.2 indexer,
    # a vision tower) make up most of the bytes and stay on the server.
    shards = list(folder.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    assert fake_hub.bytes_served(".safetensors") < 0.8 * total
    # What the reader counts as payload is the declared tensors (with FP8 scales) plus headers.
    ad = adapter_for(layout.config, set(layout.tensors))
    names = [m for layer in run.layers for m in ad.layer_tensor_names(layer, set(ad.supported_kinds()), True)]
    names += [m + "_scale_inv" for m in names if m + "_scale_inv" in layout.tensors]
    declared = sum(layout.tensors[m].numel() * layout.tensors[m].element_size() for m in names)
    headers = sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards)
    assert declared <= run.stats["bytes_fetched"] <= declared + headers


# --- the catalog ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_lists_well_known_gqa_models():
    pytest.importorskip("svd_probe.known_models")
    from typer.testing import CliRunner

    from svd_probe.cli import app

    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["repo_id"]: r for r in json.loads(result.output)}
    for repo in ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "mistralai/Mistral-7B-v0.1"):
        assert repo in rows, f"`svd-probe models` does not list {repo}"
        assert rows[repo].get("attention") == "GQA"
        assert rows[repo].get("analysis_bytes", 0) > 0
