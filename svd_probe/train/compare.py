"""`svd-probe compare RUN_DIR ...`: training runs grouped by configuration, with intervals.

One row per configuration (objective, variant, latents, output norm, --init-from source,
recipe), with the mean ± sample std over its seeds. Then, for each pair of configurations of
one objective, the difference of their means with a 95% interval, so a reader can tell which
differences the seeds support.

The interval is paired over seeds: runs of two configurations with the same seed see the same
batch order, MLM masks and fine-tuning order, so the per-seed difference d_s = a_s - b_s
cancels what the seed gives both. The interval is Student's t on those differences,
mean(d) ± t(0.975, n - 1) · sd(d) / √n, over the n seeds both configurations ran (none below 2).
We chose it over a bootstrap over dev sentences and seeds because a run records its accuracy,
not its per-sentence predictions, and at 5 seeds a bootstrap over seeds has too few resamples.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from svd_probe.errors import TrainingInputError
from svd_probe.train.config import RESUME_KEYS, read_metrics

_VARIANT_ORDER = {"mha": 0, "mla": 1, "mla-o": 2}
_NORM_ORDER = {"none": 0, "rms": 1, "rms-per-head": 2}
CONFIDENCE = 0.95
# (field, header, scale, digits), per objective, as tabled; the first is the pretraining metric
# compared in pairs. The JSON rows hold these and mlm_loss, clm_loss and the samples/s too.
PRETRAIN_FIELDS = {
    "mlm": [("mlm_accuracy", "MLM acc %", 100, 2)],
    "clm": [("clm_perplexity", "ppl valid", 1, 1), ("clm_test_perplexity", "ppl test", 1, 1)],
}
_EXTRA_FIELDS = {"mlm": ["mlm_loss"], "clm": ["clm_loss", "clm_test_loss"]}
COMMON_FIELDS = [("sst2_dev_accuracy", "SST-2 %", 100, 2)]
SPEED_FIELDS = ["pretrain_samples_per_s", "finetune_samples_per_s"]


def find_metrics(paths: list[Path]) -> list[Path]:
    """metrics.json of each RUN_DIR, or of the runs below it (a folder of runs, OUT/seed-N)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.append(p)
        elif (p / "metrics.json").is_file():
            found.append(p / "metrics.json")
        elif p.is_dir():
            sub = sorted(f for f in set(p.glob("*/metrics.json")) | set(p.glob("*/*/metrics.json")) if f.is_file())
            if not sub:
                raise TrainingInputError(
                    f"{p} holds no metrics.json (nor do its subfolders)",
                    hint="pass finished run folders (svd-probe train --out ...)",
                )
            found += sub
        else:
            raise TrainingInputError(f"run folder not found: {p}")
    return list(dict.fromkeys(found))


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for f in find_metrics(paths):
        m = read_metrics(f)
        if m.get("variant") not in _VARIANT_ORDER:
            raise TrainingInputError(f"{f} is not a metrics.json of svd-probe train")
        m["_path"] = str(f.parent)
        runs.append(m)
    return runs


def latent_label(m: dict) -> str:
    c = m.get("config", {})
    if m["variant"] == "mha":
        parts = []
    else:
        parts = [f"q{c.get('q_latent')}", f"kv{c.get('kv_latent')}"] + (
            [f"o{c.get('o_latent')}"] if m["variant"] == "mla-o" else []
        )
    parts.append(f"rope{c.get('rope_dims')}")
    return " ".join(parts)


def _objective(m: dict) -> str:
    return m.get("objective") or m.get("config", {}).get("objective") or "mlm"  # runs before clm: mlm


def _o_norm(m: dict) -> str:
    return m.get("o_norm") or m.get("config", {}).get("o_norm") or "none"


def _init_variant(m: dict) -> str | None:
    init = m.get("init_from")
    return init.get("variant") if isinstance(init, dict) else None


def config_label(m: dict) -> str:
    """variant, latents, output norm and init source: `mla-o q64 kv32 o64 rope32 rms <-mha`."""
    label = f"{m['variant']} {latent_label(m)}"
    if m["variant"] == "mla-o" and _o_norm(m) != "none":
        label += f" {_o_norm(m)}"
    if _init_variant(m):
        label += f" <-{_init_variant(m)}"
    return label


