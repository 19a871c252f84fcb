"""Input-latent planner: how narrow a shared key-value (and query) latent could be, per layer.

MHA2MLA and TransMLA convert MHA/GQA models to MLA by factoring the joint key-value map
[W_K; W_V] through a rank-r latent; the same spectrum of an MLA model says how much of its own
latent the keys and values use. Both read the `layer.KVjoint` and `layer.Qjoint` spectra
(docs/reference.md §3): the rank that keeps a share `energy` of Σσ² (docs/reference.md §4:
the energy rank at error 1 − energy) is the latent width r.

Per layer and token, with b bytes per cached element (BF16, the default: b = 2; docs/reference.md §7):

    KV cache, MHA/GQA   2·g·d_head·b  (g·(d_qk + d_v)·b)  →  r·b
    KV cache, MLA       (kv_lora_rank + d_rope)·b         →  (r + d_rope)·b
    weights             R·H (or ℓ·H + R·ℓ through the model's latent ℓ)  →  r·H + R·r

where H is d_model, R the rows of the joint map (KVjoint: g·(d_qk + d_v), MLA n·(d_qk + d_v);
Qjoint: n·d_qk) and ℓ the model's own latent (MLA: kv_lora_rank, q_lora_rank), so "before" is
what the model stores today. MHA/GQA latents count every key dimension, RoPE included: a
conversion that keeps d_r RoPE dimensions decoupled (as MLA does) caches d_r more per token.
The MLA RoPE key (kv_a_proj_with_mqa's last d_rope rows) is cached as it is, before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from svd_probe.errors import BadOptionError, MissingFigureData
from svd_probe.kinds import LAYER
from svd_probe.plots import style
from svd_probe.spectra.metrics import energy_rank

# Bytes per cached element of the KV cache dtypes the planner prices.
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
DEFAULT_KV_DTYPE = "bf16"
DEFAULT_ENERGY = 0.99
# Encoders keep no KV cache: their bytes are what a decoder of the same shape would cache.
_ENCODERS = ("bert", "svd_probe_encoder")


def joint_params(rows: int, d_model: int, latent: int | None = None) -> int:
    """Weights of a map [rows, d_model]: direct (latent None) or through a rank-`latent` factor pair
    (down [latent, d_model] + up [rows, latent]).

    Example:
        >>> joint_params(2048, 4096), joint_params(2048, 4096, 512)  # Llama-3.1-8B's W_K, W_V
        (8388608, 3145728)
    """
    return rows * d_model if latent is None else latent * (rows + d_model)


def kv_cache_elements(dims: dict, rank: int | None = None) -> int:
    """Cached elements per token per layer: the model's own cache (rank None) or a rank-r latent's.

    MHA/GQA: g·(d_qk + d_v) today, r with a latent. MLA: kv_lora_rank + d_rope, r + d_rope.

    Example:
        >>> v3 = dict(n_kv_groups=128, d_qk=128, d_v=128, d_rope=64, kv_latent=512)
        >>> kv_cache_elements(v3), kv_cache_elements(v3, 256)
        (576, 320)
    """
    kvl = dims.get("kv_latent")
    if kvl:
        return int(kvl if rank is None else rank) + int(dims.get("d_rope") or 0)
    own = int(dims["n_kv_groups"]) * (int(dims["d_qk"]) + int(dims["d_v"]))
    return own if rank is None else int(rank)


@dataclass
class KVPlan:
    """The planner's numbers for one model at one energy: `table` has one row per cached layer."""

    model: str
    energy: float
    kv_dtype: str
    dims: dict
    num_layers: int
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_element(self) -> int:
        return KV_DTYPE_BYTES[self.kv_dtype]

    @property
    def is_mla(self) -> bool:
        return bool(self.dims.get("kv_latent"))

    def cache_formula(self) -> str:
        """The KV-cache arithmetic of this model, with its numbers."""
        d, b = self.dims, self.bytes_per_element
        if self.is_mla:
            return f"(kv_lora {d['kv_latent']} + rope {d.get('d_rope') or 0})·{b} B → (r + rope)·{b} B"
        g, dk, dv = d["n_kv_groups"], d["d_qk"], d["d_v"]
        head = f"2·{g}·{dk}" if dk == dv else f"{g}·({dk}+{dv})"
        return f"{head}·{b} B → r·{b} B"

    def totals(self) -> dict:
        """Sums over the cached layers (ranks too: the elements a token's latents hold)."""
        t = self.table
        out: dict = {"model": self.model, "layer": "total", "energy": self.energy}
        for col in t.columns:
            if col in ("model", "layer", "energy") or col.endswith("_change") or col.endswith("_frac"):
                continue
            out[col] = int(t[col].sum()) if len(t) else 0
        out["kv_cache_saved_frac"] = _ratio(out.get("kv_cache_saved", 0), out.get("kv_cache_bytes_before", 0))
        out["kv_params_change"] = _ratio(out.get("kv_params_after", 0), out.get("kv_params_before", 0)) - 1.0
        out["q_params_change"] = _ratio(out.get("q_params_after", 0), out.get("q_params_before", 0)) - 1.0
        return out

    def to_csv_frame(self) -> pd.DataFrame:
        """The per-layer table followed by one 'total' row (what the CSV holds)."""
        frame = self.table.astype({"layer": object})
        return pd.concat([frame, pd.DataFrame([self.totals()])], ignore_index=True)


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def plan_kv_latent(analysis, energy: float = DEFAULT_ENERGY, kv_dtype: str = DEFAULT_KV_DTYPE) -> KVPlan:
    """Per-layer latent ranks of the joint KV and query maps at `energy`, with cache and weight arithmetic.

    Args:
        analysis: a loaded `Analysis` with `layer.KVjoint` (and, for the query columns,
            `layer.Qjoint`) spectra cached.
        energy: the share of Σσ² the latent keeps (0.99: rank at 1% error).
        kv_dtype: the cache dtype the bytes are priced in (`KV_DTYPE_BYTES`: bf16, fp16, fp8, fp32).

    Returns:
        A `KVPlan`; `plan.to_csv_frame()` is the table with its total row.

    Raises `MissingFigureData` (hint: the analyze command) when no KVjoint spectrum is cached.

    Example:
        >>> plan = plan_kv_latent(load_analysis("llama-3.1-8b"), energy=0.99)
        >>> plan.totals()["kv_cache_saved_frac"]
    """
    if not 0.0 < energy < 1.0:
        raise BadOptionError(f"--energy must be in (0, 1), got {energy}", "Use e.g. --energy 0.99.")
    if kv_dtype not in KV_DTYPE_BYTES:
        raise BadOptionError(f"unknown KV-cache dtype {kv_dtype!r}", "Choose from " + ", ".join(KV_DTYPE_BYTES) + ".")
    dims = analysis.dims
    missing = [k for k in ("n_kv_groups", "d_qk", "d_v", "d_model") if not dims.get(k)]
    if missing:
        raise MissingFigureData(f"the cache manifest lacks model dims {', '.join(missing)}", analysis.analyze_command())
    layers = [ly for ly in analysis.layers if analysis.layer_spectra[ly].spectrum(LAYER, "KVjoint") is not None]
    if not layers:
        raise MissingFigureData(
            f"{analysis.display}: no layer KVjoint spectra cached, needed for the KV planner",
            analysis.analyze_command(matrices="KVjoint,Qjoint"),
        )
    b = KV_DTYPE_BYTES[kv_dtype]
    error = 1.0 - energy
    H = int(dims["d_model"])
    own_kv = kv_cache_elements(dims)
    kv_latent, q_latent = dims.get("kv_latent"), dims.get("q_latent")
    rows = []
    notes: list[str] = []
    for layer in layers:
        ls = analysis.layer_spectra[layer]
        s_kv = ls.spectrum(LAYER, "KVjoint")
        kv_rows = ls.matrix_shape(LAYER, "KVjoint")[0] if ls.matrix_shape(LAYER, "KVjoint") else len(s_kv)
        r_kv = energy_rank(s_kv, error)
        row = {
            "model": analysis.display,
            "layer": layer,
            "energy": energy,
            "kv_rank": r_kv,
            "kv_cache_bytes_before": own_kv * b,
            "kv_cache_bytes_after": kv_cache_elements(dims, r_kv) * b,
        }
        row["kv_cache_saved"] = row["kv_cache_bytes_before"] - row["kv_cache_bytes_after"]
        row["kv_cache_saved_frac"] = _ratio(row["kv_cache_saved"], row["kv_cache_bytes_before"])
        row["kv_params_before"] = joint_params(kv_rows, H, kv_latent)
        row["kv_params_after"] = joint_params(kv_rows, H, r_kv)
        row["kv_params_change"] = row["kv_params_after"] / row["kv_params_before"] - 1.0
        s_q = ls.spectrum(LAYER, "Qjoint")
        if s_q is not None:
            shape = ls.matrix_shape(LAYER, "Qjoint")
            q_rows = shape[0] if shape else len(s_q)
            r_q = energy_rank(s_q, error)
            row.update(
                q_rank=r_q,
                q_params_before=joint_params(q_rows, H, q_latent),
                q_params_after=joint_params(q_rows, H, r_q),
            )
            row["q_params_change"] = row["q_params_after"] / row["q_params_before"] - 1.0
        rows.append(row)
    table = pd.DataFrame(rows)
    if "q_rank" in table and table["q_rank"].isna().any():
        notes.append(f"{analysis.display}: some layers have no Qjoint spectrum: their query columns are empty")
    elif "q_rank" not in table:
        notes.append(
            f"{analysis.display}: no Qjoint spectra cached (run: {analysis.analyze_command(matrices='Qjoint')})"
        )
    num_layers = int(dims.get("num_layers") or len(layers))
    if len(layers) != num_layers:
        notes.append(f"KV planner totals over {len(layers)} cached layers of {num_layers}")
    if dims.get("model_type") in _ENCODERS:
        notes.append(f"{analysis.display} is an encoder and keeps no KV cache: the bytes are a decoder's of its shape")
    return KVPlan(analysis.display, energy, kv_dtype, dict(dims), num_layers, table, notes)


