"""Config facts of the aliased models, embedded so `svd-probe models` works offline.

Only the keys that size the attention are kept, with the names and values of each repo's public
config.json (docs/reference.md §1-2). `attention_tensor_shapes` turns any config (embedded or
downloaded) into the tensors an analysis reads, so the download size is computed, not typed in.
"""

from __future__ import annotations

import math

_DSV3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "first_k_dense_replace": 3,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}
_KIMI = {
    **_DSV3,
    "model_type": "kimi_k2",
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "first_k_dense_replace": 1,
}
_KIMI_THINKING = {
    **_KIMI,
    # Experts are INT4 (compressed-tensors); attention stays BF16.
    "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
}
_DSV2 = {
    "model_type": "deepseek_v2",
    "hidden_size": 5120,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "num_hidden_layers": 60,
    "first_k_dense_replace": 1,
    "torch_dtype": "bfloat16",
}
_DSV2_LITE = {
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "torch_dtype": "bfloat16",
}
_MOONLIGHT = {**_DSV2_LITE, "model_type": "deepseek_v3"}
_LLAMA31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 32,
    "torch_dtype": "bfloat16",
}
_QWEN25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "torch_dtype": "bfloat16",
}
_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "torch_dtype": "bfloat16",
}

KNOWN_CONFIGS: dict[str, dict] = {
    "deepseek-v3": _DSV3,
    "deepseek-v3-base": _DSV3,
    "deepseek-r1": _DSV3,
    "deepseek-v3.1": _DSV3,
    "kimi-k2": _KIMI,
    "kimi-k2-base": _KIMI,
    "kimi-k2-thinking": _KIMI_THINKING,
    "deepseek-v2": _DSV2,
    "deepseek-v2-lite": _DSV2_LITE,
    "moonlight": _MOONLIGHT,
    "llama-3.1-8b": _LLAMA31_8B,
    "qwen2.5-7b": _QWEN25_7B,
    "mistral-7b": _MISTRAL_7B,
}

# Whole-checkpoint sizes where a public figure exists (docs/reference.md §1), for the "share" column.
CHECKPOINT_BYTES: dict[str, int] = {
    "deepseek-v3": 688_600_000_000,
    "deepseek-v3-base": 688_600_000_000,
    "deepseek-r1": 688_600_000_000,
    "kimi-k2": 1_030_000_000_000,
    "kimi-k2-base": 1_030_000_000_000,
}

_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}
_TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def is_mla(config: dict) -> bool:
    return config.get("kv_lora_rank") is not None


def attention_dtype(config: dict) -> str:
    """Storage dtype of the attention projections: F8_E4M3 under DeepSeek's block FP8, else torch_dtype."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3":
        return "F8_E4M3"
    return _TORCH_TO_ST.get(str(config.get("torch_dtype", "bfloat16")), "BF16")


def num_attention_layers(config: dict) -> int:
    return int(config["num_hidden_layers"]) + int(config.get("num_nextn_predict_layers") or 0)


def attention_tensor_shapes(config: dict, layer: int = 0) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor one layer's attention analysis reads, FP8 scales included."""
    H = int(config["hidden_size"])
    n = int(config["num_attention_heads"])
    wdt = attention_dtype(config)
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    out: list[tuple[str, tuple[int, ...], str]] = [(p + "input_layernorm.weight", (H,), "BF16")]
    if is_mla(config):
        nope, rope, v = int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"]), int(config["v_head_dim"])
        kv = int(config["kv_lora_rank"])
        ql = config.get("q_lora_rank")
        mats = []
        if ql:
            mats += [("q_a_proj", (int(ql), H)), ("q_b_proj", (n * (nope + rope), int(ql)))]
            out.append((a + "q_a_layernorm.weight", (int(ql),), "BF16"))
        else:
            mats.append(("q_proj", (n * (nope + rope), H)))
        mats += [("kv_a_proj_with_mqa", (kv + rope, H)), ("kv_b_proj", (n * (nope + v), kv)), ("o_proj", (H, n * v))]
        out.append((a + "kv_a_layernorm.weight", (kv,), "BF16"))
    else:
        g = int(config.get("num_key_value_heads") or n)
        d = int(config.get("head_dim") or H // n)
        mats = [("q_proj", (n * d, H)), ("k_proj", (g * d, H)), ("v_proj", (g * d, H)), ("o_proj", (H, n * d))]
    bs = ((config.get("quantization_config") or {}).get("weight_block_size")) or [128, 128]
    for short, shape in mats:
        out.append((a + short + ".weight", shape, wdt))
        if wdt == "F8_E4M3":
            out.append(
                (a + short + ".weight_scale_inv", (math.ceil(shape[0] / bs[0]), math.ceil(shape[1] / bs[1])), "F32")
            )
    return out


def attention_bytes_per_layer(config: dict) -> int:
    return sum(math.prod(s) * _BYTES[dt] for _, s, dt in attention_tensor_shapes(config))


def analysis_bytes(config: dict) -> int:
    """Bytes of tensor data a full analysis downloads (shard headers, a few MB, not included)."""
    return attention_bytes_per_layer(config) * num_attention_layers(config)
