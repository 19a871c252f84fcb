"""The models `svd-probe models` lists: config facts of each alias, and its table.

The config facts are embedded so the table works offline: only the keys that size the attention,
with the names and values of each repo's public config.json (docs/reference.md §1-2). Which
tensors an analysis reads, and their shapes, come from the adapters' own plans
(`adapter.plan`), so the download sizes are computed by the code that does the reading, never
typed in a second time.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from rich.table import Table

from svd_probe.adapters import adapter_for
from svd_probe.adapters.base import ALL_KINDS, ModelDims
from svd_probe.hub.dequant import scale_grid
from svd_probe.hub.dtypes import DTYPES, WEIGHT_DTYPES, safetensors_name
from svd_probe.models import ALIASES

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


def is_mla(config: dict) -> bool:
    return config.get("kv_lora_rank") is not None


def _torch_dtype(config: dict) -> str:
    """config.json's torch_dtype (transformers 5 writes `dtype`) as a safetensors dtype; BF16 if unknown."""
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    try:
        st = safetensors_name(str(name))
    except KeyError:
        return "BF16"
    return st if st in WEIGHT_DTYPES else "BF16"


def attention_dtype(config: dict) -> str:
    """Storage dtype of the attention projections: F8_E4M3 under DeepSeek's block FP8, else torch_dtype."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3":
        return "F8_E4M3"
    return _torch_dtype(config)


def _dims(config: dict) -> ModelDims:
    return adapter_for(config).dims()


def num_attention_layers(config: dict) -> int:
    return _dims(config).num_layers


def attention_tensor_shapes(config: dict, layer: int = 0) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor one layer's full analysis reads, FP8 scales included.

    The names and shapes are the adapter's plan for every matrix kind with norms folded; the
    projection weights are stored in `attention_dtype`, the norm weights in torch_dtype.
    """
    adapter = adapter_for(config)
    plan = adapter.plan(layer, set(adapter.supported_kinds()) & set(ALL_KINDS), fold_norms=True)
    weights = {n for names in plan.kind_tensors.values() for n in names}
    wdt, ndt = attention_dtype(config), _torch_dtype(config)
    q = config.get("quantization_config") or {}
    bs = q.get("weight_block_size") or [128, 128]
    out: list[tuple[str, tuple[int, ...], str]] = []
    for name, shape in plan.shapes.items():
        if name not in weights:
            out.append((name, shape, ndt))
            continue
        out.append((name, shape, wdt))
        if wdt == "F8_E4M3":
            out.append((name + "_scale_inv", scale_grid(shape, (bs[0], bs[1])), "F32"))
    return out


def attention_bytes_per_layer(config: dict) -> int:
    return sum(math.prod(s) * DTYPES[dt].size for _, s, dt in attention_tensor_shapes(config))


def analysis_bytes(config: dict) -> int:
    """Bytes of tensor data a full analysis downloads (shard headers, a few MB, not included)."""
    return attention_bytes_per_layer(config) * num_attention_layers(config)


# --- the `svd-probe models` table ---------------------------------------------------------------


def model_table() -> list[dict]:
    """One JSON-ready row per alias, in ALIASES order. Sizes are computed from config shapes."""
    rows: list[dict[str, Any]] = []
    for alias, a in ALIASES.items():
        cfg = KNOWN_CONFIGS.get(alias)
        if cfg is None:  # an alias added without config facts still shows up
            rows.append({"alias": alias, "repo_id": a.repo_id, "note": a.note})
            continue
        dims = _dims(cfg)
        mla = dims.kv_latent is not None
        rows.append(
            {
                "alias": alias,
                "repo_id": a.repo_id,
                "model_type": dims.model_type,
                "attention": "MLA" if mla else ("MHA" if dims.n_kv_groups == dims.n_heads else "GQA"),
                "heads": dims.n_heads,
                "kv_heads": None if mla else cfg.get("num_key_value_heads"),
                "layers": dims.num_layers,
                "mtp_layers": dims.num_mtp_layers,
                "attention_dtype": attention_dtype(cfg),
                "bytes_per_layer": attention_bytes_per_layer(cfg),
                "analysis_bytes": analysis_bytes(cfg),
                "checkpoint_bytes": CHECKPOINT_BYTES.get(alias),
                "note": a.note,
            }
        )
    return rows


def _gb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.1f} GB"


# Dropped in this order when the table does not fit the terminal (they stay in --json); the note
# becomes a footnote under the table instead.
_DROP_ORDER = ("note", "share", "attn", "dtype")


def render_model_table(rows: list[dict], width: int | None = None) -> Table:
    """The `models` table; at `width` columns (None: no limit), columns are dropped in
    `_DROP_ORDER` until the rest fit uncut. Names are never cut: they must stay copy-pasteable."""
    cells = []
    for r in rows:
        heads = (
            ""
            if r.get("heads") is None
            else str(r["heads"]) + (f"/{r['kv_heads']}kv" if r.get("kv_heads") and r["kv_heads"] != r["heads"] else "")
        )
        layers = "" if r.get("layers") is None else str(r["layers"])
        if r.get("mtp_layers"):
            layers = f"{r['layers'] - r['mtp_layers']}+{r['mtp_layers']}"
        share = f"{100 * r['analysis_bytes'] / r['checkpoint_bytes']:.1f}%" if r.get("checkpoint_bytes") else ""
        cells.append(
            {
                "alias": r["alias"],
                "repo id": r["repo_id"],
                "attn": r.get("attention", "") or "",
                "heads": heads,
                "layers": layers,
                "dtype": r.get("attention_dtype", "") or "",
                "download": _gb(r.get("analysis_bytes")),
                "share": share,
                "note": r.get("note", "") or "",
            }
        )
    cols: list[tuple[str, Literal["left", "right"]]] = [
        ("alias", "left"),
        ("repo id", "left"),
        ("attn", "left"),
        ("heads", "right"),
        ("layers", "right"),
        ("dtype", "left"),
        ("download", "right"),
        ("share", "right"),
        ("note", "left"),
    ]
    widths = {c: max([len(c)] + [len(row[c]) for row in cells]) for c, _ in cols}
    widths["note"] = min(widths["note"], 14)  # the note is rare and long: it folds

    def needed(names: list[str]) -> int:
        return sum(widths[n] for n in names) + 3 * len(names) + 1  # padding and borders

    shown = [c for c, _ in cols]
    for drop in _DROP_ORDER:
        if width is None or needed(shown) <= width:
            break
        shown.remove(drop)
    caption = (
        "layers: decoder+MTP. download: the attention tensors an analysis reads (FP8 scales and norms "
        "included), computed from config shapes" + ("; share: of the whole checkpoint." if "share" in shown else ".")
    )
    if "note" not in shown:
        caption += "".join(f"\n{row['alias']}: {row['note']}" for row in cells if row["note"])
    t = Table(
        title="Model aliases (MODEL also accepts a Hub repo id org/name or a local folder)",
        caption=caption,
        caption_justify="left",
    )
    for col, just in cols:
        if col not in shown:
            continue
        if col == "note":
            t.add_column(col, justify=just, overflow="fold", max_width=widths["note"])
        else:
            # Full width, never wrapped: names must stay copy-pasteable, numbers readable.
            t.add_column(col, justify=just, no_wrap=True, min_width=widths[col])
    for row in cells:
        t.add_row(*(row[c] for c in shown))
    return t
