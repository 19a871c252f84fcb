"""`svd-probe analyze` on the checkpoints of the lab's second round: causal models (read today)
and mla-o with an output-latent norm (waiting for adapter support)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from svd_probe.adapters.svd_probe_train import SvdProbeTrainAdapter
from svd_probe.train.config import preset
from svd_probe.train.model import pretraining_model
from svd_probe.train.run_dir import save_encoder


def checkpoint(folder, variant, objective="mlm", o_norm="none"):
    torch.manual_seed(0)
    cfg = replace(preset(variant, "tiny"), vocab_size=40, objective=objective, o_norm=o_norm)
    model = pretraining_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # ones would hide a missing fold
    folder.mkdir(parents=True)
    save_encoder(model, cfg, folder)
    return cfg, {k: v.double().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}


def analyze_run(folder, cache, monkeypatch):
    import svd_probe.adapters as adapters
    from svd_probe.analysis import AnalyzeJob, analyze

    if SvdProbeTrainAdapter not in adapters._ADAPTERS:  # until the registry lists it
        monkeypatch.setattr(adapters, "_ADAPTERS", [*adapters._ADAPTERS, SvdProbeTrainAdapter])
    return analyze(AnalyzeJob(model=str(folder), cache_dir=cache, device="cpu")).analysis


def head_o(cfg, w, layer, h):
    """O_h by hand, with the output-latent norm's weight folded (fold_norms, the default)."""
    p, D, H = f"layers.{layer}.attn.", cfg.head_dim, cfg.n_heads
    if cfg.variant != "mla-o":
        return w[p + "o_proj.weight"][:, h * D : (h + 1) * D]
    up, down = w[p + "o_up.weight"], w[p + "o_down.weight"][:, h * D : (h + 1) * D]
    if cfg.o_norm == "rms":
        up = up * w[p + "o_norm.weight"][None, :]
    elif cfg.o_norm == "rms-per-head":
        up = up * w[p + "o_norm.weight"][h][None, :] / math.sqrt(H)
    return up @ down


def head_v(cfg, w, layer, h):
    p, D, H = f"layers.{layer}.attn.", cfg.head_dim, cfg.n_heads
    if cfg.variant == "mha":
        return w[p + "qkv.weight"][2 * H * D + h * D : 2 * H * D + (h + 1) * D] * w[p[:-5] + "attn_norm.weight"]
    kv = w[p + "kv_up.weight"] * w[p + "kv_norm.weight"][None, :]
    return kv[h * 2 * D + D : (h + 1) * 2 * D]


def check_spectra(analysis, cfg, w):
    for layer in analysis.layers:
        for h in range(cfg.n_heads):
            o, v = head_o(cfg, w, layer, h), head_v(cfg, w, layer, h)
            for kind, mat in (("O", o), ("VO", o @ v)):
                want = np.linalg.svd(mat, compute_uv=False)
                got = np.asarray(analysis.sigma(layer, kind, "head")[h])[: len(want)]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"{kind} layer {layer} head {h}")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mha", "mla-o"])
def test_analyze_reads_a_causal_checkpoint(tmp_path, monkeypatch, variant):
    """A clm model has the encoder's tensor names and config fields (plus objective: clm)."""
    cfg, w = checkpoint(tmp_path / "run", variant, objective="clm")
    analysis = analyze_run(tmp_path / "run", tmp_path / "cache", monkeypatch)
    assert analysis.layers == list(range(cfg.n_layers))
    check_spectra(analysis, cfg, w)


@pytest.mark.slow
@pytest.mark.parametrize("o_norm", ["rms", "rms-per-head"])
def test_analyze_folds_the_output_latent_norm(tmp_path, monkeypatch, o_norm):
    """With an output-latent norm, O_h = o_up · diag(g) · o_down_h (rms) or
    o_up · diag(g_h) · o_down_h / √H (rms-per-head): the norm's weight folded, its per-token scale not."""
    cfg, w = checkpoint(tmp_path / "run", "mla-o", o_norm=o_norm)
    analysis = analyze_run(tmp_path / "run", tmp_path / "cache", monkeypatch)
    check_spectra(analysis, cfg, w)
