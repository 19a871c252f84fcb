"""Streaming from the loopback Hub stand-in: exact tensors, exact bytes, Range-only reads, faults."""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from svd_probe.errors import CorruptShardError, TransferError
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.hub.ranges import plan_reads
from svd_probe.hub.stream import stream_layers
from svd_probe.models import ModelRef, resolve_model
from svd_probe.testing.fake_hub import FAULT_KINDS

FAST = dict(backoff=0.01, max_backoff=0.05)  # retries in tests should not sleep long (Retry-After still honoured)
_DT = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}


def expected(ck, name: str) -> torch.Tensor:
    """What the tensor must be, from the `safetensors` library on the same files (+ per-block scale)."""
    with safe_open(str(ck.folder / ck.weight_map[name]), framework="pt") as f:
        w = f.get_tensor(name).float()
    s = name + "_scale_inv"
    if s in ck.weight_map:
        with safe_open(str(ck.folder / ck.weight_map[s]), framework="pt") as f:
            scale = f.get_tensor(s).numpy()
        full = np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)[: w.shape[0], : w.shape[1]]
        w = w * torch.from_numpy(full)
    return w


def hub_src(hub, repo, **kw):
    return open_checkpoint(ModelRef(name=repo, repo_id=repo), endpoint=hub.endpoint, **{**FAST, **kw})


def shard_header_bytes(folder, shard):
    with open(folder / shard, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["deepseek", "kimi"])
def test_stream_all_layers_exact_and_minimal(fake_hub, deepseek_ckpt, kimi_ckpt, which):
    ck, repo = (deepseek_ckpt, "tiny/deepseek-v3") if which == "deepseek" else (kimi_ckpt, "tiny/kimi-k2")
    fake_hub.clear_faults()
    src = hub_src(fake_hub, repo, concurrency=4)
    fake_hub.reset_records()
    assert re.fullmatch(r"[0-9a-f]{40}", src.commit) and src.commit == fake_hub.repos[repo].commit
    assert src.config["model_type"] == ck.config["model_type"]
    assert src.tensor_names == set(ck.weight_map)
    seen = []
    for layer, tensors in stream_layers(src, range(ck.num_layers), ck.attention_weight_names, "cpu", prefetch=1):
        seen.append(layer)
        assert set(tensors) == set(ck.attention_weight_names(layer))
        for name, t in tensors.items():
            assert t.dtype == torch.float32
            assert torch.equal(t, expected(ck, name)), name
    assert seen == list(range(ck.num_layers))

    # Bytes: exactly what the server sent for shards, and within 5% of attention tensors + headers.
    served = fake_hub.bytes_served(".safetensors")
    assert src.bytes_fetched == served
    names = ck.all_attention_tensor_names()
    shards = {ck.weight_map[n] for n in names}
    with_scales = sum(_tensor_bytes(ck, n) for n in names)
    headers = sum(shard_header_bytes(ck.folder, s) for s in shards)
    assert served <= 1.05 * (with_scales + headers), (served, with_scales, headers)
    total_ckpt = sum((ck.folder / s).stat().st_size for s in set(ck.weight_map.values()))
    assert served < 0.3 * total_ckpt  # experts dominate the files and are never read

    # Protocol: every shard GET is one byte range, on the pinned commit, never the whole file.
    shard_gets = [r for r in fake_hub.records if r.file and r.file.endswith(".safetensors") and r.method == "GET"]
    assert shard_gets
    for r in shard_gets:
        assert r.range is not None and re.fullmatch(r"bytes=\d+-\d+", r.range), r
        assert r.status in (206, 302)
        if not r.cdn:
            assert f"/resolve/{src.commit}/" in r.url
    # Only the headers of shards that hold needed tensors were read.
    header_reads = {r.file for r in shard_gets if r.range == "bytes=0-7" and r.status == 206}
    assert header_reads == shards


def _tensor_bytes(ck, name):
    with safe_open(str(ck.folder / ck.weight_map[name]), framework="pt") as f:
        sl = f.get_slice(name)
        return math.prod(sl.get_shape()) * _DT[sl.get_dtype()]


