"""The adapter for `svd-probe train` checkpoints, against float64 numpy and against the model itself."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from svd_probe.adapters.base import ALL_KINDS
from svd_probe.adapters.svd_probe_train import SvdProbeTrainAdapter
from svd_probe.train.config import preset
from svd_probe.train.loop import save_encoder
from svd_probe.train.model import MaskedLM

VARIANTS = ("mha", "mla", "mla-o")


def random_checkpoint(folder, variant, rope_dims=None, seed=0):
    """A tiny encoder with random weights and non-trivial norm weights, saved as `train` saves it."""
    torch.manual_seed(seed)
    cfg = replace(preset(variant, "tiny"), vocab_size=40, **({} if rope_dims is None else {"rope_dims": rope_dims}))
    model = MaskedLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # ones would hide a missing or misplaced fold
    folder.mkdir(parents=True, exist_ok=True)
    save_encoder(model, cfg, folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
    return cfg, config, tensors, model


def np64(t):
    return t.detach().to(torch.float64).numpy()


def reference(cfg, tensors, layer, fold):
    """Per-head matrices sliced by hand from the issue's layout description, in float64."""
    H, D, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    r = cfg.rope_dims
    partial = 0 < r < D
    p = f"layers.{layer}."
    w = {k[len(p) :]: np64(v) for k, v in tensors.items() if k.startswith(p)}
    ones = lambda n: np.ones(n)  # noqa: E731
    ref = {"q": [], "q_pe": [], "k": [], "v": [], "o": []}
    if cfg.variant == "mha":
        g = w["attn_norm.weight"] if fold else ones(d)
        qkv = w["attn.qkv.weight"] * g[None, :]
        for h in range(H):
            qh = qkv[h * D : (h + 1) * D]
            kh = qkv[H * D + h * D : H * D + (h + 1) * D]
            ref["v"].append(qkv[2 * H * D + h * D : 2 * H * D + (h + 1) * D])
            ref["q"].append(qh[r:] if partial else qh)
            ref["q_pe"].append(qh[:r] if partial else None)
            ref["k"].append(kh[r:] if partial else kh)
            ref["o"].append(w["attn.o_proj.weight"][:, h * D : (h + 1) * D])
    else:
        ql = cfg.q_latent
        q_up = w["attn.q_up.weight"] * (w["attn.q_norm.weight"] if fold else ones(ql))[None, :]
        kv_up = w["attn.kv_up.weight"] * (w["attn.kv_norm.weight"] if fold else ones(cfg.kv_latent))[None, :]
        down = w["attn.down.weight"] * (w["attn_norm.weight"] if fold else ones(d))[None, :]
        ref["QA"], ref["KVA"] = down[:ql], down[ql:]
        for h in range(H):
            qh = q_up[h * D : (h + 1) * D]
            block = kv_up[h * 2 * D : (h + 1) * 2 * D]  # per head: [key | value]
            kh, vh = block[:D], block[D:]
            ref["q"].append(qh[r:] if partial else qh)
            ref["q_pe"].append(qh[:r] if partial else None)
            ref["k"].append(kh[r:] if partial else kh)
            ref["v"].append(vh)
            if cfg.variant == "mla":
                ref["o"].append(w["attn.o_proj.weight"][:, h * D : (h + 1) * D])
            else:
                ref["o"].append(w["attn.o_up.weight"] @ w["attn.o_down.weight"][:, h * D : (h + 1) * D])
    return ref


CASES = [(v, None) for v in VARIANTS] + [("mha", 8), ("mla-o", 8), ("mla", 16)]


