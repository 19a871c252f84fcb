"""The overlap pipeline of `analyze`: local reads, the background cache writer, Ctrl-C."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.cache.writer import LayerWriter
from svd_probe.distributed import split_layers
from svd_probe.errors import DiskWriteError
from svd_probe.hub.ranges import LocalFiles
from svd_probe.results import CacheQuery, load_analysis

DEVICE = os.environ.get("SVD_PROBE_TEST_DEVICE", "cpu")


def test_local_reads_in_chunks_give_the_file_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "a.bin").write_bytes(data)
    files = LocalFiles(tmp_path, concurrency=3, chunk_size=7)  # many chunks per range, several threads
    reqs = [("a.bin", 0, 10_000), ("a.bin", 13, 14), ("a.bin", 5000, 5000), ("a.bin", 9_990, 10_000)]
    got = files.read_many(reqs)
    assert [bytes(g) for g in got] == [data[b:e] for _, b, e in reqs]
    assert files.stats.bytes_fetched == 10_000 + 1 + 10
    files.close()


def test_local_read_past_the_end_is_a_corrupt_shard(tmp_path):
    from svd_probe.errors import CorruptShardError

    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    with pytest.raises(CorruptShardError):
        LocalFiles(tmp_path).read_many([("a.bin", 90, 101)])


def test_writer_runs_jobs_in_order_off_the_callers_thread():
    threads, order = set(), []

    def job(i):
        threads.add(threading.current_thread().name)
        order.append(i)
        return i * 10

    with LayerWriter(depth=2) as w:
        for i in range(6):
            w.put(i, lambda i=i: job(i))
    assert order == list(range(6))
    assert threads == {"svd-probe-writer"}
    assert w.finished() == [(i, i * 10) for i in range(6)]


def test_writer_error_reaches_the_caller_and_stops_later_jobs():
    ran = []

    def fail():
        raise DiskWriteError("disk full", "free space")

    w = LayerWriter(depth=1)
    w.put(0, fail)
    with pytest.raises(DiskWriteError):
        for i in range(1, 50):  # a later put (or close) raises the error
            w.put(i, lambda i=i: ran.append(i))
        w.close()
    w.close()
    assert len(ran) <= 1  # at most a job already taken when the error was recorded


class _CtrlCAfterFirstLayer:
    def __init__(self):
        self.done = []

    def start(self, **kw):
        pass

    def layer_done(self, layer):
        self.done.append(layer)
        raise KeyboardInterrupt


def test_ctrl_c_keeps_computed_layers_whole_and_the_rerun_resumes(deepseek_ckpt, tmp_path):
    job = AnalyzeJob(str(deepseek_ckpt.folder), cache_dir=tmp_path, device=DEVICE, matrices="O,VO")
    with pytest.raises(KeyboardInterrupt):
        analyze(job, progress=_CtrlCAfterFirstLayer())
    cached = load_analysis(CacheQuery(str(deepseek_ckpt.folder), cache_dir=tmp_path)).layers
    assert cached and cached == sorted(cached)  # at least the layer reported done, all whole
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no half-written file
    rerun = analyze(job)
    assert rerun.from_cache == cached
    assert sorted(rerun.computed) == [ly for ly in rerun.layers if ly not in cached]


def test_split_layers_is_contiguous_and_covers_each_layer_once():
    todo = [0, 2, 3, 5, 8, 9, 13]
    for world in (1, 2, 3, 7, 9):
        runs = [split_layers(todo, r, world) for r in range(world)]
        assert sum(runs, []) == todo
        assert max(map(len, runs)) - min(map(len, runs)) <= 1


# --- torchrun: layers split across ranks (Gloo on the CPU) ----------------------------------------


def _torchrun(nproc: int, *args: str) -> dict:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    cmd += ["-m", "svd_probe.cli", *args, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # rank 0 alone prints


@pytest.mark.slow
def test_torchrun_splits_missing_layers_once_each_and_a_rerun_resumes(fake_hub, deepseek_ckpt, tmp_path):
    import json

    model, hub = "tiny/deepseek-v3", ["--endpoint", fake_hub.endpoint]
    fake_hub.clear_faults()

    def job(cache, layers=None):
        return AnalyzeJob(model, endpoint=fake_hub.endpoint, cache_dir=cache, device="cpu", layers=layers)

    reference = analyze(job(tmp_path / "one")).analysis  # one process, every layer
    alone = analyze(job(tmp_path / "alone", "1-3")).stats["bytes_fetched"]  # layers 1-3, one process
    shared = tmp_path / "shared"
    analyze(job(shared, "0"))  # layer 0 already cached by an earlier one-process run

    fake_hub.reset_records()
    out = _torchrun(2, "analyze", model, *hub, "--cache-dir", str(shared), "--device", "cpu")
    stats = out["stats"]
    assert (stats["computed"], stats["from_cache"], stats["world_size"]) == (3, 1, 2)
    assert [r["layers"] for r in stats["ranks"]] == [[1, 2], [3]]
    # Each rank fetched its own layers' bytes: the stand-in served exactly their sum, and
    # together no more than one process reading the same layers (plus re-read shard headers).
    per_rank = [r["bytes_fetched"] for r in stats["ranks"]]
    assert all(0 < b < alone for b in per_rank)
    assert sum(per_rank) == fake_hub.bytes_served() == stats["bytes_fetched"]
    assert alone <= sum(per_rank) <= 1.1 * alone
    # Each layer computed exactly once, by the rank the split names; the manifest says who.
    manifest = json.loads((next(shared.rglob("manifest.json"))).read_text())
    assert {ly: manifest["layers"][str(ly)].get("rank") for ly in range(4)} == {0: None, 1: 0, 2: 0, 3: 1}
    # The same spectra as one process.
    full = load_analysis(CacheQuery(model, cache_dir=shared))
    assert full.layers == reference.layers == [0, 1, 2, 3]
    for ly in full.layers:
        a, b = full.layer_spectra[ly].sigma, reference.layer_spectra[ly].sigma
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-12 * max(float(np.max(b[key])), 1e-300))

    # Rank 0 "killed" before it wrote its layers: they are gone. One process (another world
    # size) redoes only those.
    for ly in (1, 2):
        next(shared.rglob(f"layer-{ly:04d}.safetensors")).unlink()
    rerun = analyze(job(shared))
    assert rerun.computed == [1, 2] and rerun.from_cache == [0, 3]


def test_pipeline_config_picks_solver_and_layers_in_flight(monkeypatch):
    import torch

    from svd_probe.errors import BadOptionError
    from svd_probe.spectra.band import cores
    from svd_probe.spectra.compute import AUTO_ROUTES, pipeline_config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # resolving needs no GPU
    assert pipeline_config(cpu).inflight == 1 and pipeline_config(cpu).solver == "auto"
    assert pipeline_config(cpu).resolved(cpu).solver == AUTO_ROUTES["cpu"]["solver"]
    assert pipeline_config(cuda, "torch").inflight == 2
    # auto on CUDA: band-device from BAND_MIN_CORES cores (band-hybrid without Triton), else the
    # AUTO_ROUTES entry (syevd)
    from svd_probe.spectra import band as B
    from svd_probe.spectra import solvers
    from svd_probe.spectra.compute import BAND_MIN_CORES

    have_triton = solvers.solver_unavailable("band-device", cuda) is None
    for n_cores, want in (
        (BAND_MIN_CORES, "band-device" if have_triton else "band-hybrid"),
        (BAND_MIN_CORES - 1, "auto"),
    ):
        monkeypatch.setattr(B, "cores", lambda n=n_cores: n)
        assert pipeline_config(cuda).solver == want
        # over HTTP band-device's wall scattered (benchmarks/README.md): band-hybrid there
        assert pipeline_config(cuda, over_http=True).solver == ("band-hybrid" if want != "auto" else "auto")
    assert pipeline_config(cuda).inflight == 2  # syevd's
    monkeypatch.setattr(B, "cores", lambda: BAND_MIN_CORES)
    monkeypatch.setitem(sys.modules, "triton", None)  # an install without Triton: its import fails
    solvers._import.cache_clear()
    try:
        assert pipeline_config(cuda).solver == "band-hybrid"
    finally:
        monkeypatch.undo()
        solvers._import.cache_clear()
    # band: two problems a layer, one worker per core, four layers more
    assert pipeline_config(cuda, "band-hybrid").inflight == cores() // 2 + 4
    assert pipeline_config(cpu, "band").inflight == 1
    assert pipeline_config(cuda, "band", inflight=3).inflight == 3
    assert pipeline_config(cuda, "torch").batched is False
    with pytest.raises(BadOptionError, match="--solver nope") as e:
        pipeline_config(cpu, "nope")
    assert "band-hybrid" in (e.value.hint or "")


def test_analyze_refuses_an_unknown_solver_before_reading(deepseek_ckpt, tmp_path, monkeypatch, capsys):
    import sys

    from svd_probe.cli import main

    argv = ["svd-probe", "analyze", str(deepseek_ckpt.folder), "--cache-dir", str(tmp_path), "--solver", "nope"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--solver nope" in err and "--solver auto" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # refused before reading or writing anything
    # (band's numbers through the pipeline: tests/test_band.py, layers_spectra with big_side=100)


def test_analyze_reports_the_solver_it_ran(deepseek_ckpt, tmp_path):
    # stats and every layer's info name the eigensolver that computed them, as pipeline_config
    # resolved it (auto on the CPU: AUTO_ROUTES' entry; an explicit --solver: itself); a rerun
    # that computes nothing names none
    from svd_probe.spectra.compute import AUTO_ROUTES

    for solver, want in (("auto", AUTO_ROUTES["cpu"]["solver"]), ("band", "band")):
        cache = tmp_path / solver
        job = AnalyzeJob(str(deepseek_ckpt.folder), cache_dir=cache, device="cpu", matrices="O", solver=solver)
        out = analyze(job)
        assert out.computed and out.stats["solver"] == want and out.stats["inflight"] == 1
        cached = load_analysis(CacheQuery(str(deepseek_ckpt.folder), cache_dir=cache))  # read back from disk
        assert {cached.layer_spectra[ly].info["solver"] for ly in out.computed} == {want}
        rerun = analyze(job)
        assert not rerun.computed and "solver" not in rerun.stats


def test_a_source_says_whether_it_reads_over_http(fake_hub, deepseek_ckpt):
    """analyze's auto solver over HTTP differs from a folder's (pipeline_config's over_http, which
    analyze takes from `local_path`): the stand-in's repo has none, the folder has its own."""
    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.models import ModelRef

    with open_checkpoint(
        ModelRef(name="tiny/deepseek-v3", repo_id="tiny/deepseek-v3"), endpoint=fake_hub.endpoint
    ) as hub:
        assert hub.local_path is None
    with open_checkpoint(str(deepseek_ckpt.folder)) as local:
        assert local.local_path is not None and local.local_path.samefile(deepseek_ckpt.folder)
