"""`svd-probe sweep`: a grid of `svd-probe train` runs, run by a process pool.

The grid is the product of variants × objectives × output-latent norms × latent sizes × seeds.
An axis a variant lacks collapses instead of multiplying its runs: mha has no latents and no
output-latent norm, mla has latents but no output latent (so neither o_latent nor o_norm);
the collapsed point is listed once. The order is fixed by the command line: seeds outermost (a
sweep cut halfway has every configuration at its first seeds), then variant, objective, o_norm,
q_latent, kv_latent, o_latent in the order given.

Each grid point is one run folder, OUT/CONFIG/seed-N, CONFIG read off the point:

    mha_mlm        mla_clm_kv16        mla-o_mlm_o32_norm-rms        mla-o_mlm_norm-none_init-mha

(an axis the command did not list is left out of the name; mla-o always names its norm; a
sweep with --init-from names the source's variant, and `{seed}` in its path takes each run's), and
its child's stdout and stderr go to OUT/logs/CONFIG.seed-N.log (not into the run folder, which
`train` keeps for its own files). `svd-probe compare OUT` reads every finished run below OUT.

Each run is a child process, `python -m svd_probe.cli train ... --out OUT/CONFIG/seed-N`: a
CUDA context per run, the train command's own resume and signal handling, nothing shared. A
rerun of the sweep skips the runs whose metrics.json is complete and records this grid point's
config and recipe (`is_finished`), and starts the others, which resume from their checkpoint
(run_dir.py decides what may be resumed and refuses the rest, e.g. a changed recipe).

`--shard K/N` keeps grid points K, K+N, K+2N, ... (0-based: K in 0..N-1, as SLURM_ARRAY_TASK_ID
with --array=0-(N-1)), taken over the whole grid before any run is skipped, so every host that
runs the same command with its own K gets a disjoint part, and the N parts make the grid.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svd_probe.atomic import appendable, open_append
from svd_probe.errors import TrainingInputError, shown
from svd_probe.train.config import RESUME_KEYS, ModelConfig, TrainConfig, read_metrics

# Which axes each variant has; the others collapse.
_HAS = {
    "mha": set(),
    "mla": {"q_latent", "kv_latent"},
    "mla-o": {"q_latent", "kv_latent", "o_latent", "o_norm"},
}
_LATENT_TAGS = (("q_latent", "q"), ("kv_latent", "kv"), ("o_latent", "o"))
# Keys a finished run's metrics.json holds (loop.py writes them all at once, atomically).
_METRICS_KEYS = ("variant", "objective", "seed", "config", "train_config", "wall_time_s", "sst2_dev_accuracy")


@dataclass(frozen=True)
class GridPoint:
    """One run of the grid; None: the axis does not apply to the variant or was not listed
    (the train command's default, or the --size preset's, decides)."""

    variant: str
    objective: str
    seed: int
    o_norm: str | None = None
    q_latent: int | None = None
    kv_latent: int | None = None
    o_latent: int | None = None
    init: str | None = None  # --init-from: the source run's variant (the path is the command's)

    @property
    def config_name(self) -> str:
        """The configuration's folder name: variant, objective, the listed latents, the norm."""
        parts = [self.variant, self.objective]
        parts += [f"{tag}{getattr(self, k)}" for k, tag in _LATENT_TAGS if getattr(self, k) is not None]
        if self.variant == "mla-o":
            parts.append(f"norm-{self.o_norm or 'none'}")
        if self.init is not None:
            parts.append(f"init-{self.init}")
        return "_".join(parts)

    @property
    def name(self) -> str:
        """CONFIG/seed-N: the run folder below the sweep's --out."""
        return f"{self.config_name}/seed-{self.seed}"

    def train_args(self) -> list[str]:
        """The `train` flags that set this point (the rest of the command is shared)."""
        args = ["--variant", self.variant, "--objective", self.objective]
        for key in ("o_norm", "q_latent", "kv_latent", "o_latent"):
            value = getattr(self, key)
            if value is not None:
                args += ["--" + key.replace("_", "-"), str(value)]
        return args + ["--seed", str(self.seed)]


