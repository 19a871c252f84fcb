"""Checkpoints written by Hugging Face transformers (`save_pretrained` of tiny random models).

These are the real form of most fine-tunes and BF16 conversions: names, config keys (`dtype`,
`n_layer`), tied embeddings, and for DeepSeek-V3 a config that keeps `num_nextn_predict_layers: 1`
while transformers never builds or writes the MTP layer (analyze failed on it by default, with a
hint that did not mention --no-mtp). Spectra are checked against float64 numpy computed from the
saved tensors (read with `safetensors`, sliced by the independent references of
test_adapters_layouts); GPT-2's exact LayerNorm fold is also checked against what the transformers
module itself computes.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

# Importing transformers and building the models takes ~9 s on 2 cores.
pytestmark = pytest.mark.slow

from test_adapters_layouts import (  # noqa: E402  (independent float64 references)
    assert_spectra_match,
    read_checkpoint,
    ref_gpt2,
    ref_llama,
    ref_mla,
    reference_spectra,
)

from svd_probe.adapters import adapter_for  # noqa: E402
from svd_probe.analysis import AnalyzeJob, analyze  # noqa: E402
from svd_probe.cache.store import SpectraCache, SpectraOptions  # noqa: E402
from svd_probe.hub.checkpoint import open_checkpoint  # noqa: E402
from svd_probe.results import cache_repo  # noqa: E402


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """transformers initializes norm weights to 1 (and biases to 0), which would hide a fold
    missing or on the wrong axis."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("ln_"):
                if name.endswith("weight"):
                    p.copy_(0.25 + 1.75 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _save(model, folder):
    _randomize_norms(model, seed=1)
    model.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=12,
        kv_lora_rank=8,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
        n_group=1,
        topk_group=1,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("hf") / "deepseek-v3-tiny"
    config = _save(transformers.DeepseekV3ForCausalLM(cfg), folder)
    return folder, config


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=48,
        vocab_size=64,
    )
    folder = tmp_path_factory.mktemp("hf") / "llama-tiny"
    return folder, _save(transformers.LlamaForCausalLM(cfg), folder)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg)
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    return folder, _save(model, folder), model


def _check(folder, config, analysis, ref, **ref_kw):
    tensors = read_checkpoint(folder)
    for layer in analysis.layers:
        assert_spectra_match(analysis, layer, reference_spectra(ref(config, tensors, layer, True, **ref_kw)))


# --- DeepSeek-V3: MTP declared, not written ----------------------------------------------------------


def test_deepseek_v3_without_mtp_tensors_analyzes_by_default(tmp_path, deepseek_v3):
    folder, config = deepseek_v3
    assert config["num_nextn_predict_layers"] == 1  # what transformers keeps in config.json
    assert not any(".layers.2." in n for n in open_checkpoint(str(folder)).tensor_names)  # and never writes
    run = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu"))
    assert run.layers == [0, 1]
    dims = run.analysis.manifest["dims"]
    assert dims["num_mtp_layers"] == 0 and dims["num_layers"] == 2
    assert dims["notes"] == [
        "config declares 1 MTP layer; the checkpoint has no tensors for it (transformers drops it)"
    ]
    _check(folder, config, run.analysis, ref_mla)


