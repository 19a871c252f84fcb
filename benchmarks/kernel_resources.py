"""Registers and spill stack per thread of the training step's Triton kernels, compiled for sm_90
(H100 / H200) on a machine without a GPU.

Triton's CUDA backend and its bundled ptxas and cuobjdump run offline: each kernel of
svd_probe/train/_triton_kernels.py is compiled at the training step's shapes (bf16, head_dim 32,
128 tokens, FFN tiles as svd_probe/train/kernels.py launches them) and `cuobjdump -res-usage`
reads the cubin. A kernel that needs more than 255 registers a thread spills to local memory
(STACK); one with many registers keeps few programs on an SM. Neither is a timing: the GPU's
figures come from bench_train_kernels.py and train_speed.py.

    python benchmarks/kernel_resources.py                 # the launch configurations in use
    python benchmarks/kernel_resources.py --warps 4,8,16  # attention at other warp counts
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = ("T", "H", "N", "F")  # the kernels' integer sizes; other capitalized arguments are pointers


def signature(kernel, fp32_pointers: set[str], floats: set[str], constexprs: dict) -> dict[str, str]:
    """Triton's signature for `kernel`: bf16 pointers except `fp32_pointers`, i32 sizes and strides."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        elif name in SIZES:
            sig[name] = "i32"
        elif name.isupper() or name == "Hout":
            sig[name] = "*fp32" if name in fp32_pointers else "*bf16"
        else:
            sig[name] = "i32"
    return sig


def cases(
    attention_warps: int | None = None, query_block: int = 64, key_block: int = 64, fwd_queries: int = 128
) -> list[tuple]:
    """(name, kernel, fp32 pointers, float arguments, constexprs, warps) as the training step
    launches them; attention_warps None: each kernel's warps of the default cut at 128 tokens."""
    from svd_probe.train import _triton_kernels as tk
    from svd_probe.train.kernels import ATTENTION_CUTS

    cut = ATTENTION_CUTS[128]
    fwd_w, bwd_w, dq_w = (attention_warps,) * 3 if attention_warps else (cut.fwd_warps, cut.bwd_warps, cut.dq_warps)
    attn = dict(D=32, HALF=8, R=16, BT=128, CAUSAL=True)
    lse = {"LSE", "COS", "SIN"}
    scales = {"scale", "scale_log2"}
    split = dict(attn, BQ=query_block, BK=key_block)
    return [
        ("attention forward", tk.attn_fwd, lse, {"scale_log2"}, dict(attn, BQ=fwd_queries), fwd_w),
        ("attention backward", tk.attn_bwd, lse, scales, dict(attn, BQ=query_block), bwd_w),
        ("attention dk dv", tk.attn_bwd_dkdv, lse, scales, split, bwd_w),
        ("attention dq", tk.attn_bwd_dq, lse, scales, split, dq_w),
        ("swiglu forward", tk.swiglu_fwd, {"B"}, set(), dict(BM=16, BF=128), 4),
        ("swiglu backward", tk.swiglu_bwd, {"B", "DB"}, set(), dict(BM=16, BF=128, STEPS=16), 4),
    ]


def compile_sm90(kernel, fp32_pointers, floats, constexprs, warps: int) -> bytes:
    """The cubin of `kernel` for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, signature(kernel, fp32_pointers, floats, constexprs), constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]


def resources(cubin: bytes) -> dict[str, int]:
    """REG and STACK of the cubin's kernel, from the cuobjdump Triton bundles."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    fields = dict(kv.split(":") for kv in line.split() if ":" in kv)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--warps", default="", help="attention kernels' warps a program, comma-separated (default: the default cut's)"
    )
    ap.add_argument("--query-block", type=int, default=64, help="the attention backward's queries a step")
    ap.add_argument(
        "--key-block", type=int, default=64, help="the split backward's keys a program (dk dv) or a step (dq)"
    )
    ap.add_argument("--fwd-queries", type=int, default=128, help="the attention forward's queries a program")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    warnings.filterwarnings("ignore")
    print(f"{'kernel':<20} {'warps':>5} {'registers':>9} {'stack B':>8}")
    seen = set()
    for w in [int(x) for x in args.warps.split(",") if x] or [None]:
        for name, kernel, fp32, floats, consts, warps in cases(w, args.query_block, args.key_block, args.fwd_queries):
            if (name, warps) in seen:
                continue
            seen.add((name, warps))
            r = resources(compile_sm90(kernel, fp32, floats, consts, warps))
            print(f"{name:<20} {warps:>5} {r['registers']:>9} {r['stack_bytes']:>8}")


if __name__ == "__main__":
    main()
