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
from typing import Any, TypeGuard

from svd_probe.errors import TrainingInputError, shown
from svd_probe.train.config import (
    DATA_PARTS,
    O_NORMS,
    OBJECTIVES,
    RESUME_KEYS,
    VARIANTS,
    is_source_record,
    read_metrics,
)

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
        check_run(m, f)
        m["_path"] = str(f.parent)
        runs.append(m)
    return runs


# Every metric `summarize` averages; accuracies are fractions. MAX_METRIC is far past any metric
# of a run (a perplexity is exp of a loss) and keeps sums and differences over any number of
# seeds finite: 1e308 on two seeds ended `compare` in an OverflowError traceback.
METRIC_FIELDS = sorted(
    {f for fs in PRETRAIN_FIELDS.values() for f, *_ in fs}
    | {f for f, *_ in COMMON_FIELDS}
    | {f for fs in _EXTRA_FIELDS.values() for f in fs}
    | set(SPEED_FIELDS)
)
_FRACTIONS = {"mlm_accuracy", "sst2_dev_accuracy"}
MAX_METRIC = 1e100
_LABEL_SHAPES = ("q_latent", "kv_latent", "o_latent", "rope_dims")


def check_same_data(runs: list[dict]) -> None:
    """Runs set side by side must have seen the same tokenizer, pretraining text and SST-2 (by
    sha256, wherever the files lay): a mean over seeds of WikiText-2 and WikiText-103 runs, or a
    difference paired across them, is no measurement. A run whose metrics.json records no data
    (an earlier svd-probe) is taken as recorded; a run without SST-2 pairs with any."""
    for part in DATA_PARTS:
        first: dict | None = None
        for m in runs:
            rec = (m.get("data") or {}).get(part)
            if rec is None:
                continue
            if first is None:
                first = m
            elif rec["sha256"] != first["data"][part]["sha256"]:
                raise TrainingInputError(
                    f"{first.get('_path', '?')} and {m.get('_path', '?')} were trained on different "
                    f"{part} data ({shown(first['data'][part]['source'])}, {shown(rec['source'])}): "
                    "their figures are not comparable",
                    hint="compare the runs of each dataset separately",
                )


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def check_run(m: dict, f: Path) -> None:
    """What `summarize` groups, labels and averages, as `svd-probe train` writes it; else a
    TrainingInputError naming the file and the key. A metrics.json is input we do not control:
    a seed of 0.0 or none let a copied run count as a second seed, a NaN dropped the run from
    the mean while `n` still counted it, and a config that was no object (or a string where a
    latent size goes) ended the table in a traceback."""

    def bad(what: str) -> TrainingInputError:
        return TrainingInputError(
            f"{f} is not a metrics.json of svd-probe train: {what}",
            hint="pass run folders as svd-probe train wrote them (rerun a damaged or hand-edited run)",
        )

    seed = m.get("seed")
    if not _is_int(seed) or seed < 0:
        raise bad(f"seed is {shown(seed)}, not an integer >= 0")
    for key in ("config", "train_config"):
        if m.get(key) is None:
            m[key] = {}  # the first lab's runs: grouped as recorded
        elif not isinstance(m[key], dict):
            raise bad(f"{key} is a {type(m[key]).__name__}, not an object")
    data = m.get("data")
    if data is not None and not (
        isinstance(data, dict) and all(is_source_record(data.get(k)) for k in DATA_PARTS) and len(data) <= 8
    ):
        raise bad(f"data is {shown(data)}, not the {{tokenizer, pretrain, sst2}} records svd-probe train writes")
    init = m.get("init_from")
    if init is not None and (not isinstance(init, dict) or init.get("variant") not in VARIANTS):
        raise bad(f"init_from is {shown(init)}, not the record of a source run")
    c = m["config"]
    for key, choices in (("variant", VARIANTS), ("objective", OBJECTIVES), ("o_norm", O_NORMS)):
        top, inner = m.get(key), c.get(key)
        for v in (top, inner):
            if v is not None and (not isinstance(v, str) or v not in choices):
                raise bad(f"{key} is {shown(v)}, not one of {', '.join(choices)}")
        if top is not None and inner is not None and top != inner:
            raise bad(f"{key} is {top!r}, its config's {inner!r}")
    for key in _LABEL_SHAPES:
        if c.get(key) is not None and (not _is_int(c[key]) or c[key] < 0):
            raise bad(f"config {key} is {shown(c[key])}, not a size")
    n = m.get("parameters")
    if n is not None and (not _is_int(n) or not 0 <= n <= 10**15):
        raise bad(f"parameters is {shown(n)}, not a count")
    for key in METRIC_FIELDS:
        v = m.get(key)
        if v is None:
            continue  # not measured (no SST-2, no test split, the other objective)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and -MAX_METRIC <= v <= MAX_METRIC
        if not ok or (key in _FRACTIONS and not 0 <= v <= 1):
            want = "a fraction in [0, 1]" if key in _FRACTIONS else "a finite number"
            raise bad(f"{key} is {shown(v)}, not {want}")


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
    """(mean, sample std); the std is None below 2 values (one seed has no spread to measure,
    and 0.0 read as seeds that agreed)."""
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


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
            values = _values(ms, field)
            row[field], row[field + "_std"] = _stats(values)
            row[field + "_n"] = len(values)  # runs that measured it (no SST-2: fewer than n)
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
    check_same_data(runs)
    rows = summarize(runs)
    pairs = paired_differences(rows)
    return {"configs": [{k: v for k, v in r.items() if k != "_runs"} for r in rows], "differences": pairs}


# ---- tables (readable at 80 columns) -------------------------------------------------------------


def _pm(
    mean: float | None,
    std: float | None,
    scale: float = 1.0,
    digits: int = 2,
    count: int | None = None,
    n: int | None = None,
) -> str:
    """`mean ± std`; `mean (1 seed)` where there is no std; `(k seeds)` after it where only
    `count` of the row's `n` runs measured the metric."""
    if mean is None:
        return "—"
    if std is None:
        return f"{mean * scale:.{digits}f} (1 seed)"
    text = f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return text + (f" ({count} seeds)" if count is not None and n is not None and count < n else "")


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
    from rich.text import Text  # labels hold values read from metrics.json: text, never markup

    tables = []
    for objective in ("mlm", "clm"):
        rows = [r for r in comp["configs"] if r["objective"] == objective]
        if not rows:
            continue
        fields = PRETRAIN_FIELDS[objective] + COMMON_FIELDS
        name = "MLM (masked LM)" if objective == "mlm" else "CLM (causal LM)"
        # Samples/s are left to --json (and benchmarks/train_speed.py): runs that shared a GPU
        # do not time each other fairly, and the table must fit 80 columns.
        t = Table(
            title=f"{name}: mean ± std over seeds",
            caption="(1 seed): no std; (k seeds): only k of the n runs measured it",
            title_justify="left",
            caption_justify="left",
        )
        t.add_column("config", overflow="fold", ratio=1)
        t.add_column("n", justify="right", no_wrap=True)
        t.add_column("params", justify="right", no_wrap=True)
        for _, header, _, _ in fields:
            t.add_column(header, justify="right", no_wrap=True)
        for r in rows:
            cells = [_pm(r[f], r[f + "_std"], scale, digits, r.get(f + "_n"), r["n"]) for f, _, scale, digits in fields]
            t.add_row(Text(r["label"]), str(r["n"]), _params(r["parameters"]), *cells)
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
            d.add_row(Text(f"{a} − {b}"), str(n), *cells)
        tables.append(d)
    return tables
