"""Benchmark: the big solves of DeepSeek-V3-shaped layers (solver routes, layers in flight, stages).

    PYTHONPATH=. python benchmarks/bench_solvers.py --device cuda --out solvers.json          # H200: ~4 min
    PYTHONPATH=. python benchmarks/bench_solvers.py --device cuda --only references,band      # the band rows
    PYTHONPATH=. python benchmarks/bench_solvers.py --device cpu --small --out /tmp/s.json    # ~1 min on 2 cores

Per layer, two float64 eigensolves at d_model (stacked O and VO, 7168² Grams) are most of the
compute. In one run, with a time budget (`--budget`, from the start of the process) after which
every remaining section is recorded as skipped, this measures:

1. baseline: today's per-layer path (`layer_spectra`, default config), and the same with the two
   big solves one after the other (`concurrent=False`);
2. references: float64 spectra of the materialized matrices, built without svd-probe's reduction
   (per-head: np.linalg.svd on `--ref-heads` heads; stacked/layer: eigvalsh of the float64 Gram of
   the materialized matrix on CUDA, ~1e-8·σ₁, or np.linalg.svd on CPU). Every error below is
   max_i |σ_i − σ_ref,i| / σ_ref,1 against these; the contract is 1e-4;
3. stages of one layer, each with its host time (until the Python call returns), device time
   (CUDA events on the caller's stream) and wall time (until the device is idle): the layer's
   tensors host → device (pinned and pageable), thin factors + per-head spectra, the Grams of
   stacked O and VO, their eigensolves, the small stacked and layer problems, σ device → host;
4. layers in flight: `layers_spectra` over N copies of the layer with `inflight` k = 1, 2, 4, 8,
   big solves one thread and stream each ("threads") or one batched call ("batched"): seconds per
   layer amortized, error, and whether every σ equals the single-layer path's bit for bit;
5. solver routes on this layer's two big problems: every entry of `SOLVERS` for the float64 Grams
   ("eig") and for the reduced matrices in float32/float64 ("svd32"/"svd64"), alone and as a
   batch of two; each route first runs on a half-size problem and is skipped when that
   predicts more than `--route-limit` seconds at full size (cubic scaling); a missing library or
   a failure is recorded, never fatal;
6. the fastest accurate route of 5, in flight as in 4;
7. (CUDA) a check of the reference itself: float64 gesvd of the materialized stacked O;
8. the two-stage "band" solver (svd_probe/spectra/band.py), run before 5: its stage 1 (dense →
   band on the device, band to the host) and stage 2 (LAPACK on one CPU thread) on stacked VO's
   Gram for each `--band-widths` b, stage 2 of one problem per core at once (its throughput
   bound: the CPU does two per layer; on threads and on processes with `--band-scaling`), and
   `layers_spectra` with it and with "band-hybrid" (the device's syevd takes a problem that
   finds every worker busy) at `--band-inflight` k, stage 2 on each of `--band-workers`.

`--only` names the sections to run besides the baseline (e.g. `--only references,band`).

Prints a table last and writes everything to `--out` (JSON, rewritten after every section, so a
run cut short still leaves its numbers). The line "switch:" is the `AUTO_ROUTES["cuda"]` entry
that the fastest accurate configuration measured here corresponds to.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace

import numpy as np
import torch

T_START = time.perf_counter()  # the budget counts from here, imports included

# JAX, if a route loads it, must leave the GPU's memory to torch (svd_probe.spectra.solvers says
# so too, but only when it is the first to import JAX).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_spectra import (  # noqa: E402 - benchmarks/ is not a package
    ALL,
    DSV3,
    HEAD_KEYS,
    dims_at,
    head_matrix,
    make_layer,
    n_blocks,
    ref_sigma,
    rel_err,
    stacked_matrix,
)

from svd_probe.adapters.base import AttentionFactors  # noqa: E402
from svd_probe.spectra import compute as C  # noqa: E402

# --small: DeepSeek-V3's proportions where it matters here (n·d_v ≥ d_model, so stacked O and VO
# reduce to d_model² Grams; only they are "big"), small enough for two CPU cores.
SMALL = dict(n=16, d_model=256, in_q=64, in_kv=32, d_qk=8, d_rope=4, d_v=16)
CONTRACT = 1e-4
BIG_KEYS = ("stacked.O", "stacked.VO")


# --- timing ----------------------------------------------------------------------------------------


def _bisect_on_device(dd: np.ndarray, ee: np.ndarray, lam_cpu: np.ndarray, ref, device: torch.device) -> dict:
    """Sturm bisection of one tridiagonal on the device: seconds, its difference from dsterf's
    eigenvalues, and the singular values' error against the float64 reference."""
    from svd_probe.spectra import sturm

    # from the host's arrays, as the band solver calls it (the copy to the device is timed too)
    wall(lambda: sturm.tridiagonal_eigvalsh(dd[None], ee[None], device), device)  # compiles the kernel
    t_dev, lam = wall(lambda: sturm.tridiagonal_eigvalsh(dd[None], ee[None], device), device)
    lam_d = lam[0].cpu().numpy()
    s_d = np.sqrt(np.clip(lam_d[::-1], 0, None))
    return {
        "bisect_device_s": t_dev,
        "bisect_vs_sterf_max_abs_per_lmax": float(np.abs(lam_d - lam_cpu).max() / np.abs(lam_cpu).max()),
        "max_err_VO_bisect": rel_err(s_d, ref) if ref is not None else None,
    }


