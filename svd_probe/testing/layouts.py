"""Small checkpoints in the layouts of real releases, for tests and demos.

Each generator returns a `Layout`: a config.json with the fields the real release has (shapes
scaled down) and tensors with the real names, dtypes and relative shapes: attention, norms, MLP
(or MoE experts), embeddings and the odd extras a reader must step over (DeepSeek-V3.2's
indexer, GPT-2's causal-mask buffer, BERT's pooler and MLM head, a vision tower beside a
`language_model.` decoder). Norm weights are far from 1 so that a norm folded into the wrong
axis, or not at all, changes the spectra visibly.

    >>> from svd_probe.testing.layouts import write_layout
    >>> folder = write_layout(tmp_path / "qwen3", "qwen3")          # config.json + shards + index
    >>> analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache"))

Layouts: llama, mistral, qwen2, qwen3, bert, gpt2, deepseek_v3, deepseek_v32, deepseek_v2_lite,
moonlight, kimi_k2, kimi_multimodal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from svd_probe.testing.checkpoints import quantize_fp8_blocks, write_checkpoint


@dataclass
class Layout:
    """A generated checkpoint in memory: config.json and tensors as they are stored."""

    name: str
    config: dict
    tensors: dict[str, torch.Tensor]
    # Where the decoder lives in the names, and the config that describes it (for a multimodal
    # release the decoder's config is config["text_config"]).
    layer_prefix: str = "model.layers."
    text_config: dict = field(default_factory=dict)
    shard_naming: str = "hf"  # see `svd_probe.testing.checkpoints.shard_file_name`
    seed: int = 0

    def __post_init__(self):
        if not self.text_config:
            self.text_config = self.config


class _Rand:
    """Seeded tensors: Gaussian weights scaled like an initialization, norm weights in [0.25, 2]."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def weight(self, out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=self.g) / inp**0.5

    def norm(self, n: int) -> torch.Tensor:
        return 0.25 + 1.75 * torch.rand(n, generator=self.g)

    def vector(self, n: int) -> torch.Tensor:
        return 0.1 * torch.randn(n, generator=self.g)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


# --- Llama family -----------------------------------------------------------------------------


def _llama_family(
    name: str,
    config: dict,
    *,
    seed: int,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    tie_embeddings: bool = False,
) -> Layout:
    r = _Rand(seed)
    h, n, g = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // n
    ff, vocab = config["intermediate_size"], config["vocab_size"]
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": r.weight(vocab, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = r.norm(h)
        t[p + "self_attn.q_proj.weight"] = r.weight(n * d, h)
        t[p + "self_attn.k_proj.weight"] = r.weight(g * d, h)
        t[p + "self_attn.v_proj.weight"] = r.weight(g * d, h)
        t[p + "self_attn.o_proj.weight"] = r.weight(h, n * d)
        if qkv_bias:
            t[p + "self_attn.q_proj.bias"] = r.vector(n * d)
            t[p + "self_attn.k_proj.bias"] = r.vector(g * d)
            t[p + "self_attn.v_proj.bias"] = r.vector(g * d)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = r.norm(d)
            t[p + "self_attn.k_norm.weight"] = r.norm(d)
        t[p + "post_attention_layernorm.weight"] = r.norm(h)
        t[p + "mlp.gate_proj.weight"] = r.weight(ff, h)
        t[p + "mlp.up_proj.weight"] = r.weight(ff, h)
        t[p + "mlp.down_proj.weight"] = r.weight(h, ff)
    t["model.norm.weight"] = r.norm(h)
    if not tie_embeddings:
        t["lm_head.weight"] = r.weight(vocab, h)
    return Layout(name, config, _cast(t, torch.bfloat16), seed=seed)


