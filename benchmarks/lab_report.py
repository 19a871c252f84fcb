"""Figures and tables of a training-lab experiment (the folders `benchmarks/lab_gpu.py` writes).

Takes one lab folder or several (the device calls of one experiment), pooling their runs by run
name (`mlm-mlao-rms-seed3`). A run name in two folders with equal metrics is one run; with
different metrics it is an error, unless `--prefer FOLDER` says which folder's copy wins (its
metrics, curve and spectra are used together). Reads `results.json`, `curves.json` (the training loss every `--log-every` steps of each run) and
`spectra.jsonl.gz` (the singular values of every trained model's attention, from `svd-probe
analyze`) and writes

    IMG_DIR/lab-curves.png   pretraining loss per configuration: the mean over seeds, thin lines
                             per seed; mla-o --init-from mla drawn after its mla source's steps
    IMG_DIR/lab-ranks.png    stacked O and VO rank at 1% energy error per layer and configuration
                             (mean over seeds, bars the range), and mla-o's stacked O rank alone:
                             the output-latent dimensions it uses, out of o_latent

then prints markdown tables of those ranks. `--json FILE` also writes every run's ranks.
`--compare rich|markdown|json` also prints the tables of `svd-probe compare` (mean ± std per
configuration; per pair the paired-by-seed difference with a Student-t 95% interval), computed by
`svd_probe.train.compare` from the pooled `results.json` rows of the objective (sources left out,
as in the `compare.txt` of each folder).

    PYTHONPATH=. python benchmarks/lab_report.py benchmarks/results/h200-2026-12-02/lab \
        benchmarks/results/h200-2026-12-02c/lab benchmarks/results/h200-2026-12-02d/lab \
        --prefer benchmarks/results/h200-2026-12-02d/lab --img-dir docs/img --compare markdown

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
from svd_probe.train import compare

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
FILES = ("curves.json", "spectra.jsonl.gz", "results.json")


class PoolError(ValueError):
    """Runs of one name in several folders with different metrics, and no --prefer for them."""


def parse_run(name: str) -> tuple[str, str, int] | None:
    m = RUN.match(name)
    return (m["objective"], m["config"], int(m["seed"])) if m else None


def load(folder: Path) -> tuple[dict, list[dict]]:
    curves = json.loads((folder / "curves.json").read_text())
    with gzip.open(folder / "spectra.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return curves, rows


def pool(
    folders: list[Path], prefer: list[Path] | None = None, objective: str | None = None
) -> tuple[dict, list[dict], list[dict], list[str]]:
    """(curves, spectra rows, results, notes) of several lab folders, pooled by run name; with
    `objective`, of the runs of that objective only (`mlm-...` or `clm-...`).

    Each run comes from one folder (its metrics, curve and spectra together): the only folder
    that has it; else the first folder of `prefer` that has it; else, where its metrics are equal
    in every folder, the first listed. Runs of one name with different metrics and no such
    folder raise PoolError. A run with a curve but no metrics (cut before the end) is taken the
    same way, by its curve. `notes` says, per duplicate, which folder was used and why.
    """
    order = [p.resolve() for p in prefer or []]
    loaded = []
    for folder in folders:
        curves, rows = load(folder)
        results = json.loads((folder / "results.json").read_text())
        loaded.append((folder, curves, rows, {r["run"]: r for r in results}))
    names = dict.fromkeys(
        n for _, c, _, res in loaded for n in [*res, *c] if objective is None or n.startswith(f"{objective}-")
    )
    chosen: dict[str, int] = {}
    notes, clashes = [], []
    for name in names:
        holders = [i for i, (_, c, _, res) in enumerate(loaded) if name in res]
        what = "metrics"
        if not holders:  # a curve only
            holders = [i for i, (_, c, _, _) in enumerate(loaded) if name in c]
            what = "curves"
        if len(holders) == 1:
            chosen[name] = holders[0]
            continue
        copies = [loaded[i][3][name] if what == "metrics" else loaded[i][1][name] for i in holders]
        where = ", ".join(str(loaded[i][0]) for i in holders)
        preferred = [i for p in order for i in holders if loaded[i][0].resolve() == p]
        if preferred:
            chosen[name] = preferred[0]
            notes.append(f"{name}: in {where}; used {loaded[preferred[0]][0]} (--prefer)")
        elif all(c == copies[0] for c in copies[1:]):
            chosen[name] = holders[0]
            notes.append(f"{name}: in {where} with equal {what}; used {loaded[holders[0]][0]}")
        else:
            differ = sorted({k for c in copies for k in c if c.get(k) != copies[0].get(k)}) if what == "metrics" else []
            clashes.append(f"{name} ({where}" + (f"; differ in {', '.join(differ)})" if differ else ")"))
    if clashes:
        raise PoolError(
            "runs of one name with different "
            + "metrics in several folders: "
            + "; ".join(clashes)
            + ". Say which folder wins with --prefer FOLDER"
        )
    curves_out, rows_out, results_out = {}, [], []
    for name, i in chosen.items():
        _, c, _, res = loaded[i]
        if name in c:
            curves_out[name] = c[name]
        if name in res:
            results_out.append(res[name])
    for i, (_, _, rows, _) in enumerate(loaded):
        rows_out += [r for r in rows if chosen.get(r["run"]) == i]
    return curves_out, rows_out, results_out, notes


def compared_runs(results: list[dict], objective: str) -> list[dict]:
    """The rows `compare` pools: the objective's runs, its mla sources and tagged runs left out."""
    out = []
    for r in results:
        p = parse_run(r.get("run", ""))
        if p is not None and p[0] == objective and p[1] != SOURCE:
            out.append(r)
    return out