def _warm_band(_: int) -> str:
    from svd_probe.spectra import band

    return band.stage2_name()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_times(fn, device: torch.device, repeats: int):
    """Medians of (host, device, wall) seconds over `repeats` calls, and the last result.

    host: until fn returns; device: CUDA events on the current stream around the work fn queued
    (host time on CPU); wall: until the device is idle again."""
    samples, out = [], None
    for _ in range(repeats):
        sync(device)
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        if device.type == "cuda":
            e1.record()
        sync(device)
        t2 = time.perf_counter()
        dev = e0.elapsed_time(e1) / 1000.0 if device.type == "cuda" else t1 - t0
        samples.append((t1 - t0, dev, t2 - t0))
    host, dev, wall = (statistics.median(s[i] for s in samples) for i in range(3))
    return {"host_s": host, "device_s": dev, "wall_s": wall}, out


def wall(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# --- the run ---------------------------------------------------------------------------------------


class Run:
    """The report, the budget and the rows of the final table."""

    def __init__(self, args, device: torch.device):
        self.t0 = T_START
        self.args = args
        self.device = device
        self.report: dict = {"sections": {}, "rows": []}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def dump(self) -> None:
        self.report["wall_seconds"] = round(time.perf_counter() - self.t0, 2)
        if self.args.out:
            tmp = self.args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(self.report, fh, indent=1, default=str)
            os.replace(tmp, self.args.out)

    def row(self, section: str, what: str, per_layer=None, err=None, note: str = "") -> dict:
        r = {"section": section, "what": what, "s_per_layer": per_layer, "max_err": err, "note": note}
        self.report["rows"].append(r)
        shown = f"{per_layer:.4f}" if isinstance(per_layer, float) else "-"
        e = f"{err:.1e}" if isinstance(err, float) else "-"
        print(f"  [{section}] {what}: {shown} s/layer, err {e} {note}", flush=True)
        return r

    def section(self, name: str, fn, need: float = 5.0):
        """Run one section; its failure or a spent budget is recorded, never fatal."""
        only = {x.strip() for x in self.args.only.split(",") if x.strip()}
        if only and name != "baseline" and name not in only:
            self.report["sections"][name] = {"skipped": "not in --only"}
            return None
        if self.left() < need:
            self.report["sections"][name] = {"skipped": f"budget: {self.left():.0f} s left, needs ~{need:.0f} s"}
            self.row(name, "skipped (budget)")
            self.dump()
            return None
        print(f"# {name} ({self.left():.0f} s of budget left)", flush=True)
        t = time.perf_counter()
        try:
            out = fn()
            self.report["sections"].setdefault(name, {})["seconds"] = round(time.perf_counter() - t, 2)
            return out
        except Exception as e:  # noqa: BLE001 - one failing section must not sink the run
            self.report["sections"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            self.row(name, f"FAILED {type(e).__name__}: {str(e)[:80]}")
            return None
        finally:
            self.dump()


def layer_copies(f: AttentionFactors, n: int) -> list[AttentionFactors]:
    """n layers that share f's tensors (each is computed from scratch all the same)."""
    return [
        AttentionFactors(q=f.q, k=f.k, v=f.v, o=f.o, q_pe=f.q_pe, kv_group=f.kv_group, layer=dict(f.layer))
        for _ in range(n)
    ]


def max_diff(a: dict, b: dict) -> tuple[float, bool]:
    """Largest |σ_a − σ_b| / σ₁ over every key, and whether all are bitwise equal."""
    worst, same = 0.0, True
    for key, (s, _) in a.items():
        t = b[key][0]
        same = same and torch.equal(s, t)
        scale = float(s.abs().max()) or 1.0
        worst = max(worst, float((s - t).abs().max()) / scale)
    return worst, same


def versions() -> dict:
    """Versions from the package metadata: importing JAX here would start it before svd-probe has
    told it not to take most of the GPU's memory."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.version.cuda}
    for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "cupy-cuda13x", "cupy", "numpy", "scipy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None) -> int:
    from svd_probe.spectra import band

    # This script is guarded and its top level harmless, which band's source check cannot tell:
    # let the band solvers' stage 2 run on worker processes (spawned ones import this file).
    band.use_stage2_workers("processes")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small shapes (fast on CPU); see SMALL")
    ap.add_argument("--scale", type=float, default=None, help="shrink DeepSeek-V3's dims by this factor instead")
    ap.add_argument("--out", default=None, help="JSON report path (default: $OUT/bench_solvers.json if $OUT is set)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds from start after which sections are skipped")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the whole layer and of each stage")
    ap.add_argument("--route-repeats", type=int, default=2, help="timed repeats of each solver route")
    ap.add_argument("--route-limit", type=float, default=4.0, help="skip a route predicted slower (s per problem)")
    ap.add_argument("--inflight", default="1,2,4,8", help="layers in flight to try")
    ap.add_argument("--layers", type=int, default=0, help="layers per in-flight run (default max(4, 2k))")
    ap.add_argument(
        "--routes",
        default=",".join(
            [f"eig:{n}" for n in C.SOLVERS] + [f"svd32:{n}" for n in C.SOLVERS] + ["svd64:torch", "svd64:jax-polar"]
        ),
        help="op:solver pairs to time (op: eig on the float64 Grams, svd32/svd64 on the reduced matrices)",
    )
    ap.add_argument("--band-widths", default="32,48,64", help="band widths b whose two stages are timed (section band)")
    ap.add_argument("--band-inflight", default="8,12", help="layers in flight for the band solver")
    ap.add_argument(
        "--band-workers", default="processes", help="where band's stage 2 runs, comma-separated: processes, threads"
    )
    ap.add_argument(
        "--band-tridiagonal",
        default="cpu,device",
        help="where band's tridiagonal eigenvalues are found, comma-separated: cpu (dsterf in the worker), "
        "device (Sturm bisection, svd_probe.spectra.sturm; CUDA + Triton)",
    )
    ap.add_argument(
        "--band-solvers",
        default="band,band-hybrid:cpu-full",
        help="the band routes to time, comma-separated: band, band-hybrid:RULE (RULE: cpu-full, device-free)",
    )
    ap.add_argument("--band-repeat", type=int, default=1, help="runs of each band route, in rotating order")
    ap.add_argument(
        "--band-scaling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stage 2's throughput on 2/4/8 threads and one process per core",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated sections to run besides baseline (references, stages, inflight torch, routes, "
        "inflight best route, band, reference check); default: all",
    )
    ap.add_argument("--ref-heads", type=int, default=4, help="heads with a float64 per-head reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "bench_solvers.json")

    device = torch.device(args.device)
    run = Run(args, device)
    rep = run.report
    torch.set_float32_matmul_precision("highest")
    d = SMALL if args.small else (dims_at(args.scale) if args.scale else dict(DSV3))
    rep.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        versions=versions(),
        dims=d,
        args=vars(args),
        cpu_threads=torch.get_num_threads(),
    )
    print(f"# bench_solvers on {rep['device']}, dims {d}, versions {rep['versions']}", flush=True)

    f = make_layer(d, device, args.seed)
    sync(device)
    full = d == DSV3
    # Which problems are "big" follows the shapes: at DeepSeek-V3's dims the default config as
    # it is; shrunk, a big_side between stacked O/VO and everything else.
    probe = C._LayerProblems(f, C.SpectraConfig().resolved(device), True)
    keys = C.requested_keys(f, ALL)
    sides = {k: min(probe.shape(k)) for k in keys if not k.startswith("head.")}
    big_side = C.SpectraConfig().big_side if full else max(v for k, v in sides.items() if k not in BIG_KEYS)
    if not all(sides[k] > big_side for k in BIG_KEYS):
        print(f"warning: stacked O/VO are not the only big problems at these dims: {sides}", flush=True)
    base = C.SpectraConfig(big_side=big_side)
    rep["base_config"] = str(base)
    rep["min_sides"] = sides
    ks = [int(x) for x in args.inflight.split(",") if x.strip()]
    state: dict = {}

    # 1 ---------------------------------------------------------------------------------------------
    def baseline():
        out = {}
        layer_fn = lambda cfg: C.layer_spectra(f, ALL, config=cfg)  # noqa: E731
        t, res = wall(lambda: layer_fn(base), device)  # warm-up: cuSOLVER handles, workspaces
        out["first_call_s"] = t
        for name, cfg in (
            ("per-layer path (default)", base),
            ("big solves one after the other", replace(base, concurrent=False)),
        ):
            times = []
            for _ in range(args.repeats):
                t, r = wall(lambda cfg=cfg: layer_fn(cfg), device)
                times.append(t)
            out[name] = {"median_s": statistics.median(times), "times": times}
            state.setdefault("single", {})[name] = r
            run.row("baseline", name, statistics.median(times), note=f"({', '.join(f'{x:.3f}' for x in times)})")
        state["res"] = state["single"]["per-layer path (default)"]
        d_same, same = max_diff(state["single"]["big solves one after the other"], state["res"])
        out["sequential_vs_concurrent"] = {"max_rel_diff": d_same, "bitwise": same}
        rep["sections"]["baseline"] = out
        return out

    run.section("baseline", baseline, need=10)
    if "res" not in state:
        print("baseline failed; nothing else is meaningful", flush=True)
        run.dump()
        return 1

    # 2 ---------------------------------------------------------------------------------------------
    def references():
        exact = device.type == "cpu"
        s1 = {k.split(".")[1]: v[0][:, 0] for k, v in state["res"].items() if k.startswith("head.")}
        refs: dict[str, np.ndarray] = {}
        n = d["n"]
        heads = list(range(min(args.ref_heads, n)))
        for key in sorted(HEAD_KEYS):
            kind = key.split(".")[1]
            hs = [h for h in heads if h < n_blocks(f, kind)]
            refs[key] = np.stack([ref_sigma(head_matrix(f, kind, h, torch.float64), True) for h in hs])
        for kind in ("Q", "Q_pe", "K", "V", "O", "VO", "QK", "KQ"):
            m = stacked_matrix(f, kind, s1["QK" if kind == "KQ" else kind], torch.float64)
            refs[f"stacked.{kind}"] = ref_sigma(m, exact)
            del m
        for kind in ("QA", "KVA", "KVA_pe"):
            refs[f"layer.{kind}"] = ref_sigma(f.layer[kind], exact)
        state["refs"] = refs
        rep["sections"]["references"] = {
            "stacked_and_layer": "np.linalg.svd"
            if exact
            else "eigvalsh of the float64 Gram of the materialized matrix",
            "sigma_min_over_max": {k: float(v[-1] / v[0]) for k, v in refs.items() if not k.startswith("head.")},
        }

    run.section("references", references, need=15)

    def errors(result: dict) -> dict[str, float]:
        refs = state.get("refs")
        if not refs:
            return {}
        out = {}
        for key, (sig, _) in result.items():
            s = sig.numpy()
            if key.startswith("head."):
                s = s[: refs[key].shape[0]]
            out[key] = rel_err(s, refs[key])
        return out

    def worst(errs: dict) -> float | None:
        return max(errs.values()) if errs else None

    if "refs" in state:
        for i, name in enumerate(("per-layer path (default)", "big solves one after the other")):
            e = errors(state["single"][name])
            rep["sections"]["baseline"][name]["errors"] = e
            rep["rows"][i]["max_err"] = worst(e)

    # 3 ---------------------------------------------------------------------------------------------
    def stages():
        out: dict = {}
        cfg = base.resolved(device)
        cpu_tensors = {
            name: t.cpu()
            for name, t in (("q", f.q), ("q_pe", f.q_pe), ("k", f.k), ("v", f.v), ("o", f.o), *f.layer.items())
        }
        nbytes = sum(t.numel() * t.element_size() for t in cpu_tensors.values())
        if device.type == "cuda":
            pinned = {k: t.pin_memory() for k, t in cpu_tensors.items()}
            for label, src, nb in (("H2D pinned", pinned, True), ("H2D pageable", cpu_tensors, False)):
                tm, _ = stage_times(
                    lambda src=src, nb=nb: [t.to(device, non_blocking=nb) for t in src.values()], device, args.repeats
                )
                tm["GB_per_s"] = nbytes / tm["wall_s"] / 1e9
                out[f"transfer {label} ({nbytes / 1e6:.0f} MB)"] = tm
        with C._full_fp32_matmul(), torch.no_grad():
            small_keys = [k for k in keys if not k.startswith("head.") and k not in BIG_KEYS]

            def one_layer():
                lay = C._LayerProblems(f, cfg, True)
                parts = {}
                parts["thin factors + per-head σ"], _ = stage_times(
                    lambda: [lay.head(k.partition(".")[2]) for k in keys if k.startswith("head.")], device, 1
                )
                parts["Grams of stacked O and VO"], jobs = stage_times(
                    lambda: [lay.solve_for(k) for k in BIG_KEYS], device, 1
                )
                parts["eigensolves of stacked O and VO (torch, one after the other)"], sig = stage_times(
                    lambda: [C._run_solves([job])[0] for job in jobs], device, 1
                )
                parts["small stacked + layer problems"], small = stage_times(
                    lambda: [C._run_solves([lay.solve_for(k)])[0] for k in small_keys], device, 1
                )
                parts["σ device → host"], _ = stage_times(lambda: [s.to("cpu") for s in [*sig, *small]], device, 1)
                return parts

            samples = [one_layer() for _ in range(args.repeats)]
        for name in samples[0]:
            out[name] = {m: statistics.median(s[name][m] for s in samples) for m in ("host_s", "device_s", "wall_s")}
        rep["sections"]["stages"] = out
        for name, tm in out.items():
            run.row("stages", name, tm["wall_s"], note=f"host {tm['host_s']:.4f} device {tm['device_s']:.4f}")

    run.section("stages", stages, need=10)

    # 4, 6 -----------------------------------------------------------------------------------------
    def inflight(label: str, cfg: C.SpectraConfig, kvals: list[int] | None = None):
        rows = []
        try:
            resolved = cfg.resolved(device)
        except ValueError as e:
            run.row("inflight", f"{label}: unavailable", note=str(e)[:90])
            return rows
        single = C.layer_spectra(f, ALL, config=replace(cfg, inflight=1))
        C.layers_spectra(layer_copies(f, 2), ALL, config=replace(cfg, inflight=2))  # warm-up
        for k in kvals or ks:
            n_layers = args.layers or max(4, 2 * k)
            # the slowest per-layer time seen so far, with a margin: a run must not overrun
            budget_need = 2.0 + n_layers * 1.3 * max([state["per_layer_s"], *(r["s_per_layer"] for r in rows)])
            if run.left() < budget_need:
                run.row("inflight", f"{label}, k={k}", note="skipped (budget)")
                continue
            fs = layer_copies(f, n_layers)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t, res = wall(lambda fs=fs, k=k: C.layers_spectra(fs, ALL, config=replace(cfg, inflight=k)), device)
            diffs = [max_diff(r, single) for r in res]
            errs = [worst(errors(r)) for r in res]
            r = {
                "config": label,
                "inflight": k,
                "layers": n_layers,
                "seconds": t,
                "s_per_layer": t / n_layers,
                "max_err": max((e for e in errs if e is not None), default=None),
                "max_rel_diff_vs_single": max(x for x, _ in diffs),
                "bitwise_equal_single": all(s for _, s in diffs),
                "peak_gpu_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                "settings": {"big": resolved.big, "solver": resolved.solver, "batched": resolved.batched},
            }
            rows.append(r)
            note = "= single bitwise" if r["bitwise_equal_single"] else f"vs single {r['max_rel_diff_vs_single']:.1e}"
            if r["peak_gpu_GB"] is not None:
                note += f", peak {r['peak_gpu_GB']:.1f} GB"
            run.row("inflight", f"{label}, k={k}, {n_layers} layers", r["s_per_layer"], r["max_err"], note)
            run.dump()
        rep["sections"].setdefault("inflight", {}).setdefault("runs", []).extend(rows)
        return rows

    state["per_layer_s"] = rep["sections"]["baseline"]["per-layer path (default)"]["median_s"]
    torch_threads = replace(base, solver="torch", batched=False)
    torch_batched = replace(base, solver="torch", batched=True)
    run.section(
        "inflight torch",
        lambda: inflight("gram64 torch threads", torch_threads) + inflight("gram64 torch batched", torch_batched),
        need=20,
    )

    # 8 ---------------------------------------------------------------------------------------------
    def band_section():
        from concurrent.futures import ThreadPoolExecutor

        from svd_probe.spectra import band as BD

        out: dict = {"stage2_routine": BD.stage2_name(), "cores": BD.cores(), "default_band": BD.DEFAULT_BAND}
        with C._full_fp32_matmul(), torch.no_grad():
            lay = C._LayerProblems(f, base.resolved(device), True)
            g = lay.stack("stacked.VO").gram64(base.chunk_bytes)
        refs = state.get("refs", {})
        widths = [int(x) for x in args.band_widths.split(",") if x.strip()]
        bands = {}
        for b in widths:
            if run.left() < 15:
                run.row("band", f"b={b}: skipped (budget)")
                continue
            wall(lambda b=b, g=g: BD.to_band(g, b), device)  # warm-up (cuSOLVER geqrf handles)
            t1 = statistics.median(wall(lambda b=b, g=g: BD.to_band(g, b), device)[0] for _ in range(2))
            t_host = time.perf_counter()
            BD.band_on_device(g, b)
            t_host = time.perf_counter() - t_host  # until queued: ≈ t1 if launch-bound
            sync(device)
            bands[b] = ab = BD.to_band(g, b)
            t2, lam = wall(lambda ab=ab: BD.band_eigvals(ab), device)
            s = np.sqrt(np.clip(lam[::-1], 0, None))
            err = rel_err(s, refs["stacked.VO"]) if "stacked.VO" in refs else None
            out[f"b={b}"] = {"stage1_s": t1, "stage1_host_s": t_host, "stage2_one_thread_s": t2, "max_err_VO": err}
            run.row(
                "band",
                f"stacked VO, b={b}: stage 1 (device → band on host)",
                t1,
                note=f"s per problem, host {t_host:.3f}",
            )
            run.row("band", f"stacked VO, b={b}: stage 2 (CPU, one thread)", t2, err, "s per problem")
            if BD.has_band_tridiagonal():
                # stage 2 split: band → tridiagonal on the CPU, then its eigenvalues by dsterf
                # (CPU) or by Sturm bisection on the device (svd_probe.spectra.sturm)
                from svd_probe.spectra import sturm

                t_tri, (dd, ee) = wall(lambda ab=ab: BD.band_tridiagonal(ab), device)
                t_sterf, lam_c = wall(lambda: sturm.tridiagonal_eigvalsh_numpy(dd, ee), device)
                split = {"sb2st_s": t_tri, "sterf_s": t_sterf}
                if device.type == "cuda" and sturm.available():
                    try:
                        split |= _bisect_on_device(dd, ee, lam_c, refs.get("stacked.VO"), device)
                    except Exception as e:  # noqa: BLE001 - a kernel that does not compile: say so, go on
                        split["bisect_device_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                out[f"b={b}"]["stage2_split"] = split
                run.row("band", f"b={b}: stage 2 split (sb2st, sterf, bisection on device)", note=json.dumps(split))
        # stage 2's throughput: one band per core at once (the pipeline's ceiling on this host)
        b0 = BD.DEFAULT_BAND
        if b0 in bands and run.left() > 20:
            p = BD.cores()
            with ThreadPoolExecutor(p) as ex:
                t, _ = wall(lambda ab=bands[b0]: list(ex.map(BD.band_eigvals, [ab] * p)), device)
            out["stage2_parallel"] = {"problems": p, "seconds": t, "s_per_problem": t / p}
            run.row(
                "band",
                f"stage 2, b={b0}: {p} problems on {p} threads",
                2 * t / p,
                note=f"s/layer for 2 problems (per problem {t / p:.3f}; the CPU bound of the route)",
            )
        # Why 16 threads ran only about 2x one on the H200 host (2026-12-02): the same problems on
        # 2, 4, 8 threads, and on as many processes as cores (no shared interpreter at all). If
        # processes scale no better than threads, the host's cores are the limit, not the GIL.
        if b0 in bands and args.band_scaling and run.left() > 45:
            import multiprocessing as mp

            scaling: dict = {}
            for k in [k for k in (2, 4, 8) if k < BD.cores()]:
                with ThreadPoolExecutor(k) as ex:
                    t, _ = wall(lambda ab=bands[b0], k=k, ex=ex: list(ex.map(BD.band_eigvals, [ab] * k)), device)
                scaling[f"threads={k}"] = t / k
            p = BD.cores()
            with mp.get_context("spawn").Pool(p) as procs:
                procs.map(_warm_band, range(p))  # workers up, LAPACK found, before the clock starts
                t, _ = wall(lambda ab=bands[b0]: procs.map(BD.band_eigvals, [ab] * p), device)
            scaling[f"processes={p}"] = t / p
            out["stage2_scaling_s_per_problem"] = scaling
            run.row("band", f"stage 2, b={b0}: s per problem by workers", note=json.dumps(scaling))
        bands.clear()  # the Gram goes with this function's frame
        rep["sections"]["band"] = out
        band_ks = [int(x) for x in args.band_inflight.split(",") if x.strip()]
        out["hybrid_problems_by_route"] = {}
        tris = [t.strip() for t in args.band_tridiagonal.split(",") if t.strip()]
        band_solvers = [t.strip() for t in args.band_solvers.split(",") if t.strip()]
        for workers in [w.strip() for w in args.band_workers.split(",") if w.strip()]:
            # where stage 2 runs: one worker process per core (the default), or threads
            BD.use_stage2_workers(workers)
            # each combination `--band-repeat` times, in rotating order, so that warming (the
            # pool's first spawn, the allocator, clocks) does not favour the later ones
            combos = [(tri, name) for tri in tris for name in band_solvers]
            for r in range(args.band_repeat):
                for tri, name in combos[r % len(combos) :] + combos[: r % len(combos)]:
                    # where stage 2's tridiagonal eigenvalues are found: dsterf in the worker, or the device
                    BD.use_device_tridiagonal(tri == "device")
                    if tri == "device" and not BD.tridiagonal_on_device(device):
                        run.row("band", f"tridiagonal on device, stage 2 on {workers}", note="skipped: cannot run here")
                        continue
                    solver, _, rule = name.partition(":")
                    if rule:
                        BD.use_hybrid_rule(rule)
                    where = f"{name}, {workers}, tri {tri}, rep {r + 1}"
                    before = dict(BD.ROUTE_COUNTS)
                    inflight(f"gram64 {where}", replace(base, solver=solver, batched=False), band_ks)
                    split = {k: BD.ROUTE_COUNTS[k] - before[k] for k in before}
                    out["hybrid_problems_by_route"][where] = split
                    run.row("band", f"{where}: problems by route", note=str(split))
            BD.use_hybrid_rule(BD.DEFAULT_HYBRID_RULE)  # for the sections after this one
        BD.use_stage2_workers("processes")
        BD.use_device_tridiagonal(None)
        return out

    run.section("band", band_section, need=40)

    # 5 ---------------------------------------------------------------------------------------------
    def routes():
        with C._full_fp32_matmul(), torch.no_grad():
            lay = C._LayerProblems(f, base.resolved(device), True)
            stacks = {k: lay.stack(k) for k in BIG_KEYS}
            inputs = {
                "eig": {k: s.gram64(base.chunk_bytes) for k, s in stacks.items()},
                "svd32": {k: s.materialize(torch.float32) for k, s in stacks.items()},
                "svd64": {k: s.materialize(torch.float64) for k, s in stacks.items()},
            }
        sizes = {k: min(s.shape) for k, s in stacks.items()}
        refs = state.get("refs", {})
        out = []
        plan = [tuple(item.split(":", 1)) for item in args.routes.split(",") if item.strip()]

        def solve(op, solver, key, x):
            job = C._Solve("eig" if op == "eig" else "svd", x, solver, sizes[key])
            return C._run_solves([job])[0]

        def solve_pair(op, solver):
            jobs = [C._Solve("eig" if op == "eig" else "svd", inputs[op][k], solver, sizes[k]) for k in BIG_KEYS]
            return C._run_solves(jobs)  # same shape: one batched call

        def half(op, x):
            q = max(8, x.shape[-1] // 2)
            return x[:q, :q].contiguous() if op == "eig" else x[: max(q, x.shape[0] // 2), :q].contiguous()

        for op, name in plan:
            label = f"{op} {name}"
            why = C.solver_unavailable(name, device, "eig" if op == "eig" else "svd")
            if why:
                out.append({"route": label, "skipped": why})
                run.row("routes", label, note=f"skipped: {why[:70]}")
                continue
            if run.left() < 8:
                out.append({"route": label, "skipped": "budget"})
                run.row("routes", label, note="skipped (budget)")
                continue
            try:
                x_vo = inputs[op]["stacked.VO"]
                xq = half(op, x_vo)
                job = C._Solve("eig" if op == "eig" else "svd", xq, name, min(xq.shape))
                # cubic, except the band solver's CPU stage 2 (most of its time): O(n²·b)
                growth = (x_vo.shape[-1] / xq.shape[-1]) ** (2 if name == "band" else 3)
                t_q, _ = wall(lambda job=job: C._run_solves([job]), device)
                if t_q * growth <= args.route_limit * 4:  # maybe only slow once (JAX compiles)
                    t_q = min(t_q, wall(lambda job=job: C._run_solves([job]), device)[0])
                predicted = t_q * growth
                if predicted * (4 + args.route_repeats) + 5 > run.left():
                    out.append({"route": label, "skipped": f"budget (predicts {predicted:.1f} s per problem)"})
                    run.row("routes", label, note="skipped (budget)")
                    continue
                if predicted > args.route_limit:
                    out.append({"route": label, "skipped": f"half size took {t_q:.3f} s, predicts {predicted:.1f} s"})
                    run.row("routes", label, note=f"skipped: predicts {predicted:.1f} s per problem")
                    continue
                errs, first = {}, {}
                for key in BIG_KEYS:  # first full-size calls: warm-up and error
                    first[key] = solve(op, name, key, inputs[op][key]).cpu()
                    if key in refs:
                        errs[key] = rel_err(first[key].numpy(), refs[key])
                times = [
                    wall(lambda: solve(op, name, "stacked.VO", x_vo), device)[0] for _ in range(args.route_repeats)
                ]
                t_one = statistics.median(times)
                t_pair, pair_same = None, None
                if op == "eig":  # both Grams in one batched call
                    t_pair, pair = wall(lambda: solve_pair(op, name), device)
                    pair_same = all(torch.equal(a.cpu(), first[k]) for a, k in zip(pair, BIG_KEYS, strict=True))
                r = {
                    "route": label,
                    "op": op,
                    "solver": name,
                    "what": C.SOLVERS[name].what,
                    "s_per_problem": t_one,
                    "s_per_layer_two_problems": 2 * t_one,
                    "s_batch_of_two": t_pair,
                    "batch_equals_single": pair_same,
                    "errors": errs,
                    "max_err": max(errs.values()) if errs else None,
                    "half_size_s": t_q,
                }
                out.append(r)
                pair_note = f"; batch of 2: {t_pair:.3f}" if t_pair is not None else ""
                run.row("routes", label, 2 * t_one, r["max_err"], f"(per problem {t_one:.3f}{pair_note})")
            except Exception as e:  # noqa: BLE001 - a failing route is a result
                out.append({"route": label, "error": f"{type(e).__name__}: {e}"})
                run.row("routes", label, note=f"FAILED {type(e).__name__}: {str(e)[:60]}")
            run.dump()
            rep["sections"]["routes"] = {"runs": out}
        # for scale: a float32 eigensolve of the float64 Gram (not offered: inaccurate)
        try:
            g = inputs["eig"]["stacked.VO"]
            t32, lam = wall(lambda: torch.linalg.eigvalsh(g.float()), device)
            s = lam.double().flip(-1).clamp_min(0).sqrt().cpu().numpy()
            e32 = rel_err(s, refs["stacked.VO"]) if "stacked.VO" in refs else None
            out.append({"route": "eig torch float32 (for scale; not offered)", "s_per_problem": t32, "max_err": e32})
            run.row("routes", "eig torch float32 of the Gram (for scale)", 2 * t32, e32, "not offered: inaccurate")
        except Exception as e:  # noqa: BLE001
            out.append({"route": "eig torch float32", "error": f"{type(e).__name__}: {e}"})
        rep["sections"]["routes"] = {"runs": out}
        inputs.clear()
        return out

    route_rows = run.section("routes", routes, need=15) or []

    # 6 ---------------------------------------------------------------------------------------------
    accurate = [
        r
        for r in route_rows
        if "s_per_problem" in r and r.get("solver") and r.get("max_err") is not None and r["max_err"] <= CONTRACT
    ]
    best = min(
        # torch eig is the baseline's, band has its own section (8)
        (r for r in accurate if (r["solver"] != "torch" or r["op"] != "eig") and r["solver"] != "band"),
        key=lambda r: r["s_per_problem"],
        default=None,
    )
    if best is not None:
        big = "gram64" if best["op"] == "eig" else best["op"]
        cfg = replace(base, big=big, solver=best["solver"], batched=False)
        rep["best_route"] = best["route"]
        run.section("inflight best route", lambda: inflight(f"{big} {best['solver']} threads", cfg), need=20)

    # 7 ---------------------------------------------------------------------------------------------
    def ref_check():
        s1 = state["res"]["head.O"][0][:, 0]
        m = stacked_matrix(f, "O", s1, torch.float64)
        a = m if m.shape[0] >= m.shape[1] else m.mT
        t, s = wall(lambda: torch.linalg.svdvals(a, driver="gesvd"), device)
        dev = rel_err(s.cpu().numpy(), state["refs"]["stacked.O"])
        rep["sections"]["reference check"] = {"gesvd_float64_vs_gram_reference": dev, "seconds": t}
        run.row("reference", "float64 gesvd of stacked O vs the Gram reference", None, dev, f"({t:.1f} s)")

    if device.type == "cuda" and "refs" in state:
        run.section("reference check", ref_check, need=25)

    # summary -----------------------------------------------------------------------------------------
    runs = rep["sections"].get("inflight", {}).get("runs", [])
    good = [r for r in runs if r["max_err"] is not None and r["max_err"] <= CONTRACT]
    fastest = min(good, key=lambda r: r["s_per_layer"], default=None)
    if fastest is not None:
        s = fastest["settings"]
        switch = {
            "factor": "gram",
            "stacked": "gram64",
            "big": s["big"],
            "solver": s["solver"],
            "inflight": fastest["inflight"],
            "batched": s["batched"],
        }
        rep["fastest_accurate"] = fastest
        rep["switch"] = f'AUTO_ROUTES["cuda"] = {switch!r}'
    run.dump()

    print()
    print(f"{'section':<10} {'what':<58} {'s/layer':>8} {'err/σ₁':>8}  note")
    for r in rep["rows"]:
        pl = f"{r['s_per_layer']:.4f}" if isinstance(r["s_per_layer"], float) else "-"
        e = f"{r['max_err']:.1e}" if isinstance(r["max_err"], float) else "-"
        print(f"{r['section'][:10]:<10} {r['what'][:58]:<58} {pl:>8} {e:>8}  {r['note'][:60]}")
    if fastest is not None:
        print(
            f"fastest accurate: {fastest['config']}, inflight {fastest['inflight']}: {fastest['s_per_layer']:.3f} s/layer "
            f"(target 0.5 s at full size), err {fastest['max_err']:.1e}"
        )
        print(f"switch: {rep['switch']}")
    print(f"benchmark wall time: {time.perf_counter() - run.t0:.1f} s (budget {args.budget:.0f} s)")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