def llama(seed: int = 0) -> Layout:
    """Llama-3.1-8B, scaled down: GQA with 4 query heads per key/value head."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": 128,
    }
    return _llama_family("llama", config, seed=seed)


def mistral(seed: int = 0) -> Layout:
    """Mistral-7B-v0.1, scaled down: no `head_dim` field (d = hidden_size / heads), sliding window."""
    config: dict[str, Any] = {
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 48,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 6,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0",
        "use_cache": True,
        "vocab_size": 128,
    }
    return _llama_family("mistral", config, seed=seed)


def qwen2(seed: int = 0) -> Layout:
    """Qwen2.5-7B, scaled down: 7 query heads per key/value head, biases on q/k/v."""
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 56,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 128,
    }
    return _llama_family("qwen2", config, seed=seed, qkv_bias=True)


def qwen3(seed: int = 0) -> Layout:
    """Qwen3-0.6B, scaled down: per-head q/k RMSNorm, heads·head_dim ≠ hidden_size, tied embeddings."""
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 128,
    }
    return _llama_family("qwen3", config, seed=seed, qk_norm=True, tie_embeddings=True)


# --- encoders and GPT-2 ----------------------------------------------------------------------


def bert(seed: int = 0, prefix: str = "bert.") -> Layout:
    """bert-base-uncased (BertForMaskedLM), scaled down; `prefix=""` for a bare BertModel save."""
    config: dict[str, Any] = {
        "architectures": ["BertForMaskedLM"],
        "attention_probs_dropout_prob": 0.1,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 48,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "transformers_version": "4.6.0.dev0",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": 128,
    }
    r = _Rand(seed)
    h, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    t: dict[str, torch.Tensor] = {}

    def linear(name: str, out: int, inp: int) -> None:
        t[name + ".weight"] = r.weight(out, inp)
        t[name + ".bias"] = r.vector(out)

    def layer_norm(name: str) -> None:
        t[name + ".weight"] = r.norm(h)
        t[name + ".bias"] = r.vector(h)

    p = prefix
    t[p + "embeddings.word_embeddings.weight"] = r.weight(vocab, h)
    t[p + "embeddings.position_embeddings.weight"] = r.weight(config["max_position_embeddings"], h)
    t[p + "embeddings.token_type_embeddings.weight"] = r.weight(config["type_vocab_size"], h)
    layer_norm(p + "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        lp = f"{p}encoder.layer.{layer}."
        for m in ("query", "key", "value"):
            linear(lp + "attention.self." + m, h, h)
        linear(lp + "attention.output.dense", h, h)
        layer_norm(lp + "attention.output.LayerNorm")
        linear(lp + "intermediate.dense", ff, h)
        # Same leaf name as the attention output, one level up: a reader must not confuse them.
        linear(lp + "output.dense", h, ff)
        layer_norm(lp + "output.LayerNorm")
    if prefix:
        linear(p + "pooler.dense", h, h)
        t["cls.predictions.bias"] = r.vector(vocab)
        linear("cls.predictions.transform.dense", h, h)
        layer_norm("cls.predictions.transform.LayerNorm")
    return Layout("bert", config, _cast(t, torch.float32), layer_prefix=p + "encoder.layer.", seed=seed)


def gpt2(seed: int = 0, prefix: str = "") -> Layout:
    """openai-community/gpt2, scaled down: Conv1D weights ([in, out]), fused c_attn.

    `prefix="transformer."` gives the names GPT2LMHeadModel saves with recent transformers.
    """
    config: dict[str, Any] = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 50256,
        "embd_pdrop": 0.1,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": 32,
        "n_embd": 48,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 32,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 128,
    }
    r = _Rand(seed)
    h, ctx, vocab = config["n_embd"], config["n_ctx"], config["vocab_size"]
    p = prefix
    t: dict[str, torch.Tensor] = {p + "wte.weight": r.weight(vocab, h), p + "wpe.weight": r.weight(ctx, h)}

    def conv1d(name: str, inp: int, out: int) -> None:
        # Conv1D stores [in, out] (y = x @ W + b): the transpose of a Linear weight.
        t[name + ".weight"] = r.weight(out, inp).T.contiguous()
        t[name + ".bias"] = r.vector(out)

    for layer in range(config["n_layer"]):
        lp = f"{p}h.{layer}."
        t[lp + "ln_1.weight"], t[lp + "ln_1.bias"] = r.norm(h), r.vector(h)
        # The causal-mask buffer old checkpoints carry beside the weights.
        t[lp + "attn.bias"] = torch.tril(torch.ones(ctx, ctx)).reshape(1, 1, ctx, ctx)
        conv1d(lp + "attn.c_attn", h, 3 * h)
        conv1d(lp + "attn.c_proj", h, h)
        t[lp + "ln_2.weight"], t[lp + "ln_2.bias"] = r.norm(h), r.vector(h)
        conv1d(lp + "mlp.c_fc", h, 4 * h)
        conv1d(lp + "mlp.c_proj", 4 * h, h)
    t[p + "ln_f.weight"], t[p + "ln_f.bias"] = r.norm(h), r.vector(h)
    return Layout("gpt2", config, _cast(t, torch.float32), layer_prefix=p + "h.", seed=seed)


# --- MLA: DeepSeek, Kimi, Moonlight ------------------------------------------------------------

_MLA_BASE = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "kv_lora_rank": 16,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 16,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 2,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 1,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    # q_nope ≠ v and rope ≠ either, so that a slice taken at the wrong offset changes shapes.
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128,
}


def _mla_layer(r: _Rand, c: dict, p: str, t: dict[str, torch.Tensor], layer: int, *, indexer: bool) -> None:
    h, n = c["hidden_size"], c["num_attention_heads"]
    nope, rope, dv, kv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    a = p + "self_attn."
    t[p + "input_layernorm.weight"] = r.norm(h)
    if c.get("q_lora_rank") is None:
        t[a + "q_proj.weight"] = r.weight(n * (nope + rope), h)
    else:
        ql = c["q_lora_rank"]
        t[a + "q_a_proj.weight"] = r.weight(ql, h)
        t[a + "q_a_layernorm.weight"] = r.norm(ql)
        t[a + "q_b_proj.weight"] = r.weight(n * (nope + rope), ql)
    t[a + "kv_a_proj_with_mqa.weight"] = r.weight(kv + rope, h)
    t[a + "kv_a_layernorm.weight"] = r.norm(kv)
    t[a + "kv_b_proj.weight"] = r.weight(n * (nope + dv), kv)
    t[a + "o_proj.weight"] = r.weight(h, n * dv)
    if indexer:
        # DeepSeek-V3.2's lightning indexer: attention-like tensors the analysis must never read.
        ih, idim = c["index_n_heads"], c["index_head_dim"]
        t[a + "indexer.wq_b.weight"] = r.weight(ih * idim, c["q_lora_rank"])
        t[a + "indexer.wk.weight"] = r.weight(idim, h)
        t[a + "indexer.k_norm.weight"] = r.norm(idim)
        t[a + "indexer.k_norm.bias"] = r.vector(idim)
        t[a + "indexer.weights_proj.weight"] = r.weight(ih, h)
    t[p + "post_attention_layernorm.weight"] = r.norm(h)
    if layer < c["first_k_dense_replace"]:
        ff = c["intermediate_size"]
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = r.weight(ff, h), r.weight(ff, h)
        t[p + "mlp.down_proj.weight"] = r.weight(h, ff)
    else:
        ff, e = c["moe_intermediate_size"], c["n_routed_experts"]
        t[p + "mlp.gate.weight"] = r.weight(e, h)
        if c.get("topk_method") == "noaux_tc":
            t[p + "mlp.gate.e_score_correction_bias"] = r.vector(e)
        for i in range(e):
            ep = f"{p}mlp.experts.{i}."
            t[ep + "gate_proj.weight"], t[ep + "up_proj.weight"] = r.weight(ff, h), r.weight(ff, h)
            t[ep + "down_proj.weight"] = r.weight(h, ff)
        sf = ff * c["n_shared_experts"]
        t[p + "mlp.shared_experts.gate_proj.weight"] = r.weight(sf, h)
        t[p + "mlp.shared_experts.up_proj.weight"] = r.weight(sf, h)
        t[p + "mlp.shared_experts.down_proj.weight"] = r.weight(h, sf)


def _fp8_blocks(t: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """DeepSeek's FP8 storage: E4M3 weights with a float32 `weight_scale_inv` per tile.

    Like the release, only 2-D projection weights inside the layers are FP8; embeddings, the
    lm_head, norms, the MoE router and 1-D tensors stay BF16.
    """
    out: dict[str, torch.Tensor] = {}
    for name, w in t.items():
        fp8 = (
            w.dim() == 2
            and ".layers." in name
            and not name.endswith(("mlp.gate.weight", "embed_tokens.weight", "head.weight"))
        )
        if fp8:
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(w, block)
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def _mla(
    config: dict, *, seed: int, indexer: bool = False, prefix: str = "", fp8_block: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    r = _Rand(seed)
    c = config
    h, vocab = c["hidden_size"], c["vocab_size"]
    n_main, n_mtp = c["num_hidden_layers"], int(c.get("num_nextn_predict_layers") or 0)
    base = prefix + "model."
    t: dict[str, torch.Tensor] = {base + "embed_tokens.weight": r.weight(vocab, h)}
    for layer in range(n_main + n_mtp):
        p = f"{base}layers.{layer}."
        _mla_layer(r, c, p, t, layer, indexer=indexer)
        if layer >= n_main:
            # DeepSeek-V3's multi-token-prediction module rides along as an extra decoder layer.
            t[p + "embed_tokens.weight"] = r.weight(vocab, h)
            t[p + "enorm.weight"], t[p + "hnorm.weight"] = r.norm(h), r.norm(h)
            t[p + "eh_proj.weight"] = r.weight(h, 2 * h)
            t[p + "shared_head.norm.weight"] = r.norm(h)
            t[p + "shared_head.head.weight"] = r.weight(vocab, h)
    t[base + "norm.weight"] = r.norm(h)
    t[prefix + "lm_head.weight"] = r.weight(vocab, h)
    return _fp8_blocks(t, fp8_block) if fp8_block else _cast(t, torch.bfloat16)


def deepseek_v3(seed: int = 0, fp8: bool = False) -> Layout:
    """DeepSeek-V3, scaled down: query latent, one MTP layer; FP8 in 16×16 tiles with fp8=True."""
    config: dict[str, Any] = {
        **_MLA_BASE,
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 24,
        "transformers_version": "4.33.1",
    }
    block = (16, 16)
    if fp8:
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        }
    return Layout(
        "deepseek_v3",
        config,
        _mla(config, seed=seed, fp8_block=block if fp8 else None),
        shard_naming="deepseek",
        seed=seed,
    )


def deepseek_v32(seed: int = 0, fp8: bool = False) -> Layout:
    """DeepSeek-V3.2-Exp, scaled down: V3 plus the indexer tensors in every layer."""
    config: dict[str, Any] = {
        **_MLA_BASE,
        "architectures": ["DeepseekV32ForCausalLM"],
        "index_head_dim": 8,
        "index_n_heads": 4,
        "index_topk": 16,
        "model_type": "deepseek_v32",
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 24,
        "transformers_version": "4.44.2",
    }
    block = (16, 16)
    if fp8:
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        }
    return Layout(
        "deepseek_v32",
        config,
        _mla(config, seed=seed, indexer=True, fp8_block=block if fp8 else None),
        shard_naming="deepseek",
        seed=seed,
    )


def deepseek_v2_lite(seed: int = 0) -> Layout:
    """DeepSeek-V2-Lite, scaled down: no query latent (`q_lora_rank: null`, one q_proj), no MTP."""
    config: dict[str, Any] = {
        **{k: v for k, v in _MLA_BASE.items() if k not in ("ep_size",)},
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV2Config",
            "AutoModel": "modeling_deepseek.DeepseekV2Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
        },
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "topk_method": "greedy",
        "transformers_version": "4.33.1",
    }
    return Layout("deepseek_v2_lite", config, _mla(config, seed=seed), shard_naming="deepseek", seed=seed)


def moonlight(seed: int = 0) -> Layout:
    """Moonlight-16B-A3B, scaled down: model_type deepseek_v3 but no query latent and no MTP."""
    config: dict[str, Any] = {
        **_MLA_BASE,
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_nextn_predict_layers": 0,
        "q_lora_rank": None,
        "transformers_version": "4.48.2",
    }
    return Layout("moonlight", config, _mla(config, seed=seed), seed=seed)


def kimi_k2(seed: int = 0) -> Layout:
    """Kimi-K2, scaled down: model_type kimi_k2, DeepSeek-V3 names, no MTP layer."""
    config: dict[str, Any] = {
        **_MLA_BASE,
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "num_nextn_predict_layers": 0,
        "q_lora_rank": 24,
        "transformers_version": "4.48.3",
    }
    return Layout("kimi_k2", config, _mla(config, seed=seed), shard_naming="kimi", seed=seed)


def kimi_multimodal(seed: int = 0, nested_config: bool = True) -> Layout:
    """A Kimi multimodal release, scaled down: the decoder under `language_model.`, beside a vision
    tower and projector.

    The releases nest the decoder's config under `text_config` of an outer multimodal config;
    `nested_config=False` writes the decoder's config flat instead (names still prefixed).
    """
    text: dict[str, Any] = {
        **_MLA_BASE,
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "num_nextn_predict_layers": 0,
        "q_lora_rank": 24,
    }
    tensors = _mla(text, seed=seed, prefix="language_model.")
    r = _Rand(seed + 1)
    vh = 32
    for block in range(2):
        # The vision tower has attention of its own under other names; it is not analysed.
        vp = f"vision_tower.encoder.blocks.{block}."
        tensors[vp + "wqkv.weight"] = r.weight(3 * vh, vh).to(torch.bfloat16)
        tensors[vp + "wo.weight"] = r.weight(vh, vh).to(torch.bfloat16)
        tensors[vp + "norm0.weight"] = r.norm(vh).to(torch.bfloat16)
    tensors["mm_projector.proj.0.weight"] = r.weight(text["hidden_size"], 4 * vh).to(torch.bfloat16)
    if nested_config:
        config: dict[str, Any] = {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "text_config": text,
            "vision_config": {
                "model_type": "kimi_k25_vision",
                "hidden_size": vh,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "patch_size": 14,
            },
            "torch_dtype": "bfloat16",
            "transformers_version": "4.56.2",
        }
    else:
        config = text
    return Layout(
        "kimi_multimodal",
        config,
        tensors,
        layer_prefix="language_model.model.layers.",
        text_config=text,
        shard_naming="kimi",
        seed=seed,
    )


LAYOUTS: dict[str, Callable[..., Layout]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "bert": bert,
    "gpt2": gpt2,
    "deepseek_v3": deepseek_v3,
    "deepseek_v32": deepseek_v32,
    "deepseek_v2_lite": deepseek_v2_lite,
    "moonlight": moonlight,
    "kimi_k2": kimi_k2,
    "kimi_multimodal": kimi_multimodal,
}


def build_layout(name: str, **options) -> Layout:
    """The in-memory checkpoint of layout `name` (see `LAYOUTS`); options go to its generator."""
    if name not in LAYOUTS:
        raise KeyError(f"no layout {name!r}; choose from {', '.join(LAYOUTS)}")
    return LAYOUTS[name](**options)


def write_layout(folder: str | Path, name: str | Layout, n_shards: int = 2, **options) -> Path:
    """Write a layout as a checkpoint folder (config.json, shards, index); returns the folder.

    One shard gives a bare `model.safetensors`, as GPT-2 and BERT ship; tensors within a shard
    are in shuffled order and shards are named the way the release names them.
    """
    layout = name if isinstance(name, Layout) else build_layout(name, **options)
    write_checkpoint(folder, layout.tensors, layout.config, n_shards, naming=layout.shard_naming, seed=layout.seed)
    return Path(folder)
