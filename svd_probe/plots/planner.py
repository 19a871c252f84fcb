"""Shared-output-latent planner: what factoring the output projection through D dims costs and saves.

Today a layer's output projection maps the n heads' values (n·d_v wide) straight to the residual
stream (H wide): n·d_v·H weights. A shared output latent factors it as [n·d_v → D] then
[D → H]: n·d_v·D + D·H weights, the same number of multiply-adds per token. It pays off when
D < n·d_v·H / (n·d_v + H) (the break-even; 4,986.4 for DeepSeek-V3: n = 128, d_v = 128,
H = 7168). What it costs is the part of the output that no longer fits: the energy of the stacked
O (and fused VO) spectrum beyond rank D. The stacked spectra are of heads each divided by their
largest σ when the analysis normalized stacked heads, so "energy" here is the share of that
normalized stack, the question a shared latent asks (docs/reference.md §3).

FLOPs are per token and counted as 2 per multiply-add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from svd_probe.errors import MissingFigureData
from svd_probe.kinds import STACKED
from svd_probe.plots.style import si
from svd_probe.spectra.metrics import energy_kept_at_rank, energy_rank

# The energy error of the "D that keeps the energy" figures: D keeps 99% of Σσ² in every layer.
ENERGY_ERROR = 0.01


def output_params(n_heads: int, d_v: int, d_model: int, latent: int | None = None) -> int:
    """Weights of one layer's output projection, direct (latent None) or through a D-dim latent."""
    if latent is None:
        return n_heads * d_v * d_model
    return n_heads * d_v * latent + latent * d_model


def break_even_latent(n_heads: int, d_v: int, d_model: int) -> float:
    """The D at which the factored projection has as many weights as the direct one."""
    return n_heads * d_v * d_model / (n_heads * d_v + d_model)


# The default latent keeps at least this share of the output weights off: D ≤ 0.85 × break-even.
DEFAULT_CUT = 0.15


def default_latent(d_model: int, n_heads: int | None = None, d_v: int | None = None) -> int:
    """The planner's D when none is given: the smaller of 3/7 of d_model and 85% of the break-even.

    3/7 of d_model is the round figure of the public analyses: 3072 for DeepSeek-V3 (a 38% cut;
    break-even 4,986.4) and for Kimi-K2 (a 20% cut; break-even 3,822.9). It is not below the
    break-even of every model: the demo checkpoint (n = 4, d_v = 32, H = 320) has 3/7·H = 137
    against a break-even of 91.4, where a latent adds 50% weights and keeps energy that rank 128
    already holds. The weights after are D / break-even of those before, so D ≤ 0.85 × break-even
    always saves at least 15% (`DEFAULT_CUT`): 77 for the demo model, a 15.8% cut, while
    DeepSeek-V3 and Kimi-K2 keep 3072. D is rounded to a multiple of 64 from 512 wide (3/7·H to
    the nearest, the cap down), else to a whole number.

    Whether any D that saves weights also keeps enough energy is the data's to say:
    `plan_latent` notes it (`PlannerResult.latent_for_energy`).

    Args:
        d_model: residual width H.
        n_heads, d_v: heads and value width; without them only 3/7 of d_model is used.

    Returns:
        D, at least 1.

    Example:
        >>> default_latent(7168, 128, 128), default_latent(320, 4, 32)
        (3072, 77)
    """
    q = 64 if d_model >= 512 else 1
    latent = max(1, int(round(d_model * 3 / 7 / q)) * q)
    if n_heads and d_v:
        cap = (1 - DEFAULT_CUT) * break_even_latent(n_heads, d_v, d_model)
        if latent > cap:
            latent = int(cap // q) * q or int(cap) or 1
    return latent


@dataclass
class PlannerResult:
    """Per-layer and whole-model numbers of one latent size D for one model."""

    model: str
    latent: int
    n_heads: int
    d_v: int
    d_model: int
    num_layers: int  # layers the totals count (the model's, not only the cached ones)
    table: pd.DataFrame  # one row per cached layer
    sweep: pd.DataFrame = field(default_factory=pd.DataFrame)  # energy and cost against D
    notes: list[str] = field(default_factory=list)
    # Per kind (O, VO): the smallest D keeping 1 − ENERGY_ERROR of the energy in every cached layer.
    latent_for_energy: dict[str, int] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return output_params(self.n_heads, self.d_v, self.d_model)

    @property
    def params_after(self) -> int:
        return output_params(self.n_heads, self.d_v, self.d_model, self.latent)

    @property
    def param_change(self) -> float:
        """Relative change of output-projection weights (−0.384 is a 38.4% cut)."""
        return self.params_after / self.params_before - 1.0

    @property
    def break_even(self) -> float:
        return break_even_latent(self.n_heads, self.d_v, self.d_model)

    def totals(self) -> dict:
        t = self.table
        out = {
            "model": self.model,
            "latent": self.latent,
            "layers": self.num_layers,
            "layers_with_spectra": int(len(t)),
            "params_before": self.params_before * self.num_layers,
            "params_after": self.params_after * self.num_layers,
            "params_change": self.param_change,
            "flops_per_token_before": 2 * self.params_before * self.num_layers,
            "flops_per_token_after": 2 * self.params_after * self.num_layers,
            "break_even_latent": self.break_even,
        }
        for kind in ("O", "VO"):
            col = f"energy_kept_{kind}"
            vals = t[col].dropna() if col in t else pd.Series(dtype=float)
            out[f"{col}_min"] = float(vals.min()) if len(vals) else float("nan")
            out[f"{col}_mean"] = float(vals.mean()) if len(vals) else float("nan")
        return out

    def to_csv_frame(self) -> pd.DataFrame:
        """The per-layer table followed by one 'total' row (what the CSV holds)."""
        t = self.totals()
        total = {
            "model": self.model,
            "layer": "total",
            "latent": self.latent,
            "energy_kept_O": t["energy_kept_O_mean"],
            "energy_kept_VO": t["energy_kept_VO_mean"],
            "params_before": t["params_before"],
            "params_after": t["params_after"],
            "params_change": t["params_change"],
            "flops_per_token_before": t["flops_per_token_before"],
            "flops_per_token_after": t["flops_per_token_after"],
        }
        frame = self.table.astype({"layer": object})
        return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)


