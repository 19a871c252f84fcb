"""Streaming benchmark: DeepSeek-V3-shaped attention served by the loopback Hub stand-in.

Generates (in a temp dir, deleted afterwards unless --keep) a checkpoint whose attention layers
have DeepSeek-V3's real shapes (187 MB per layer, FP8 + scales) and whose experts make up most
bytes, serves it with `svd_probe.testing.fake_hub.FakeHub` on 127.0.0.1, and reports:

1. bytes svd-probe fetches vs the whole-shard approach (download every shard holding attention);
2. read throughput of svd-probe's range reads vs a plain sequential read of the same bytes
   (one `open/seek/read` per tensor from the local files, and one HTTP range at a time);
3. the effect of the number of requests in flight (--concurrency 1 2 4 8 16, fixed widths), and
   svd-probe's default (at most 8, 2 while one connection streams >= 200 MB/s);
   then httpcore's socket read size (--read-kib 64 1024: its default, svd-probe's) at 8 in flight,
   with this process's CPU seconds per GB (the client's work, most of it with the GIL held).
4. end to end: `stream_layers` with FP8 → float32 dequantization on `--device` (cpu, cuda).

    python benchmarks/bench_streaming.py                   # ~3.2 GB checkpoint, 4 layers
    python benchmarks/bench_streaming.py --layers 2 --experts 6 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


class _RemoteStats:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def stats(self, reset: bool = False) -> dict:
        with urllib.request.urlopen(self.endpoint + "/_stats" + ("?reset" if reset else "")) as r:
            return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=14, help="real-shaped experts per layer (44 MB each)")
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--read-kib", type=int, nargs="+", default=[64, 1024], help="httpcore read sizes to compare")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    ap.add_argument("--keep", type=Path, default=None, help="generate into / reuse this folder instead of a temp dir")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--in-process", action="store_true", help="run the Hub stand-in in this process (GIL shared)")
    ap.add_argument(
        "--device", nargs="+", default=["cpu"], help="where the end-to-end step dequantizes (e.g. cpu cuda)"
    )
    args = ap.parse_args()

    # Here, not at the top level: the reader process (reader="process") imports this script, and
    # band's spawn check accepts only a top level that defines things.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    hf_home = tempfile.mkdtemp(prefix="bench-hf-")
    os.environ["HF_HOME"] = hf_home  # before huggingface_hub is imported
    import torch

    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.ranges import HubFiles
    from svd_probe.hub.stream import stream_layers
    from svd_probe.models import ModelRef
    from svd_probe.testing.checkpoints import Checkpoint, build_deepseek_v3_real
    from svd_probe.testing.fake_hub import FakeHub

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    t0 = time.perf_counter()
    if args.keep and (work / "model.safetensors.index.json").is_file():
        cfg = json.loads((work / "config.json").read_text())
        wm = json.loads((work / "model.safetensors.index.json").read_text())["weight_map"]
        ck = Checkpoint(work, cfg, wm, cfg["num_hidden_layers"], "F8_E4M3")
    else:
        ck = build_deepseek_v3_real(work, layers=args.layers, experts_per_layer=args.experts, n_shards=args.shards)
    gen_s = time.perf_counter() - t0
    shard_files = sorted(set(ck.weight_map.values()))
    ckpt_bytes = sum((work / s).stat().st_size for s in shard_files)
    names = ck.all_attention_tensor_names()
    attn_shards = sorted({ck.weight_map[n] for n in names})
    whole_shard_bytes = sum((work / s).stat().st_size for s in attn_shards)
    print(
        f"checkpoint: {ckpt_bytes / 1e9:.2f} GB in {len(shard_files)} shards, generated in {gen_s:.1f} s; "
        f"{ck.num_layers} layers of real DeepSeek-V3 attention shapes"
    )

    results: dict = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "checkpoint_bytes": ckpt_bytes,
        "layers": ck.num_layers,
        "load_average_at_start": os.getloadavg(),
        "hub_in_process": args.in_process,
    }
    proc = None
    try:
        with contextlib.ExitStack() as stack:
            if args.in_process:
                hub = stack.enter_context(FakeHub())
                hub.add_repo("bench/deepseek-v3-real", work)
                endpoint = hub.endpoint
            else:
                # The stand-in in its own process: its Python request handling must not share
                # the client's GIL, or the benchmark measures the lock, not the reader.
                proc = subprocess.Popen(
                    [sys.executable, "-m", "svd_probe.testing.fake_hub", f"bench/deepseek-v3-real={work}"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                endpoint = proc.stdout.readline().strip()
            hub = _RemoteStats(endpoint)
            ref = ModelRef(name="bench", repo_id="bench/deepseek-v3-real")

            # Warm the page cache so every method reads the same (memory-resident) bytes.
            for s in attn_shards:
                with open(work / s, "rb") as f:
                    while f.read(64 << 20):
                        pass

            # -- 1 + 3: raw range reads at several concurrencies -------------------------------
            seen: dict = {}

            def range_reads(c: int, **options) -> dict:
                best = None
                for _ in range(args.repeats):
                    src = open_checkpoint(ref, endpoint=endpoint, concurrency=c, **options)
                    hub.stats(reset=True)
                    cpu0 = os.times()
                    t = time.perf_counter()
                    spans = src.headers(attn_shards)
                    infos = [spans[ck.weight_map[n]].tensors[n] for n in names]
                    bufs = src._files.read_many(
                        [(ck.weight_map[n], i.begin, i.end) for n, i in zip(names, infos, strict=False)]
                    )
                    dt = time.perf_counter() - t
                    cpu1 = os.times()
                    fetched = src.bytes_fetched
                    st = hub.stats()
                    assert fetched == st["bytes_served"] and st["shard_gets_without_range"] == 0, st
                    del bufs
                    seen["commit"] = src.commit
                    row = {
                        "concurrency": c,
                        "in_flight": src.stats["in_flight"],
                        "seconds": dt,
                        "bytes": fetched,
                        "GBps": fetched / dt / 1e9,
                        "requests": st["ranged_206"],
                        "cpu_s_per_GB": (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / (fetched / 1e9),
                        "infos": infos,
                    }
                    src.close()
                    if best is None or dt < best["seconds"]:
                        best = row
                assert best is not None
                return best

            def show(label: str, r: dict) -> None:
                print(
                    f"  {label}: {r['bytes'] / 1e9:.3f} GB in {r['seconds']:.2f} s = {r['GBps']:.2f} GB/s "
                    f"({r['requests']} requests, {r['in_flight']} in flight, client CPU {r['cpu_s_per_GB']:.2f} s/GB)"
                )

            per_conc = []
            for c in args.concurrency:
                r = range_reads(c, fast_connection=None)
                infos = r.pop("infos")
                per_conc.append(r)
                show(f"svd-probe range reads, {c:2d} in flight", r)
            results["range_reads"] = per_conc
            r = range_reads(8)
            r.pop("infos")
            results["range_reads_default"] = r
            show("svd-probe's default (at most 8)", r)
            import httpcore2 as core

            from svd_probe.hub import http as hub_http

            per_size = []
            for kib in args.read_kib:
                core.HTTP11Connection.READ_NUM_BYTES = kib * 1024
                r = range_reads(8, fast_connection=None)
                r.pop("infos")
                per_size.append({"read_kib": kib, **r})
                show(f"httpcore reads of {kib:4d} KiB, 8 in flight", r)
            core.HTTP11Connection.READ_NUM_BYTES = hub_http.READ_SIZE
            results["read_sizes"] = per_size

            # -- 3b: what the reads cost a thread that issues many small torch ops, as analyze's
            # main thread issues GPU launches: its op rate alone, then while the reads run.
            def small_ops(stop: threading.Event, out: list) -> None:
                x = torch.zeros(16)
                n, t = 0, time.perf_counter()
                while not stop.is_set():
                    for _ in range(100):
                        x.add_(1.0)
                    n += 100
                out.append(n / (time.perf_counter() - t))

            def beside_ops(fn) -> tuple:
                stop, out = threading.Event(), []
                th = threading.Thread(target=small_ops, args=(stop, out))
                th.start()
                try:
                    r = fn() if fn is not None else time.sleep(2.0)
                finally:
                    stop.set()
                    th.join()
                return r, out[0]

            _, alone = beside_ops(None)
            contention = {"ops_per_s_alone": alone, "rows": []}
            print(f"  a thread of small torch ops: {alone:,.0f} ops/s alone")
            for label, c, opts in (
                ("8 in flight", 8, {"fast_connection": None}),
                ("2 in flight", 2, {}),
                ("default", 8, {}),
                ("process", 8, {"reader": "process"}),
            ):
                r, rate = beside_ops(lambda c=c, opts=opts: range_reads(c, **opts))
                r.pop("infos")
                contention["rows"].append({"label": label, "ops_per_s": rate, **r})
                print(
                    f"    during reads, {label:11s}: {rate:,.0f} ops/s ({rate / alone:.0%} of alone), "
                    f"reads {r['GBps']:.2f} GB/s ({r['in_flight']} in flight)"
                )
            results["small_ops_beside_reads"] = contention
            fetched = per_conc[0]["bytes"]
            attn_bytes = sum(i.nbytes for i in infos)
            results["bytes"] = {
                "svd_probe_fetched": fetched,
                "attention_tensors": attn_bytes,
                "whole_shard_approach": whole_shard_bytes,
                "ratio_whole_vs_svd_probe": whole_shard_bytes / fetched,
            }
            print(
                f"bytes: svd-probe {fetched / 1e9:.3f} GB (attention {attn_bytes / 1e9:.3f} GB + headers); "
                f"whole shards {whole_shard_bytes / 1e9:.2f} GB ({whole_shard_bytes / fetched:.1f}×)"
            )

            # -- 2: baselines over the same bytes --------------------------------------------
            order = sorted(zip(names, infos, strict=False), key=lambda x: (ck.weight_map[x[0]], x[1].begin))
            best = None
            for _ in range(args.repeats):
                t = time.perf_counter()
                total = 0
                for n, i in order:
                    with open(work / ck.weight_map[n], "rb") as f:
                        f.seek(i.begin)
                        total += len(f.read(i.nbytes))
                dt = time.perf_counter() - t
                best = dt if best is None else min(best, dt)
            results["local_sequential_read"] = {"seconds": best, "GBps": total / best / 1e9}
            print(f"  plain sequential local read of the same bytes (page cache): {total / best / 1e9:.2f} GB/s")

            commit = seen["commit"]
            best = None
            for _ in range(args.repeats):
                # One request at a time, whole tensor per request: no splitting, no parallelism.
                files = HubFiles(endpoint, ref.repo_id, commit, concurrency=1, chunk_size=1 << 40, max_gap=0)
                t = time.perf_counter()
                for n, i in order:
                    files.read_many([(ck.weight_map[n], i.begin, i.end)])
                dt = time.perf_counter() - t
                files.close()
                best = dt if best is None else min(best, dt)
            results["http_one_at_a_time"] = {"seconds": best, "GBps": total / best / 1e9}
            print(f"  plain sequential HTTP (one whole-tensor range at a time): {total / best / 1e9:.2f} GB/s")

            # Whole-shard download speed of one shard (what the public approach does, no disk write).
            files = HubFiles(endpoint, ref.repo_id, commit, concurrency=1, chunk_size=1 << 40)
            s0 = attn_shards[0]
            size = (work / s0).stat().st_size
            t = time.perf_counter()
            files.read_many([(s0, 0, size)])
            dt = time.perf_counter() - t
            files.close()
            results["whole_shard_http"] = {
                "bytes": size,
                "seconds": dt,
                "GBps": size / dt / 1e9,
                "est_seconds_all_attention_shards": whole_shard_bytes / (size / dt),
            }
            print(
                f"  whole-shard GET: {size / dt / 1e9:.2f} GB/s → {whole_shard_bytes / (size / dt):.1f} s for all attention shards"
            )

            # -- 4: end to end with dequantization, on each device asked for ----------------------
            c = max(per_conc, key=lambda r: r["GBps"])["concurrency"]
            for dev in args.device:
                src = open_checkpoint(ref, endpoint=endpoint, concurrency=c)
                t = time.perf_counter()
                for _layer, tensors in stream_layers(
                    src, range(ck.num_layers), ck.attention_weight_names, dev, prefetch=1
                ):
                    del tensors
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
                results[f"stream_layers_{dev}_dequant"] = {
                    "concurrency": c,
                    "seconds": dt,
                    "GBps": src.bytes_fetched / dt / 1e9,
                }
                print(
                    f"  stream_layers incl. FP8→float32 dequant on {dev} ({c} in flight): {src.bytes_fetched / dt / 1e9:.2f} GB/s of fetched bytes"
                )
                src.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(hf_home, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
