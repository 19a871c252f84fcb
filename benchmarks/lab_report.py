"""Figures and tables of one training-lab experiment (the folder `benchmarks/lab_gpu.py` writes).

Reads `curves.json` (the training loss every `--log-every` steps of each run) and
`spectra.jsonl.gz` (the singular values of every trained model's attention, from `svd-probe
analyze`) and writes

    IMG_DIR/lab-curves.png   pretraining loss per configuration: the mean over seeds, thin lines
                             per seed; mla-o --init-from mla drawn after its mla source's steps
    IMG_DIR/lab-ranks.png    stacked O and VO rank at 1% energy error per layer and configuration
                             (mean over seeds, bars the range), and mla-o's stacked O rank alone:
                             the output-latent dimensions it uses, out of o_latent

then prints markdown tables of those ranks. `--json FILE` also writes every run's ranks.

    PYTHONPATH=. python benchmarks/lab_report.py benchmarks/results/h200-2026-12-02/lab \
        --img-dir docs/img

Ranks come from `svd_probe.spectra.metrics.energy_rank`, the function behind every rank the
project reports. The mla sources of `--init-from` (half the steps, never fine-tuned) are left
out: their curve is drawn as the first half of the init-from configuration's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from svd_probe.plots.style import new_figure, plot_style, rank_at
from svd_probe.spectra.metrics import energy_rank

ERROR = 0.01
RUN = re.compile(r"^(?P<objective>mlm|clm)-(?P<config>.+)-seed(?P<seed>\d+)$")
SOURCE, INIT = "mla-src", "mlao-init"
# Run-name config → label, in the order of the tables and legends.
LABELS = {
    "mha": "mha",
    "mla": "mla",
    "mlao": "mla-o",
    "mlao-rms": "mla-o rms",
    "mlao-rmsph": "mla-o rms-per-head",
    INIT: "mla-o ← mla (init-from)",
}
COLORS = {
    "mha": "#000000",
    "mla": "#0072B2",
    "mlao": "#D55E00",
    "mlao-rms": "#009E73",
    "mlao-rmsph": "#CC79A7",
    INIT: "#E69F00",
}
MATRICES = ("O", "VO")


def parse_run(name: str) -> tuple[str, str, int] | None:
    m = RUN.match(name)
    return (m["objective"], m["config"], int(m["seed"])) if m else None


def load(folder: Path) -> tuple[dict, list[dict]]:
    curves = json.loads((folder / "curves.json").read_text())
    with gzip.open(folder / "spectra.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return curves, rows


def run_ranks(rows: list[dict], error: float = ERROR) -> dict[str, dict[str, dict[int, int]]]:
    """{run: {matrix: {layer: rank at `error`}}} of the stacked O and VO rows."""
    out: dict[str, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["scope"] == "stacked" and r["matrix"] in MATRICES and r.get("head") is None:
            out[r["run"]][r["matrix"]][int(r["layer"])] = energy_rank(r["sigma"], error)
    return {k: dict(v) for k, v in out.items()}


def by_config(ranks: dict, objective: str = "mlm") -> dict[str, dict[str, np.ndarray]]:
    """{config: {matrix: array [seeds, layers]}} in LABELS order, sources left out."""
    grouped: dict[str, dict[str, list[list[int]]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(ranks):
        p = parse_run(run)
        if p is None or p[0] != objective or p[1] not in LABELS:
            continue
        for m in MATRICES:
            layers = ranks[run].get(m, {})
            grouped[p[1]][m].append([layers[i] for i in sorted(layers)])
    return {c: {m: np.array(grouped[c][m]) for m in MATRICES} for c in LABELS if c in grouped}


def config_curves(curves: dict, objective: str = "mlm") -> dict[str, list[np.ndarray]]:
    """{config: [array [points, 2] (step, loss) per seed]}; init-from runs follow their source."""
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for run in sorted(curves):
        p = parse_run(run)
        if p is None or p[0] != objective or p[1] not in LABELS:
            continue
        pts = np.array(curves[run]["pretrain"], dtype=float)
        if p[1] == INIT:
            src = curves.get(f"{objective}-{SOURCE}-seed{p[2]}")
            if not src:
                continue
            head = np.array(src["pretrain"], dtype=float)
            pts = np.vstack([head, pts + [head[-1, 0], 0.0]])
        out[p[1]].append(pts)
    return {c: out[c] for c in LABELS if c in out}


def curves_figure(curves: dict[str, list[np.ndarray]], title: str, switch: float | None = None, objective: str = "mlm"):
    """`switch`: the step where init-from's mla source hands over to mla-o (a dotted line)."""
    with plot_style():
        fig = new_figure(7.5, 4.2)
        ax = fig.subplots()
        for c, seeds in curves.items():
            for pts in seeds:
                ax.plot(pts[:, 0], pts[:, 1], color=COLORS[c], lw=0.6, alpha=0.35)
            n = min(len(p) for p in seeds)
            steps = seeds[0][:n, 0]
            mean = np.mean([p[:n, 1] for p in seeds], axis=0)
            ax.plot(steps, mean, color=COLORS[c], lw=1.8, label=f"{LABELS[c]} (n={len(seeds)})")
        if switch is not None:
            ax.axvline(switch, color=COLORS[INIT], ls=":", lw=1)
            ax.annotate(" init-from: mla → mla-o", (switch, 7.6), color=COLORS[INIT], fontsize=8)
        ax.set_xlabel("pretraining step (batch 256 × 128 tokens)")
        ax.set_ylabel(f"training {objective.upper()} loss (mean over 25 steps)")
        ax.set_ylim(top=8.0)
        ax.set_title(title)
        ax.legend(loc="upper right")
    return fig


