"""Checkpoints written by Hugging Face transformers (`save_pretrained` of tiny random models).

These are the real form of most fine-tunes and BF16 conversions: names, config keys (`dtype`,
`n_layer`), tied embeddings, and for DeepSeek-V3 a config that keeps `num_nextn_predict_layers: 1`
while transformers never builds or writes the MTP layer (analyze failed on it by default, with a
hint that did not mention --no-mtp). Spectra are checked against float64 numpy computed from the
saved tensors (read with `safetensors`, sliced by the independent references of
test_adapters_layouts); GPT-2's exact LayerNorm fold is also checked against what the transformers
module itself computes.

The second half builds every other model_type an adapter claims (and multimodal wrappers of those
decoders), each with the traps real configs set, and checks each against the references and
against the transformers attention module (see "every other model_type" below).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

# Importing transformers and building the models takes ~9 s on 2 cores.
pytestmark = pytest.mark.slow

from test_adapters_layouts import (  # noqa: E402  (independent float64 references)
    assert_spectra_match,
    read_checkpoint,
    ref_bert,
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
    missing or on the wrong axis (or, for BERT's `LayerNorm`s, one made where there is none)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln_" in name or name.startswith("ln_"):
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


# --- every other model_type an adapter claims, as transformers writes it ------------------------------
#
# One tiny random model per claimed model_type transformers can build, each config set to a trap
# real checkpoints set: head_dim given and ≠ hidden/heads (Mistral-Nemo, Mistral-Small, Qwen3),
# several query heads per key/value head, and one key/value head (MQA); q/k/v(/o) biases (Qwen2,
# Llama's attention_bias); Qwen3's per-head q_norm/k_norm; BF16 weights; tied and untied
# embeddings; several shards; BERT with and without its `bert.` prefix; DeepSeek-V2 with and
# without a query latent; V3.2's indexer; Kimi-K2's relabelled config; multimodal wrappers whose
# decoder is their text_config, two of them with an audio tower named like the decoder (GLM-ASR,
# Fun-ASR-Nano: the adapters read the audio tower until find_layers learned to pass it by).
# Each is checked twice: its cached spectra against the float64 references of
# test_adapters_layouts, computed from the saved tensors; and the adapter's factors against what
# the transformers module itself computes, so that the references' slicing (written from our docs)
# is tied to the model that wrote the checkpoint.


def _hf_class(name: str):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


_DECODER = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48, vocab_size=64, max_position_embeddings=64)
_MLA = dict(
    _DECODER,
    moe_intermediate_size=16,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=8,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=5,
    n_group=1,
    topk_group=1,
)


def _decoder(model: str, config: str, **kw):
    return _hf_class(model)(_hf_class(config)(**(_DECODER | kw)))


def _mla(model: str, config: str, **kw):
    return _hf_class(model)(_hf_class(config)(**(_MLA | kw)))


def _bert(model: str):
    cfg = transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48, vocab_size=64
    )
    return _hf_class(model)(cfg)


def _llava():
    # llava-1.5's shape: a CLIP vision tower and a Llama decoder in text_config.
    vision = _hf_class("CLIPVisionConfig")(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    text = transformers.LlamaConfig(**_DECODER, num_attention_heads=4, num_key_value_heads=2)
    cfg = _hf_class("LlavaConfig")(
        vision_config=vision, text_config=text, image_token_index=63, vision_feature_layer=-1
    )
    return _hf_class("LlavaForConditionalGeneration")(cfg)


def _mistral3():
    # Mistral-Small-3.1's shape: a Pixtral vision tower (its layers have `attention.o_proj`) and a
    # Mistral decoder with head_dim given (128 in the release, with hidden 5120 and 32 heads).
    vision = _hf_class("PixtralVisionConfig")(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    text = transformers.MistralConfig(**_DECODER, num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    cfg = _hf_class("Mistral3Config")(
        vision_config=vision, text_config=text, image_token_index=63, spatial_merge_size=1
    )
    return _hf_class("Mistral3ForConditionalGeneration")(cfg)


def _glmasr():
    # GLM-ASR-Nano's shape: a Llama decoder in text_config beside an audio encoder whose layers are
    # named like the decoder's (`audio_tower.layers.L.self_attn.o_proj`, a shorter prefix than
    # `language_model.model.layers.`). Here the encoder's shapes match the decoder's, so only the
    # names (and the layer count, 3 against 2) tell them apart.
    audio = _hf_class("GlmAsrEncoderConfig")(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_mel_bins=8
    )
    text = dict(_DECODER, num_attention_heads=4, num_key_value_heads=4)
    return _hf_class("GlmAsrForConditionalGeneration")(
        _hf_class("GlmAsrConfig")(audio_config=audio, text_config=text, audio_token_id=63)
    )


def _fun_asr_nano():
    # Fun-ASR-Nano's shape: a Qwen3 decoder beside an audio encoder (`model.audio_tower.layers.`)
    # and an adaptor (`model.multi_modal_projector.layers.`), both with `self_attn.o_proj` too.
    audio = _hf_class("FunAsrNanoEncoderConfig")(
        hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2, num_mel_bins=8
    )
    adaptor = _hf_class("FunAsrNanoAdaptorConfig")(
        hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    )
    text = dict(_DECODER, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg = _hf_class("FunAsrNanoConfig")(audio_config=audio, adaptor_config=adaptor, text_config=text, audio_token_id=63)
    return _hf_class("FunAsrNanoForConditionalGeneration")(cfg)


def _kimi_k25():
    text = _hf_class("DeepseekV3Config")(**(_MLA | {"q_lora_rank": 12}))
    vision = _hf_class("Kimi_K25VisionConfig")(
        patch_size=4,
        pos_emb_height=4,
        pos_emb_width=4,
        pos_emb_time=2,
        num_attention_heads=2,
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=24,
    )
    cfg = _hf_class("Kimi_K25Config")(
        text_config=text,
        vision_config=vision,
        projection_hidden_size=16,
        image_token_id=63,
        video_token_id=62,
        vision_start_token_id=61,
        vision_end_token_id=60,
    )
    return _hf_class("Kimi_K25ForConditionalGeneration")(cfg)


class Case(NamedTuple):
    model_type: str  # what config.json (or its text_config) says
    family: str  # which reference slices it: gqa, bert, mla
    build: Callable[[], torch.nn.Module]
    dtype: torch.dtype = torch.float32  # of the saved weights
    save: dict = {}  # save_pretrained options
    relabel: str | None = None  # config.json's model_type, set after saving


HF_CASES = {
    # Mistral-Nemo's trap: head_dim 12 ≠ 32/8; 4 query heads per key/value head; 5 shards.
    "mistral-head_dim-gqa4": Case(
        "mistral",
        "gqa",
        lambda: _decoder(
            "MistralForCausalLM", "MistralConfig", num_attention_heads=8, num_key_value_heads=2, head_dim=12
        ),
        save={"max_shard_size": "20KB"},
    ),
    # head_dim 12 ≠ 32/4 in Llama, every projection biased (attention_bias), embeddings tied.
    "llama-head_dim-bias-tied": Case(
        "llama",
        "gqa",
        lambda: _decoder(
            "LlamaForCausalLM",
            "LlamaConfig",
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=12,
            attention_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    # One key/value head for all queries (MQA), saved in BF16.
    "llama-mqa-bf16": Case(
        "llama",
        "gqa",
        lambda: _decoder("LlamaForCausalLM", "LlamaConfig", num_attention_heads=4, num_key_value_heads=1),
        torch.bfloat16,
    ),
    # Qwen2: q/k/v carry biases, which are not part of the maps analysed; BF16, untied (Qwen2.5-7B).
    "qwen2-bias-bf16": Case(
        "qwen2",
        "gqa",
        lambda: _decoder("Qwen2ForCausalLM", "Qwen2Config", num_attention_heads=4, num_key_value_heads=2),
        torch.bfloat16,
    ),
    # Qwen3: per-head q_norm/k_norm, head_dim 16 ≠ 32/4, GQA, BF16, tied (Qwen3-0.6B).
    "qwen3-qknorm-head_dim-bf16-tied": Case(
        "qwen3",
        "gqa",
        lambda: _decoder(
            "Qwen3ForCausalLM",
            "Qwen3Config",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
        ),
        torch.bfloat16,
    ),
    # Qwen3 in float32, MHA, untied: the q/k-norm fold with nothing else in the way.
    "qwen3-qknorm-f32": Case(
        "qwen3",
        "gqa",
        lambda: _decoder("Qwen3ForCausalLM", "Qwen3Config", num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    ),
    # BERT as fine-tunes save it (`bert.` prefix, tied MLM decoder) and as BertModel does (no prefix).
    "bert-mlm": Case("bert", "bert", lambda: _bert("BertForMaskedLM")),
    "bert-model": Case("bert", "bert", lambda: _bert("BertModel")),
    # DeepSeek-V2-Lite (no query latent: one q_proj) and DeepSeek-V2 (q_a/q_b), the latter in BF16.
    "deepseek_v2-lite": Case(
        "deepseek_v2", "mla", lambda: _mla("DeepseekV2ForCausalLM", "DeepseekV2Config", q_lora_rank=None)
    ),
    "deepseek_v2-bf16": Case(
        "deepseek_v2",
        "mla",
        lambda: _mla("DeepseekV2ForCausalLM", "DeepseekV2Config", q_lora_rank=12),
        torch.bfloat16,
    ),
    # DeepSeek-V3 (the fixture above, here checked against the module) and V3.2 with its indexer.
    "deepseek_v3": Case(
        "deepseek_v3", "mla", lambda: _mla("DeepseekV3ForCausalLM", "DeepseekV3Config", q_lora_rank=12)
    ),
    "deepseek_v32": Case(
        "deepseek_v32", "mla", lambda: _mla("DeepseekV32ForCausalLM", "DeepseekV32Config", q_lora_rank=12)
    ),
    # Kimi-K2 as Moonshot ships it: DeepSeek-V3's tensors under config.json's `model_type: kimi_k2`
    # (its modeling code is remote; transformers has no class of its own and reads it as deepseek_v3).
    "kimi_k2": Case(
        "kimi_k2",
        "mla",
        lambda: _mla("DeepseekV3ForCausalLM", "DeepseekV3Config", q_lora_rank=12),
        torch.bfloat16,
        relabel="kimi_k2",
    ),
    # Kimi-K2.5 as transformers writes it: the decoder's text_config says deepseek_v3 (transformers
    # renames kimi_k2 on reading), beside a vision tower of other names.
    "kimi_k25": Case("deepseek_v3", "mla", _kimi_k25, torch.bfloat16),
    # Multimodal wrappers: the decoder's config is text_config and its layers sit under language_model.
    "llava-llama": Case("llama", "gqa", _llava),
    "mistral3-head_dim": Case("mistral", "gqa", _mistral3),
    # ...and wrappers where another tower's layers carry the decoder's tensor names.
    "glmasr-llama": Case("llama", "gqa", _glmasr),
    "fun_asr_nano-qwen3": Case("qwen3", "gqa", _fun_asr_nano),
}


class Saved(NamedTuple):
    case: Case
    folder: Path
    config: dict  # config.json as written
    text: dict  # the decoder's part of it (text_config for the wrappers)
    model: torch.nn.Module


_SAVED: dict[str, Saved] = {}


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-cases")


def _saved(name: str, root: Path) -> Saved:
    """Build, randomize the norms of and save case `name` once per module."""
    if name not in _SAVED:
        case = HF_CASES[name]
        torch.manual_seed(0)
        model = case.build().to(case.dtype)
        _randomize_norms(model, seed=1)
        folder = root / name
        model.save_pretrained(folder, **case.save)
        config = json.loads((folder / "config.json").read_text())
        if case.relabel:
            config["model_type"] = case.relabel
            (folder / "config.json").write_text(json.dumps(config))
        _SAVED[name] = Saved(case, folder, config, config.get("text_config", config), model)
    return _SAVED[name]


@pytest.fixture(scope="module", params=list(HF_CASES))
def hf_case(request, hf_root) -> Saved:
    return _saved(request.param, hf_root)


def _layer_prefix(names, num_layers: int) -> str:
    """Where the decoder's (encoder's) layers are: the one prefix whose attention layers are
    exactly 0..num_layers-1 (the cases give every other tower another count)."""
    layers: dict[str, set[int]] = {}
    for n in names:
        m = re.match(r"^(.*?)(\d+)\.(self_attn\.o_proj|attention\.self\.query)\.weight$", n)
        if m:
            layers.setdefault(m.group(1), set()).add(int(m.group(2)))
    found = [p for p, held in layers.items() if held == set(range(num_layers))]
    assert len(found) == 1, layers
    return found[0]


def _reference(s: Saved, tensors: dict, layer: int, fold: bool, text: dict | None = None) -> dict:
    text = text or s.text
    prefix = _layer_prefix(tensors, text["num_hidden_layers"])
    if s.case.family == "bert":
        return ref_bert(text, tensors, layer, fold, prefix=prefix[: -len("encoder.layer.")])
    if s.case.family == "mla":
        return ref_mla(text, tensors, layer, fold, prefix=prefix)
    # ref_llama reads `model.layers.`: move a wrapper's decoder there.
    moved = {"model.layers." + k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return ref_llama(text, moved, layer, fold)


def test_every_claimed_model_type_has_a_case():
    """A model_type an adapter starts to claim needs a case here (or a reason it has none)."""
    from svd_probe.adapters import supported_model_types

    elsewhere = {
        "gpt2": "the gpt2 fixture above",
        "svd_probe_encoder": "written by `svd-probe train`, not by transformers (tests/test_train_analyze.py)",
    }
    assert set(supported_model_types()) == {c.model_type for c in HF_CASES.values()} | set(elsewhere)


def test_analyze_matches_float64(tmp_path, hf_case):
    s = hf_case
    src = open_checkpoint(str(s.folder))
    names = set(src.tensor_names)
    # The traps are in the checkpoint as transformers wrote it.
    assert s.text["model_type"] == s.case.model_type
    if s.case.family != "bert":
        has_head = any(n.endswith("lm_head.weight") for n in names)
        assert has_head != bool(s.config.get("tie_word_embeddings")), "lm_head iff untied"
    if s.case.save:
        assert len(list(s.folder.glob("*.safetensors"))) > 1 and (s.folder / "model.safetensors.index.json").exists()
    run = analyze(AnalyzeJob(model=str(s.folder), cache_dir=tmp_path / "cache", device="cpu"))
    assert run.layers == list(range(s.text["num_hidden_layers"]))
    dims = run.analysis.manifest["dims"]
    assert dims["model_type"] == s.case.model_type
    if s.case.family == "gqa":
        head_dim = s.text.get("head_dim") or s.text["hidden_size"] // s.text["num_attention_heads"]
        assert (dims["d_qk"], dims["n_kv_groups"]) == (head_dim, s.text["num_key_value_heads"])
    tensors = read_checkpoint(s.folder)
    for layer in run.layers:
        assert_spectra_match(run.analysis, layer, reference_spectra(_reference(s, tensors, layer, True)))
    want = {torch.float32: "F32", torch.bfloat16: "BF16"}[s.case.dtype]
    assert set(run.analysis.layer_spectra[0].storage_dtypes.values()) == {want}
    # Only the decoder's attention weights and the norms folded into them are read: no bias, no
    # indexer, no vision tower, no embeddings, no post-attention LayerNorm (BERT).
    ad = adapter_for(src.config, src.tensor_names)
    read = [n for layer in run.layers for n in ad.layer_tensor_names(layer, set(ad.supported_kinds()), True)]
    assert read and all(n.startswith(_layer_prefix(names, s.text["num_hidden_layers"])) for n in read)
    assert not [n for n in read if n.endswith(".bias") or ".indexer." in n or "LayerNorm" in n]


def test_analyze_without_folding_matches_float64(tmp_path, hf_case):
    s = hf_case
    run = analyze(
        AnalyzeJob(model=str(s.folder), cache_dir=tmp_path / "cache", device="cpu", fold_norms=False, layers="1")
    )
    assert_spectra_match(run.analysis, 1, reference_spectra(_reference(s, read_checkpoint(s.folder), 1, False)))


@pytest.mark.parametrize("name", [n for n, c in HF_CASES.items() if c.model_type == "qwen3"])
def test_qwen3_q_and_k_norms_are_folded_into_the_heads_rows(tmp_path, hf_root, name):
    """llama.py folds q_norm/k_norm as diag(w)·W_h (each head's output rows): the spectra match that
    and not the ones without it, so a dropped fold could not pass test_analyze_matches_float64."""
    s = _saved(name, hf_root)
    run = analyze(AnalyzeJob(model=str(s.folder), cache_dir=tmp_path / "cache", device="cpu"))
    tensors = read_checkpoint(s.folder)
    without = {**s.text, "model_type": "qwen3-without-qk-norm"}  # ref_llama folds qk-norm for qwen3 only
    for layer in run.layers:
        ref = reference_spectra(_reference(s, tensors, layer, True, text=without))
        for key in ("head.Q", "head.K", "head.QK", "stacked.QK"):
            scope, matrix = key.split(".")
            got = np.asarray(run.analysis.sigma(layer, matrix, scope))
            assert not np.allclose(got, ref[key][0], rtol=1e-2), f"layer {layer} {key} ignores q_norm/k_norm"
        # V and O do not go through them.
        assert np.allclose(run.analysis.sigma(layer, "VO", "head"), ref["head.VO"][0], rtol=1e-4)


# --- the factors against the transformers module ----------------------------------------------------


class _NoRope(tuple):
    """position_embeddings for a module whose rotary function is patched out: (cos, sin) unpacks,
    DeepSeek-V2's complex `freqs_cis.to(device)` works."""

    def to(self, *args, **kwargs):
        return self


def _run_attention(attn: torch.nn.Module, xn: torch.Tensor, monkeypatch) -> dict:
    """One attention call on the normalized stream xn [T, H], without RoPE; returns the per-head
    query, key and value states the module builds ([heads, T, dim], before any repeat_kv), its
    per-head output before the output projection ([T, n, d_v]) and its scaling."""
    module = sys.modules[type(attn).__module__]
    eager = getattr(module, "eager_attention_forward", None)
    if eager is None:
        pytest.skip(f"{module.__name__} has no eager_attention_forward to watch")
    seen: dict = {}

    def capture(mod, query, key, value, attention_mask, **kw):
        out, weights = eager(mod, query, key, value, attention_mask, **kw)
        seen.update(q=query[0], k=key[0], v=value[0], ctx=out[0], scaling=kw["scaling"])
        return out, weights

    with monkeypatch.context() as patch:  # undone on return: the next call wraps the original
        patch.setattr(module, "eager_attention_forward", capture)
        for rope in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave", "apply_rotary_emb"):
            if hasattr(module, rope):  # the rotation is the identity at position 0; here everywhere
                patch.setattr(module, rope, lambda q, k, *a, **kw: (q, k))
        # No mask (every token sees every token), spelled as the additive mask eager attention
        # takes, which V3.2's indexer needs.
        kwargs: dict = {"attention_mask": xn.new_zeros(1, 1, len(xn), len(xn))}
        if "position_embeddings" in inspect.signature(attn.forward).parameters:
            kwargs["position_embeddings"] = _NoRope((None, None))
        with torch.no_grad():
            attn(hidden_states=xn[None], **kwargs)
    assert seen, "the module did not call eager_attention_forward"
    return seen


def _multiple_of(got: torch.Tensor, want: torch.Tensor, what: str) -> torch.Tensor:
    """got[h, t] = r[h, t]·want[h, t] with r > 0, returning r: the adapter's map is the model's up to
    a positive scalar per token (RMSNorm's 1/rms), which scales all singular values alike."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    r = (got * want).sum(-1) / (want * want).sum(-1)
    err = (got - r[..., None] * want).norm(dim=-1) / got.norm(dim=-1)
    assert (r > 0).all() and err.max() < 1e-6, f"{what}: off by {err.max():.1e}·|x|"
    return r


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.allclose(a, b.expand_as(a), rtol=1e-6, atol=0), what


def test_factors_are_the_attention_transformers_computes(hf_case, monkeypatch):
    """For random residual streams x, the module's per-head q, k, v are the adapter's factors times
    x (up to the positive per-token scale of the norms), its per-head outputs are those the
    adapter's kv_group pairs up, and its output projection is the sum of the adapter's O_h."""
    s = hf_case
    if not hasattr(s.model, "set_attn_implementation"):
        pytest.skip(f"transformers {transformers.__version__} cannot switch a model to eager attention")
    model = copy.deepcopy(s.model).double().eval()
    model.set_attn_implementation("eager")
    src = open_checkpoint(str(s.folder))
    ad = adapter_for(src.config, src.tensor_names)
    kinds = set(ad.supported_kinds())
    x = torch.randn(6, s.text["hidden_size"], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = 2 * x + 0.5
    heads = lambda w, inp: torch.einsum("hdi,ti->htd", w.double(), inp)  # noqa: E731
    per_head_norm = s.case.model_type == "qwen3"
    for layer in range(s.text["num_hidden_layers"]):
        f = ad.factors(layer, src.read_tensors(ad.plan(layer, kinds, True)), kinds, True)
        if s.case.family == "bert":
            block = getattr(model, "bert", model).encoder.layer[layer].attention
            norm, attn, o_proj = (lambda t: t), block.self, block.output.dense
        else:  # the decoder as the model itself names it, never another tower
            block = model.get_decoder().layers[layer]
            norm, attn, o_proj = block.input_layernorm, block.self_attn, block.self_attn.o_proj
        with torch.no_grad():
            xn = norm(x)
        seen = _run_attention(attn, xn, monkeypatch)
        bias = _run_attention(attn, torch.zeros_like(xn), monkeypatch)  # what a zero input gets: biases
        lin = {k: seen[k] - bias[k] for k in "qkv"}

        d_qk = f.q.shape[1]
        q_in = x @ f.q_read.double().T if f.q_read is not None else x
        kv_in = x @ f.kv_read.double().T if f.kv_read is not None else x
        r_q = _multiple_of(lin["q"][..., :d_qk], heads(f.q, q_in), f"layer {layer} Q")
        r_k = _multiple_of(lin["k"][..., :d_qk], heads(f.k, kv_in), f"layer {layer} K")
        r_v = _multiple_of(lin["v"], heads(f.v, kv_in), f"layer {layer} V")
        # Without a per-head norm, all heads of a token share one scale (the latent's, or the
        # input norm's); q, k and v share it when they read the residual stream itself.
        _same(r_v, r_v[:1], "V's scale differs between heads")
        if not per_head_norm:
            _same(r_q, r_q[:1], "Q's scale differs between heads")
            _same(r_k, r_v[:1], "K and V scales differ")
        if f.q_read is None and f.kv_read is None and not per_head_norm:
            _same(r_q, r_v[:1], "Q and V scales differ")
        if s.case.family == "bert":  # nothing normalizes what BERT's attention reads
            _same(r_v, torch.ones(1, dtype=r_v.dtype), "BERT's maps are scaled")
        if f.q_pe is not None:
            r_pe = _multiple_of(lin["q"][..., d_qk:], heads(f.q_pe, q_in), f"layer {layer} Q_pe")
            _same(r_pe, r_q[:1], "Q_pe and Q scales differ")
            shared_pe = (x @ f.layer["KVA_pe"].double().T).expand(lin["k"].shape[0], -1, -1)
            _multiple_of(lin["k"][..., d_qk:], shared_pe, f"layer {layer} K_pe")

        # The heads pair up as the adapter's kv_group says (transformers' repeat_kv).
        g = f.groups()
        assert g.tolist() == [h // (len(g) // seen["k"].shape[0]) for h in range(len(g))]
        scores = torch.einsum("htd,hsd->hts", seen["q"], seen["k"][g]) * seen["scaling"]
        ctx = torch.softmax(scores, dim=-1) @ seen["v"][g]
        assert torch.allclose(ctx.transpose(0, 1), seen["ctx"], rtol=1e-5, atol=1e-6 * ctx.abs().max())
        # The output projection of the module's per-head outputs is Σ_h O_h·out_h.
        out = seen["ctx"]  # [T, n, d_v]
        with torch.no_grad():
            want = o_proj(out.reshape(out.shape[0], -1)) - o_proj(torch.zeros_like(out.reshape(out.shape[0], -1)))
        got = torch.einsum("hmd,thd->tm", f.o.double(), out)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7 * want.abs().max()), f"layer {layer} O"
