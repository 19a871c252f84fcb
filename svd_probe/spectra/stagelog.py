"""Where a solve's host time goes, stage by stage: an opt-in log for benchmarks.

`with stagelog.recording() as log:` collects one `Span` per stage that the band solvers pass
through on any thread (stage 1's launches, the wait for it, the bulge chase's queue and launch,
the bisection, a CPU worker's stage 2), and `summary(log)` totals them per stage. Outside
`recording()` a span costs one global read. torch.profiler would record every one of stage 1's
4,500 kernel launches a problem and their Python frames, which changes the timing it measures
(hundreds of thousands of events over a model); this records a handful of spans a problem.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Span", "recording", "span", "summary"]


@dataclass(frozen=True)
class Span:
    stage: str
    thread: int
    start: float  # time.perf_counter()
    end: float


_log: list[Span] | None = None
_lock = threading.Lock()


@contextlib.contextmanager
def recording() -> Iterator[list[Span]]:
    """Record every span while the block runs (one recording at a time); the list fills as it goes."""
    global _log
    with _lock:
        if _log is not None:
            raise RuntimeError("stagelog.recording() is already on")
        log: list[Span] = []
        _log = log
    try:
        yield log
    finally:
        with _lock:
            _log = None


@contextlib.contextmanager
def span(stage: str) -> Iterator[None]:
    """Time the block as one span of `stage` if a recording is on."""
    log = _log
    if log is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        log.append(Span(stage, threading.get_ident(), t0, time.perf_counter()))  # list.append is atomic


def summary(log: list[Span]) -> dict[str, dict[str, float]]:
    """Per stage: spans, total and mean seconds, the longest, and `busy_s`, the time in which at
    least one span of the stage was open (total / busy is how many ran at once, on average)."""
    out: dict[str, dict[str, float]] = {}
    for stage in sorted({s.stage for s in log}):
        spans = sorted((s.start, s.end) for s in log if s.stage == stage)
        durations = [b - a for a, b in spans]
        busy, reach = 0.0, float("-inf")
        for a, b in spans:  # the union of the intervals, in start order
            if b > reach:
                busy += b - max(a, reach)
                reach = b
        out[stage] = {
            "count": len(spans),
            "total_s": round(sum(durations), 4),
            "mean_s": round(sum(durations) / len(spans), 5),
            "max_s": round(max(durations), 4),
            "busy_s": round(busy, 4),
        }
    return out