def test_local_folder_same_code_path(deepseek_ckpt, fake_hub):
    ck = deepseek_ckpt
    local = open_checkpoint(resolve_model(str(ck.folder)))
    assert re.fullmatch(r"[0-9a-f]{40}", local.commit)
    assert open_checkpoint(resolve_model(str(ck.folder))).commit == local.commit  # stable fingerprint
    names = ck.attention_weight_names(ck.num_layers - 1)  # the MTP layer
    a = local.read_tensors(names)
    b = hub_src(fake_hub, "tiny/deepseek-v3").read_tensors(names)
    for n in names:
        assert torch.equal(a[n], b[n]) and torch.equal(a[n], expected(ck, n))
    assert local.bytes_fetched > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_faults_survived_with_identical_results(fake_hub, deepseek_ckpt, kind):
    ck = deepseek_ckpt
    names = ck.attention_weight_names(1) + ck.attention_weight_names(2)
    fake_hub.clear_faults()
    src = hub_src(fake_hub, "tiny/deepseek-v3", concurrency=3)
    src.headers(
        {ck.weight_map[n] for n in names}
        | {ck.weight_map[n + "_scale_inv"] for n in names if n + "_scale_inv" in ck.weight_map}
    )
    fake_hub.reset_records()
    fake_hub.inject(kind, count=2)
    t0 = time.perf_counter()
    got = src.read_tensors(names)
    elapsed = time.perf_counter() - t0
    fired = fake_hub.faults_fired()
    fake_hub.clear_faults()
    assert fired.count(kind) == 2, fired
    for n in names:
        assert torch.equal(got[n], expected(ck, n)), n
    if kind == "stall":  # a slow answer is waited for, not retried
        assert src.stats["retries"] == 0
    else:
        assert src.stats["retries"] + src.stats["reresolves"] >= 2
    if kind == "429":  # Retry-After: 1 was honoured although the test's own backoff is 10 ms
        assert elapsed >= 0.9


def test_persistent_failure_is_a_transfer_error(fake_hub, deepseek_ckpt):
    fake_hub.clear_faults()
    src = hub_src(fake_hub, "tiny/deepseek-v3", retries=2)
    fake_hub.inject("503", count=1000)
    try:
        with pytest.raises(TransferError) as ei:
            src.read_tensors(deepseek_ckpt.attention_weight_names(0))
        assert ei.value.hint
    finally:
        fake_hub.clear_faults()


def test_expired_signed_url_is_reresolved(fake_hub, deepseek_ckpt):
    fake_hub.clear_faults()
    old_ttl = fake_hub.sign_ttl
    fake_hub.sign_ttl = -1  # every signed URL the Hub hands out is already expired ...
    src = hub_src(fake_hub, "tiny/deepseek-v3")
    name = "model.layers.1.self_attn.o_proj.weight"
    try:
        with pytest.raises(TransferError):  # ... so after a few fresh ones, the reader gives up
            src.read_tensors([name])
        fake_hub.sign_ttl = old_ttl  # the Hub recovers: the next read re-resolves and succeeds
        assert torch.equal(src.read_tensors([name])[name], expected(deepseek_ckpt, name))
        assert src.stats["reresolves"] >= 1
    finally:
        fake_hub.sign_ttl = old_ttl


def test_stream_prefetches_one_layer_ahead(deepseek_ckpt):
    ck = deepseek_ckpt
    src = open_checkpoint(resolve_model(str(ck.folder)))
    requested = []
    lock = threading.Lock()

    def names(layer):
        with lock:
            requested.append(layer)
        return ck.attention_weight_names(layer)

    it = stream_layers(src, [0, 1, 2, 3], names, "cpu", prefetch=1)
    layer, _ = next(it)
    assert layer == 0
    # While the caller holds layer 0, layer 1 is in flight, and nothing further: two layers at most.
    assert requested == [0, 1]
    layer, _ = next(it)
    assert layer == 1 and requested == [0, 1, 2]
    it.close()  # stopping early cancels cleanly
    assert requested == [0, 1, 2]


