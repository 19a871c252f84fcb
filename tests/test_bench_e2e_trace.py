"""benchmarks/bench_e2e.py --trace: the busy time of each CUDA stream and of the GPU as a whole is the
union of the kernels' intervals clipped to the window (exact answers on hand-made intervals), the
window sits in the middle of the model past the warm-up layers, and a real torch.profiler run over
a small CPU workload on two threads gives the "trace" entry: its CPU ops of both threads, the
chrome trace written gzipped, or left out over its size limit. The CUDA tables are checked on
made-up events shaped like torch's (no GPU here), with and without a stream attribute.

The bench itself is not run here: its compute phase on the CPU takes about 220 s at 2 layers of
DeepSeek-V3's real shapes (2 cores), far over a test's budget."""

from __future__ import annotations

import gzip
import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MARK = "bench_e2e: trace window"  # bench_e2e.TRACE_MARK


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", REPO / "benchmarks" / "bench_e2e.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_union_seconds_of_overlapping_disjoint_and_clipped_intervals(e2e):
    iv = [(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.25, 3.5)]  # [0, 2] and [3, 4]
    assert e2e.union_seconds(iv) == 3.0
    assert e2e.union_seconds(iv, 0.5, 3.5) == 2.0  # [0.5, 2] and [3, 3.5]
    assert e2e.union_seconds(iv, 2.0, 3.0) == 0.0  # the gap between them
    assert e2e.union_seconds([(1.0, 2.0), (2.0, 3.0)]) == 2.0  # touching ones
    assert e2e.union_seconds([]) == 0.0


def test_stream_busy_per_stream_and_over_all_streams(e2e):
    kernels = [
        (7, 0.0, 0.25),  # stream 7: [0, 0.5] (two overlapping) and [0.75, 1]: 0.75 s
        (7, 0.125, 0.5),
        (7, 0.75, 1.0),
        (13, 0.25, 0.625),  # stream 13: 0.375 s, overlapping stream 7's first run
        (13, 2.0, 3.0),  # after the window: not counted
        ("?", -1.0, -0.5),  # before it
    ]
    got = e2e.stream_busy(kernels, 0.0, 1.0)
    assert got["streams"] == {
        "7": {"kernels": 3, "busy_s": 0.75, "fraction": 0.75},
        "13": {"kernels": 1, "busy_s": 0.375, "fraction": 0.375},
    }
    assert list(got["streams"]) == ["7", "13"]  # busiest first
    # all streams: [0, 0.625] and [0.75, 1]; no kernel at all in (0.625, 0.75)
    assert got["all"] == {"kernels": 4, "busy_s": 0.875, "fraction": 0.875, "idle_s": 0.125}
    # a window cutting through kernels: each is clipped to it
    got = e2e.stream_busy(kernels, 0.5, 1.5)
    assert got["streams"]["7"] == {"kernels": 1, "busy_s": 0.25, "fraction": 0.25}  # (0.125, 0.5) ends at 0.5
    assert got["streams"]["13"] == {"kernels": 1, "busy_s": 0.125, "fraction": 0.125}
    assert got["all"] == {"kernels": 2, "busy_s": 0.375, "fraction": 0.375, "idle_s": 0.625}
    assert e2e.stream_busy([], 0.0, 2.0) == {
        "streams": {},
        "all": {"kernels": 0, "busy_s": 0.0, "fraction": 0.0, "idle_s": 2.0},
    }


def test_trace_window_in_the_middle_past_the_warm_up(e2e):
    assert e2e.TRACE_WARMUP == 4
    assert e2e.trace_window(8, 62) == (27, 35)
    assert e2e.trace_window(1, 62) == (30, 31)
    assert e2e.trace_window(2, 10) == (4, 6)  # the middle would be 4 too
    assert e2e.trace_window(2, 6) == (4, 6)
    assert e2e.trace_window(1, 2) is None  # too few layers: the whole run
    assert e2e.trace_window(62, 62) is None


def _layer_work(n: int = 96) -> float:
    a = torch.randn(n, n, dtype=torch.float64)
    return float((a @ a.T).trace())