def plan_latent(analysis, latent: int | None = None, sweep_points: int = 64) -> PlannerResult:
    """Per-layer energy of stacked O and VO kept at rank `latent`, and the parameter arithmetic."""
    dims = analysis.dims
    missing = [k for k in ("n_heads", "d_v", "d_model") if not dims.get(k)]
    if missing:
        raise MissingFigureData(f"the cache manifest lacks model dims {', '.join(missing)}", analysis.analyze_command())
    n, d_v, H = int(dims["n_heads"]), int(dims["d_v"]), int(dims["d_model"])
    D = int(latent) if latent else default_latent(H, n, d_v)
    notes: list[str] = []
    break_even = break_even_latent(n, d_v, H)
    if D >= break_even:
        change = output_params(n, d_v, H, D) / output_params(n, d_v, H) - 1
        notes.append(
            f"{analysis.display}: a {D:,}-dim latent saves nothing: it is at or above the break-even "
            f"D = {break_even:,.1f} and has {change * 100:+.1f}% output weights; pick D < {break_even:,.1f}"
        )
    rows = []
    kinds_present = set(analysis.kinds("stacked"))
    for kind in ("O", "VO"):
        if kind not in kinds_present:
            notes.append(
                f"no stacked {kind} spectra cached: its energy column is empty (run: {analysis.analyze_command(matrices=kind)})"
            )
    before, after = output_params(n, d_v, H), output_params(n, d_v, H, D)
    for layer in analysis.layers:
        row = {"model": analysis.display, "layer": layer, "latent": D}
        for kind in ("O", "VO"):
            s = analysis.layer_spectra[layer].spectrum(STACKED, kind)
            row[f"energy_kept_{kind}"] = energy_kept_at_rank(s, D) if s is not None else np.nan
        row.update(
            params_before=before,
            params_after=after,
            params_change=after / before - 1.0,
            flops_per_token_before=2 * before,
            flops_per_token_after=2 * after,
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    latent_for_energy = _latent_for_energy(analysis)
    for kind, needed in latent_for_energy.items():
        if needed >= break_even:
            notes.append(
                f"{analysis.display}: no latent that saves weights keeps {100 * (1 - ENERGY_ERROR):g}% of the "
                f"stacked {kind} energy in every layer: that takes D ≥ {needed:,}, the break-even is {break_even:,.1f}"
            )
    num_layers = int(dims.get("num_layers") or len(analysis.layers))
    if num_layers != len(analysis.layers):
        notes.append(
            f"energies from {len(analysis.layers)} cached layers of {num_layers}; parameter totals count all {num_layers}"
        )
    return PlannerResult(
        model=analysis.display,
        latent=D,
        n_heads=n,
        d_v=d_v,
        d_model=H,
        num_layers=num_layers,
        table=table,
        sweep=_sweep(analysis, n, d_v, H, sweep_points),
        latent_for_energy=latent_for_energy,
        notes=notes,
    )


def _latent_for_energy(analysis) -> dict[str, int]:
    """Per kind (O, VO): the smallest D that keeps 1 − ENERGY_ERROR of the energy in every cached layer."""
    out = {}
    for kind in ("O", "VO"):
        found = (analysis.layer_spectra[ly].spectrum(STACKED, kind) for ly in analysis.layers)
        needed = [energy_rank(s, ENERGY_ERROR) for s in found if s is not None]
        if needed:
            out[kind] = int(max(needed))
    return out


def _sweep(analysis, n: int, d_v: int, H: int, points: int) -> pd.DataFrame:
    """Energy kept (min and median over layers) and relative weights, for D from 1 to min(H, n·d_v).

    Stacked O and VO have rank ≤ min(H, n·d_v): past it no energy is left to keep and the
    weights only grow (the break-even is always below it)."""
    ds = np.unique(np.linspace(1, min(H, n * d_v), points).round().astype(int))
    out = {"latent": ds, "params_ratio": [output_params(n, d_v, H, int(d)) / output_params(n, d_v, H) for d in ds]}
    for kind in ("O", "VO"):
        found = (analysis.layer_spectra[ly].spectrum(STACKED, kind) for ly in analysis.layers)
        spectra = [s for s in found if s is not None]
        if not spectra:
            continue
        # Cumulative energy per layer once, then read it at every D: one pass per layer, not per point.
        kept = np.array([_cumulative_energy(s, ds) for s in spectra])
        out[f"energy_kept_{kind}_min"] = kept.min(axis=0)
        out[f"energy_kept_{kind}_median"] = np.median(kept, axis=0)
    return pd.DataFrame(out)


def _cumulative_energy(sigma, ds: np.ndarray) -> np.ndarray:
    s2 = np.sort(np.asarray(sigma, dtype=np.float64) ** 2)[::-1]
    total = s2.sum()
    if total == 0:
        return np.ones(len(ds))
    cum = np.concatenate([[0.0], np.cumsum(s2)]) / total
    return cum[np.minimum(ds, len(s2))]


def planner_rich_table(results: list[PlannerResult]):
    """The summary the CLI prints: one column per model, totals over the whole model."""
    from rich.table import Table

    from svd_probe.report import terminal_text

    table = Table(title="Shared output latent: output projection n·d_v·H → n·d_v·D + D·H", title_justify="left")
    table.add_column("")
    for r in results:
        # The model's name is text, never console markup (`m[/]x` ended `plot` in a MarkupError).
        table.add_column(terminal_text(r.model), justify="right", overflow="fold")
    totals = [r.totals() for r in results]
    rows = [
        ("n · d_v · H", lambda r, t: f"{r.n_heads} · {r.d_v} · {r.d_model:,}"),
        ("latent D", lambda r, t: f"{r.latent:,}"),
        ("break-even D", lambda r, t: f"{t['break_even_latent']:,.1f}"),
        ("layers (with spectra)", lambda r, t: f"{t['layers']} ({t['layers_with_spectra']})"),
        ("output weights before", lambda r, t: si(t["params_before"])),
        ("output weights after", lambda r, t: si(t["params_after"])),
        (
            "change",
            lambda r, t: f"{t['params_change'] * 100:+.1f}%" + ("" if t["params_change"] < 0 else " (no saving)"),
        ),
        (
            "FLOP per token, before → after",
            lambda r, t: f"{si(t['flops_per_token_before'], 'FLOP')} → {si(t['flops_per_token_after'], 'FLOP')}",
        ),
        (f"D for {100 * (1 - ENERGY_ERROR):g}% energy, all layers, O / VO", lambda r, t: _latents(r)),
        ("stacked O energy kept, min / mean", lambda r, t: _pct_pair(t["energy_kept_O_min"], t["energy_kept_O_mean"])),
        (
            "stacked VO energy kept, min / mean",
            lambda r, t: _pct_pair(t["energy_kept_VO_min"], t["energy_kept_VO_mean"]),
        ),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(r, t) for r, t in zip(results, totals, strict=False)))
    return table


def _latents(r: PlannerResult) -> str:
    return " / ".join(f"{r.latent_for_energy[k]:,}" if k in r.latent_for_energy else "—" for k in ("O", "VO"))


def _pct_pair(a: float, b: float) -> str:
    if np.isnan(a):
        return "—"
    return f"{a * 100:.2f}% / {b * 100:.2f}%"