def kv_planner_figure(analysis, energy: float = DEFAULT_ENERGY, kv_dtype: str = DEFAULT_KV_DTYPE, dpi: float = 100):
    """Latent rank per layer of the joint KV and query maps at `energy`, against the model's own
    widths; returns a `FigureResult` whose data is the planner's table with its total row."""
    from matplotlib.ticker import MaxNLocator

    from svd_probe.plots.figures import FigureResult

    plan = plan_kv_latent(analysis, energy, kv_dtype)
    t, dims, tot = plan.table, plan.dims, plan.totals()
    with style.plot_style():
        fig = style.new_figure(7.5, 3.8, dpi)
        ax = fig.add_subplot(1, 1, 1)
        kv_c, q_c = style.kind_color("KVjoint"), style.kind_color("Qjoint")
        ax.plot(t["layer"], t["kv_rank"], marker="o", ms=3, lw=1.3, color=kv_c, label="KVjoint rank r")
        own = int(dims["kv_latent"]) if plan.is_mla else kv_cache_elements(dims)
        what = "kv_lora_rank" if plan.is_mla else "today's KV cache, 2·g·d_head"
        ax.axhline(own, color=kv_c, ls="--", lw=1.0, label=f"{what} = {own:,}")
        if "q_rank" in t:
            ax.plot(t["layer"], t["q_rank"], marker="s", ms=3, lw=1.0, color=q_c, label="Qjoint rank")
            if dims.get("q_latent"):
                ax.axhline(
                    int(dims["q_latent"]), color=q_c, ls="--", lw=1.0, label=f"q_lora_rank = {dims['q_latent']:,}"
                )
        mtp = int(dims.get("num_mtp_layers") or 0)
        first_mtp = int(dims.get("num_layers") or 0) - mtp
        if mtp and (t["layer"] >= first_mtp).any():
            ax.axvspan(first_mtp - 0.5, first_mtp + mtp - 0.5, color="0.5", alpha=0.12, lw=0, label="MTP layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(f"rank keeping {style.pct(energy)} of Σσ²")
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=7)
        ax.set_title(
            f"KV cache per token and layer {plan.cache_formula()}; all cached layers: "
            f"{tot['kv_cache_bytes_before']:,} B → {tot['kv_cache_bytes_after']:,} B "
            f"({tot['kv_cache_saved_frac'] * 100:.1f}% saved, {kv_dtype.upper()})",
            loc="left",
            fontsize=8,
        )
        what = "Input-latent planner: ranks of the joint key-value and query maps"
        style.literal_suptitle(fig, style.title(analysis, what, f"energy {energy:g}"))
    stem = "kv-planner-E" + f"{energy:g}".replace(".", "p")
    return FigureResult("kv-planner", stem, fig, plan.to_csv_frame(), list(plan.notes), {"plan": plan})