def _traced_loop(e2e, trace, layers: int) -> None:
    """The compute phase's loop in small: the main thread submits, a worker thread computes."""
    if trace.whole:
        trace.begin()
    with ThreadPoolExecutor(1, thread_name_prefix="svd-probe-solve") as pool:
        for i in range(layers):
            trace.before_submit(i)
            pending = pool.submit(_layer_work)
            torch.ones(8).sum()  # the main thread's own op
            pending.result()
            trace.after_result(i)
    if trace.whole:
        trace.end()


def test_trace_of_a_cpu_workload_on_two_threads(e2e, tmp_path, monkeypatch):
    path = tmp_path / "e2e-compute-trace.json.gz"
    steps = tmp_path / "steps.log"
    monkeypatch.setenv("SVD_PROBE_TRACE_LOG", str(steps))
    trace = e2e._Trace(2, 8, torch.device("cpu"), path)
    _traced_loop(e2e, trace, 8)
    tr = trace.summary()
    # each step of the trace's end, as it happened, and the tables before the chrome trace
    logged = [line.split(" s  trace: ", 1)[1] for line in steps.read_text().splitlines()]
    assert [line.split(" ")[0] for line in logged[:3]] == ["begun", "window", "profiler"]
    assert logged[3].endswith(" events parsed") and int(logged[3].split(" ")[0]) > 0
    assert [line.split(" ")[0] for line in logged[4:]] == ["tables", "chrome"]
    assert json.loads(logged[4].removeprefix("tables "))["window_layers"] == [4, 6]
    json.dumps(tr)  # goes into the phase's JSON as it is
    assert "error" not in tr, tr["error"]
    assert tr["window_layers"] == [4, 6] and not tr["whole_run"] and tr["layers"] == 8
    assert tr["wall_s"] > 0
    assert "gpu" not in tr and "streams" not in tr  # no CUDA activity on the CPU
    ops = tr["top_cpu_ops"]
    assert 0 < len(ops) <= 15
    assert set(ops[0]) == {"name", "thread", "main", "count", "self_s", "total_s"}
    assert [op["self_s"] for op in ops] == sorted((op["self_s"] for op in ops), reverse=True)
    main = threading.main_thread().native_id
    assert any(op["main"] and op["thread"] == main for op in ops)
    if tr["all_threads"]:  # torch records the worker's ops too: the matrix product, 2 layers
        mm = [op for op in ops if op["name"] == "aten::mm" and not op["main"]]
        assert mm and mm[0]["count"] == 2, ops
        assert tr["threads"] >= 2
    assert tr["chrome_trace"] == str(path) and tr["chrome_trace_mib"] >= 0
    with gzip.open(path, "rt") as f:
        assert any(ev.get("name") == e2e.TRACE_MARK for ev in json.load(f)["traceEvents"])
    lines = e2e.trace_lines(tr)
    assert lines[0].startswith("  trace: layers 4-5 of 8, window ")
    assert "no CUDA activity (CPU only)" in lines[1]
    assert any("main" in line for line in lines) and lines[-1].startswith("    chrome trace: ")


def test_trace_of_the_whole_run_and_a_chrome_trace_left_out(e2e, tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "TRACE_MAX_GZ", 0)  # any trace is over it
    path = tmp_path / "e2e-compute-trace.json.gz"
    trace = e2e._Trace(1, 2, torch.device("cpu"), path)
    _traced_loop(e2e, trace, 2)
    tr = trace.summary()
    assert tr["whole_run"] and tr["window_layers"] == [0, 2]
    assert tr["top_cpu_ops"]
    assert tr["chrome_trace"] is None and tr["chrome_trace_note"].startswith("left out: ")
    assert list(tmp_path.iterdir()) == []  # nor its partial file
    assert e2e.trace_lines(tr)[0].startswith("  trace: the whole run of 2, ")

    no_json = e2e._Trace(1, 2, torch.device("cpu"), None)
    _traced_loop(e2e, no_json, 2)
    assert no_json.summary()["chrome_trace_note"] == "no --json: not written"


def _event(name, start_us, end_us, device_type, kind, resource, thread=1, self_us=0.0):
    from types import SimpleNamespace

    return SimpleNamespace(
        name=name,
        time_range=SimpleNamespace(start=start_us, end=end_us),
        device_type=device_type,
        activity_type=kind,
        device_resource_id=resource,
        thread=thread,
        is_async=False,
        self_cpu_time_total=self_us,
        cpu_time_total=end_us - start_us,
    )


