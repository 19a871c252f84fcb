"""The training step's hand-written kernels against the torch code they replace, at the lab's shape.

One layer's worth of each job, forward + backward, bf16, on one GPU (batch 256 × 128 tokens,
8 heads of 32, FFN 1,024):

    attention  mha's qkv [B, T, 3, H, D] -> RoPE -> softmax attention -> [B, T, H·D]
               torch: the model's own code (Rope + SDPA, torch.compile'd, torch's backend choice)
               kernel: kernels.short_attention, at 4 and 8 warps a program
    swiglu     y [B·T, 2F] (the bias-free gate_up GEMM's output), b [2F] -> silu(g)·u
               torch: silu(g + b_g)·(u + b_u), torch.compile'd (its backward sums the bias
               gradient in a kernel of its own)
               kernel: kernels.swiglu_bias

Each row: the median of `--reps` timed calls (CUDA events, after warm-up), and the bytes the job
must move at the least (inputs read once, outputs written once) over that time, against the
H200's 4.8 TB/s.

    PYTHONPATH=. python benchmarks/bench_train_kernels.py --json $OUT/bench_train_kernels.json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", dest="json_path", default=None)
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
    for warps in (4, 8):
        kernels.ATTENTION_WARPS[128] = warps
        f = lambda x: kernels.short_attention(x, None, rope.cos, rope.sin, D, False)  # noqa: E731
        err = ((f(qkv).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t = timed(step(f), args.reps)
        rows.append({"job": "attention", "path": f"kernel, {warps} warps", "ms": round(t, 4), "max_rel_err": err})
    kernels.ATTENTION_WARPS[128] = 8
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
        Path(args.json_path).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
