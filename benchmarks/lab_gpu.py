"""The training lab's experiment on one GPU (issue 11, item 7), sized to fit one call.

Per seed, seven runs of `svd-probe train` (MLM by default):

    mha, mla, mla-o, mla-o --o-norm rms, mla-o --o-norm rms-per-head     S pretraining steps
    mla (source, no fine-tuning, RoPE on the whole head as mla-o has)     S/2 steps
    mla-o --init-from that source                                         S/2 more steps

so `--init-from` is compared with mla-o from scratch at equal total pretraining steps. Every run
but the source is then fine-tuned on SST-2. Then, while time is left, `--then` (clm:0-2: mha,
mla, mla-o, causal, seeds 0-2).

`--parallel` runs share the GPU at once, taken from a queue in seed order, so that a cut-off
leaves whole seeds; a run is started only if runs of its kind finished in the time left. The
first try (2026-12-02, H200) started all 60 runs of both objectives at once: 43 ran out of GPU
memory (about 5.5 GB each at batch 256) and the 16 cores starved the rest; hence the pool.
`--calibrate` measures the steps/s of the first `--parallel` runs and trains nothing.

At the end: every run's metrics.json (`results.json`), `svd-probe compare` of all runs but the
sources (`compare.txt`, table and JSON), the learning curves parsed from each train.log
(`curves.json`), the stacked and layer spectra of every trained model through `svd-probe
analyze` on the GPU (`spectra.jsonl.gz`, head rows left out), logs and the environment.

    # .carry/data/{wikitext-2,SST-2,vocab/bert-base-uncased-vocab.txt}: the README's three inputs
    PYTHONPATH=. python benchmarks/lab_gpu.py --deadline-s 500          # on the GPU, $OUT set
    PYTHONPATH=. python benchmarks/lab_gpu.py --device cpu --size tiny --seeds 0 --then '' \
        --steps 20 --batch-size 8 --finetune-steps 10 --parallel 3       # a CPU smoke test

The driver is a process pool over `svd-probe train` (one process a run, so every run has its
own CUDA context and its own resume); it schedules nothing beyond that.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

T0 = time.monotonic()
STEP = re.compile(r"pretrain step (\d+)/(\d+) loss ([0-9.]+)")
FT_STEP = re.compile(r"finetune step (\d+)/(\d+) loss ([0-9.]+)")
TAGGED = re.compile(r"-seed\d+-.+$")


def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def seeds_of(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


CONFIGS = {
    # name: (train flags, full-length?, fine-tuned?)
    "mha": (["--variant", "mha"], True, True),
    "mla": (["--variant", "mla"], True, True),
    "mlao": (["--variant", "mla-o"], True, True),
    "mlao-rms": (["--variant", "mla-o", "--o-norm", "rms"], True, True),
    "mlao-rmsph": (["--variant", "mla-o", "--o-norm", "rms-per-head"], True, True),
    # The source: mla with RoPE on the whole head, as mla-o has by default (mla's own default is
    # half the head), so that mla-o --init-from it has the shapes of mla-o from scratch.
    "mla-src": (["--variant", "mla", "--rope-dims", "HEAD_DIM"], False, False),
}
HEAD_DIM = {"small": "32", "tiny": "16"}
INIT = "mlao-init"  # mla-o --init-from <obj>-mla-src-seed<k>, S/2 steps, fine-tuned


class Pool:
    """Processes of `svd-probe train`, each with its log file; killed together on the way out."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    def common(self, objective: str, seed: int) -> list[str]:
        a = self.args
        d = Path(a.data)
        return [
            sys.executable, "-m", "svd_probe.cli", "train",
            "--objective", objective, "--seed", str(seed), "--size", a.size, "--device", a.device,
            "--tokenizer", str(d / "vocab/bert-base-uncased-vocab.txt"), "--data-dir", str(d / "wikitext-2"),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--log-every", str(a.log_every), "--checkpoint-every", "100000", "--checkpoint-minutes", "0",
            "--no-progress", "--compile" if a.compile else "--no-compile",
        ]  # fmt: skip

    def start(self, name: str, cmd: list[str]) -> None:
        logf = Path(self.args.runs) / "stdout" / f"{name}.txt"
        logf.parent.mkdir(parents=True, exist_ok=True)
        fh = open(logf, "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs[name] = (p, logf)

    def running(self) -> list[str]:
        return [n for n, (p, _) in self.procs.items() if p.poll() is None]

    def kill_all(self, sig: int = signal.SIGKILL, grace_s: float = 15) -> None:
        """Signal every running process, wait at most `grace_s` in all (not per process), then
        SIGKILL what is left: the first call (2026-12-02) waited 30 s per process after SIGTERM
        and ran past its device call's limit before writing any result."""
        for p, _ in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + grace_s
        while time.monotonic() < end and any(p.poll() is None for p, _ in self.procs.values()):
            time.sleep(0.2)
        for p, _ in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def last_step(logf: Path) -> int | None:
    try:
        text = logf.read_text(errors="replace")
    except OSError:
        return None
    steps = STEP.findall(text)
    return int(steps[-1][0]) if steps else None


def gpu_memory() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def calibrate(args: argparse.Namespace, jobs: list[tuple[str, str, int, list[str]]]) -> dict:
    """Steps per second per process, by objective, with every phase-1 process running at once."""
    pool = Pool(args)
    for name, obj, seed, flags in jobs:
        run = Path(args.runs) / "calib" / name
        cmd = pool.common(obj, seed) + flags + ["--pretrain-steps", "1000000", "--out", str(run), "--overwrite"]
        cmd[cmd.index("--log-every") + 1] = "5"
        pool.start("calib-" + name, cmd)
    started = elapsed()
    # Start-up: until every process has logged a step (or gave up), at most --startup-limit-s.
    while elapsed() - started < args.startup_limit_s:
        steps = {n: last_step(f) for n, (_, f) in pool.procs.items()}
        if all(s is not None for s in steps.values()) or not pool.running():
            break
        time.sleep(0.5)
    startup = elapsed() - started
    # The window: each process's step count as it changes, timed when the change is seen (every
    # 0.5 s), so a rate is (last change - first change) in steps over the time between them.
    seen: dict[str, list[tuple[int, float]]] = {n: [] for n in pool.procs}
    end = time.monotonic() + args.calibrate_s
    while time.monotonic() < end:
        for n, (_, f) in pool.procs.items():
            s_now = last_step(f)
            if s_now is not None and (not seen[n] or seen[n][-1][0] != s_now):
                seen[n].append((s_now, time.monotonic()))
        time.sleep(0.5)
    mem = gpu_memory()
    rates: dict[str, list[float]] = {}
    failed = [n for n, (p, _) in pool.procs.items() if p.poll() is not None]
    for (_, obj, _, _), n in zip(jobs, pool.procs, strict=True):
        marks = seen[n][1:]  # the first mark may be a log line printed long before the window
        if len(marks) >= 2 and marks[-1][1] > marks[0][1]:
            rates.setdefault(obj, []).append((marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1]))
    pool.kill_all()
    out = {
        "processes": len(jobs),
        "startup_s": round(startup, 1),
        "window_s": args.calibrate_s,
        "gpu_memory_used_total": mem,
        "failed": failed,
        "steps_per_s_per_process": {k: [round(r, 2) for r in v] for k, v in rates.items()},
        "samples_per_s_total": round(sum(sum(v) for v in rates.values()) * args.batch_size, 0),
    }
    log(f"calibration: {json.dumps(out)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".carry/data")
    ap.add_argument("--runs", default="runs/lab")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/lab/out"))
    ap.add_argument("--objectives", default="mlm", help="the full grid, seed by seed")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        help="OBJ:SEEDS[:CONFIGS], repeatable, queued seed by seed: these configurations (default: all "
        "seven; 'init' = the mla source and mla-o --init-from it) instead of --objectives/--seeds",
    )
    ap.add_argument(
        "--then",
        action="append",
        default=None,
        help="afterwards, if time is left: OBJ:SEEDS[:CONFIGS[:TAG]] (configs default mha,mla,mlao; "
        "a TAG is appended to the run names and keeps those runs out of compare.txt); repeatable",
    )
    ap.add_argument("--compile", action="store_true", help="train with --compile (CUDA graphs)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=800, help="pretraining steps S")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--finetune-steps", type=int, default=500)
    ap.add_argument("--finetune-batch-size", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--parallel", type=int, default=12, help="runs at once on the GPU")
    ap.add_argument("--deadline-s", type=float, default=500, help="the whole script, from start to results")
    ap.add_argument("--list", action="store_true", help="print the queue and exit")
    ap.add_argument("--calibrate", action="store_true", help="measure steps/s of the first wave (no runs)")
    ap.add_argument("--calibrate-s", type=float, default=25, help="the measuring window, after start-up")
    ap.add_argument("--startup-limit-s", type=float, default=120)
    args = ap.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    d = Path(args.data)
    for f in ("wikitext-2/wiki.train.tokens", "SST-2/train.tsv", "vocab/bert-base-uncased-vocab.txt"):
        if not (d / f).is_file():
            print(
                f"missing {d / f}: put WikiText-2, SST-2 and vocab/bert-base-uncased-vocab.txt (README, Training lab) in {d}/",
                file=sys.stderr,
            )
            return 2
    env: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "argv": sys.argv,
        "gpu": gpu_memory(),
        "cpus": os.cpu_count(),
    }
    import torch

    env["torch"], env["cuda"] = torch.__version__, torch.version.cuda

    sst2 = ["--sst2-dir", str(d / "SST-2"), "--finetune-steps", str(args.finetune_steps)]
    sst2 += ["--finetune-batch-size", str(args.finetune_batch_size)]

    def flags(config: str, steps: int) -> list[str]:
        f, full, tuned = CONFIGS[config]
        f = [HEAD_DIM[args.size] if x == "HEAD_DIM" else x for x in f]
        return f + ["--pretrain-steps", str(steps if full else steps // 2)] + (sst2 if tuned else [])

    # The queue, seed by seed, so that a cut-off leaves whole seeds: (name, objective, seed, flags,
    # the source run it waits for).
    queue: list[tuple[str, str, int, list[str], Path | None]] = []
    # --grid OBJ:SEEDS[:CONFIGS]; "init" in CONFIGS is the mla source and mla-o --init-from it
    every = "mha,mla,mlao,mlao-rms,mlao-rmsph,init"
    grid = [(g.split(":") + [""])[:3] for g in args.grid] or [[o, args.seeds, ""] for o in args.objectives.split(",")]
    by_seed = sorted({s for _, ss, _ in grid for s in seeds_of(ss)})
    for s in by_seed:
        for o, _, configs in [g for g in grid if s in seeds_of(g[1])]:
            chosen = (configs or every).split(",")
            src = runs / f"{o}-mla-src-seed{s}"
            if "init" in chosen:
                queue.append((src.name, o, s, flags("mla-src", args.steps), None))
            for c in [c for c in chosen if c != "init"]:
                queue.append((f"{o}-{c}-seed{s}", o, s, flags(c, args.steps), None))
            if "init" in chosen:
                init = ["--variant", "mla-o", "--init-from", str(src), "--pretrain-steps", str(args.steps // 2)]
                queue.append((f"{o}-{INIT}-seed{s}", o, s, init + sst2, src))
    for spec in ["clm:0-2"] if args.then is None else [t for t in args.then if t]:
        o, seeds, configs, tag = (spec.split(":") + ["", ""])[:4]
        for s in seeds_of(seeds):
            for c in (configs or "mha,mla,mlao").split(","):
                queue.append((f"{o}-{c}-seed{s}" + (f"-{tag}" if tag else ""), o, s, flags(c, args.steps), None))
    if args.list:
        for name, _o, _s, f, src in queue:
            print(name, " ".join(f), f"(after {src.name})" if src else "")
        return 0
    if args.calibrate:
        first = [(n, o, s, [x for x in f if x not in sst2]) for n, o, s, f, _ in queue[: args.parallel]]
        env["calibration"] = calibrate(args, [(n, o, s, f[: f.index("--pretrain-steps")]) for n, o, s, f in first])
        (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
        return 0
    env["queue"] = [n for n, *_ in queue]

    pool = Pool(args)
    walls: dict[str, list[float]] = {}
    started: dict[str, float] = {}
    skipped: list[str] = []
    train_deadline = args.deadline_s - 25

    def stop(signum, frame):  # SIGTERM (an outer timeout): stop training, still collect
        raise KeyboardInterrupt

    def reap() -> None:  # log and record the runs that ended since the last look
        for n in list(started):
            p = pool.procs[n][0]
            if p.poll() is not None:
                ok = (runs / n / "metrics.json").is_file()
                if ok:
                    walls.setdefault(n.split("-", 1)[0], []).append(elapsed() - started[n])
                    write_results(runs, out)  # a driver killed later still leaves these
                log(f"{'finished' if ok else 'FAILED'} {n} ({elapsed() - started[n]:.0f} s)")
                del started[n]

    signal.signal(signal.SIGTERM, stop)
    try:
        while queue or pool.running():
            reap()
            if elapsed() >= train_deadline:
                break
            for job in list(queue):
                if len(pool.running()) >= args.parallel:
                    break
                name, o, s, f, wait_for = job
                if wait_for is not None and not (wait_for / "metrics.json").is_file():
                    if wait_for.name in started or any(j[0] == wait_for.name for j in queue):
                        continue  # its source is still training or queued
                    queue.remove(job)  # the source failed: nothing to start from
                    skipped.append(name)
                    continue
                # Start a run only if runs of its kind have finished in the time left (+15%).
                w = walls.get(o) or [x for v in walls.values() for x in v]
                need = 1.15 * sorted(w)[len(w) // 2] * (0.5 if "src" in name or INIT in name else 1) if w else 0
                if elapsed() + need > train_deadline:
                    queue.remove(job)
                    skipped.append(name)
                    continue
                queue.remove(job)
                if (runs / name / "metrics.json").is_file():
                    continue
                pool.start(name, pool.common(o, s) + f + ["--out", str(runs / name)])
                started[name] = elapsed()
                log(f"started {name} ({len(pool.running())} running)")
            time.sleep(1)
        reap()  # the last runs ended while the loop's condition was checked
    except KeyboardInterrupt:
        log("stopped by a signal: collecting what finished")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # collecting is not interrupted; SIGKILL still is
        cut = pool.running()
        if cut:
            log(f"deadline: stopping {len(cut)} runs (they checkpoint on SIGTERM): {cut}")
            pool.kill_all(signal.SIGTERM)
    env.update(cut_runs=cut, skipped=skipped + [j[0] for j in queue], train_end_s=round(elapsed(), 1))
    env["median_wall_s"] = {k: sorted(v)[len(v) // 2] for k, v in walls.items() if v}
    log(f"training ended: cut {cut}, skipped {env['skipped']}")
    collect(args, runs, out, env)
    return 0


SPECTRA_WORKER = """
import sys
from pathlib import Path
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.export import export
from svd_probe.results import CacheQuery
cache, device, jdir, *runs = sys.argv[1:]
for r in runs:
    try:
        analyze(AnalyzeJob(r, cache_dir=cache, device=device))
        export(CacheQuery(r, cache_dir=cache), format="jsonl", out=Path(jdir) / (Path(r).name + ".jsonl"), overwrite=True)
    except Exception as e:  # one bad run must not cost the others their spectra
        print(r, type(e).__name__, e, file=sys.stderr)
"""


def curves(runs: Path) -> dict:
    out = {}
    for logf in sorted(runs.glob("*/train.log")):
        text = logf.read_text(errors="replace")
        out[logf.parent.name] = {
            "pretrain": [[int(a), float(c)] for a, _, c in STEP.findall(text)],
            "finetune": [[int(a), float(c)] for a, _, c in FT_STEP.findall(text)],
        }
    return out


def finished_runs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("*/metrics.json") if p.parent.name != "calib")


def write_results(runs: Path, out: Path) -> int:
    """results.json (every finished run's metrics.json) and curves.json, rewritten whole."""
    rows = [dict(json.loads((r / "metrics.json").read_text()), run=r.name) for r in finished_runs(runs)]
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "curves.json").write_text(json.dumps(curves(runs)) + "\n")
    return len(rows)


def collect(args: argparse.Namespace, runs: Path, out: Path, env: dict) -> None:
    finished = finished_runs(runs)
    log(f"{write_results(runs, out)} finished runs")
    cli = [sys.executable, "-m", "svd_probe.cli"]
    cenv = dict(os.environ, COLUMNS="160")
    with open(out / "compare.txt", "w") as fh:
        # sources are not compared; tagged runs (controls) would pool with their configuration
        compared = [str(r) for r in finished if "-mla-src-" not in r.name and not TAGGED.search(r.name)]
        for extra in ([], ["--json"]):
            try:
                r = subprocess.run(
                    cli + ["compare", *compared] + extra, capture_output=True, text=True, env=cenv, timeout=60
                )
                fh.write(r.stdout + r.stderr + "\n")
            except subprocess.TimeoutExpired:
                fh.write("compare timed out (60 s)\n")
    # Spectra of every trained model on the GPU: 4 worker processes (one CUDA start-up each), each
    # analyzing its share of the runs through the Python API; stacked and layer rows only.
    spectra: list[dict] = []
    budget = args.deadline_s - elapsed() - 5
    if finished and budget > 10:
        cache, jdir = runs / "spectra-cache", runs / "spectra"
        jdir.mkdir(exist_ok=True)
        shares = [finished[i::4] for i in range(4)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", SPECTRA_WORKER, str(cache), args.device, str(jdir), *map(str, share)],
                stdout=subprocess.DEVNULL,
                stderr=open(runs / "stdout" / f"spectra{i}.txt", "w"),  # noqa: SIM115
            )  # fmt: skip
            for i, share in enumerate(shares)
            if share
        ]
        for p in procs:
            try:
                p.wait(timeout=max(1.0, args.deadline_s - 5 - elapsed()))
            except subprocess.TimeoutExpired:
                p.kill()
        for jl in sorted(jdir.glob("*.jsonl")):
            for line in jl.read_text().splitlines():
                row = json.loads(line)
                if row.get("scope") != "head":
                    row["run"] = jl.stem
                    row["sigma"] = [float(f"{x:.6g}") for x in row.get("sigma", [])]
                    spectra.append(row)
    with gzip.open(out / "spectra.jsonl.gz", "wt") as fh:
        for row in spectra:
            fh.write(json.dumps(row) + "\n")
    env["spectra_rows"] = len(spectra)
    with open(out / "logs.txt", "w") as fh:
        for f in sorted((runs / "stdout").glob("*.txt")):
            lines = f.read_text(errors="replace").splitlines()
            fh.write(f"===== {f.name}\n" + "\n".join(lines[:3] + ["..."] + lines[-12:]) + "\n")
    env["end_s"] = round(elapsed(), 1)
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    log(f"results in {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    sys.exit(main())
