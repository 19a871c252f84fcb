"""Forward + backward time of ONE attention layer, mha vs mla vs mla-o, from d_model 256 to 7168.

The open question this answers: where does mla-o's shared output latent (o_down [L, H·D], then
o_up [d, L]) become cheaper than mla's full output map o_proj [d, H·D]? Per token, the factored
output costs L·(H·D + d) multiply-adds against H·D·d; the fused form that svd-probe's mla-o
uses by default, x·(W_up·W_down)ᵀ, costs H·D·d per token plus d·L·H·D once per step, so it can
never beat mla on FLOPs; it wins only while the skinny factored matmuls are launch- and
bandwidth-bound (small d).

Modules are the training lab's own (`svd_probe.train.model.MHA` / `MLA`), fp32 weights under
bf16 autocast as in training, eager (compiling every shape would not fit the time budget).
Each configuration is timed two ways:

    layer    the whole attention layer: x [B, T, d] -> out, then backward with a random gradient
             (weights' and x's gradients, as in a middle layer of training)
    output   the output map alone, on heads [B·T, H·D]: mla's o_proj vs mla-o fused vs factored

Timing: CUDA events over `--iters` iterations after `--warmup`, median of `--repeats`. Also,
at the training model's shape (batch 256, 8 heads, 128 tokens, head_dim 32), forward + backward
of SDPA alone under each backend that accepts it (flash, efficient, cudnn, math).

    PYTHONPATH=. python benchmarks/bench_attention.py --json $OUT/bench_attention.json     # H200: over 75 s
    PYTHONPATH=. python benchmarks/bench_attention.py --device cpu --smoke --json /tmp/ba.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svd_probe.train.config import ModelConfig  # noqa: E402
from svd_probe.train.model import MHA, MLA  # noqa: E402

# (d_model, n_heads, head_dim, q_latent, kv_latent, o_latents). The first row is the lab's small
# preset; the last is DeepSeek-V3's attention width (128 heads of 128, q 1536, kv 512).
GRID = [
    (256, 8, 32, 64, 32, (32, 64, 128)),
    (512, 8, 64, 128, 64, (64, 128, 256)),
    (1024, 16, 64, 256, 128, (128, 256, 512)),
    (2048, 16, 128, 512, 256, (256, 512, 1024)),
    (4096, 32, 128, 1024, 512, (512, 1024, 2048)),
    (7168, 56, 128, 1536, 512, (512, 1024, 2048)),
    (7168, 128, 128, 1536, 512, (512, 1024, 2048)),
]
SMOKE_GRID = [(64, 4, 16, 16, 8, (8, 16)), (128, 4, 32, 32, 16, (16, 32))]


def timer(dev: torch.device, fn, warmup: int, iters: int, repeats: int) -> float:
    """Median milliseconds of one call of `fn`."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(dev)
            out.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append(1000 * (time.perf_counter() - t0) / iters)
    return statistics.median(out)


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def layer_config(variant: str, d: int, h: int, hd: int, q: int, kv: int, o: int, seq: int) -> ModelConfig:
    rope = hd // 2 if variant == "mla" else hd  # the presets' choice: partial RoPE for mla only
    return ModelConfig(
        variant=variant,
        d_model=d,
        n_heads=h,
        head_dim=hd,
        rope_dims=rope,
        q_latent=q,
        kv_latent=kv,
        o_latent=o,
        ffn_dim=4 * d,
        max_seq_len=seq,
    )


def time_layer(module, dev, batch, seq, d, args) -> float:
    x = torch.randn(batch, seq, d, device=dev, requires_grad=True)
    grad = torch.randn(batch, seq, d, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)

    def step():
        with autocast(dev):
            y = module(x)
        y.backward(grad.to(y.dtype))
        module.zero_grad(set_to_none=True)
        x.grad = None

    return timer(dev, step, args.warmup, args.iters, args.repeats)