def test_plan_reads_coalesces_small_gaps_within_budget():
    reqs = [("a", 0, 1000), ("a", 1010, 2000), ("a", 100_000, 100_500), ("b", 0, 10)]
    spans, chunks = plan_reads(reqs, max_gap=1 << 20, gap_fraction=0.02, chunk_size=1 << 20)
    by = {(p, b, e) for p, b, e, _ in spans}
    assert ("a", 0, 2000) in by  # a 10-byte gap merges
    assert ("a", 100_000, 100_500) in by  # a 98 kB gap would cost far more than 2%: separate read
    assert ("b", 0, 10) in by
    spans, chunks = plan_reads([("a", 0, 10 << 20)], max_gap=0, gap_fraction=0, chunk_size=4 << 20)
    assert [(b, e) for _, b, e in chunks] == [(0, 4 << 20), (4 << 20, 8 << 20), (8 << 20, 10 << 20)]


def test_coalesced_members_are_exact_and_aligned(fake_hub, tmp_path):
    """Members of one coalesced span come back byte-exact; one at an 8-byte multiple into the span
    is a view of the span's buffer (no copy), one that is not is an aligned copy."""
    from svd_probe.hub import http
    from svd_probe.hub.ranges import HubFiles

    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    fake_hub.add_repo("t/coalesce", tmp_path)
    files = HubFiles(fake_hub.endpoint, "t/coalesce", fake_hub.repos["t/coalesce"].commit)
    reqs = [("f.bin", 0, 16), ("f.bin", 16, 40), ("f.bin", 41, 1000), ("f.bin", 50, 50)]
    spans, _ = plan_reads(reqs[:3], files.max_gap, files.gap_fraction, files.chunk_size)
    assert len(spans) == 1  # one GET for the three
    out = files.read_many(reqs)
    for (_, b, e), buf in zip(reqs, out, strict=True):
        assert bytes(buf) == data[b:e].tobytes()
    assert out[1].base is not None and out[1].base is out[0].base  # 16 bytes in: a view of the span
    assert out[2].base is None  # 41 bytes in: its own copy
    assert out[1].ctypes.data % 8 == 0 and out[2].ctypes.data % 8 == 0
    # httpcore2 reads 1 MiB per recv, not its default 64 KiB (the GIL cost: benchmarks/README.md)
    import httpcore2

    assert httpcore2.HTTP11Connection.READ_NUM_BYTES == http.READ_SIZE == 1 << 20
    files.close()


@pytest.mark.parametrize("rate", [None, 10e6])
def test_requests_in_flight_follow_the_link(tmp_path, rate):
    """Reads start 2 wide and the 3 large bodies timed first decide the width against
    `fast_connection`, here 30 MB/s. Unpaced loopback streams several times that even under a full
    suite on 2 cores (135 MB/s seen at the worst), so reads stay 2 wide; a link pacing each
    connection at 10 MB/s cannot reach it, so every worker is used. (The default threshold,
    `FAST_CONNECTION`, is not timed here: the loaded VM's loopback has fallen below it.)"""
    from svd_probe.hub.ranges import HubFiles
    from svd_probe.testing.fake_hub import FakeHub

    threshold = 30e6
    data = np.random.default_rng(1).integers(0, 256, 44 << 20, dtype=np.uint8)
    (tmp_path / "w.bin").write_bytes(data.tobytes())
    with FakeHub(rate=rate) as hub:
        hub.add_repo("t/width", tmp_path)
        commit = hub.repos["t/width"].commit
        files = HubFiles(hub.endpoint, "t/width", commit, concurrency=8, chunk_size=4 << 20, fast_connection=threshold)
        assert files.stats.in_flight == 2
        probe = files.read_many([("w.bin", 0, 12 << 20)])  # three 4 MiB bodies, two at a time
        assert hub.max_in_flight <= 2 and len(files._probes) == 3
        assert (max(files._probes) >= threshold) == (rate is None)
        hub.reset_records()
        rest = files.read_many([("w.bin", 12 << 20, 44 << 20)])  # eight 4 MiB bodies
        assert bytes(probe[0]) + bytes(rest[0]) == data.tobytes()
        if rate is None:
            assert files.stats.in_flight == 2 and hub.max_in_flight <= 2
        else:
            assert files.stats.in_flight == 8 and hub.max_in_flight >= 4
        files.close()


