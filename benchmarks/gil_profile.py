"""Who holds the GIL: a summary of `py-spy record --gil -f raw` output.

py-spy's `--gil` samples only the thread that holds the GIL, so each sample is 1/rate seconds of
GIL time. For the process with the most samples (with `--subprocesses`, the analyze process;
the band workers are processes of their own, each with its own GIL) this prints the GIL seconds
by thread (the outermost frame that is not the thread pool's) and by innermost frame.

    py-spy record --gil --nonblocking --subprocesses -r 50 -f raw -o gil.txt -- \\
        python benchmarks/bench_e2e.py --device cuda --phases analyze-http
    python benchmarks/gil_profile.py gil.txt --rate 50
"""

from __future__ import annotations

import argparse
import collections
import gzip
from pathlib import Path

_POOL = ("threading.py", "concurrent/futures", "<frozen importlib")


def read(path: Path) -> list[tuple[list[str], int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if stack and n.isdigit():
                out.append((stack.split(";"), int(n)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", type=Path, help="py-spy raw output (.txt or .txt.gz)")
    ap.add_argument("--rate", type=float, default=50.0, help="py-spy's -r (samples a second)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    samples = read(args.raw)
    per_process: collections.Counter = collections.Counter()
    for frames, n in samples:
        procs = [f for f in frames if f.startswith("process ")]
        per_process[procs[-1] if procs else "?"] += n
    main_proc, main_n = per_process.most_common(1)[0]
    s = 1 / args.rate
    print(f"{sum(per_process.values()) * s:.1f} GIL-seconds in {len(per_process)} processes")
    print(f"the busiest: {main_n * s:.1f} s  {main_proc[:110]}")
    by_thread: collections.Counter = collections.Counter()
    by_leaf: collections.Counter = collections.Counter()
    for frames, n in samples:
        procs = [f for f in frames if f.startswith("process ")]
        if not procs or procs[-1] != main_proc:
            continue
        code = [f for f in frames if not f.startswith(("process ", "thread "))] or ["?"]
        own = [f for f in code if not any(p in f for p in _POOL)] or code
        by_thread[own[0]] += n
        by_leaf[code[-1]] += n
    for title, counts in (("by thread (outermost frame)", by_thread), ("by innermost frame", by_leaf)):
        print(f"\n{title}:")
        for frame, n in counts.most_common(args.top):
            print(f"  {n * s:6.1f} s  {frame[:100]}")


if __name__ == "__main__":
    main()
