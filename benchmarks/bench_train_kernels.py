"""The training step's hand-written kernels against the torch code they replace, at the lab's shape.

One layer's worth of each job, forward + backward, bf16, on one GPU (batch 256 × 128 tokens,
8 heads of 32, FFN 1,024):

    attention  mha's qkv [B, T, 3, H, D] -> RoPE -> softmax attention -> [B, T, H·D]
               torch: the model's own code (Rope + SDPA, torch.compile'd, torch's backend choice)
               kernel: kernels.short_attention, the default cut at 4 and 8 warps a program
    swiglu     y [B·T, 2F] (the bias-free gate_up GEMM's output), b [2F] -> silu(g)·u
               torch: silu(g + b_g)·(u + b_u), torch.compile'd (its backward sums the bias
               gradient in a kernel of its own)
               kernel: kernels.swiglu_bias

Each row: the median of `--reps` timed calls (CUDA events, after warm-up), and the bytes the job
must move at the least (inputs read once, outputs written once) over that time, against the
H200's 4.8 TB/s. These rows time autograd calls one at a time, launches and all.

`--cuts` adds the attention kernels alone, forward and backward apart, under every cut of
`kernels.AttentionCut` in a grid (forward: queries a program × warps; backward: the fused kernel
and the split pair, queries × keys × warps × pipelining stages): `--launches` launches back to
back between two CUDA events, so that the GPU never waits for the host, median of `--reps`.
Each cut's output and gradients are checked against float32 torch code (Rope + SDPA) on the
same bf16 inputs; a cut off by more than 2e-2 relative is reported and never chosen. The fastest
forward and the fastest backward are written together to `--best-cut` (a JSON object of
AttentionCut fields, what `train_speed.py --cuts` takes).

    PYTHONPATH=. python benchmarks/bench_train_kernels.py --json $OUT/bench_train_kernels.json
    PYTHONPATH=. python benchmarks/bench_train_kernels.py --cuts --best-cut /tmp/cut.json --json $OUT/cuts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svd_probe.train import kernels  # noqa: E402
from svd_probe.train.model import Rope, _attend  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median ms of fn() over reps calls, each between two CUDA events."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


FWD_GRID = [dict(fwd_queries=q, fwd_warps=w) for q in (128, 64, 32) for w in (8, 4)]
BWD_GRID = [dict(split=False, bwd_queries=q, bwd_warps=w) for q in (64, 32) for w in (8, 4)] + [
    dict(split=True, bwd_queries=q, bwd_keys=k, bwd_warps=w, dq_warps=w, stages=st)
    for q, k in ((64, 64), (32, 64), (64, 32), (32, 32), (32, 128), (128, 32))
    for w in (8, 4)
    for st in (None, 1)
]

# --grid fine: around the fused backward's best (first run, H100, 2026-12-07: 64 queries at 4
# warps), and the forward at 2 and 4 warps.
FINE_FWD_GRID = [dict(fwd_queries=q, fwd_warps=w) for q in (128, 64) for w in (8, 4, 2)]
FINE_BWD_GRID = [
    dict(split=False, bwd_queries=q, bwd_warps=w, stages=st)
    for q in (128, 64, 32, 16)
    for w in (4, 2)
    for st in (None, 1, 2)
]


def sweep_cuts(
    B: int, T: int, H: int, D: int, launches: int, reps: int, dev=None, grids=(FWD_GRID, BWD_GRID)
) -> tuple[list[dict], dict]:
    """The attention kernels alone under each cut of FWD_GRID and BWD_GRID (mha's packed layout,
    full RoPE): rows, and the best cut's fields. On the CPU (Triton's interpreter, fp32: a smoke
    test of this function) the times are wall times."""
    dev = dev or torch.device("cuda")
    bf = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, device=dev, dtype=bf)
    do = torch.randn(B, T, H * D, device=dev, dtype=bf)
    rope = Rope(D, D, 10000.0, T).to(dev)
    cos, sin = kernels._rope_tables(rope.cos, rope.sin, T)
    # float32 torch code on the same bf16 inputs: the reference every cut is checked against
    x = qkv.float().requires_grad_()
    q, k, v = x.unbind(2)
    q, k = Rope(D, D, 10000.0, T).to(dev)(q, k)
    ref_o = _attend(q, k, v, None, False)
    (ref_g,) = torch.autograd.grad(ref_o, [x], do.float())
    views = kernels._qkv_views(qkv, None, True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    def run(fn) -> float:
        if dev.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - t0)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(launches):
                fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / launches)
        return statistics.median(out)

    rows: list[dict] = []
    bt = kernels._block_tokens(T)
    saved = kernels.ATTENTION_CUTS.get(bt)
    try:
        for fields in grids[0]:
            kernels.ATTENTION_CUTS[bt] = kernels.AttentionCut(**fields)
            row: dict = {"job": "attention forward", "cut": fields}
            try:
                o, _ = kernels._launch_attention(*views, cos, sin, D, False)
                row["max_rel_err"] = rel(o, ref_o.detach())
                row["ms"] = round(run(lambda: kernels._launch_attention(*views, cos, sin, D, False)), 4)
            except Exception as e:  # a cut that does not compile or run here is a row, not the end
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
        kernels.ATTENTION_CUTS[bt] = kernels.AttentionCut()
        o, lse = kernels._launch_attention(*views, cos, sin, D, False)
        dsrc = torch.empty_like(qkv)
        grads = kernels._qkv_views(dsrc, None, True)
        for fields in grids[1]:
            kernels.ATTENTION_CUTS[bt] = kernels.AttentionCut(**fields)
            row = {"job": "attention backward", "cut": fields}

            def bwd() -> None:
                kernels._launch_attention(*views, cos, sin, D, False, grads=grads, o=o, lse=lse, do=do)

            try:
                dsrc.zero_()
                bwd()
                row["max_rel_err"] = rel(dsrc, ref_g)
                row["ms"] = round(run(bwd), 4)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    finally:
        if saved is None:
            kernels.ATTENTION_CUTS.pop(bt, None)
        else:
            kernels.ATTENTION_CUTS[bt] = saved
    best: dict = {}
    for job in ("attention forward", "attention backward"):
        ok = [r for r in rows if r["job"] == job and "ms" in r and r["max_rel_err"] <= 2e-2]
        if ok:
            best.update(min(ok, key=lambda r: r["ms"])["cut"])
    return rows, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--cuts", action="store_true", help="also time the attention kernels under a grid of cuts")
    ap.add_argument("--launches", type=int, default=20, help="--cuts: launches between two events")
    ap.add_argument("--grid", choices=["coarse", "fine"], default="coarse", help="--cuts: which grid of cuts")
    ap.add_argument("--best-cut", default=None, help="--cuts: write the fastest correct cut here (JSON)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, T, H, D, Fd = args.batch, args.tokens, args.heads, args.head_dim, args.ffn
    bf = torch.bfloat16
    rows = []

    # attention, mha's packed layout
    rope = Rope(D, D, 10000.0, T).to(dev)
    qkv = torch.randn(B, T, 3, H, D, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(B, T, H * D, device=dev, dtype=bf)

    def torch_attention(x):
        q, k, v = x.unbind(2)
        q, k = rope(q, k)
        return _attend(q, k, v, None, False)

    compiled = torch.compile(torch_attention)

    def step(f):
        def run():
            o = f(qkv)
            torch.autograd.grad(o, [qkv], g)

        return run

    least = (qkv.numel() * 2 + g.numel() * 2) * 2  # read q, k, v and dO, write o and dq, dk, dv
    t = timed(step(compiled), args.reps)
    rows.append({"job": "attention", "path": "torch (compiled)", "ms": round(t, 4)})
    ref = compiled(qkv)
    default_cut = kernels.ATTENTION_CUTS[128]
    for warps in (4, 8):
        kernels.ATTENTION_CUTS[128] = kernels.AttentionCut(fwd_warps=warps, bwd_warps=warps)
        f = lambda x: kernels.short_attention(x, None, rope.cos, rope.sin, D, False)  # noqa: E731
        err = ((f(qkv).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t = timed(step(f), args.reps)
        rows.append({"job": "attention", "path": f"kernel, {warps} warps", "ms": round(t, 4), "max_rel_err": err})
    kernels.ATTENTION_CUTS[128] = default_cut
    for r in rows:
        if r["job"] == "attention":
            r["least_GB"] = round(least / 1e9, 4)

    # swiglu with the bias folded in
    N = B * T
    y = torch.randn(N, 2 * Fd, device=dev, dtype=bf, requires_grad=True)
    bias = torch.randn(2 * Fd, device=dev, dtype=torch.float32, requires_grad=True)
    dh = torch.randn(N, Fd, device=dev, dtype=bf)

    def torch_swiglu(y, b):
        gate, up = (y + b.to(y.dtype)).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    csw = torch.compile(torch_swiglu)

    def sw(f):
        def run():
            h = f(y, bias)
            torch.autograd.grad(h, [y, bias], dh)

        return run

    # forward reads y, writes h; backward reads dh and y, writes dy (the bias is tiny)
    least = (y.numel() * 2 + dh.numel() * 2) + (dh.numel() * 2 + 2 * y.numel() * 2)
    for name, f in (("torch (compiled)", csw), ("kernel", kernels.swiglu_bias)):
        t = timed(sw(f), args.reps)
        rows.append({"job": "swiglu", "path": name, "ms": round(t, 4), "least_GB": round(least / 1e9, 4)})
    err = ((kernels.swiglu_bias(y, bias).float() - csw(y, bias).float()).abs().max()).item()
    rows[-1]["max_abs_err"] = err

    for r in rows:
        r["GB_per_s_at_least"] = round(r["least_GB"] / (r["ms"] / 1000), 1)
    cut_rows: list[dict] = []
    best: dict = {}
    if args.cuts:
        grids = (FINE_FWD_GRID, FINE_BWD_GRID) if args.grid == "fine" else (FWD_GRID, BWD_GRID)
        cut_rows, best = sweep_cuts(B, T, H, D, args.launches, max(5, args.reps // 5), grids=grids)
        for r in cut_rows:
            what = ", ".join(f"{k}={v}" for k, v in r["cut"].items())
            fig = f"{r['ms']:.4f} ms, err {r['max_rel_err']:.1e}" if "ms" in r else r["error"]
            print(f"{r['job']:<19} {what:<78} {fig}")
        print("best cut:", json.dumps(best))
        if args.best_cut:
            Path(args.best_cut).write_text(json.dumps(best) + "\n")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, B {B} T {T} H {H} D {D} F {Fd}, fwd+bwd")
    print(f"{'job':<10} {'path':<18} {'ms':>8} {'GB/s at the least bytes':>24}")
    for r in rows:
        print(f"{r['job']:<10} {r['path']:<18} {r['ms']:>8.4f} {r['GB_per_s_at_least']:>24,.0f}")
    if args.json_path:
        env = {
            "device": torch.cuda.get_device_name(dev),
            "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        }
        out = {"env": env, "rows": rows, "cut_rows": cut_rows, "best_cut": best}
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