def test_fixed_width_uses_every_worker(tmp_path):
    """fast_connection=None: all `concurrency` requests in flight from the start, even on loopback."""
    from svd_probe.hub.ranges import HubFiles
    from svd_probe.testing.fake_hub import FakeHub

    data = np.random.default_rng(2).integers(0, 256, 8 << 20, dtype=np.uint8)
    (tmp_path / "w.bin").write_bytes(data.tobytes())
    with FakeHub(rate=20e6) as hub:  # slow enough that the eight 1 MiB bodies overlap
        hub.add_repo("t/fixed", tmp_path)
        commit = hub.repos["t/fixed"].commit
        files = HubFiles(hub.endpoint, "t/fixed", commit, concurrency=8, chunk_size=1 << 20, fast_connection=None)
        assert files.stats.in_flight == 8
        got = files.read_many([("w.bin", 0, 8 << 20)])
        assert bytes(got[0]) == data.tobytes() and hub.max_in_flight >= 4
        files.close()


@pytest.mark.slow
def test_several_requests_in_flight_and_split_tensors(fake_hub, deepseek_ckpt):
    ck = deepseek_ckpt
    fake_hub.clear_faults()
    # Small chunks so even a tiny tensor becomes many ranges; the server sees them overlap.
    src = hub_src(fake_hub, "tiny/deepseek-v3", concurrency=4, chunk_size=4096)
    fake_hub.reset_records()
    names = [n for layer in range(ck.num_layers) for n in ck.attention_weight_names(layer)]
    got = src.read_tensors(names)
    for n in names:
        assert torch.equal(got[n], expected(ck, n))
    assert fake_hub.max_in_flight >= 2  # ~250 ranges through 4 workers: they overlap on the server


# -- the reader process (open_checkpoint(..., reader="process")) ------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reader process needs memfds (Linux)")
def test_reader_process_reads_what_threads_read(fake_hub, deepseek_ckpt):
    """The same tensors as the `safetensors` library, the same bytes over the wire as the thread
    reader, errors raised in the parent with their type and fields, and a dead child reported."""
    ck = deepseek_ckpt
    fake_hub.clear_faults()
    names = [n for layer in range(ck.num_layers) for n in ck.attention_weight_names(layer)]
    threads = hub_src(fake_hub, "tiny/deepseek-v3")
    threads.read_tensors(names)
    proc = hub_src(fake_hub, "tiny/deepseek-v3", reader="process", retries=1)
    try:
        got = proc.read_tensors(names)
        for n in names:
            assert torch.equal(got[n], expected(ck, n))
        assert proc.bytes_fetched == threads.bytes_fetched > 0
        assert proc.stats["requests"] == threads.stats["requests"]
        fake_hub.inject("503", count=1000)
        with pytest.raises(TransferError) as ei:
            proc.read_tensors(ck.attention_weight_names(0))
        assert ei.value.hint and "503" in str(ei.value)
        fake_hub.clear_faults()
        shard = ck.weight_map[names[0]]
        # The child refills one arena each call: what an earlier call returned stays the caller's.
        raw = (ck.folder / shard).read_bytes()
        first = proc._files.read_many([(shard, 0, 1000), (shard, 5000, 9000)])
        second = proc._files.read_many([(shard, 1000, 5000)])
        assert [bytes(b) for b in first] == [raw[0:1000], raw[5000:9000]] and bytes(second[0]) == raw[1000:5000]
        with pytest.raises(CorruptShardError) as ce:  # past the end: a typed error with its fields
            proc._files.read_many([(shard, 0, (ck.folder / shard).stat().st_size + 10)])
        assert ce.value.file == shard
        proc._files._proc.kill()
        proc._files._proc.wait()
        with pytest.raises(TransferError, match="reader process ended"):
            proc.read_tensors(ck.attention_weight_names(0))
    finally:
        fake_hub.clear_faults()
        proc.close()
        threads.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reader process needs memfds (Linux)")