def _values(ms: list[dict], field: str) -> list[float]:
    out = []
    for m in ms:
        v = m.get(field)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def _stats(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def t_interval(diffs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of Student's t-interval on paired differences; low, high None for n < 2."""
    from scipy import stats

    mean = statistics.fmean(diffs)
    n = len(diffs)
    if n < 2:
        return mean, None, None
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def _group_key(m: dict) -> tuple:
    recipe = {k: m.get("train_config", {}).get(k) for k in RESUME_KEYS if k != "seed"}
    config = dict(m.get("config", {}))
    config.setdefault("objective", _objective(m))
    config.setdefault("o_norm", _o_norm(m))
    # Runs started from another run group by the source's variant and pretraining steps, not by
    # its sha256: each seed's source is a different file, and the seeds must pool.
    init = m.get("init_from") or {}
    source = (init.get("variant"), init.get("source_pretrain_steps")) if init else None
    return (json.dumps(config, sort_keys=True), json.dumps(recipe, sort_keys=True), json.dumps(source))


def summarize(runs: list[dict]) -> list[dict]:
    """One row per configuration, with mean and sample std over its seeds (and its runs' seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for m in runs:
        groups.setdefault(_group_key(m), []).append(m)

    def order(ms: list[dict]) -> tuple:
        m = ms[0]
        return (
            _objective(m) != "mlm",
            _init_variant(m) is not None,
            _VARIANT_ORDER[m["variant"]],
            _NORM_ORDER.get(_o_norm(m), 9),
            latent_label(m),
        )

    rows = []
    labels: dict[tuple[str, str], int] = {}
    for ms in sorted(groups.values(), key=order):
        m = ms[0]
        seen: dict[int, str] = {}
        for x in ms:  # a copied run folder would count as a second seed and shrink the intervals
            seed, where = x.get("seed"), x.get("_path", "?")
            if not isinstance(seed, int):
                continue
            if seed in seen:
                raise TrainingInputError(
                    f"two runs of one configuration with seed {seed}: {seen[seed]} and {where}",
                    hint="pass each run once (a copy of a run folder is not another seed)",
                )
            seen[seed] = where
        label = config_label(m)
        key = (_objective(m), label)
        labels[key] = labels.get(key, 0) + 1
        if labels[key] > 1:  # the same shapes under another recipe
            label += f" #{labels[key]}"
        row: dict[str, Any] = {
            "label": label,
            "objective": _objective(m),
            "variant": m["variant"],
            "latents": latent_label(m),
            "o_norm": _o_norm(m),
            "init_from": _init_variant(m),
            "parameters": m.get("parameters"),
            "seeds": sorted(x.get("seed") for x in ms if isinstance(x.get("seed"), int)),
            "n": len(ms),
        }
        fields = [f for f, *_ in PRETRAIN_FIELDS[row["objective"]] + COMMON_FIELDS]
        fields += _EXTRA_FIELDS[row["objective"]] + SPEED_FIELDS
        for field in fields:
            row[field], row[field + "_std"] = _stats(_values(ms, field))
        row["device"] = m.get("device")
        row["_runs"] = {x.get("seed"): x for x in ms}
        rows.append(row)
    return rows


def paired_differences(rows: list[dict]) -> list[dict]:
    """For each pair of configurations of one objective (later row minus earlier row) and each
    compared metric: the mean per-seed difference and its 95% t-interval, over common seeds."""
    pairs = []
    for i, b in enumerate(rows):
        for a in rows[i + 1 :]:
            if a["objective"] != b["objective"]:
                continue
            common = sorted(set(a["_runs"]) & set(b["_runs"]) - {None})
            for field, *_ in PRETRAIN_FIELDS[a["objective"]][:1] + COMMON_FIELDS:
                diffs, seeds = [], []
                for s in common:
                    va, vb = _values([a["_runs"][s]], field), _values([b["_runs"][s]], field)
                    if va and vb:
                        diffs.append(va[0] - vb[0])
                        seeds.append(s)
                if not diffs:
                    continue
                mean, low, high = t_interval(diffs)
                pairs.append(
                    {
                        "objective": a["objective"],
                        "a": a["label"],
                        "b": b["label"],
                        "metric": field,
                        "n": len(diffs),
                        "seeds": seeds,
                        "mean": mean,
                        "low": low,
                        "high": high,
                        "confidence": CONFIDENCE,
                        "interval": "paired t over seeds",
                    }
                )
    return pairs


def comparison(runs: list[dict]) -> dict:
    """What `compare --json` prints: {"configs": rows, "differences": pairs}."""
    rows = summarize(runs)
    pairs = paired_differences(rows)
    return {"configs": [{k: v for k, v in r.items() if k != "_runs"} for r in rows], "differences": pairs}


# ---- tables (readable at 80 columns) -------------------------------------------------------------


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None or std is None:
        return "—"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _signed(x: float, scale: float, digits: int) -> str:
    return f"{x * scale:+.{digits}f}".replace("-", "−")


def _interval(p: dict, scale: float, digits: int) -> str:
    if p["low"] is None:
        return f"{_signed(p['mean'], scale, digits)} [—]"
    return (
        f"{_signed(p['mean'], scale, digits)} [{_signed(p['low'], scale, digits)}, {_signed(p['high'], scale, digits)}]"
    )


def _params(n: object) -> str:
    return f"{n / 1e6:.2f}M" if isinstance(n, (int, float)) and n else "—"


def compared_fields(objective: str) -> list:
    """The metrics whose paired differences the tables show: the objective's headline, then the
    fields every objective shares (`PRETRAIN_FIELDS`, `COMMON_FIELDS` entries)."""
    return PRETRAIN_FIELDS[objective][:1] + COMMON_FIELDS


def pair_rows(comp: dict, objective: str) -> list[tuple[str, str, int, list[str]]]:
    """Per pair of configurations of `objective` in `comparison`'s output: (first, second, seeds
    both ran, one "Δ [95%]" cell per `compared_fields` entry), as the difference tables print them."""
    by_pair: dict[tuple[str, str], dict[str, dict]] = {}
    for p in comp["differences"]:
        if p["objective"] == objective:
            by_pair.setdefault((p["a"], p["b"]), {})[p["metric"]] = p
    return [
        (
            a,
            b,
            max(p["n"] for p in metrics.values()),
            [
                _interval(metrics[f], scale, digits) if f in metrics else "—"
                for f, _, scale, digits in compared_fields(objective)
            ],
        )
        for (a, b), metrics in by_pair.items()
    ]


def render_tables(comp: dict) -> list:
    """rich Tables: per objective, the configurations and then their paired differences."""
    from rich.table import Table

    tables = []
    for objective in ("mlm", "clm"):
        rows = [r for r in comp["configs"] if r["objective"] == objective]
        if not rows:
            continue
        fields = PRETRAIN_FIELDS[objective] + COMMON_FIELDS
        name = "MLM (masked LM)" if objective == "mlm" else "CLM (causal LM)"
        # Samples/s are left to --json (and benchmarks/train_speed.py): runs that shared a GPU
        # do not time each other fairly, and the table must fit 80 columns.
        t = Table(title=f"{name}: mean ± std over seeds", title_justify="left")
        t.add_column("config", overflow="fold", ratio=1)
        t.add_column("n", justify="right", no_wrap=True)
        t.add_column("params", justify="right", no_wrap=True)
        for _, header, _, _ in fields:
            t.add_column(header, justify="right", no_wrap=True)
        for r in rows:
            cells = [_pm(r[f], r[f + "_std"], scale, digits) for f, _, scale, digits in fields]
            t.add_row(r["label"], str(r["n"]), _params(r["parameters"]), *cells)
        tables.append(t)
        pairs = pair_rows(comp, objective)
        if not pairs:
            continue
        d = Table(
            title=f"{name}: differences, first − second config",
            caption="[95% interval]: Student t on the per-seed differences (paired by seed); "
            "n: seeds both ran; [—]: fewer than 2",
            title_justify="left",
            caption_justify="left",
        )
        d.add_column("first − second", overflow="fold", ratio=1)
        d.add_column("n", justify="right", no_wrap=True)
        for _, header, _, _ in compared_fields(objective):
            d.add_column(f"Δ {header} [95%]", justify="right", no_wrap=True)
        for a, b, n, cells in pairs:
            d.add_row(f"{a} − {b}", str(n), *cells)
        tables.append(d)
    return tables