def ranks_figure(configs: dict[str, dict[str, np.ndarray]], o_latent: int, title: str):
    with plot_style():
        fig = new_figure(12, 4.4)
        axes = fig.subplots(1, 3)
        panels = [("O", configs, "stacked O"), ("VO", configs, "stacked VO")]
        latent = {c: v for c, v in configs.items() if c.startswith("mlao")}
        panels.append(("O", latent, f"mla-o latent dims used (stacked O; of {o_latent})"))
        for ax, (m, data, name) in zip(axes, panels, strict=True):
            for i, (c, arr) in enumerate(data.items()):
                a = arr[m]
                x = np.arange(a.shape[1]) + (i - (len(data) - 1) / 2) * 0.07
                mean = a.mean(axis=0)
                err = np.vstack([mean - a.min(axis=0), a.max(axis=0) - mean])
                ax.errorbar(
                    x,
                    mean,
                    yerr=err,
                    color=COLORS[c],
                    marker="o",
                    ms=3,
                    lw=1.2,
                    capsize=2,
                    label=f"{LABELS[c]} (n={a.shape[0]})",
                )
            ax.set_xlabel("layer")
            ax.set_ylabel(rank_at(ERROR))
            ax.set_title(name)
            ax.set_ylim(bottom=0)
        axes[2].axhline(o_latent, color="#7F7F7F", ls="--", lw=0.8)
        axes[2].set_ylim(0, o_latent + 4)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
        fig.suptitle(f"{title}: {rank_at(ERROR)} per layer (mean over seeds, bars min–max)")
    return fig


def markdown(configs: dict[str, dict[str, np.ndarray]]) -> str:
    """One table per matrix: rows layers, columns configs, cells 'mean [min–max]'."""
    out = []
    for m in MATRICES:
        out.append(f"Stacked {m}, {rank_at(ERROR)} (mean [min–max] over seeds):\n")
        out.append("| layer | " + " | ".join(f"{LABELS[c]} (n={v[m].shape[0]})" for c, v in configs.items()) + " |")
        out.append("| ---: |" + " ---: |" * len(configs))
        n_layers = max(v[m].shape[1] for v in configs.values())
        for layer in range(n_layers):
            cells = []
            for v in configs.values():
                col = v[m][:, layer]
                cells.append(f"{col.mean():.0f} [{col.min()}–{col.max()}]")
            out.append(f"| {layer} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="the lab folder (curves.json, spectra.jsonl.gz, results.json)")
    ap.add_argument("--img-dir", type=Path, default=Path("docs/img"), help="where the two PNGs go")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's ranks here")
    ap.add_argument("--title", default="H200, 2026-12-02: 640 steps × 256, WikiText-2 MLM")
    ap.add_argument(
        "--objective",
        choices=("mlm", "clm"),
        default="mlm",
        help="whose runs: mlm writes lab-curves.png and lab-ranks.png, clm lab-clm-curves.png "
        "(and lab-clm-ranks.png where the folder has their spectra)",
    )
    args = ap.parse_args(argv)
    missing = [n for n in ("curves.json", "spectra.jsonl.gz", "results.json") if not (args.folder / n).is_file()]
    if missing:
        print(f"error: {args.folder} lacks {', '.join(missing)}; give the folder lab_gpu.py wrote", file=sys.stderr)
        return 2
    try:
        curves, rows = load(args.folder)
        results = json.loads((args.folder / "results.json").read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.folder}: {e}", file=sys.stderr)
        return 2
    o_latent = next((r["config"]["o_latent"] for r in results if r["variant"] == "mla-o"), 64)
    obj = args.objective
    prefix = "lab" if obj == "mlm" else f"lab-{obj}"
    ranks = run_ranks(rows)
    configs = by_config(ranks, obj)
    by_run = config_curves(curves, obj)
    if not configs and (obj == "mlm" or not by_run):
        what = f"stacked O/VO spectra of {obj.upper()} runs in {args.folder}/spectra.jsonl.gz"
        print(f"error: no {what}" + ("" if obj == "mlm" else " and no learning curves"), file=sys.stderr)
        return 2
    args.img_dir.mkdir(parents=True, exist_ok=True)
    source_steps = [r["train_config"]["pretrain_steps"] for r in results if parse_run(r["run"]) and SOURCE in r["run"]]
    has_init = any(c == INIT for c in by_run)
    switch = float(source_steps[0]) if source_steps and has_init else None
    curves_figure(by_run, f"Pretraining loss, {args.title}", switch, obj).savefig(
        args.img_dir / f"{prefix}-curves.png", dpi=130
    )
    if not configs:  # curves only (runs cut before their spectra)
        print(f"no spectra of {obj.upper()} runs: wrote {args.img_dir / f'{prefix}-curves.png'} only")
        return 0
    ranks_figure(configs, o_latent, f"Trained attention, {args.title}").savefig(
        args.img_dir / f"{prefix}-ranks.png", dpi=130
    )
    if args.json:
        args.json.write_text(json.dumps({"error": ERROR, "ranks": ranks}, indent=1))
    print(markdown(configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