@pytest.mark.slow
@pytest.mark.parametrize("variant,rope_dims", CASES, ids=[f"{v}-rope{r}" if r else v for v, r in CASES])
@pytest.mark.parametrize("fold", [True, False])
def test_factors_match_float64_slices(tmp_path, variant, rope_dims, fold):
    cfg, config, tensors, _ = random_checkpoint(tmp_path / "ckpt", variant, rope_dims)
    adapter = SvdProbeTrainAdapter(config)
    dims = adapter.dims()
    kinds = set(adapter.supported_kinds())
    partial = 0 < cfg.rope_dims < cfg.head_dim
    assert dims.n_heads == cfg.n_heads and dims.d_v == cfg.head_dim and dims.num_layers == cfg.n_layers
    assert (dims.d_rope, dims.d_qk) == ((cfg.rope_dims, cfg.head_dim - cfg.rope_dims) if partial else (0, cfg.head_dim))
    assert ("Q_pe" in kinds) == partial and ("QA" in kinds) == (variant != "mha")
    assert kinds <= set(ALL_KINDS)
    for layer in range(cfg.n_layers):
        names = adapter.layer_tensor_names(layer, kinds, fold)
        # The adapter works from exactly the tensors it asked for.
        f = adapter.factors(layer, {n: tensors[n] for n in names}, kinds, fold)
        ref = reference(cfg, tensors, layer, fold)
        for h in range(cfg.n_heads):
            for key in ("q", "k", "v", "o"):
                np.testing.assert_allclose(
                    np64(getattr(f, key)[h]), ref[key][h], rtol=1e-6, atol=1e-7, err_msg=f"{key} head {h}"
                )
            if partial:
                np.testing.assert_allclose(np64(f.q_pe[h]), ref["q_pe"][h], rtol=1e-6, atol=1e-7)
            # The fused maps of base.py, from the factors, equal the products of the slices.
            np.testing.assert_allclose(np64(f.o[h] @ f.v[h]), ref["o"][h] @ ref["v"][h], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np64(f.q[h].T @ f.k[h]), ref["q"][h].T @ ref["k"][h], rtol=1e-5, atol=1e-6)
        if not partial:
            assert f.q_pe is None
        if variant != "mha":
            np.testing.assert_allclose(np64(f.layer["QA"]), ref["QA"], rtol=1e-6)
            np.testing.assert_allclose(np64(f.layer["KVA"]), ref["KVA"], rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vo_is_what_one_head_writes(tmp_path, variant):
    """Ground truth from the model: with query weights zeroed every head attends uniformly, and with
    every other head's values zeroed the attention block outputs mean_t(x_t) · (O_h V_h)ᵀ."""
    cfg, config, tensors, model = random_checkpoint(tmp_path / "ckpt", variant)
    attn = model.encoder.layers[0].attn
    adapter = SvdProbeTrainAdapter(config)
    f = adapter.factors(0, tensors, {"V", "O", "VO"}, fold_norms=False)
    H, D = cfg.n_heads, cfg.head_dim
    head = 1
    with torch.no_grad():
        if variant == "mha":
            attn.qkv.weight[: H * D] = 0
            keep = torch.zeros(H * D, dtype=torch.bool)
            keep[head * D : (head + 1) * D] = True
            attn.qkv.weight[2 * H * D :][~keep] = 0
        else:
            attn.q_up.weight.zero_()
            rows = attn.kv_up.weight.view(H, 2, D, -1)
            mask = torch.ones(H, dtype=torch.bool)
            mask[head] = False
            rows[mask, 1] = 0
        x = torch.randn(2, 7, cfg.d_model)
        out = attn(x)
    xs = np64(x)
    if variant == "mha":
        inputs = xs  # the block's input is already the normalized stream
    else:
        w = {k: np64(v) for k, v in tensors.items()}
        c_kv = xs @ w["layers.0.attn.down.weight"][cfg.q_latent :].T
        inputs = c_kv / np.sqrt((c_kv**2).mean(-1, keepdims=True) + cfg.norm_eps) * w["layers.0.attn.kv_norm.weight"]
    vo = np64(f.o[head] @ f.v[head])
    expected = inputs.mean(axis=1, keepdims=True) @ vo.T
    np.testing.assert_allclose(np64(out), np.broadcast_to(expected, out.shape), rtol=1e-4, atol=1e-5)


def test_tensor_names_are_only_what_the_kinds_need(tmp_path):
    _, config, tensors, _ = random_checkpoint(tmp_path / "ckpt", "mla-o")
    a = SvdProbeTrainAdapter(config)
    assert a.layer_tensor_names(1, {"O"}, True) == ["layers.1.attn.o_down.weight", "layers.1.attn.o_up.weight"]
    assert a.layer_tensor_names(0, {"QA"}, False) == ["layers.0.attn.down.weight"]
    assert a.layer_tensor_names(0, {"QA"}, True) == ["layers.0.attn.down.weight", "layers.0.attn_norm.weight"]
    assert a.layer_tensor_names(0, {"V"}, True) == ["layers.0.attn.kv_up.weight", "layers.0.attn.kv_norm.weight"]
    assert set(a.layer_tensor_names(0, set(a.supported_kinds()), True)) <= set(tensors)
    _, config, tensors, _ = random_checkpoint(tmp_path / "mha", "mha")
    a = SvdProbeTrainAdapter(config)
    assert a.layer_tensor_names(0, {"Q"}, True) == ["layers.0.attn.qkv.weight", "layers.0.attn_norm.weight"]
    assert a.layer_tensor_names(0, {"O"}, True) == ["layers.0.attn.o_proj.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_analyze_reads_a_trained_checkpoint(tmp_path, monkeypatch, variant):
    """`svd-probe analyze` on a run folder: per-head VO spectra equal float64 numpy's."""
    import svd_probe.adapters as adapters
    from svd_probe.analysis import AnalyzeJob, analyze

    if SvdProbeTrainAdapter not in adapters._ADAPTERS:  # until the registry lists it
        monkeypatch.setattr(adapters, "_ADAPTERS", [*adapters._ADAPTERS, SvdProbeTrainAdapter])
    cfg, config, tensors, _ = random_checkpoint(tmp_path / "run", variant)
    result = analyze(AnalyzeJob(model=str(tmp_path / "run"), cache_dir=tmp_path / "cache", device="cpu"))
    analysis = result.analysis
    assert analysis.layers == list(range(cfg.n_layers))
    for layer in analysis.layers:
        ref = reference(cfg, tensors, layer, fold=True)
        got = analysis.sigma(layer, "VO", "head")
        for h in range(cfg.n_heads):
            want = np.linalg.svd(ref["o"][h] @ ref["v"][h], compute_uv=False)
            np.testing.assert_allclose(np.asarray(got[h])[: len(want)], want, rtol=1e-4, atol=1e-6)
        if variant == "mla":  # partial RoPE: Q_pe is the first rope_dims query rows of each head
            want_pe = np.linalg.svd(ref["q_pe"][2], compute_uv=False)
            np.testing.assert_allclose(
                np.asarray(analysis.sigma(layer, "Q_pe", "head")[2])[: len(want_pe)], want_pe, rtol=1e-4, atol=1e-6
            )
        want_o = np.linalg.svd(ref["o"][0], compute_uv=False)
        np.testing.assert_allclose(
            np.asarray(analysis.sigma(layer, "O", "head")[0])[: len(want_o)], want_o, rtol=1e-4, atol=1e-6
        )
