"""Training throughput of the three encoder variants, in one process, on one device.

One step = forward + backward + clip + AdamW step on a pretraining batch (MLM head at the masked
positions, as in `svd-probe train`), bf16 autocast on CUDA. Each variant runs eager and (with
--compile both|on) under torch.compile. Rounds are interleaved (mha, mla, mla-o, mha, ...) and
the median round is reported, so clock drift and a warming GPU hit every variant alike.

Also measured by default: mla with rope_dims 32 and mla-o with rope_dims 16, to separate the
cost of the RoPE width from the cost of the factored output.

    PYTHONPATH=. python benchmarks/train_speed.py                       # cuda, batch 256
    PYTHONPATH=. python benchmarks/train_speed.py --device cpu --size tiny --batch-size 8 --steps 3 --compile off

Prints a table; writes $OUT/train_speed.json when $OUT is set (or --json-out PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svd_probe.train.config import preset  # noqa: E402
from svd_probe.train.data import masked_count  # noqa: E402
from svd_probe.train.loop import autocast, make_optimizer  # noqa: E402
from svd_probe.train.model import MaskedLM, pretraining_parameters  # noqa: E402


def make_cases(size: str, ablation: bool):
    cases = [(v, preset(v, size)) for v in ("mha", "mla", "mla-o")]
    # mla-o's output as two skinny matmuls (o_up(o_down(x))) instead of the default fused form.
    cases.append(("mla-o factored", preset("mla-o", size)))
    if ablation:
        mla, mlao = cases[1][1], cases[2][1]
        cases.append((f"mla rope{mla.head_dim}", replace(mla, rope_dims=mla.head_dim)))
        cases.append((f"mla-o rope{mlao.rope_dims // 2}", replace(mlao, rope_dims=mlao.rope_dims // 2)))
    return cases


class Bench:
    """A model, its optimizer and a few fixed device-resident batches."""

    def __init__(self, name, cfg, dev, batch, seq_len, compiled, compile_mode):
        torch.manual_seed(0)
        self.dev = dev
        self.model = MaskedLM(cfg).to(dev)
        if name == "mla-o factored":
            for m in self.model.modules():
                if hasattr(m, "fuse_shared_output"):
                    m.fuse_shared_output = False
        self.opt = make_optimizer(self.model, 1e-4, 0.01, dev)
        self.fwd = torch.compile(self.model, mode=compile_mode) if compiled else self.model
        k = masked_count(seq_len)
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(4):
            ids = torch.randint(1000, cfg.vocab_size, (batch, seq_len), generator=g)
            positions = torch.rand(batch, seq_len, generator=g)[:, 1:-1].topk(k, dim=1).indices + 1
            targets = torch.gather(ids, 1, positions)
            self.batches.append(tuple(t.to(dev) for t in (ids, positions, targets)))
        self.i = 0

    def step(self):
        ids, positions, targets = self.batches[self.i % len(self.batches)]
        self.i += 1
        with autocast(self.dev):
            loss, _ = self.fwd(ids, positions, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def timed(self, steps: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="small", choices=["small", "tiny"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation happens here)")
    ap.add_argument("--compile", default="both", choices=["off", "on", "both"])
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--no-ablation", action="store_true", help="only the three presets")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    cases = make_cases(args.size, not args.no_ablation)
    results = []
    for compiled in modes:
        benches = []
        for name, cfg in cases:
            t0 = time.perf_counter()
            b = Bench(name, cfg, dev, args.batch_size, args.seq_len, compiled, args.compile_mode)
            for _ in range(args.warmup):
                b.step()
            b.sync()
            benches.append((name, cfg, b, time.perf_counter() - t0))
        rounds = {name: [] for name, *_ in benches}
        for _ in range(args.rounds):
            for name, _, b, _ in benches:
                rounds[name].append(args.batch_size * args.steps / b.timed(args.steps))
        for name, cfg, _b, setup_s in benches:
            rates = rounds[name]
            results.append(
                {
                    "variant": name,
                    "compiled": compiled,
                    "parameters": pretraining_parameters(cfg),
                    "rope_dims": cfg.rope_dims,
                    "samples_per_s": round(statistics.median(rates), 1),
                    "samples_per_s_min": round(min(rates), 1),
                    "samples_per_s_max": round(max(rates), 1),
                    "samples_per_s_rounds": [round(r, 1) for r in rates],
                    "ms_per_step": round(1000 * args.batch_size / statistics.median(rates), 2),
                    "setup_and_warmup_s": round(setup_s, 1),
                }
            )
        del benches
        if compiled:
            torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    env = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "rounds": args.rounds,
        "size": args.size,
        "autocast": "bf16" if dev.type == "cuda" else "off",
        "compile_mode": args.compile_mode,
    }
    print(
        f"# {env['device']}, torch {env['torch']}, batch {args.batch_size} x seq {args.seq_len}, autocast {env['autocast']}, median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'variant':<14} {'compiled':>8} {'params':>12} {'rope':>5} {'samples/s':>11} {'ms/step':>8}  vs mla")
    base = {r["compiled"]: r["samples_per_s"] for r in results if r["variant"] == "mla"}
    for r in results:
        rel = r["samples_per_s"] / base[r["compiled"]] if base.get(r["compiled"]) else float("nan")
        print(
            f"{r['variant']:<14} {str(r['compiled']):>8} {r['parameters']:>12,} {r['rope_dims']:>5} {r['samples_per_s']:>11,.0f} {r['ms_per_step']:>8.2f}  {rel:.3f}   [{r['samples_per_s_min']:,.0f} .. {r['samples_per_s_max']:,.0f}]"
        )
    path = args.json_out or (os.path.join(os.environ["OUT"], "train_speed.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
