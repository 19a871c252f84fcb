"""Rows and the rich table of `svd-probe models`."""

from __future__ import annotations

from rich.table import Table

from svd_probe.hub.known_configs import (
    CHECKPOINT_BYTES,
    KNOWN_CONFIGS,
    analysis_bytes,
    attention_bytes_per_layer,
    attention_dtype,
    is_mla,
    num_attention_layers,
)
from svd_probe.models import ALIASES


def model_table() -> list[dict]:
    """One JSON-ready row per alias, in ALIASES order. Sizes are computed from config shapes."""
    rows = []
    for alias, a in ALIASES.items():
        cfg = KNOWN_CONFIGS.get(alias)
        if cfg is None:  # an alias added without config facts still shows up
            rows.append({"alias": alias, "repo_id": a.repo_id, "note": a.note})
            continue
        total = analysis_bytes(cfg)
        ckpt = CHECKPOINT_BYTES.get(alias)
        rows.append(
            {
                "alias": alias,
                "repo_id": a.repo_id,
                "model_type": cfg["model_type"],
                "attention": "MLA"
                if is_mla(cfg)
                else (
                    "MHA"
                    if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) == cfg["num_attention_heads"]
                    else "GQA"
                ),
                "heads": cfg["num_attention_heads"],
                "kv_heads": None if is_mla(cfg) else cfg.get("num_key_value_heads"),
                "layers": num_attention_layers(cfg),
                "mtp_layers": int(cfg.get("num_nextn_predict_layers") or 0),
                "attention_dtype": attention_dtype(cfg),
                "bytes_per_layer": attention_bytes_per_layer(cfg),
                "analysis_bytes": total,
                "checkpoint_bytes": ckpt,
                "note": a.note,
            }
        )
    return rows


def _gb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.1f} GB"


def render_model_table(rows: list[dict]) -> Table:
    t = Table(
        title="Model aliases (MODEL also accepts a Hub repo id org/name or a local folder)",
        caption="layers: decoder+MTP. download: the attention tensors an analysis reads (FP8 scales and norms "
        "included), computed from config shapes; share: of the whole checkpoint.",
    )
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
            [
                r["alias"],
                r["repo_id"],
                r.get("attention", ""),
                heads,
                layers,
                r.get("attention_dtype", ""),
                _gb(r.get("analysis_bytes")),
                share,
                r.get("note", ""),
            ]
        )
    # Numbers and dtypes keep their full width on narrow terminals (min_width); names fold
    # character-wise instead of being cut with an ellipsis, so they stay copy-pasteable.
    cols = [
        ("alias", "left", None),
        ("repo id", "left", "fold"),
        ("attn", "left", None),
        ("heads", "right", None),
        ("layers", "right", None),
        ("dtype", "left", None),
        ("download", "right", None),
        ("share", "right", None),
        ("note", "left", "fold"),
    ]
    for i, (col, just, overflow) in enumerate(cols):
        if overflow:
            # The note is rare and long: cap it so the repo ids get the room.
            t.add_column(col, justify=just, overflow=overflow, max_width=14 if col == "note" else None)
        else:
            width = max([len(col)] + [len(c[i]) for c in cells])
            t.add_column(col, justify=just, no_wrap=True, min_width=width)
    for c in cells:
        t.add_row(*c)
    return t