def time_output(form: str, tokens: int, hd_total: int, d: int, o: int, dev, args) -> float:
    """Output map alone: mla o_proj [d, H·D]; mla-o fused x·(U·W)ᵀ; mla-o factored U(W x)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    heads = torch.randn(tokens, hd_total, generator=g).to(dev).requires_grad_(True)
    if form == "mla":
        weights = [torch.randn(d, hd_total, generator=g).div_(hd_total**0.5).to(dev).requires_grad_(True)]
    else:
        weights = [
            torch.randn(o, hd_total, generator=g).div_(hd_total**0.5).to(dev).requires_grad_(True),
            torch.randn(d, o, generator=g).div_(o**0.5).to(dev).requires_grad_(True),
        ]
    grad = torch.randn(tokens, d, generator=g).to(dev)

    def fwd():
        if form == "mla":
            return F.linear(heads, weights[0])
        down, up = weights
        if form == "fused":
            return F.linear(heads, up @ down)
        return F.linear(F.linear(heads, down), up)

    def step():
        with autocast(dev):
            y = fwd()
        y.backward(grad.to(y.dtype))
        for w in (*weights, heads):
            w.grad = None

    return timer(dev, step, args.warmup, args.iters, args.repeats)


def sdpa_backends(dev, args, shape) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, D = shape
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    rows = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue

        def step(backend=backend):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None

        try:
            ms = timer(dev, step, args.warmup, args.iters, args.repeats)
            rows.append({"backend": name.lower(), "ms": round(ms, 4)})
        except Exception as e:  # a backend that refuses this shape or machine
            rows.append({"backend": name.lower(), "error": f"{type(e).__name__}: {str(e)[:160]}"})
    try:  # what SDPA picks by itself
        rows.append(
            {
                "backend": "default",
                "ms": round(timer(dev, lambda: sdpa_default(q, k, v, grad), args.warmup, args.iters, args.repeats), 4),
            }
        )
    except Exception as e:
        rows.append({"backend": "default", "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return rows


def sdpa_default(q, k, v, grad):
    F.scaled_dot_product_attention(q, k, v).backward(grad)
    for t in (q, k, v):
        t.grad = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="two tiny shapes, few tokens (CPU test)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per layer call (default 16384; smoke 256)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 128 (smoke 32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=85.0, help="seconds; larger shapes are skipped past it")
    ap.add_argument(
        "--json", dest="json_path", default=None, help="default: $OUT/bench_attention.json when $OUT is set"
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
    grid = SMOKE_GRID if args.smoke else GRID
    seq = args.seq_len or (32 if args.smoke else 128)
    tokens = args.tokens or (256 if args.smoke else 16384)
    batch = max(1, tokens // seq)
    path = args.json_path or (
        os.path.join(os.environ["OUT"], "bench_attention.json") if os.environ.get("OUT") else None
    )
    env = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "tokens": batch * seq,
        "batch": batch,
        "seq_len": seq,
        "autocast": "bf16" if dev.type == "cuda" else "off",
        "warmup": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    layers: list[dict] = []
    outputs: list[dict] = []
    doc = {"env": env, "layer": layers, "output": outputs, "sdpa": []}

    def write() -> None:
        doc["crossover"] = crossover([r for r in layers if "ms" in r])  # so far: a cut run keeps it
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(doc, indent=2) + "\n")

    print(f"# {env['device']}, torch {env['torch']}, {batch} x {seq} tokens, {env['autocast']}", flush=True)
    # The attention kernel at the training shape first: cheap, and kept if a wide shape runs long.
    doc["sdpa"] = sdpa_backends(dev, args, (8, 4, 32, 16) if args.smoke else (256, 8, 128, 32))
    doc["sdpa_shape"] = "[B, H, T, D] = " + ("[8, 4, 32, 16]" if args.smoke else "[256, 8, 128, 32]")
    write()
    for d, h, hd, q, kv, o_latents in grid:
        if time.perf_counter() - t_start > args.budget:
            print(f"skip d={d} H={h}: past the {args.budget:.0f}s budget", flush=True)
            layers.append({"d_model": d, "n_heads": h, "skipped": "budget"})
            continue
        shape = {"d_model": d, "n_heads": h, "head_dim": hd, "q_latent": q, "kv_latent": kv}
        cases = [("mha", None, None), ("mla", None, None)]
        cases += [("mla-o", o, form) for o in o_latents for form in ("fused", "factored")]
        for variant, o, form in cases:
            if time.perf_counter() - t_start > args.budget:  # checked per case: a wide shape is slow
                layers.append({**shape, "variant": variant, "o_latent": o, "form": form, "skipped": "budget"})
                continue
            cfg = layer_config(variant, d, h, hd, q, kv, o or o_latents[0], seq)
            torch.manual_seed(0)
            module = (MHA(cfg) if variant == "mha" else MLA(cfg)).to(dev)
            if form == "factored":
                module.fuse_shared_output = False  # type: ignore[assignment]
            try:
                ms = timer_row = time_layer(module, dev, batch, seq, d, args)
                row = {**shape, "variant": variant, "o_latent": o, "form": form, "ms": round(ms, 4)}
            except torch.OutOfMemoryError as e:
                timer_row = None
                row = {**shape, "variant": variant, "o_latent": o, "form": form, "error": f"out of memory: {e}"[:200]}
            layers.append(row)
            del module
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            ms_txt = f"{timer_row:9.3f} ms" if timer_row is not None else row.get("error", "")
            print(
                f"layer  d={d:<5} H={h:<4} D={hd:<4} {variant:<6} L={o or '-':<5} {form or '':<9}{ms_txt}", flush=True
            )
        hd_total = h * hd
        mla_ms = time_output("mla", batch * seq, hd_total, d, 0, dev, args)
        outputs.append(
            {**shape, "form": "mla", "o_latent": None, "ms": round(mla_ms, 4), "mult_adds_per_token": hd_total * d}
        )
        for o in o_latents:
            for form in ("fused", "factored"):
                ms = time_output(form, batch * seq, hd_total, d, o, dev, args)
                macs = hd_total * d if form == "fused" else o * (hd_total + d)
                outputs.append(
                    {
                        **shape,
                        "form": form,
                        "o_latent": o,
                        "ms": round(ms, 4),
                        "vs_mla": round(ms / mla_ms, 3),
                        "mult_adds_per_token": macs,
                    }
                )
                print(f"output d={d:<5} H={h:<4} L={o:<5} {form:<9}{ms:9.3f} ms  vs mla {ms / mla_ms:.3f}", flush=True)
        write()

    write()

    print(f"\n# one attention layer, forward + backward, ms ({batch} x {seq} tokens); mla-o: best form and L")
    print(f"{'d':>5} {'H':>4} {'D':>4} {'mha':>9} {'mla':>9}   mla-o (L: fused / factored, vs mla best)")
    for key in dict.fromkeys((r["d_model"], r["n_heads"]) for r in layers if "ms" in r):
        rs = [r for r in layers if (r["d_model"], r["n_heads"]) == key and "ms" in r]
        get = {(r["variant"], r["o_latent"], r["form"]): r["ms"] for r in rs}
        mla = get.get(("mla", None, None))
        parts = []
        for o in sorted({r["o_latent"] for r in rs if r["variant"] == "mla-o"}):
            f, fa = get.get(("mla-o", o, "fused")), get.get(("mla-o", o, "factored"))
            best = min(x for x in (f, fa) if x is not None)
            parts.append(f"{o}: {f:.2f} / {fa:.2f} ({best / mla:.2f})" if mla else f"{o}: {f} / {fa}")
        print(
            f"{key[0]:>5} {key[1]:>4} {rs[0]['head_dim']:>4} {get.get(('mha', None, None), float('nan')):>9.3f} {mla or float('nan'):>9.3f}   "
            + "; ".join(parts)
        )
    print("\n# SDPA alone at " + doc["sdpa_shape"] + ", forward + backward")
    for r in doc["sdpa"]:
        print(f"  {r['backend']:<20} " + (f"{r['ms']:.4f} ms" if "ms" in r else r["error"]))
    print("\n# crossover: " + json.dumps(doc["crossover"]))
    print(f"total {time.perf_counter() - t_start:.0f}s" + (f"; wrote {path}" if path else ""))


def crossover(layers: list[dict]) -> dict:
    """For each o_latent/d_model ratio: the smallest d where factored mla-o beats mla, and beats fused."""
    out: dict = {}
    for r in layers:
        if r.get("variant") != "mla-o" or r.get("form") != "factored" or "ms" not in r:
            continue
        same = {
            (x["variant"], x.get("form"), x.get("o_latent")): x.get("ms")
            for x in layers
            if (x.get("d_model"), x.get("n_heads")) == (r["d_model"], r["n_heads"]) and "ms" in x
        }
        ratio = f"L/d={r['o_latent'] / r['d_model']:.3g}"
        entry = out.setdefault(ratio, {"factored_below_mla_from_d": None, "factored_below_fused_from_d": None})
        mla, fused = same.get(("mla", None, None)), same.get(("mla-o", "fused", r["o_latent"]))
        if mla and r["ms"] < mla and entry["factored_below_mla_from_d"] is None:
            entry["factored_below_mla_from_d"] = r["d_model"]
        if fused and r["ms"] < fused and entry["factored_below_fused_from_d"] is None:
            entry["factored_below_fused_from_d"] = r["d_model"]
    return out


if __name__ == "__main__":
    main()