def test_reader_process_serves_a_script_that_works_at_import(fake_hub, deepseek_ckpt, tmp_path):
    """The child is a plain subprocess, not multiprocessing's spawn (which imports the main script
    again): a script that reads at its top level, run from another folder than the repo's, reads
    through it, and its top level runs once."""
    import subprocess
    import textwrap

    ck = deepseek_ckpt
    name = ck.attention_weight_names(0)[0]
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from svd_probe.hub.checkpoint import open_checkpoint
            print("top level ran")
            src = open_checkpoint("tiny/deepseek-v3", endpoint={fake_hub.endpoint!r}, reader="process")
            print("read", tuple(src.read_tensors([{name!r}])[{name!r}].shape))
            src.close()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("top level ran") == 1
    assert f"read {tuple(expected(ck, name).shape)}" in r.stdout


def test_pick_reader_auto_is_for_cuda_only():
    """`analyze --reader auto` asks for "auto" (the process where it can run and start, else
    threads: `open_checkpoint`) where the GPU computes, and for threads on the CPU; given ones
    stand, and anything else is refused with the choices."""
    from svd_probe.errors import BadOptionError
    from svd_probe.hub.reader_process import pick_reader

    assert pick_reader("auto", "cuda") == "auto" and pick_reader("auto", "cpu") == "thread"
    assert pick_reader("process", "cpu") == "process" and pick_reader("thread", "cuda") == "thread"
    with pytest.raises(BadOptionError, match="fork") as ei:
        pick_reader("fork", "cuda")
    assert "auto, thread or process" in ei.value.hint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reader process needs memfds (Linux)")
def test_reader_process_after_ctrl_c(tmp_path):
    """Ctrl-C during a read through the reader process: the child is stopped (its late answer
    would land on the next call), and every later call says so instead of returning wrong bytes."""
    import signal

    from svd_probe.hub.reader_process import ProcessFiles
    from svd_probe.testing.fake_hub import FakeHub

    (tmp_path / "w.bin").write_bytes(bytes(range(256)) * (16 << 12))  # 16 MiB
    with FakeHub(rate=4e6) as hub:  # 4 s for the file: the interrupt comes mid-read
        hub.add_repo("t/ctrl-c", tmp_path)
        files = ProcessFiles(hub.endpoint, "t/ctrl-c", hub.repos["t/ctrl-c"].commit)

        def interrupt(*_):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(KeyboardInterrupt):
                files.read_many([("w.bin", 0, 16 << 20)])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert files._proc.wait(timeout=10) is not None  # the child is gone
        with pytest.raises(TransferError, match="reader process was stopped"):
            files.read_many([("w.bin", 0, 10)])
        files.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reader process needs memfds (Linux)")
def test_reader_auto_reads_in_threads_where_the_process_cannot_start(fake_hub, deepseek_ckpt, monkeypatch):
    """A Python that cannot run the child (here sys.executable is /bin/false, as in a frozen app
    or an embedded interpreter): `reader="auto"` warns and reads in threads, the same bytes;
    `reader="process"` says the child did not start and how to read without it."""
    from svd_probe.hub.reader_process import ReaderStartError

    ck = deepseek_ckpt
    fake_hub.clear_faults()
    names = ck.attention_weight_names(0)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.warns(UserWarning, match="reading in threads instead"):
        src = hub_src(fake_hub, "tiny/deepseek-v3", reader="auto")
    try:
        assert src.stats["reader"] == "thread"
        got = src.read_tensors(names)
        for n in names:
            assert torch.equal(got[n], expected(ck, n))
    finally:
        src.close()
    with pytest.raises(ReaderStartError, match="did not start") as ei:
        hub_src(fake_hub, "tiny/deepseek-v3", reader="process")
    assert "--reader thread" in ei.value.hint
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(ReaderStartError, match="did not start"):
        hub_src(fake_hub, "tiny/deepseek-v3", reader="process")