def kv_planner_rich_table(plan: KVPlan):
    """The per-layer table the CLI prints, readable at 80 columns, with the total row last."""
    from rich import box
    from rich.table import Table

    from svd_probe.report import terminal_text

    table = Table(
        # The model's name is text, never console markup (`m[/]x` ended `plot` in a MarkupError).
        title=terminal_text(
            f"{plan.model}: joint KV / Q latent at {plan.energy:g} energy, KV cache {plan.kv_dtype.upper()}"
        ),
        caption=f"KV cache per token and layer: {plan.cache_formula()}\n"
        + ("weights ℓ·(R+H) (ℓ: the model's latent) → r·(R+H)" if plan.is_mla else "weights R·H → r·(R+H)"),
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in ("layer", "KV r", "cache B/tok", "saved", "KV wts", "Q r", "Q wts"):
        table.add_column(name, justify="right", no_wrap=True)
    has_q = "q_rank" in plan.table

    def cells(row: dict) -> list[str]:
        q = has_q and not pd.isna(row.get("q_rank", np.nan))
        return [
            str(row["layer"]),
            f"{int(row['kv_rank']):,}",
            f"{int(row['kv_cache_bytes_before']):,}→{int(row['kv_cache_bytes_after']):,}",
            f"{row['kv_cache_saved_frac'] * 100:.1f}%",
            f"{row['kv_params_change'] * 100:+.1f}%",
            f"{int(row['q_rank']):,}" if q else "—",
            f"{row['q_params_change'] * 100:+.1f}%" if q else "—",
        ]

    for row in plan.table.to_dict("records"):
        table.add_row(*cells(row))
    total = plan.totals()
    table.add_section()
    table.add_row(*cells({**total, "q_rank": total.get("q_rank", np.nan) if has_q else np.nan}), style="bold")
    return table
