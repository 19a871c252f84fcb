"""End to end: does `svd-probe analyze` overlap reading and computing? (issue: a whole DeepSeek-V3)

Builds (or reuses, in `--ckpt`) a checkpoint of DeepSeek-V3's real attention shapes
(`build_deepseek_v3_real(layers, experts_per_layer=0, n_shards=16)`: 187 MB of FP8 per layer,
11.6 GB at 62 layers), serves it with the Hub stand-in in its own process, and measures, each
phase in a fresh process of its own (so peak RSS and peak GPU memory are per phase):

    read-http / read-local   `stream_layers` to the device (FP8 dequantized there), no spectra
    compute                  factors + spectra of every layer from tensors already on the
                             device (at most 8 distinct layers resident, cycled: the solves'
                             time does not depend on the values), as `analyze` launches them
    analyze-http / -local    `analyze` into an empty cache, over HTTP and from the folder
                             (`--nproc N`: under torchrun with N ranks)

and prints the ratio of each `analyze` to the slower of its read-only and compute-only times
(the goal: at most 1.05). The page cache is warmed first, so the folder is read from memory.

    PYTHONPATH=. python benchmarks/bench_e2e.py --device cuda --json e2e.json        # 62 layers
    PYTHONPATH=. python benchmarks/bench_e2e.py --layers 2 --device cpu              # a smoke run
    PYTHONPATH=. python benchmarks/bench_e2e.py --device cuda --phases compute --trace 8 --json e2e.json
                                        # + a kernel timeline of 8 layers of compute (e2e-compute-trace.json.gz)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's svd_probe, as in PYTHONPATH=.

REPO = "bench/deepseek-v3-real"
PHASES = ("read-http", "read-local", "compute", "analyze-http", "analyze-local")


def _cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of a running process, from /proc (Linux; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_gb() -> float:
    """This process's peak RSS. Linux keeps ru_maxrss across fork and execve, so a phase process
    would report its parent's peak (the checkpoint build); VmHWM belongs to the process's own
    memory map, new at execve. ru_maxrss where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _gpu_peak_gb(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _source(args, http: bool):
    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.reader_process import pick_reader
    from svd_probe.models import ModelRef, resolve_model
    from svd_probe.options import pick_device

    if http:  # read-http reads with the reader analyze would pick
        return open_checkpoint(
            ModelRef(name="bench", repo_id=REPO),
            endpoint=args.endpoint,
            concurrency=args.concurrency,
            reader=pick_reader(args.reader, pick_device(args.device).type),
        )
    return open_checkpoint(resolve_model(str(args.ckpt)))


def _plan(src):
    from svd_probe.adapters import adapter_for

    adapter = adapter_for(src.config, src.tensor_names)
    kinds = set(adapter.supported_kinds())
    layers = list(range(adapter.dims().num_layers))
    return adapter, kinds, layers


def phase(args) -> dict:
    """One phase, in this process; returns its figures."""
    from svd_probe.options import pick_device

    device = pick_device(args.device)
    out: dict = {"phase": args.phase}
    cpu0 = os.times()
    from svd_probe.spectra import band

    if args.band_workers:
        band.use_stage2_workers("processes", args.band_workers)  # guarded script: see main
    if args.hybrid_rule:
        band.use_hybrid_rule(args.hybrid_rule)
    if args.chase_launches != 1:
        from svd_probe.spectra import bulge

        bulge.use_chase_launches(args.chase_launches)
    from svd_probe.spectra import stagelog

    syncs = _SyncCounter() if args.sync_debug and device.type == "cuda" else None
    with stagelog.recording() if args.stages else contextlib.nullcontext() as log, syncs or contextlib.nullcontext():
        out.update(_run_phase(args, device, out))
    if log is not None:
        out["stages"] = stagelog.summary(log)
    if syncs is not None:
        out["syncs"] = syncs.summary()
    cpu = os.times()
    # Host CPU seconds of this phase's process, all its threads (user + system), children too:
    # against the wall time it says how much of the host the phase keeps busy (the HTTP reader
    # threads' parsing, the band solver's worker processes).
    user = cpu.user - cpu0.user + cpu.children_user - cpu0.children_user
    system = cpu.system - cpu0.system + cpu.children_system - cpu0.children_system
    out["cpu_s"], out["cpu_user_s"], out["cpu_system_s"] = round(user + system, 2), round(user, 2), round(system, 2)
    out["peak_rss_gb"] = _peak_rss_gb()
    out["peak_gpu_gb"] = _gpu_peak_gb(device)
    out["device"] = str(device)
    return out


class _SyncCounter:
    """--sync-debug: every synchronizing CUDA call of the phase (torch.cuda.set_sync_debug_mode
    "warn"), counted by thread (the main thread, which submits the layers, or a solver worker)
    and by the innermost svd_probe frame that made it. A sync on the main thread waits for all
    the work queued on its stream, behind whatever else holds the GPU (the chases' spinning
    programs), so these are the suspects for the main thread's 0.42-0.51 s a layer of submits."""

    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}

    def __enter__(self):
        import threading
        import traceback

        import torch

        self._saved = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message).lower():  # torch: "called a synchronizing CUDA operation"
                return self._saved(message, category, filename, lineno, file, line)
            who = "main" if threading.current_thread() is threading.main_thread() else "worker"
            frames = [f for f in traceback.extract_stack() if "svd_probe" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            self.counts[(who, where)] = self.counts.get((who, where), 0) + 1

        warnings.showwarning = show
        self._filters = warnings.filters[:]
        warnings.filterwarnings("always", message="(?i).*synchroniz.*")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._saved
        warnings.filters[:] = self._filters

    def summary(self) -> dict:
        out: dict = {}
        for (who, where), n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            out.setdefault(who, {})[where] = n
        return out


TRACE_WARMUP = 4  # layers before a --trace window: first launches, cuBLAS/cuSOLVER handles, worker start
TRACE_MAX_GZ = 15 << 20  # a gzipped chrome trace over this is left out (the JSON's summary stays)
TRACE_MARK = "bench_e2e: trace window"  # the record_function that spans the window on the main thread


def union_seconds(intervals, lo: float = -math.inf, hi: float = math.inf) -> float:
    """Length of the union of the (start, end) intervals, each clipped to [lo, hi]. By hand:
    torch.profiler sums kernel times by name, never the wall time a stream or the GPU is busy."""
    total, cur_start, cur_end = 0.0, 0.0, -math.inf
    for start, end in sorted((max(s, lo), min(e, hi)) for s, e in intervals):
        if end <= start:
            continue
        if start > cur_end:  # a gap: the run so far is closed
            total += max(0.0, cur_end - cur_start)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + max(0.0, cur_end - cur_start)


def stream_busy(kernels, lo: float, hi: float) -> dict:
    """(stream, start_s, end_s) of each kernel -> per stream: the kernels that overlap the window
    [lo, hi], their union in it (busy_s) and its fraction of the window; and all streams together:
    the union over streams, its fraction, and idle_s, the window's time with no kernel running."""
    window = hi - lo
    by_stream: dict[str, list] = collections.defaultdict(list)
    for stream, start, end in kernels:
        if start < hi and end > lo:
            by_stream[str(stream)].append((start, end))

    def frac(x: float) -> float | None:
        return round(x / window, 4) if window > 0 else None

    streams: dict[str, dict] = {}
    for stream, iv in by_stream.items():
        busy = union_seconds(iv, lo, hi)
        streams[stream] = {"kernels": len(iv), "busy_s": round(busy, 6), "fraction": frac(busy)}
    busy = union_seconds([iv for ivs in by_stream.values() for iv in ivs], lo, hi)
    return {
        "streams": dict(sorted(streams.items(), key=lambda kv: -kv[1]["busy_s"])),
        "all": {
            "kernels": sum(st["kernels"] for st in streams.values()),
            "busy_s": round(busy, 6),
            "fraction": frac(busy),
            "idle_s": round(window - busy, 6),
        },
    }


def trace_window(n: int, layers: int) -> tuple[int, int] | None:
    """The layers [first, end) a --trace N window covers: N in the middle of the model, none of
    the first TRACE_WARMUP; None (the whole run) where the model has too few layers for that."""
    first = max(TRACE_WARMUP, (layers - n) // 2)
    return (first, first + n) if first + n <= layers else None


class _Trace:
    """--trace N: torch.profiler (CPU ops of every thread of the phase's process, and on CUDA its
    kernels and copies on every stream) over N layers of the compute phase: from the submit of
    layer `first` to the return of layer `end - 1`'s σ, other layers then in flight included; the
    whole run where the model is too small (trace_window). The band solvers' stage-2 worker
    processes are not seen (their LAPACK runs in other processes); their waits are, on the
    threads that wait. Stopping the profiler synchronizes the device (torch does) and parsing its
    events takes a while: the phase's `seconds` carry that cost, so compare them only untraced."""

    def __init__(self, n: int, layers: int, device, path: Path | None):
        self.n, self.layers, self.device, self.path = n, layers, device, path
        self.window = trace_window(n, layers)
        self.whole = self.window is None
        self.prof: Any = None  # torch.profiler.profile, once begun
        self.all_threads = False
        self.wall_s: float | None = None
        # SVD_PROBE_TRACE_LOG=FILE: each step of the trace's end, and its tables before the chrome
        # trace is written, appended as they happen: the phase's stdout comes back only at its end,
        # and a GPU call's timeout would lose where the time went.
        self.log = os.environ.get("SVD_PROBE_TRACE_LOG")
        self._c0 = time.perf_counter()

    def note(self, what: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{time.perf_counter() - self._c0:9.2f} s  {what}\n")

    def before_submit(self, i: int) -> None:
        if self.window and i == self.window[0]:
            self.begin()

    def after_result(self, i: int) -> None:
        if self.window and i == self.window[1] - 1:
            self.end()

    def begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        config = None
        try:  # without it only the thread that starts the profiler has its CPU ops recorded
            from torch.profiler import _ExperimentalConfig

            config = _ExperimentalConfig(profile_all_threads=True)
            self.all_threads = True
        except (ImportError, TypeError):  # an older torch: the main thread's ops only
            pass
        self.prof = profile(activities=activities, experimental_config=config)
        self.prof.start()
        self._mark = record_function(TRACE_MARK)
        self._mark.__enter__()
        self._t0 = time.perf_counter()
        self.note(f"trace: begun (window {self.window})")

    def end(self) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self._mark.__exit__(None, None, None)
        assert self.prof is not None
        self.note(f"trace: window closed after {self.wall_s:.2f} s; stopping the profiler")
        self.prof.stop()
        self.note("trace: profiler stopped")

    def summary(self) -> dict:
        out: dict = {"layers": self.layers, "n": self.n, "whole_run": self.whole}
        out["window_layers"] = list(self.window) if self.window else [0, self.layers]
        out["wall_s"] = round(self.wall_s, 4) if self.wall_s is not None else None
        out["all_threads"] = self.all_threads
        try:
            out.update(self._tables())
        except Exception as e:  # noqa: BLE001 - a torch whose events look otherwise: keep the phase's figures
            out["error"] = f"{type(e).__name__}: {e}"
        self.note("trace: tables " + json.dumps(out))
        out.update(self._chrome_trace())
        self.note(f"trace: chrome trace {out.get('chrome_trace_note') or out.get('chrome_trace_mib')}")
        return out

    def _tables(self) -> dict:
        from torch.profiler import DeviceType

        assert self.prof is not None
        events = self.prof.events()
        self.note(f"trace: {len(events)} events parsed")
        cpu = [e for e in events if e.device_type == DeviceType.CPU]
        # on CUDA the marker has a GPU twin (a gpu_user_annotation over its kernels): the CPU one
        mark = next((e for e in cpu if e.name == TRACE_MARK), None)
        if mark is not None:  # the window on the profiler's clock (µs since the trace began)
            lo, hi = mark.time_range.start / 1e6, mark.time_range.end / 1e6
        else:
            lo = min((e.time_range.start / 1e6 for e in events), default=0.0)
            hi = lo + (self.wall_s or 0.0)
        out: dict = {}
        cpu_names = {e.name for e in cpu}
        kernels: list[tuple] = []
        copies: list[tuple] = []
        kinds: collections.Counter[str] = collections.Counter()
        streams_known = True
        for e in events:
            if e.device_type == DeviceType.CPU:
                continue
            kind = getattr(e, "activity_type", None)  # "kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation"
            if kind is None:  # a torch without it: told apart by name; a GPU-side record_function
                if getattr(e, "is_user_annotation", False) or e.name in cpu_names:  # bears its CPU twin's name
                    kind = "gpu_user_annotation"
                else:
                    kind = "gpu_memcpy" if e.name.startswith(("Memcpy", "Memset")) else "kernel"
            kinds[kind] += 1
            # Kineto's kernel and copy records carry their CUDA stream in device_resource_id; a
            # torch without it pools every kernel under stream "?": the per-stream split is lost,
            # the all-streams union (the GPU's idle time) stays right.
            stream = getattr(e, "device_resource_id", None)
            if stream is None:
                stream, streams_known = "?", False
            iv = (stream, e.time_range.start / 1e6, e.time_range.end / 1e6, e.name)
            if kind == "kernel":
                kernels.append(iv)
            elif kind in ("gpu_memcpy", "gpu_memset"):
                copies.append(iv)
        if self.device.type == "cuda":
            out["device_events"] = dict(kinds)  # what was counted: kernels, copies; annotations left out
            out["streams_known"] = streams_known
            busy = stream_busy([iv[:3] for iv in kernels], lo, hi)
            out["streams"] = dict(list(busy["streams"].items())[:32])
            out["gpu"] = busy["all"]
            cp = stream_busy([iv[:3] for iv in copies], lo, hi)["all"]  # memcpy, memset: all streams
            out["copies"] = {"count": cp["kernels"], "busy_s": cp["busy_s"], "fraction": cp["fraction"]}
            names = {iv[3] for iv in kernels + copies}
            self.note(f"trace: {len(kernels)} kernels, {len(copies)} copies; averaging")
            gpu_ops = [a for a in self.prof.key_averages() if a.device_type != DeviceType.CPU and a.key in names]
            gpu_ops.sort(key=lambda a: -a.device_time_total)
            out["top_kernels"] = [  # kernels and copies launched in the window, by total GPU time
                {
                    "name": a.key[:120],
                    "count": a.count,
                    "total_s": round(a.device_time_total / 1e6, 6),
                    "mean_ms": round(a.device_time_total / 1e3 / max(1, a.count), 4),
                }
                for a in gpu_ops[:25]
            ]
        # By hand: key_averages groups by name (shapes, stack), never by thread. A CPU op carries
        # its OS thread id in device_resource_id, `thread` is torch's own number of the thread; a
        # CUDA runtime call (cudaStreamSynchronize, cudaMemcpyAsync) gets its op's `thread`.
        main_ids = {threading.main_thread().native_id, threading.main_thread().ident}
        os_tid: dict[int, int] = {}
        for e in cpu:
            if getattr(e, "activity_type", "cpu_op") in ("cpu_op", "user_annotation"):
                os_tid.setdefault(e.thread, getattr(e, "device_resource_id", None) or e.thread)
        ops: dict[tuple[str, int], list] = {}
        for e in cpu:
            if e.is_async:
                continue
            tid = os_tid.get(e.thread) or getattr(e, "device_resource_id", None) or e.thread
            row = ops.setdefault((e.name, tid), [0, 0.0, 0.0])
            row[0] += 1
            row[1] += e.self_cpu_time_total / 1e6
            row[2] += e.cpu_time_total / 1e6
        out["threads"] = len({tid for _, tid in ops})
        out["top_cpu_ops"] = [
            {
                "name": name[:120],
                "thread": tid,
                "main": tid in main_ids,
                "count": n,
                "self_s": round(self_s, 6),
                "total_s": round(total_s, 6),
            }
            for (name, tid), (n, self_s, total_s) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:15]
        ]
        return out

    def _chrome_trace(self) -> dict:
        if self.path is None:
            return {"chrome_trace": None, "chrome_trace_note": "no --json: not written"}
        assert self.prof is not None
        tmp = self.path.with_name(f".{self.path.name}")  # ends in .gz: torch gzips it
        try:
            self.prof.export_chrome_trace(str(tmp))
            size = tmp.stat().st_size
        except OSError as e:
            tmp.unlink(missing_ok=True)
            return {"chrome_trace": None, "chrome_trace_note": f"not written: {e}"}
        if size > TRACE_MAX_GZ:
            tmp.unlink()
            note = f"left out: {size / 2**20:.1f} MiB gzipped, over {TRACE_MAX_GZ >> 20} MiB"
            return {"chrome_trace": None, "chrome_trace_note": note}
        tmp.replace(self.path)
        return {"chrome_trace": str(self.path), "chrome_trace_mib": round(size / 2**20, 2)}


def trace_lines(tr: dict) -> list[str]:
    """The short, human-readable form of a phase's "trace" entry, printed after its line."""
    first, end = tr["window_layers"]
    span = "the whole run" if tr["whole_run"] else f"layers {first}-{end - 1}"
    wall = f"{tr['wall_s']:.2f} s" if tr.get("wall_s") is not None else "?"
    threads = "all threads" if tr.get("all_threads") else "main thread only"
    lines = [f"  trace: {span} of {tr['layers']}, window {wall}, CPU ops of {threads} ({tr.get('threads', '?')} seen)"]
    if tr.get("error"):
        lines.append(f"    summary failed: {tr['error']}")
    gpu = tr.get("gpu")
    if gpu:
        lines.append(
            f"    GPU: {gpu['kernels']} kernels, busy {gpu['busy_s']:.3f} s = {100 * (gpu['fraction'] or 0):.1f}% of the"
            f" window (no kernel {gpu['idle_s']:.3f} s); copies busy {tr['copies']['busy_s']:.3f} s"
        )
        for stream, st in list(tr["streams"].items())[:8]:
            lines.append(
                f"    stream {stream:>6s}: {st['kernels']:7d} kernels, busy {st['busy_s']:8.3f} s"
                f" ({100 * (st['fraction'] or 0):5.1f}%)"
            )
        if tr.get("top_kernels"):
            lines.append("    top kernels, by GPU time:")
        for k in tr.get("top_kernels", [])[:5]:
            lines.append(f"    {k['total_s']:8.3f} s {k['count']:7d} x {k['mean_ms']:8.3f} ms  {k['name'][:70]}")
    elif "top_cpu_ops" in tr:
        lines.append("    no CUDA activity (CPU only)")
    if tr.get("top_cpu_ops"):
        lines.append("    top CPU ops, by self time (thread):")
    for op in tr.get("top_cpu_ops", [])[:6]:
        who = "main" if op["main"] else str(op["thread"])
        name = op["name"][:70] + (" (outside torch ops: Python, waits)" if op["name"] == TRACE_MARK else "")
        lines.append(f"    {op['self_s']:8.3f} s {op['count']:7d} calls  {who:>8s}  {name}")
    if tr.get("chrome_trace"):
        lines.append(f"    chrome trace: {tr['chrome_trace']} ({tr['chrome_trace_mib']:.2f} MiB)")
    else:
        lines.append(f"    chrome trace: {tr.get('chrome_trace_note')}")
    return lines


def _run_phase(args, device, out: dict) -> dict:
    """The phase's own work; its figures go into `out`."""
    if args.phase.startswith("read"):
        from svd_probe.hub.stream import stream_layers

        t_open = time.perf_counter()
        src = _source(args, args.phase == "read-http")
        adapter, kinds, layers = _plan(src)
        # The start-up that `analyze` pays before its first layer can compute: opening the source
        # (config, index, shard headers) and the first layer's read. At 16 layers it weighs 4x
        # what it does at 62, which bears on the ratio (benchmarks/README.md, bench_e2e).
        out["open_s"] = time.perf_counter() - t_open
        t = time.perf_counter()
        arrivals = []
        for _layer, tensors in stream_layers(src, layers, lambda L: adapter.plan(L, kinds, True), device, prefetch=2):
            _sync(device)
            arrivals.append(round(time.perf_counter() - t, 4))
            del tensors
        out["seconds"] = time.perf_counter() - t
        out["arrivals_s"] = arrivals
        out["bytes"] = src.bytes_fetched
        out["requests_in_flight"] = src.stats.get("in_flight") or None
    elif args.phase == "compute":
        from svd_probe.analysis import AnalyzeJob
        from svd_probe.hub.stream import stream_layers
        from svd_probe.spectra.compute import SpectraPipeline, pipeline_config

        src = _source(args, False)
        adapter, kinds, layers = _plan(src)
        resident = [
            (layer, t)
            for layer, t in stream_layers(src, layers[:8], lambda L: adapter.plan(L, kinds, True), device, prefetch=1)
        ]
        _sync(device)
        cfg = pipeline_config(device, args.solver, args.inflight)  # as `analyze`
        trace = _Trace(args.trace, len(layers), device, args.trace_file) if args.trace else None
        if trace and trace.whole:
            trace.begin()
        t = time.perf_counter()
        with SpectraPipeline(kinds, config=cfg) as pipe:
            # the σ of each layer to the host, oldest first, with as many layers waiting as
            # analyze's writer queue allows: the pipeline keeps `inflight` busy
            depth = max(AnalyzeJob.write_queue, cfg.inflight)
            waiting: collections.deque = collections.deque()
            for i in range(len(layers)):
                layer, tensors = resident[i % len(resident)]
                if trace:
                    trace.before_submit(i)
                waiting.append((i, pipe.submit(adapter.factors(layer, tensors, kinds, True))))
                if len(waiting) > depth:
                    j, pending = waiting.popleft()
                    pending.result()
                    if trace:
                        trace.after_result(j)
            while waiting:
                j, pending = waiting.popleft()
                pending.result()
                if trace:
                    trace.after_result(j)
        _sync(device)
        out["seconds"] = time.perf_counter() - t
        if trace:
            if trace.whole:
                trace.end()
            out["trace"] = trace.summary()  # read after the timing: the events are parsed here
        out["resident_layers"] = len(resident)
        out["inflight"] = cfg.inflight
        out["solver"] = cfg.resolved(device).solver
    else:
        from svd_probe.analysis import AnalyzeJob, analyze

        http = args.phase == "analyze-http"
        model = REPO if http else str(args.ckpt)
        cache = Path(tempfile.mkdtemp(prefix="bench-e2e-cache-"))
        try:
            if args.nproc > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
                cmd += [str(args.nproc), "-m", "svd_probe.cli", "analyze", model, "--cache-dir", str(cache)]
                cmd += [
                    "--device",
                    args.device,
                    "--json",
                    "--solver",
                    args.solver,
                    "--concurrency",
                    str(args.concurrency),
                ]
                cmd += ["--endpoint", args.endpoint] if http else []
                t = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True)
                out["wall_with_startup"] = time.perf_counter() - t
                if r.returncode != 0:
                    raise SystemExit(f"torchrun failed:\n{r.stderr[-4000:]}")
                stats = json.loads(r.stdout)["stats"]
                out["seconds"] = stats["seconds"]  # rank 0, from analyze's start (after imports)
                out["ranks"] = stats.get("ranks")
                peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
                out["peak_rss_gb_largest_rank"] = peak
            else:
                job = AnalyzeJob(
                    model,
                    endpoint=args.endpoint if http else None,
                    cache_dir=cache,
                    device=args.device,
                    solver=args.solver,
                    inflight=args.inflight,
                    concurrency=args.concurrency,
                    reader=args.reader,
                )
                t = time.perf_counter()
                stats = analyze(job).stats
                out["seconds"] = time.perf_counter() - t
            out["solver"] = stats.get("solver")  # what analyze ran (rank 0's, under torchrun)
            out["inflight"] = stats.get("inflight")
            out["requests_in_flight"] = stats.get("requests_in_flight")
            out["bytes"] = stats["bytes_fetched"]
            out["computed"] = stats["computed"]
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return out


def _build(args) -> tuple[float, int]:
    from svd_probe.testing.checkpoints import build_deepseek_v3_real

    ckpt = args.ckpt
    cfg = ckpt / "config.json"
    if (ckpt / "model.safetensors.index.json").is_file() and cfg.is_file():
        if json.loads(cfg.read_text()).get("num_hidden_layers") == args.layers:
            return 0.0, args.layers
        raise SystemExit(f"{ckpt} holds a checkpoint of another layer count: pass another --ckpt or delete it")
    if ckpt.exists() and any(ckpt.iterdir()):
        raise SystemExit(f"{ckpt} is not empty and holds no benchmark checkpoint: pass another --ckpt")
    t = time.perf_counter()
    build_deepseek_v3_real(ckpt, layers=args.layers, experts_per_layer=0, n_shards=args.shards, workers=args.workers)
    return time.perf_counter() - t, args.layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=62, help="layers of DeepSeek-V3's real attention shapes")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--ckpt", type=Path, default=None, help="build here, or reuse (default: a folder under /tmp)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="shards written at once")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nproc", type=int, default=1, help="analyze under torchrun with this many ranks")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--solver", default="auto", help="analyze --solver, for compute and analyze")
    ap.add_argument("--inflight", type=int, default=0, help="layers in flight (0: analyze's auto)")
    ap.add_argument(
        "--band-workers",
        type=int,
        default=0,
        help="the band solvers' stage-2 workers (0: one per core); fewer leave cores to an HTTP transfer",
    )
    ap.add_argument(
        "--hybrid-rule", default="", help="band-hybrid's rule for sending a matrix to the device (band.HYBRID_RULES)"
    )
    ap.add_argument("--concurrency", type=int, default=8, help="HTTP range requests in flight (analyze's default)")
    ap.add_argument(
        "--reader",
        default="auto",
        choices=["auto", "thread", "process"],
        help="HTTP reads in threads or in a process (auto: analyze's default, the process on cuda)",
    )
    ap.add_argument(
        "--stages", action="store_true", help="log the band solvers' stages (svd_probe.spectra.stagelog) in each phase"
    )
    ap.add_argument(
        "--sync-debug",
        action="store_true",
        help="count synchronizing CUDA calls per thread and svd_probe call site in each phase (CUDA only)",
    )
    ap.add_argument(
        "--chase-launches",
        type=int,
        default=1,
        help="band-device's bulge-chase launches at once, each on 1/N of the SMs",
    )
    ap.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="N",
        help="profile N layers in the middle of the compute phase (torch.profiler; the whole run if fewer):"
        " per-stream kernel busy time, top kernels and CPU ops in its JSON, and a gzipped chrome trace"
        " next to --json (<stem>-compute-trace.json.gz, if under 15 MiB); its seconds then carry the profiler's cost",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase
    ap.add_argument("--trace-file", type=Path, default=None, help=argparse.SUPPRESS)  # internal: --trace's file
    ap.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trace < 0:
        ap.error("--trace takes a number of layers (0: no trace)")
    if args.ckpt is None:
        args.ckpt = Path(tempfile.gettempdir()) / f"svdp-bench-e2e-{args.layers}"
    if args.phase:
        from svd_probe.spectra import band

        # This script is guarded and its top level harmless (a sys.path entry, which band's
        # source check accepts): stage 2 on worker processes, as auto would choose, said here.
        band.use_stage2_workers("processes")
        print(json.dumps(phase(args)), flush=True)
        return

    t0 = time.perf_counter()
    build_s, _ = _build(args)
    shards = sorted(args.ckpt.glob("*.safetensors"))
    size = sum(s.stat().st_size for s in shards)
    print(f"checkpoint: {args.ckpt}, {args.layers} layers, {size / 1e9:.2f} GB, built in {build_s:.1f} s", flush=True)
    for s in shards:  # warm the page cache: both sources then read the same memory-resident bytes
        with open(s, "rb") as f:
            while f.read(64 << 20):
                pass
    hf_home = tempfile.mkdtemp(prefix="bench-e2e-hf-")
    env = {**os.environ, "HF_HOME": hf_home, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_ENDPOINT", None)
    hub = subprocess.Popen(
        [sys.executable, "-m", "svd_probe.testing.fake_hub", f"{REPO}={args.ckpt}"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    results: dict = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "layers": args.layers,
        "checkpoint_gb": size / 1e9,
        "build_seconds": build_s,
        "nproc": args.nproc,
        "solver": args.solver,
        "inflight": args.inflight,
        "band_workers": args.band_workers,
        "hybrid_rule": args.hybrid_rule or None,
        "concurrency": args.concurrency,
        "reader": args.reader,
        "chase_launches": args.chase_launches,
        "trace": args.trace or None,
        "phases": {},
    }
    try:
        assert hub.stdout is not None
        endpoint = hub.stdout.readline().strip()
        for name in args.phases:
            cmd = [sys.executable, __file__, "--phase", name, "--endpoint", endpoint, "--ckpt", str(args.ckpt)]
            cmd += ["--device", args.device, "--nproc", str(args.nproc), "--layers", str(args.layers)]
            cmd += ["--solver", args.solver, "--inflight", str(args.inflight), "--band-workers", str(args.band_workers)]
            cmd += ["--hybrid-rule", args.hybrid_rule] if args.hybrid_rule else []
            cmd += ["--concurrency", str(args.concurrency), "--reader", args.reader]
            cmd += ["--stages"] if args.stages else []
            cmd += ["--sync-debug"] if args.sync_debug else []
            cmd += ["--chase-launches", str(args.chase_launches)]
            if args.trace and name == "compute":  # the compute phase only: its layer loop is here
                cmd += ["--trace", str(args.trace)]
                if args.json:
                    cmd += ["--trace-file", str(args.json.with_name(f"{args.json.stem}-{name}-trace.json.gz"))]
            hub_cpu0 = _cpu_seconds_of(hub.pid)
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            hub_cpu = _cpu_seconds_of(hub.pid)
            if r.returncode != 0:
                print(f"{name}: failed\n{r.stderr[-4000:]}", flush=True)
                results["phases"][name] = {"error": r.stderr[-2000:]}
                continue
            fig = json.loads(r.stdout.strip().splitlines()[-1])
            if hub_cpu is not None and hub_cpu0 is not None:
                fig["server_cpu_s"] = round(hub_cpu - hub_cpu0, 2)  # the stand-in's CPU in this phase
            results["phases"][name] = fig
            gpu = f", GPU peak {fig['peak_gpu_gb']:.2f} GB" if fig.get("peak_gpu_gb") is not None else ""
            start = ""
            if fig.get("arrivals_s"):
                start = f", start-up: open {fig['open_s']:.2f} s + first layer {fig['arrivals_s'][0]:.2f} s"
            cpu = f", CPU {fig['cpu_user_s']:.1f} + {fig['cpu_system_s']:.1f} s (user + system)" + (
                f" (server {fig['server_cpu_s']:.1f} s)" if "server_cpu_s" in fig else ""
            )
            if fig.get("requests_in_flight"):
                cpu += f", {fig['requests_in_flight']} range requests in flight"
            print(
                f"{name:14s} {fig['seconds']:8.2f} s   RSS peak {fig['peak_rss_gb']:.2f} GB{gpu}{start}{cpu}",
                flush=True,
            )
            for who, sites in (fig.get("syncs") or {}).items():  # --sync-debug: who waited for the GPU
                print(f"  syncs on the {who} thread{'s' if who == 'worker' else ''}: {sum(sites.values())}", flush=True)
                for where, n in list(sites.items())[:8]:
                    print(f"    {n:6d}  {where}", flush=True)
            for stage, st in (fig.get("stages") or {}).items():  # --stages: where the host time went
                print(
                    f"  {stage:18s} {st['count']:5d} spans  total {st['total_s']:8.2f} s  mean {st['mean_s']:.4f} s"
                    f"  max {st['max_s']:.3f} s  busy {st['busy_s']:.2f} s",
                    flush=True,
                )
            if fig.get("trace"):  # --trace: what the GPU and the threads did in the window
                for line in trace_lines(fig["trace"]):
                    print(line, flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    finally:
        hub.terminate()
        with contextlib.suppress(Exception):
            hub.wait(timeout=10)
        shutil.rmtree(hf_home, ignore_errors=True)
    ph = results["phases"]

    def secs(name):
        return ph.get(name, {}).get("seconds")

    for src in ("http", "local"):
        read, comp, wall = secs(f"read-{src}"), secs("compute"), secs(f"analyze-{src}")
        if read and comp and wall:
            ratio = wall / max(read, comp)
            results[f"ratio_{src}"] = ratio
            print(
                f"analyze {src:5s}: {wall:.2f} s = {ratio:.3f} × max(read {read:.2f} s, compute {comp:.2f} s)"
                f"  ({wall / args.layers:.3f} s a layer)",
                flush=True,
            )
    results["total_seconds"] = time.perf_counter() - t0
    print(f"total {results['total_seconds']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
