"""`svd-probe compare RUN_DIR ...`: one table over training runs, seeds pooled per configuration."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from svd_probe.errors import TrainingInputError

_VARIANT_ORDER = {"mha": 0, "mla": 1, "mla-o": 2}


def find_metrics(paths: list[Path]) -> list[Path]:
    """metrics.json of each RUN_DIR, or of its subfolders when it is a folder of runs."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.append(p)
        elif (p / "metrics.json").is_file():
            found.append(p / "metrics.json")
        elif p.is_dir():
            sub = sorted(p.glob("*/metrics.json"))
            if not sub:
                raise TrainingInputError(
                    f"{p} holds no metrics.json (nor do its subfolders)",
                    hint="pass finished run folders (svd-probe train --out ...)",
                )
            found += sub
        else:
            raise TrainingInputError(f"run folder not found: {p}")
    return found


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for f in find_metrics(paths):
        try:
            m = json.loads(f.read_bytes().decode("utf-8"))
        except RecursionError:
            raise TrainingInputError(f"{f} is nested too deeply to be a metrics.json") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
            raise TrainingInputError(f"{f} is not valid JSON: {e}") from None
        if not isinstance(m, dict) or "variant" not in m:
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


def _stats(values: list) -> tuple[float | None, float | None]:
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (variant, shapes), with mean and sample std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for m in runs:
        key = (m["variant"], latent_label(m), json.dumps(m.get("config", {}), sort_keys=True))
        groups.setdefault(key, []).append(m)
    rows = []
    for (variant, latents, _), ms in sorted(groups.items(), key=lambda kv: (_VARIANT_ORDER.get(kv[0][0], 9), kv[0][1])):
        row = {
            "variant": variant,
            "latents": latents,
            "parameters": ms[0].get("parameters"),
            "seeds": sorted(m.get("seed") for m in ms),
            "n": len(ms),
        }
        for field in (
            "mlm_loss",
            "mlm_accuracy",
            "sst2_dev_accuracy",
            "pretrain_samples_per_s",
            "finetune_samples_per_s",
        ):
            row[field], row[field + "_std"] = _stats([m.get(field) for m in ms])
        row["device"] = ms[0].get("device")
        rows.append(row)
    return rows


def _pm(mean, std, scale=1.0, digits=2) -> str:
    if mean is None:
        return "—"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def render_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="svd-probe train: runs compared (mean ± std over seeds)")
    for col, justify in [
        ("variant", "left"),
        ("latents", "left"),
        ("params", "right"),
        ("seeds", "right"),
        ("MLM acc %", "right"),
        ("MLM loss", "right"),
        ("SST-2 dev acc %", "right"),
        ("pretrain samples/s", "right"),
        ("finetune samples/s", "right"),
    ]:
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            r["variant"],
            r["latents"],
            f"{r['parameters']:,}" if r["parameters"] else "—",
            str(r["n"]),
            _pm(r["mlm_accuracy"], r["mlm_accuracy_std"], 100),
            _pm(r["mlm_loss"], r["mlm_loss_std"], 1, 3),
            _pm(r["sst2_dev_accuracy"], r["sst2_dev_accuracy_std"], 100),
            _pm(r["pretrain_samples_per_s"], r["pretrain_samples_per_s_std"], 1, 0),
            _pm(r["finetune_samples_per_s"], r["finetune_samples_per_s_std"], 1, 0),
        )
    return table