@dataclass
class Grid:
    """The axes as listed on the command line; a latent axis of None is not swept."""

    variants: list[str]
    objectives: list[str]
    seeds: list[int]
    o_norms: list[str] = field(default_factory=lambda: ["none"])
    q_latents: list[int] | None = None
    kv_latents: list[int] | None = None
    o_latents: list[int] | None = None


MAX_GRID_POINTS = 10_000  # runs of one sweep: past this a grid is a typo, and listing it alone would take hours


def grid_size(grid: Grid) -> int:
    """How many distinct runs `expand` lists, counted without listing them (the lists are distinct)."""
    sizes = {
        "o_norm": len(grid.o_norms),
        "q_latent": len(grid.q_latents or [None]),
        "kv_latent": len(grid.kv_latents or [None]),
        "o_latent": len(grid.o_latents or [None]),
    }
    per_variant = 0
    for variant in grid.variants:
        n = 1
        for axis in _HAS[variant]:
            n *= sizes[axis]
        per_variant += n
    return len(grid.seeds) * len(grid.objectives) * per_variant


def expand(grid: Grid) -> list[GridPoint]:
    """Every distinct run of the grid, in the documented order (collapsed axes listed once)."""
    n = grid_size(grid)
    if n > MAX_GRID_POINTS:
        raise TrainingInputError(
            f"the grid has {n:,} runs, more than a sweep takes ({MAX_GRID_POINTS:,})",
            hint="list fewer seeds, latent sizes or norms, or split the grid into several sweeps",
        )
    axes: list[list[Any]] = [
        grid.seeds,
        grid.variants,
        grid.objectives,
        grid.o_norms,
        grid.q_latents or [None],
        grid.kv_latents or [None],
        grid.o_latents or [None],
    ]
    points: dict[GridPoint, None] = {}
    for seed, variant, objective, o_norm, q, kv, o in itertools.product(*axes):
        has = _HAS[variant]
        point = GridPoint(
            variant=variant,
            objective=objective,
            seed=seed,
            o_norm=o_norm if "o_norm" in has else None,
            q_latent=q if "q_latent" in has else None,
            kv_latent=kv if "kv_latent" in has else None,
            o_latent=o if "o_latent" in has else None,
        )
        points.setdefault(point, None)
    return list(points)


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N`, 0 <= K < N: the K-th of N parts (0-based)."""
    k_text, sep, n_text = text.partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        k, n = -1, 0
    if not sep or n < 1 or not 0 <= k < n:
        raise TrainingInputError(
            f"bad --shard {shown(text)}: K/N with 0 <= K < N",
            hint="e.g. --shard 0/4 ... --shard 3/4, or --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT "
            "with --array=0-3",
        )
    return k, n


def shard(points: list[GridPoint], k: int, n: int) -> list[GridPoint]:
    """Grid points k, k + n, k + 2n, ... (0-based)."""
    return points[k::n]


def parse_list(text: str, flag: str, choices: tuple[str, ...] | None = None) -> list[str]:
    """A comma list of distinct words (from `choices`, when given), in the order given."""
    items = [t.strip().lower() for t in text.split(",")]
    if not items or any(not t for t in items) or len(set(items)) != len(items):
        raise TrainingInputError(f"bad {flag} {text!r}: a comma list of distinct values", hint=f"e.g. {flag} a,b")
    if choices is not None:
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise TrainingInputError(
                f"bad {flag} {text!r}: unknown {', '.join(unknown)}", hint=f"use some of: {','.join(choices)}"
            )
    return items


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(t) for t in parse_list(text, flag)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise TrainingInputError(f"bad {flag} {text!r}: a comma list of positive integers", hint=f"e.g. {flag} 32,64")
    return values


# ---- the state of a run folder -------------------------------------------------------------------


def is_finished(run_dir: Path, cfg: ModelConfig, tc: TrainConfig) -> bool:
    """metrics.json is complete and records this config and recipe (the tokenizer decides the
    vocabulary size and seq_len the position table, so those two are not compared)."""
    return _recorded_match(run_dir, cfg, tc) is True


def _recorded_match(run_dir: Path, cfg: ModelConfig, tc: TrainConfig) -> bool | None:
    """None: no complete metrics.json; else whether it records this config and recipe."""
    try:
        m = read_metrics(Path(run_dir) / "metrics.json")
    except TrainingInputError:
        return None
    if any(k not in m for k in _METRICS_KEYS):
        return None
    recorded, recipe = m["config"], m["train_config"]
    if not isinstance(recorded, dict) or not isinstance(recipe, dict):
        return None
    mine = {k: v for k, v in cfg.to_dict().items() if k not in ("vocab_size", "max_seq_len")}
    theirs = ModelConfig.from_dict(recorded).to_dict()
    if any(theirs.get(k) != v for k, v in mine.items()):
        return False
    # metrics.json records the fine-tuning steps taken; compare them only when the recipe set them.
    keys = [k for k in RESUME_KEYS if k != "finetune_steps" or tc.finetune_steps is not None]
    if any(recipe.get(k) != getattr(tc, k) for k in keys):
        return False
    init = m.get("init_from")
    want = None if tc.init_from is None else str(Path(tc.init_from))
    return (init.get("source") if isinstance(init, dict) else None) == want


def run_state(run_dir: Path, cfg: ModelConfig, tc: TrainConfig) -> str:
    """ "finished"; "differs" (finished under another config or recipe: `train` will refuse it);
    "cut" (a checkpoint or a log: `train` resumes it); or "new"."""
    run_dir = Path(run_dir)
    match = _recorded_match(run_dir, cfg, tc)
    if match is not None:
        return "finished" if match else "differs"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "cut"
    return "new"


# ---- the pool ------------------------------------------------------------------------------------


@dataclass
class SweepRun:
    """One grid point to run: where, with which command line, logged where."""

    point: GridPoint
    run_dir: Path
    log: Path
    argv: list[str]  # the `train` arguments (after `python -m svd_probe.cli`)
    state: str = "new"  # before the sweep: finished, cut, new


@dataclass
class RunOutcome:
    run: SweepRun
    status: str  # finished, stopped (--stop-after), interrupted, failed, skipped, not started, busy
    returncode: int | None = None
    seconds: float = 0.0
    slot: str | None = None  # CUDA_VISIBLE_DEVICES of the child, None: inherited


def device_slots(parallel: int, device: str, gpu_count: int, visible: str | None) -> list[str | None]:
    """One entry per concurrent run: the CUDA_VISIBLE_DEVICES its child gets (None: unchanged).

    On a host with several GPUs (and --device auto or cuda) each GPU takes `parallel` runs, one
    CUDA_VISIBLE_DEVICES entry each, the slots interleaved so the first runs spread over the GPUs;
    with one GPU, a --device cuda:N, or the CPU, the runs share the device they would use alone."""
    if parallel < 1:
        raise TrainingInputError(f"--parallel must be at least 1, got {parallel}")
    if device not in ("auto", "cuda") or gpu_count < 2:
        return [None] * parallel
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    if len(ids) < gpu_count:
        ids = [str(i) for i in range(gpu_count)]
    gpus = ids[:gpu_count]
    return [g for _ in range(parallel) for g in gpus]


class _Children:
    """The running children, for the signal handler to reach; no new child after a stop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stop_signal: str | None = None

    def start(self, argv: list[str], env: dict, log) -> subprocess.Popen | None:
        with self.lock:
            if self.stop_signal is not None:
                return None
            # Its own session: a Ctrl-C on the terminal reaches the sweep, which forwards it.
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.procs.add(proc)
            return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)

    def forward(self, signum: int) -> None:
        with self.lock:
            if self.stop_signal is None:
                self.stop_signal = signal.Signals(signum).name
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)


def child_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "svd_probe.cli", *argv]


def run_pool(
    runs: list[SweepRun],
    slots: list[str | None],
    on_event: Callable[[str, RunOutcome], None] | None = None,
) -> tuple[list[RunOutcome], str | None]:
    """Run `runs` (skipping the finished) `len(slots)` at a time; returns each run's outcome,
    in order, and the name of the signal that stopped the sweep (None: it ran to the end).

    SIGINT or SIGTERM stops the sweep: the signal goes to every running child (which checkpoints
    after its step and exits), no further run starts. `on_event("start" | "end", outcome)`."""
    notify = on_event or (lambda kind, outcome: None)
    children = _Children()
    free: queue.Queue[str | None] = queue.Queue()
    for s in slots:
        free.put(s)

    def one(run: SweepRun) -> RunOutcome:
        slot = free.get()
        try:
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            run.log.parent.mkdir(parents=True, exist_ok=True)
            with open_append(run.log, hint="remove it, or pass another --out") as log:
                # The log's lock is held by the child too (its stdout is this file): while a
                # run trains, even if this sweep is killed, no other sweep starts it again.
                try:
                    fcntl.flock(log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return RunOutcome(run, "busy")
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} svd-probe {' '.join(run.argv)}\n")
                log.flush()
                t0 = time.perf_counter()
                proc = children.start(child_command(run.argv), env, log)
                if proc is None:
                    return RunOutcome(run, "not started")
                notify("start", RunOutcome(run, "running", slot=slot))
                try:
                    rc = proc.wait()
                finally:
                    children.done(proc)
            seconds = time.perf_counter() - t0
            if rc == 0:
                status = "finished" if (run.run_dir / "metrics.json").is_file() else "stopped"
            elif rc in (130, 143) and children.stop_signal is not None:
                status = "interrupted"
            else:
                status = "failed"
            outcome = RunOutcome(run, status, rc, seconds, slot)
            notify("end", outcome)
            return outcome
        finally:
            free.put(slot)

    todo = [r for r in runs if r.state != "finished"]
    check_logs(todo)
    with _forward_signals(children), ThreadPoolExecutor(max_workers=max(1, len(slots))) as pool:
        futures = {id(r): pool.submit(one, r) for r in todo}
        while not all(f.done() for f in futures.values()):
            time.sleep(0.1)  # the main thread stays free for the signal handler
    outcomes = [futures[id(r)].result() if id(r) in futures else RunOutcome(r, "skipped") for r in runs]
    return outcomes, children.stop_signal


def check_run_dir(out_dir: Path, run_dir: Path) -> None:
    """The run folder OUT/CONFIG/seed-N is a real folder inside OUT where it exists: a link
    there (in a sweep folder received or edited) would have `train` read and write elsewhere."""
    rel = Path(run_dir).relative_to(out_dir)
    where = Path(out_dir)
    for part in rel.parts:
        where = where / part
        if where.is_symlink() or (where.exists() and not where.is_dir()):
            raise TrainingInputError(
                f"{where} is a link or a file, not a folder of this sweep",
                hint="remove it (a sweep writes its runs only inside --out), or pass another --out",
            )


def check_logs(runs: list[SweepRun]) -> None:
    """Before any run starts: each log folder is a real folder and each log, where it exists, a
    plain file (logs are appended to: through a link they would grow a file outside --out, and
    a FIFO would block). `open_append` checks again at the open itself."""
    for run in runs:
        folder = run.log.parent
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise TrainingInputError(
                f"{folder} is a link or a file, not a folder", hint="remove it, or pass another --out"
            )
        if not appendable(run.log):
            raise TrainingInputError(
                f"{run.log} is a link, pipe or device, not a plain file", hint="remove it, or pass another --out"
            )


class _forward_signals:
    """While the pool runs, SIGINT and SIGTERM go to the children (see run_pool)."""

    def __init__(self, children: _Children):
        self.children = children
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.getsignal(s)
            signal.signal(s, lambda signum, frame: self.children.forward(signum))

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def iter_status(outcomes: list[RunOutcome], status: str) -> Iterator[RunOutcome]:
    return (o for o in outcomes if o.status == status)
