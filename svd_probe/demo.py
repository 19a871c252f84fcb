"""`svd-probe demo`: the whole path offline, in one folder, with nothing left running.

It writes a small checkpoint in DeepSeek-V3's layout (`testing.checkpoints.build_deepseek_v3`:
real tensor names, FP8 with 128×128 scale blocks, 5 shards, 3 layers + 1 MTP layer), serves it
on loopback with the Hub stand-in (`testing.fake_hub`, a random free port), analyzes it through
the Hub protocol (HEAD, Range reads, signed redirects), exports the spectra and the metrics table
and draws the figures. The stand-in stops when the demo ends, also on an error or Ctrl-C.

Everything goes under one folder (default `svd-probe-demo/`):

    checkpoint/          the generated checkpoint (the stand-in serves it as demo/tiny-deepseek-v3)
    cache/               the spectra cache: pass `--cache-dir DIR/cache` to export, plot, report
    spectra.jsonl        one spectrum a line;  metrics.csv  one row a spectrum
    plots/               the figures

The folder is marked with `.svd-probe-demo`; a non-empty folder without that mark is refused, so
the demo never overwrites files it did not make. Running it again reuses the folder: the analysis
comes from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from svd_probe.errors import OutputExistsError

if TYPE_CHECKING:
    from svd_probe.analysis import AnalyzeOutcome

DEMO_REPO = "demo/tiny-deepseek-v3"
DEFAULT_DEMO_DIR = Path("svd-probe-demo")
MARK = ".svd-probe-demo"


@dataclass
class DemoPaths:
    """Where the demo writes; all under `root`."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def jsonl(self) -> Path:
        return self.root / "spectra.jsonl"

    @property
    def csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


@dataclass
class DemoResult:
    """What `run_demo` did: the analyze outcome, the files written, the stand-in's endpoint."""

    paths: DemoPaths
    outcome: AnalyzeOutcome
    endpoint: str
    rows: dict[str, int] = field(default_factory=dict)  # export file -> rows
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def prepare_folder(root: str | Path) -> DemoPaths:
    """Create (or reuse) the demo folder; refuse a non-empty folder the demo did not make."""
    paths = DemoPaths(Path(root))
    r = paths.root
    if r.exists() and not r.is_dir():
        raise OutputExistsError(f"{r} exists and is not a folder", "Pass another --out folder.")
    if r.is_dir() and any(r.iterdir()) and not (r / MARK).is_file():
        raise OutputExistsError(
            f"{r} is not empty and was not made by `svd-probe demo`",
            "Pass an empty or new folder with --out; the demo never overwrites other files.",
        )
    r.mkdir(parents=True, exist_ok=True)
    (r / MARK).write_text("made by `svd-probe demo`; safe to delete with the folder\n")
    return paths


def build_checkpoint(paths: DemoPaths) -> Path:
    """The demo checkpoint (deterministic: seed 0); built once, reused on reruns."""
    from svd_probe.testing.checkpoints import build_deepseek_v3

    folder = paths.checkpoint
    if not (folder / "model.safetensors.index.json").is_file():
        build_deepseek_v3(folder)
    return folder


def run_demo(root: str | Path = DEFAULT_DEMO_DIR, *, progress=None, device: str = "auto") -> DemoResult:
    """Build, serve, analyze, export and plot; the stand-in is stopped however this ends.

    Args:
        root: the demo folder (see the module docstring).
        progress: passed to `analyze` (a `report.LayerProgress`, or None).
        device: auto, cpu or cuda.

    Returns:
        A `DemoResult`; the cache it filled is read offline with
        `load_analysis(CacheQuery("demo/tiny-deepseek-v3", cache_dir=root / "cache"))`.
    """
    paths = prepare_folder(root)  # first: a refused folder costs no imports
    from svd_probe.analysis import AnalyzeJob, analyze
    from svd_probe.export import export
    from svd_probe.plots import make_plots
    from svd_probe.results import CacheQuery
    from svd_probe.testing.fake_hub import FakeHub

    folder = build_checkpoint(paths)
    with FakeHub() as hub:
        hub.add_repo(DEMO_REPO, folder)
        outcome = analyze(
            AnalyzeJob(DEMO_REPO, endpoint=hub.endpoint, cache_dir=paths.cache, device=device), progress=progress
        )
        endpoint = hub.endpoint
    query = CacheQuery(DEMO_REPO, cache_dir=paths.cache)
    result = DemoResult(paths=paths, outcome=outcome, endpoint=endpoint, notes=list(outcome.notes))
    for fmt, out in (("jsonl", paths.jsonl), ("csv", paths.csv)):
        result.rows[str(out)] = export(query, format=fmt, out=out, overwrite=True)
    report = make_plots([query], out_dir=paths.plots, dpi=100)
    result.figures = list(report.files)
    result.notes += report.notes
    return result