def test_the_summary_says_the_mtp_layer_is_missing(tmp_path, monkeypatch, capsys, deepseek_v3):
    from svd_probe.cli import main

    folder, _ = deepseek_v3
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["svd-probe", "analyze", str(folder), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())  # the table wraps its caption
    assert "config declares 1 MTP layer; the checkpoint has no tensors for it (transformers drops it)" in out
    # Asking for the layer by number names what the model has.
    monkeypatch.setattr(sys, "argv", argv + ["--layers", "2"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code not in (0, None)
    assert "has layers 0-1" in capsys.readouterr().err


def test_an_mtp_layer_that_is_present_still_counts():
    # DeepSeek's own release writes layer 61: the MTP layer counts when its tensors are there.
    from svd_probe.testing.layouts import build_layout

    layout = build_layout("deepseek_v3")
    dims = adapter_for(layout.config, set(layout.tensors)).dims()
    assert (dims.num_layers, dims.num_mtp_layers, dims.notes) == (3, 1, ())


# --- Llama (GQA) and GPT-2 ---------------------------------------------------------------------------


def test_llama_gqa_matches_float64(tmp_path, llama):
    folder, config = llama
    run = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu"))
    assert run.layers == [0, 1]
    _check(folder, config, run.analysis, ref_llama)
    assert set(run.analysis.layer_spectra[0].storage_dtypes.values()) == {"F32"}


def test_gpt2_exact_layernorm_fold_matches_float64(tmp_path, gpt2):
    folder, config, _ = gpt2
    run = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu"))
    assert run.analysis.options.layernorm_fold == "exact"
    _check(folder, config, run.analysis, ref_gpt2, prefix="transformer.", layernorm_fold="exact")


def test_gpt2_gain_fold_is_kept_behind_the_option(tmp_path, gpt2):
    folder, config, _ = gpt2
    gain = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu", layernorm_fold="gain"))
    assert gain.analysis.options == SpectraOptions(layernorm_fold="gain")
    _check(folder, config, gain.analysis, ref_gpt2, prefix="transformer.", layernorm_fold="gain")
    exact = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu"))
    # Two cache folders, so neither run reads the other's spectra; and the folds differ.
    assert gain.analysis.cache_dir != exact.analysis.cache_dir and exact.computed == [0, 1]
    assert not np.allclose(gain.analysis.sigma(0, "QK", "head"), exact.analysis.sigma(0, "QK", "head"), rtol=1e-3)
    # Without norm folding there is no LayerNorm fold to choose: one cache for both values.
    raw = [
        analyze(
            AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu", fold_norms=False, layernorm_fold=v)
        )
        for v in ("gain", "exact")
    ]
    assert raw[0].analysis.cache_dir == raw[1].analysis.cache_dir and raw[1].computed == []


def test_gpt2_exact_fold_is_the_map_the_model_computes(gpt2):
    """Against transformers itself: c_attn(ln_1(x)) = (W·diag(g)·P)·x / std(x) + const, where W·diag(g)·P
    is what the adapter returns; the gain-only fold misses the centering and does not fit."""
    folder, _, model = gpt2
    src = open_checkpoint(str(folder))
    ad = adapter_for(src.config, src.tensor_names)
    kinds = {"Q", "K", "V"}
    block = model.transformer.h[1]
    x = torch.randn(5, 32, dtype=torch.float64) * 2 + 0.7  # an uncentered residual stream
    with torch.no_grad():
        want = block.attn.c_attn.double()(block.ln_1.double()(x))
    const = block.ln_1.bias.double() @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()
    inv_std = 1 / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + block.ln_1.eps)
    for fold, fits in (("exact", True), ("gain", False)):
        f = ad.factors(1, src.read_tensors(ad.plan(1, kinds, True)), kinds, True, fold)
        w = torch.cat([f.q.reshape(-1, 32), f.k.reshape(-1, 32), f.v.reshape(-1, 32)]).double()
        got = (x @ w.T) * inv_std + const
        assert torch.allclose(got, want, atol=1e-5) == fits, fold


def test_options_key_is_unchanged_at_the_default():
    """Caches written before `layernorm_fold` existed stay valid for every model at the default."""
    import hashlib

    def old(fold: bool, norm: bool) -> str:  # the key formula before the field existed
        blob = json.dumps({"v": 1, "fold_norms": fold, "normalize_stacked": norm}, sort_keys=True)
        tag = ("fold" if fold else "nofold") + "-" + ("norm" if norm else "raw")
        return f"{tag}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    for fold in (True, False):
        for norm in (True, False):
            assert SpectraOptions(fold_norms=fold, normalize_stacked=norm).key() == old(fold, norm)
    gain = SpectraOptions(layernorm_fold="gain").key()
    assert gain.startswith("fold-norm-lngain-") and gain != old(True, True)


def test_rmsnorm_models_ignore_the_option(tmp_path, llama):
    folder, _ = llama
    runs = [
        analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu", layernorm_fold=v))
        for v in ("exact", "gain")
    ]
    assert runs[0].analysis.cache_dir == runs[1].analysis.cache_dir and runs[1].computed == []
    repo = cache_repo(runs[0].analysis.ref)
    assert SpectraCache(tmp_path / "c", repo, runs[0].commit, SpectraOptions()).dir == runs[0].analysis.cache_dir