def short_labels(runs: list[dict]) -> dict[str, str]:
    """compare's configuration label → this report's (`mla-o q64 kv32 o64 rope32 rms` → `mla-o rms`)."""
    out = {}
    for r in runs:
        p = parse_run(r["run"])
        if p is not None and p[1] in LABELS:
            out[compare.config_label(r)] = LABELS[p[1]]
    return out


def compare_markdown(comp: dict, labels: dict[str, str]) -> str:
    """`compare`'s two tables per objective as markdown, cells formatted as `svd-probe compare` does."""
    out = []
    for objective in ("mlm", "clm"):
        rows = [r for r in comp["configs"] if r["objective"] == objective]
        if not rows:
            continue
        fields = compare.PRETRAIN_FIELDS[objective] + compare.COMMON_FIELDS
        extra = [("mlm_loss", "MLM loss", 1, 3)] if objective == "mlm" else []
        heads = [h for _, h, _, _ in fields[:1] + extra + fields[1:]]
        out.append(f"{objective.upper()}: mean ± std over seeds\n")
        out.append("| configuration | n | seeds | parameters | " + " | ".join(heads) + " |")
        out.append("| --- | ---: | --- | ---: |" + " ---: |" * len(heads))
        for r in rows:
            cells = [compare._pm(r[f], r[f + "_std"], sc, d) for f, _, sc, d in fields[:1] + extra + fields[1:]]
            seeds = ",".join(map(str, r["seeds"]))
            params = f"{r['parameters']:,}" if r.get("parameters") else "—"
            out.append(
                f"| {labels.get(r['label'], r['label'])} | {r['n']} | {seeds} | {params} | " + " | ".join(cells) + " |"
            )
        compared = compare.compared_fields(objective)
        pairs = compare.pair_rows(comp, objective)
        if pairs:
            out.append(f"\n{objective.upper()}: differences, first − second (paired by seed, Student t 95%)\n")
            out.append("| first − second | n | " + " | ".join(f"Δ {h} [95%]" for _, h, _, _ in compared) + " |")
            out.append("| --- | ---: |" + " ---: |" * len(compared))
            for a, b, n, cells in pairs:
                name = f"{labels.get(a, a)} − {labels.get(b, b)}"
                out.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


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
    ap.add_argument(
        "folders",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="lab folders (curves.json, spectra.jsonl.gz, results.json); several are pooled by run name",
    )
    ap.add_argument(
        "--prefer",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="for a run name in several folders with different metrics, use this folder's copy "
        "(repeatable: the first listed that has the run wins)",
    )
    ap.add_argument("--img-dir", type=Path, default=Path("docs/img"), help="where the two PNGs go")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's ranks here")
    ap.add_argument("--title", default=None, help="default: H200, 2026-12-02: 640 steps × 256, WikiText-2 MLM (or CLM)")
    ap.add_argument(
        "--objective",
        choices=("mlm", "clm"),
        default="mlm",
        help="whose runs: mlm writes lab-curves.png and lab-ranks.png, clm lab-clm-curves.png "
        "(and lab-clm-ranks.png where the folder has their spectra)",
    )
    ap.add_argument(
        "--compare",
        choices=("rich", "markdown", "json"),
        default=None,
        help="also print svd-probe compare's tables of the pooled runs of the objective: as "
        "`svd-probe compare` prints them (rich), as markdown, or its JSON",
    )
    args = ap.parse_args(argv)
    for folder in args.folders:
        missing = [n for n in FILES if not (folder / n).is_file()]
        if missing:
            print(f"error: {folder} lacks {', '.join(missing)}; give the folder lab_gpu.py wrote", file=sys.stderr)
            return 2
    where = ", ".join(map(str, args.folders))
    try:
        curves, rows, results, notes = pool(args.folders, args.prefer, args.objective)
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: cannot read {where}: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    o_latent = next((r["config"]["o_latent"] for r in results if r["variant"] == "mla-o"), 64)
    obj = args.objective
    title = args.title or f"H200, 2026-12-02: 640 steps × 256, WikiText-2 {obj.upper()}"
    prefix = "lab" if obj == "mlm" else f"lab-{obj}"
    ranks = run_ranks(rows)
    configs = by_config(ranks, obj)
    by_run = config_curves(curves, obj)
    if not configs and (obj == "mlm" or not by_run):
        what = f"stacked O/VO spectra of {obj.upper()} runs in {where} (spectra.jsonl.gz)"
        print(f"error: no {what}" + ("" if obj == "mlm" else " and no learning curves"), file=sys.stderr)
        return 2
    args.img_dir.mkdir(parents=True, exist_ok=True)
    source_steps = [
        r["train_config"]["pretrain_steps"]
        for r in results
        if (p := parse_run(r["run"])) and p[0] == obj and p[1] == SOURCE
    ]
    has_init = any(c == INIT for c in by_run)
    switch = float(source_steps[0]) if source_steps and has_init else None
    curves_figure(by_run, f"Pretraining loss, {title}", switch, obj).savefig(
        args.img_dir / f"{prefix}-curves.png", dpi=130
    )
    if args.compare:
        runs = compared_runs(results, obj)
        comp = compare.comparison(runs)
        if args.compare == "json":
            print(json.dumps(comp, indent=1))
        elif args.compare == "markdown":
            print(compare_markdown(comp, short_labels(runs)))
        else:
            from rich.console import Console

            console = Console(width=160)
            for table in compare.render_tables(comp):
                console.print(table)
    if not configs:  # curves only (runs cut before their spectra)
        print(f"no spectra of {obj.upper()} runs: wrote {args.img_dir / f'{prefix}-curves.png'} only")
        return 0
    ranks_figure(configs, o_latent, f"Trained attention, {title}").savefig(
        args.img_dir / f"{prefix}-ranks.png", dpi=130
    )
    if args.json:
        args.json.write_text(json.dumps({"error": ERROR, "ranks": ranks}, indent=1))
    print(markdown(configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
