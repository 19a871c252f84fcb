"""The alignment figure (`svd-probe align`, `svd-probe plot --kind alignment`).

Three panels, each against the random-subspace baseline √(max(a, b)/d) (`svd_probe.alignment`):
a head × head heat map of one layer's mean principal cosine between output subspaces; per layer
L → L+1, the RMS principal cosine between layer L's stacked output subspace and layer L+1's
read subspaces (Q, K, V; QA, KVA for MLA); per layer, each head's output subspace against its own
layer's stacked one (mean over heads, with the lowest and highest head). The figure returns its
data: the tidy rows it draws (`Alignment.frame`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from svd_probe.alignment import TARGETS, Alignment, random_rms_cosine
from svd_probe.plots import style

# Read targets: the kinds' own colours; the MLA latents' row spaces dashed.
_TARGET_STYLE = {"Q": ("Q", "-"), "K": ("K", "-"), "V": ("V", "-"), "QA": ("QA", "--"), "KVA": ("KVA", "--")}


def default_layer(alignment: Alignment) -> int:
    """The middle layer with results."""
    layers = sorted(alignment.layers)
    return layers[len(layers) // 2]


def alignment_figure(alignment: Alignment, layer: int | None = None, dpi: float = 100):
    """Heat map of head × head mean cosines at `layer` (default: the middle one), L → L+1 read
    alignment per layer, and head → own layer alignment per layer; a `FigureResult`."""
    from svd_probe.plots.figures import FigureResult

    layer = default_layer(alignment) if layer is None or layer not in alignment.layers else layer
    notes = list(alignment.notes)
    nxt = alignment.next_frame()
    hl = alignment.head_layer_frame()
    la = alignment.layers[layer]
    mean = la.pairs["mean"]
    n, d, rh = mean.shape[0], la.d_model, int(la.ranks.get("head", 0))
    with style.plot_style():
        fig = style.new_figure(13.0, 4.2, dpi)
        ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.0, 1.3, 1.3]})
        im = ax1.imshow(mean, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax1, shrink=0.85, label="mean principal cosine")
        ax1.set_xlabel("head")
        ax1.set_ylabel("head")
        ax1.grid(False)
        base_h = random_rms_cosine(rh, rh, d)
        off = mean[~np.eye(n, dtype=bool)] if n > 1 else np.array([np.nan])
        ax1.set_title(
            f"layer {layer}: head output subspaces (r = {rh})\noff-diagonal mean {np.nanmean(off):.3f}, random ≈ {base_h:.3f}"
        )

        if len(nxt):
            present = [t for t in TARGETS if t in set(nxt["target"])]
            for target in present:
                rows = nxt[nxt["target"] == target]
                kind, ls = _TARGET_STYLE.get(target, (target, "-"))
                ax2.plot(
                    rows["other_layer"],
                    rows["rms_cos"],
                    marker="o",
                    ms=3,
                    ls=ls,
                    color=style.kind_color(kind),
                    label=target,
                )
            ax2.plot(nxt["other_layer"], nxt["random_rms_cos"], color="0.4", lw=1.0, ls=":", label="random √(r/d)")
            ax2.legend(fontsize=7, ncol=2)
        else:
            notes.append(f"{alignment.model}: no consecutive layers aligned, the L → L+1 panel is empty")
            ax2.text(0.5, 0.5, "needs two consecutive layers", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xlabel("layer L+1 (reading)")
        ax2.set_ylabel("RMS principal cosine")
        ax2.set_ylim(0, 1.02)
        ax2.set_title(f"layer L's stacked {alignment.write} output vs layer L+1's read subspaces")

        per = hl.groupby("layer")["rms_cos"].agg(["mean", "min", "max"]).reset_index()
        base = hl.groupby("layer")["random_rms_cos"].first().reindex(per["layer"]).to_numpy()
        c = style.kind_color(alignment.write)
        ax3.fill_between(per["layer"], per["min"], per["max"], color=c, alpha=0.2, lw=0, label="lowest–highest head")
        ax3.plot(per["layer"], per["mean"], color=c, marker="o", ms=3, label="mean over heads")
        ax3.plot(per["layer"], base, color="0.4", lw=1.0, ls=":", label="random √(r/d)")
        ax3.set_xlabel("layer")
        ax3.set_ylabel("RMS principal cosine")
        ax3.set_ylim(0, 1.02)
        ax3.set_title(f"each head's {alignment.write} output vs its layer's stacked subspace")
        ax3.legend(fontsize=7)
        for ax in (ax1, ax2, ax3):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
        what = f"Subspace alignment in the residual stream (d = {d:,}, rank r = {alignment.rank})"
        style.literal_suptitle(fig, what + f"\n{alignment.model} ({alignment.commit[:8]}; {_options(alignment)})")
    heat = pd.DataFrame(
        [
            {"comparison": "head_pair", "layer": layer, "head": i, "other_head": j, "mean_cos": float(mean[i, j])}
            for i in range(n)
            for j in range(n)
        ]
    )
    data = pd.concat([heat, nxt, hl], ignore_index=True)
    stem = f"alignment-{alignment.write}-r{alignment.rank}"
    return FigureResult("alignment", stem, fig, data, notes, {"layer": layer, "alignment": alignment})


def _options(alignment: Alignment) -> str:
    o = alignment.options
    return (
        ("norms folded" if o.fold_norms else "norms not folded")
        + ", "
        + ("heads normalized before stacking" if o.normalize_stacked else "raw heads stacked")
    )
