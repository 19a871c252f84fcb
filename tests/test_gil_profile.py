"""benchmarks/gil_profile.py sums py-spy `--gil` samples by process, thread and frame: on a
synthetic raw file its seconds equal a count of the samples by hand."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MAIN = 'process 10:"python bench.py --phase analyze-http"'
WORKER = 'process 11:"python -c from multiprocessing.spawn import spawn_main"'
RAW = "\n".join(
    [
        # the busiest process: 30 samples by a request thread (20 in the copy, 10 in h11), 15 by main
        f"{MAIN};thread (1): svd-probe-range_0;Thread._bootstrap (threading.py:1030);run (svd_probe/hub/http.py:233);"
        "_Fill.write (svd_probe/hub/ranges.py:141) 20",
        f"{MAIN};thread (1): svd-probe-range_0;Thread._bootstrap (threading.py:1030);run (svd_probe/hub/http.py:233);"
        "ReceiveBuffer.__iadd__ (h11/_receivebuffer.py:54) 10",
        f"{MAIN};thread (2): MainThread;<module> (bench.py:370);band_on_device (svd_probe/spectra/band.py:143) 15",
        # a worker process (its own GIL): in the total, not in the busiest process's split
        f"{MAIN};{WORKER};thread (3): MainThread;_solve (band.py:1) 40",
        "malformed line without a count",
    ]
)


def test_seconds_by_process_thread_and_frame(tmp_path):
    raw = tmp_path / "gil.txt.gz"
    with gzip.open(raw, "wt") as f:
        f.write(RAW + "\n")
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gil_profile.py"), str(raw), "--rate", "10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "8.5 GIL-seconds in 2 processes" in out  # (20 + 10 + 15 + 40) samples / 10 a second
    assert "the busiest: 4.5 s  process 10" in out  # 45 samples against the worker's 40
    by_thread, by_leaf = out.split("by thread (outermost frame):")[1].split("by innermost frame:")
    assert "3.0 s  run (svd_probe/hub/http.py:233)" in by_thread  # the pool's frames skipped
    assert "1.5 s  <module> (bench.py:370)" in by_thread
    assert "2.0 s  _Fill.write" in by_leaf and "1.0 s  ReceiveBuffer.__iadd__" in by_leaf
    assert "_solve" not in out  # the worker holds a GIL of its own: not the busiest process's
