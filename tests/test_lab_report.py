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
