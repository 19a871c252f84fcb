"""benchmarks/lab_report.py on the measured H200 lab folder: both figures are written, and a rank
it reports equals one computed by hand from the singular values of one row of spectra.jsonl.gz."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "benchmarks" / "results" / "h200-2026-12-02" / "lab"


def hand_rank(sigma: list[float], error: float) -> int:
    """Smallest r whose top-r squared singular values hold ≥ (1 − error) of the total, by a loop."""
    s2 = sorted((x * x for x in sigma), reverse=True)
    total, kept = sum(s2), 0.0
    for r, v in enumerate(s2, 1):
        kept += v
        if kept >= (1 - error) * total:
            return r
    return len(s2)


@pytest.mark.slow
def test_lab_report_writes_both_figures_and_the_ranks_of_the_spectra(tmp_path):
    out = tmp_path / "img"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "lab_report.py"),
            str(LAB),
            "--img-dir",
            str(out),
            "--json",
            str(tmp_path / "ranks.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for name in ("lab-curves.png", "lab-ranks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| layer | mha (n=3) |" in r.stdout

    with gzip.open(LAB / "spectra.jsonl.gz", "rt") as f:
        row = next(
            json.loads(line)
            for line in f
            if '"mlm-mlao-seed0"' in line and json.loads(line)["matrix"] == "O" and json.loads(line)["layer"] == 4
        )
    expected = hand_rank(row["sigma"], 0.01)
    assert 1 <= expected <= 64  # mla-o's stacked O has at most o_latent nonzero singular values
    ranks = json.loads((tmp_path / "ranks.json").read_text())["ranks"]
    assert ranks["mlm-mlao-seed0"]["O"]["4"] == expected
    # The table's mla-o column at layer 4 is the mean over the three seeds, each by hand.
    with gzip.open(LAB / "spectra.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    per_seed = [
        hand_rank(x["sigma"], 0.01)
        for x in rows
        if x["run"] in {f"mlm-mlao-seed{k}" for k in range(3)} and x["matrix"] == "O" and x["layer"] == 4
    ]
    assert len(per_seed) == 3
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("| 4 |"))  # the O table comes first
    cell = line.split("|")[4].strip()
    assert cell == f"{np.mean(per_seed):.0f} [{min(per_seed)}–{max(per_seed)}]"


@pytest.mark.slow
def test_lab_report_refuses_a_folder_without_the_lab_files(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "lab_report.py"), str(tmp_path), "--img-dir", str(tmp_path / "i")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "lacks curves.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "i").exists()


@pytest.mark.slow
def test_lab_report_clm_curves_of_cut_runs(tmp_path):
    """The CLM runs of the second H200 call (2026-12-02) were cut before their spectra: the report
    draws their curves only, one line per seed, as many seeds per configuration as curves.json has."""
    folder = REPO / "benchmarks" / "results" / "h200-2026-12-02b" / "lab"
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import lab_report
    finally:
        sys.path.pop(0)
    curves = json.loads((folder / "curves.json").read_text())
    by_config = lab_report.config_curves(curves, "clm")
    counted: dict[str, int] = {}
    for run in curves:  # by hand: clm-<config>-seed<k>, sources left out (no init-from run finished)
        config = run.removeprefix("clm-").rsplit("-seed", 1)[0]
        if config != "mla-src":
            counted[config] = counted.get(config, 0) + 1
    assert (
        {c: len(v) for c, v in by_config.items()}
        == counted
        == {
            "mha": 3,
            "mla": 2,
            "mlao": 2,
            "mlao-rms": 2,
            "mlao-rmsph": 2,
        }
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "lab_report.py"), str(folder), "--objective", "clm"]
    r = subprocess.run([*cmd, "--img-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "lab-clm-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "lab-clm-ranks.png").exists() and "curves only" not in r.stderr


# ---- several folders pooled by run name (CPU, synthetic) -------------------------------------------


def _lab_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import lab_report
    finally:
        sys.path.pop(0)
    return lab_report


def _metrics(config: str, seed: int, acc: float, sst2: float) -> dict:
    variant = {"mha": "mha", "mla": "mla"}[config]
    shapes = {"q_latent": 64, "kv_latent": 32, "rope_dims": 16} if variant == "mla" else {"rope_dims": 32}
    return {
        "run": f"mlm-{config}-seed{seed}",
        "objective": "mlm",
        "variant": variant,
        "o_norm": None,
        "init_from": None,
        "seed": seed,
        "parameters": 1000 if variant == "mha" else 900,
        "config": {"d_model": 32, "n_layers": 2, **shapes},
        "train_config": {"pretrain_steps": 640, "batch_size": 256, "finetune_steps": 500, "seed": seed},
        "mlm_accuracy": acc,
        "mlm_loss": 5.0 - acc,
        "sst2_dev_accuracy": sst2,
    }


def _write_lab(folder: Path, runs: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(runs))
    curves = {r["run"]: {"pretrain": [[25, 7.0], [50, 6.0 - r["mlm_accuracy"]]]} for r in runs}
    (folder / "curves.json").write_text(json.dumps(curves))
    with gzip.open(folder / "spectra.jsonl.gz", "wt") as f:
        for r in runs:
            for layer in range(2):
                for matrix in ("O", "VO"):
                    sigma = [4.0, 2.0, 1.0, 0.1 * (1 + r["seed"])]
                    row = {"run": r["run"], "scope": "stacked", "matrix": matrix, "head": None, "layer": layer}
                    f.write(json.dumps({**row, "sigma": sigma}) + "\n")


# mha and mla MLM accuracy / SST-2 per seed: seeds 0-2 in folder a, 3-4 in folder b
ACC = {"mha": [0.30, 0.32, 0.31, 0.33, 0.29], "mla": [0.25, 0.20, 0.27, 0.22, 0.26]}
SST2 = {"mha": [0.75, 0.76, 0.74, 0.77, 0.75], "mla": [0.76, 0.74, 0.78, 0.75, 0.77]}


def _two_folders(tmp_path: Path, clash: bool = False) -> tuple[Path, Path]:
    a = [_metrics(c, s, ACC[c][s], SST2[c][s]) for c in ACC for s in range(3)]
    b = [_metrics(c, s, ACC[c][s], SST2[c][s]) for c in ACC for s in (3, 4)]
    # mha seed 0 in both: equal metrics pool as one run; with `clash`, folder b's copy differs
    b.append(_metrics("mha", 0, ACC["mha"][0] + (0.05 if clash else 0.0), SST2["mha"][0]))
    _write_lab(tmp_path / "a", a)
    _write_lab(tmp_path / "b", b)
    return tmp_path / "a", tmp_path / "b"


def _hand_interval(diffs: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = stats.t.ppf(0.975, n - 1) * sd / n**0.5
    return mean, mean - half, mean + half


def test_lab_report_pools_two_folders_into_compare_tables(tmp_path, capsys):
    lab_report = _lab_module()
    a, b = _two_folders(tmp_path)
    assert lab_report.main([str(a), str(b), "--img-dir", str(tmp_path / "img"), "--compare", "json"]) == 0
    out, err = capsys.readouterr()
    comp, end = json.JSONDecoder().raw_decode(out)
    assert "mlm-mha-seed0" in err and "equal metrics" in err
    configs = {r["variant"]: r for r in comp["configs"]}
    assert configs["mha"]["n"] == configs["mla"]["n"] == 5
    assert configs["mha"]["seeds"] == [0, 1, 2, 3, 4]
    pair = next(p for p in comp["differences"] if p["metric"] == "mlm_accuracy")
    assert (pair["a"].split()[0], pair["b"].split()[0], pair["n"]) == ("mla", "mha", 5)
    mean, low, high = _hand_interval([ACC["mla"][s] - ACC["mha"][s] for s in range(5)])
    assert pair["mean"] == pytest.approx(mean) and pair["low"] == pytest.approx(low)
    assert pair["high"] == pytest.approx(high)
    # the rank tables after the JSON count the pooled seeds too
    assert "| layer | mha (n=5) | mla (n=5) |" in out[end:]
    for name in ("lab-curves.png", "lab-ranks.png"):
        assert (tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert lab_report.main([str(a), str(b), "--img-dir", str(tmp_path / "img"), "--compare", "markdown"]) == 0
    md = capsys.readouterr().out
    cell = f"{mean * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}]".replace("-", "−")
    assert f"| mla − mha | 5 | {cell} |" in md


def test_lab_report_refuses_a_clash_unless_a_folder_is_preferred(tmp_path, capsys):
    lab_report = _lab_module()
    a, b = _two_folders(tmp_path, clash=True)
    img = str(tmp_path / "img")
    assert lab_report.main([str(a), str(b), "--img-dir", img, "--compare", "json"]) == 2
    err = capsys.readouterr().err
    assert "mlm-mha-seed0" in err and "mlm_accuracy" in err and "--prefer" in err
    assert not (tmp_path / "img").exists()

    assert lab_report.main([str(a), str(b), "--img-dir", img, "--compare", "json", "--prefer", str(b)]) == 0
    out, err = capsys.readouterr()
    assert f"used {b} (--prefer)" in err
    comp, _ = json.JSONDecoder().raw_decode(out)
    mha = next(r for r in comp["configs"] if r["variant"] == "mha")
    accs = [ACC["mha"][0] + 0.05] + ACC["mha"][1:]
    assert mha["n"] == 5 and mha["mlm_accuracy"] == pytest.approx(sum(accs) / 5)