class _FakeProfile:
    """What torch.profiler gives on CUDA (no GPU here): CPU ops on two threads, the window's marker
    and its GPU twin (a gpu_user_annotation), kernels on two streams and a copy."""

    def __init__(self, with_stream: bool = True):
        from torch.profiler import DeviceType

        cpu, cuda = DeviceType.CPU, DeviceType.CUDA
        main = threading.main_thread().native_id
        s7, s13 = (7, 13) if with_stream else (None, None)
        self._events = [
            _event(MARK, 1_000_000, 2_000_000, cpu, "user_annotation", main, 1, 600_000),
            _event("cudaStreamSynchronize", 1_100_000, 1_500_000, cpu, "cuda_runtime", 99, 1, 400_000),
            _event("aten::mm", 1_000_000, 1_050_000, cpu, "cpu_op", 4242, 2, 50_000),
            _event(MARK, 1_000_000, 2_500_000, cuda, "gpu_user_annotation", s7),  # not a kernel
            _event("chase", 500_000, 1_500_000, cuda, "kernel", s7),  # begins before the window
            _event("gemm", 1_250_000, 1_750_000, cuda, "kernel", s13),
            _event("gemm", 1_875_000, 2_250_000, cuda, "kernel", s13),  # ends after it
            _event("Memcpy DtoH (Device -> Pinned)", 1_800_000, 1_812_500, cuda, "gpu_memcpy", s7),
        ]
        self._avgs = [
            _avg(MARK, cuda, 1, 1_500_000),
            _avg("chase", cuda, 1, 1_000_000),
            _avg("gemm", cuda, 2, 875_000),
            _avg("Memcpy DtoH (Device -> Pinned)", cuda, 1, 12_500),
            _avg("aten::mm", cpu, 1, 0),
        ]

    def events(self):
        return self._events

    def key_averages(self):
        return self._avgs


def _avg(key, device_type, count, device_us):
    from types import SimpleNamespace

    return SimpleNamespace(key=key, device_type=device_type, count=count, device_time_total=device_us)


@pytest.mark.parametrize("with_stream", [True, False])
def test_trace_tables_of_cuda_events(e2e, with_stream):
    trace = e2e._Trace(1, 62, torch.device("cuda"), None)  # no CUDA needed: the events are made here
    trace.prof, trace.wall_s, trace.all_threads = _FakeProfile(with_stream), 1.0, True
    tr = trace.summary()
    assert "error" not in tr, tr["error"]
    assert tr["device_events"] == {"gpu_user_annotation": 1, "kernel": 3, "gpu_memcpy": 1}
    # window [1, 2] s: chase [1, 1.5], gemm [1.25, 1.75] and [1.875, 2]
    assert tr["gpu"] == {"kernels": 3, "busy_s": 0.875, "fraction": 0.875, "idle_s": 0.125}
    assert tr["copies"] == {"count": 1, "busy_s": 0.0125, "fraction": 0.0125}
    if with_stream:
        assert tr["streams_known"] and tr["streams"] == {
            "13": {"kernels": 2, "busy_s": 0.625, "fraction": 0.625},
            "7": {"kernels": 1, "busy_s": 0.5, "fraction": 0.5},
        }
    else:  # pooled: the per-stream split is lost, the GPU's busy time is not
        assert not tr["streams_known"]
        assert tr["streams"] == {"?": {"kernels": 3, "busy_s": 0.875, "fraction": 0.875}}
    assert [(k["name"], k["count"], k["total_s"], k["mean_ms"]) for k in tr["top_kernels"]] == [
        ("chase", 1, 1.0, 1000.0),
        ("gemm", 2, 0.875, 437.5),
        ("Memcpy DtoH (Device -> Pinned)", 1, 0.0125, 12.5),
    ]
    ops = [(op["name"], op["main"], op["self_s"]) for op in tr["top_cpu_ops"]]
    # the runtime call is told to the main thread through its op's torch thread number
    assert ops == [
        ("bench_e2e: trace window", True, 0.6),
        ("cudaStreamSynchronize", True, 0.4),
        ("aten::mm", False, 0.05),
    ]
    assert tr["threads"] == 2
    lines = e2e.trace_lines(tr)
    assert lines[0] == "  trace: layers 30-30 of 62, window 1.00 s, CPU ops of all threads (2 seen)"
    assert lines[1].startswith("    GPU: 3 kernels, busy 0.875 s = 87.5% of the window (no kernel 0.125 s)")
