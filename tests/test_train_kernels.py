"""The training step's hand-written kernels (svd_probe/train/kernels.py) against float64 references.

The Triton kernels run here in Triton's interpreter (TRITON_INTERPRET=1, numpy underneath, fp32
inputs), in a subprocess so that no Triton imported earlier by another test decides the mode. The
references are written out in this file (explicit softmax, rotate-half RoPE, SwiGLU), not taken
from the model's code. On a CUDA machine, the last test compares a whole MaskedLM step with and
without the fast paths under bf16 autocast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")  # in the test extra on Linux x86_64: CI runs these
REPO = Path(__file__).resolve().parents[1]


def _ref_rope(x: torch.Tensor, r: int, theta: float = 10000.0) -> torch.Tensor:
    """x [B, T, H, D] float64; rotate-half RoPE on the first r dims (dim i pairs with i + r/2)."""
    if r == 0:
        return x
    T, half = x.shape[1], r // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / r)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # [T, half]
    c, s = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    a, b, rest = x[..., :half], x[..., half:r], x[..., r:]
    return torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)


def _ref_attention(q, k, v, r: int, causal: bool) -> torch.Tensor:
    q, k = _ref_rope(q, r), _ref_rope(k, r)
    B, T, H, D = q.shape
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    return torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * D)


# (B, T, H, D, rope_dims, causal, packed): full and partial RoPE, none, a length that is not a
# power of two (masked rows and columns), causal, and both input layouts (mha's packed qkv,
# mla's q beside a per-head [key | value]).
CASES = [
    (2, 20, 3, 16, 16, False, True),
    (2, 33, 2, 32, 16, True, False),
    (1, 16, 2, 16, 0, False, False),
    (1, 128, 2, 32, 32, True, True),
    (1, 100, 2, 32, 16, False, False),
]


# The kernels' cuts (kernels.AttentionCut), for every padded length: the defaults; and blocks
# smaller than the sequence, with the split backward, keys blocks larger than query blocks and
# smaller, so that each program of the forward sees part of the queries and the split backward's
# causal bounds (its first query block, its last key block) are crossed.
CUTS = {
    "default": None,
    "split, 16 queries, 32 keys": dict(fwd_queries=16, split=True, bwd_queries=16, bwd_keys=32),
    "split, 32 queries, 16 keys": dict(fwd_queries=32, split=True, bwd_queries=32, bwd_keys=16, stages=1),
}


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("cut", list(CUTS))
def test_short_attention_and_its_gradients_match_float64_in_the_interpreter(tmp_path, cut):
    torch.manual_seed(0)
    inputs = {}
    for i, (B, T, H, D, _r, _c, packed) in enumerate(CASES):
        src = torch.randn(B, T, 3, H, D) if packed else torch.randn(B, T, H, D)
        kv = None if packed else torch.randn(B, T, H, 2, D)
        inputs[i] = (src, kv, torch.randn(B, T, H * D))
    torch.save(inputs, tmp_path / "in.pt")
    code = textwrap.dedent(f"""
        import torch
        from svd_probe.train import kernels as K
        from svd_probe.train.model import Rope
        cases, inputs, out = {CASES!r}, torch.load({str(tmp_path / "in.pt")!r}), {{}}
        cut = {CUTS[cut]!r}
        if cut is not None:
            K.ATTENTION_CUTS.update({{bt: K.AttentionCut(**cut) for bt in (16, 32, 64, 128)}})
        for i, (B, T, H, D, r, causal, packed) in enumerate(cases):
            src, kv, g = inputs[i]
            rope = Rope(D, r, 10000.0, 128)  # the tables only: the kernel does the rotation
            src.requires_grad_()
            leaves = [src] if kv is None else [src, kv.requires_grad_()]
            o = K.short_attention(src, kv, rope.cos, rope.sin, r, causal)
            out[i] = (o.detach(), torch.autograd.grad(o, leaves, g))
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for i, (_B, _T, _H, _D, r, causal, packed) in enumerate(CASES):
        src, kv, g = (None if x is None else x.double() for x in inputs[i])
        src.requires_grad_()
        if packed:
            q, k, v, leaves = src[:, :, 0], src[:, :, 1], src[:, :, 2], [src]
        else:
            kv.requires_grad_()
            q, k, v, leaves = src, kv[..., 0, :], kv[..., 1, :], [src, kv]
        ref = _ref_attention(q, k, v, r, causal)
        ref_grads = torch.autograd.grad(ref, leaves, g)
        o, grads = got[i]
        # fp32 through the interpreter: a few ulps of fp32 at these sizes
        assert (o.double() - ref).abs().max() < 1e-5, CASES[i]
        for a, b in zip(grads, ref_grads, strict=True):
            assert a.shape == b.shape
            assert (a.double() - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item()), CASES[i]


@pytest.mark.triton_interpreter
def test_swiglu_bias_and_its_gradients_match_float64_in_the_interpreter(tmp_path):
    torch.manual_seed(1)
    N, Fd = 300, 200  # neither a multiple of the 16 x 128 tile, and two programs of 256 rows: masked edges
    y, b, dh = torch.randn(N, 2 * Fd), torch.randn(2 * Fd), torch.randn(N, Fd)
    torch.save((y, b, dh), tmp_path / "in.pt")
    code = textwrap.dedent(f"""
        import torch
        from svd_probe.train import kernels as K
        y, b, dh = torch.load({str(tmp_path / "in.pt")!r})
        y.requires_grad_(), b.requires_grad_()
        h = K.swiglu_bias(y, b)
        torch.save((h.detach(), torch.autograd.grad(h, [y, b], dh)), {str(tmp_path / "out.pt")!r})
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    h, (dy, db) = torch.load(tmp_path / "out.pt")
    y64, b64 = y.double().requires_grad_(), b.double().requires_grad_()
    g, u = (y64 + b64).chunk(2, dim=-1)
    ref = g * torch.sigmoid(g) * u
    ref_dy, ref_db = torch.autograd.grad(ref, [y64, b64], dh.double())
    assert (h.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (dy.double() - ref_dy).abs().max() < 1e-5 * ref_dy.abs().max()
    assert (db.double() - ref_db).abs().max() < 1e-5 * ref_db.abs().max()  # summed over 70 rows


def test_the_padded_head_gives_the_loss_and_gradients_of_the_plain_one_in_float64():
    from svd_probe.train.model import _head_chunk

    torch.manual_seed(2)
    h, w = torch.randn(12, 8, dtype=torch.float64), torch.randn(61, 8, dtype=torch.float64)
    t = torch.randint(0, 61, (12,))
    out = {}
    for pad in (0, 3):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, correct = _head_chunk(hh, ww, t, True, pad)
        out[pad] = (loss, correct, *torch.autograd.grad(loss, [hh, ww]))
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    assert torch.allclose(out[3][0], ref, rtol=1e-12) and torch.allclose(out[0][0], ref, rtol=1e-12)
    assert out[3][1] == out[0][1] == ((h @ w.T).argmax(-1) == t).sum()
    assert out[3][3].shape == w.shape  # the padding's rows do not reach the weight's gradient
    for a, b in zip(out[3][2:], out[0][2:], strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast paths run on CUDA only")
@pytest.mark.parametrize("variant", ["mha", "mla", "mla-o"])
def test_a_cuda_step_with_the_fast_paths_matches_the_torch_step(variant, capsys):
    """bf16 autocast, both paths from the same weights and batch: the loss and every gradient
    agree to bf16's precision (the two paths round at different points)."""
    from svd_probe.train import kernels
    from svd_probe.train.config import preset
    from svd_probe.train.model import MaskedLM

    dev = torch.device("cuda")
    cfg = preset(variant, "small")
    results = {}
    for name, fast in (("fast", kernels.ALL), ("torch", frozenset())):
        torch.manual_seed(0)
        with kernels.enabled(fast):
            model = MaskedLM(cfg).to(dev)
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(1000, cfg.vocab_size, (16, 128), generator=g).to(dev)
        pos = torch.stack([torch.randperm(128, generator=g)[:19] for _ in range(16)]).to(dev)
        tgt = torch.randint(1000, cfg.vocab_size, (16, 19), generator=g).to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(ids, pos, tgt, accuracy=False)
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    (lf, gf), (lt, gt) = results["fast"], results["torch"]
    worst = {n: ((gf[n] - gt[n]).norm() / gt[n].norm().clamp_min(1e-30)).item() for n in gt}
    with capsys.disabled():
        print(json.dumps({"variant": variant, "loss": [lf, lt], "worst_grad_rel": max(worst.values())}))
    assert abs(lf - lt) < 2e-3 * abs(lt)
    assert max(worst.values()) < 3e-2, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.triton_interpreter
def test_the_self_check_passes_good_kernels_and_turns_a_failing_one_off_with_a_warning():
    """self_check is what keeps a CUDA run on the torch code where a kernel cannot run: here the
    real kernels on fp16 inputs pass it, and a kernel that raises is reported and refused. (fp16:
    Triton 3.9's interpreter multiplies bf16 dot operands as integers, 2e10 off on a 16 x 16
    product, where compiled Triton uses the tensor cores' bf16.) The checks run under a meta
    default device, as they do when `svd-probe train` first counts parameters on the meta device:
    inputs made there have no data, and every kernel failed its check on an H100 that way."""
    code = textwrap.dedent("""
        import warnings, torch
        from svd_probe.train import kernels as K
        with warnings.catch_warnings(record=True) as seen, torch.device("meta"):
            warnings.simplefilter("always")
            ok = [K.self_check(n, "cpu", torch.float16) for n in ("attention", "swiglu", "fused-moe")]
        print(ok, [str(w.message) for w in seen])
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("[True, True, False]"), run.stdout
    assert "the fused-moe kernel does not work on this GPU (no kernel named 'fused-moe')" in run.stdout
    assert run.stdout.count("does not work") == 1


@pytest.mark.slow  # about 10 s: four kernels through Triton's whole CUDA pipeline and ptxas
def test_the_kernels_compile_for_an_h100_or_h200_without_one():
    """Compiled Triton checks what the interpreter does not (a loop-carried variable that changes
    shape compiled nowhere, though it ran in the interpreter): each kernel is compiled here for
    sm_90 at the training step's shapes, bf16, as on the GPU, with the bundled ptxas
    (benchmarks/kernel_resources.py, which also reports each one's registers)."""
    spec = importlib.util.spec_from_file_location("kernel_resources", REPO / "benchmarks" / "kernel_resources.py")
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    for name, kernel, fp32, floats, consts, warps in kr.cases():
        try:
            cubin = kr.compile_sm90(kernel, fp32, floats, consts, warps)
        except RuntimeError as e:  # a Triton build without its CUDA toolchain: nothing to check
            if "ptxas" in str(e) and "not found" in str(e):
                pytest.skip(f"Triton has no ptxas here: {e}")
            raise
        use = kr.resources(cubin)
        assert 0 < use["registers"] <= 255, (name, use)


@pytest.mark.triton_interpreter
@pytest.mark.slow  # torch.compile on the CPU: about 20 s
def test_torch_compile_traces_the_kernels_whole_and_matches_eager(tmp_path):
    """The training step compiles its model (fullgraph): the custom ops' fake shapes and their
    autograd must trace. Here both ops, in both attention layouts, under torch.compile with
    fullgraph=True, give eager's loss and gradients exactly (the same kernels run either way)."""
    code = textwrap.dedent("""
        import torch
        from svd_probe.train import kernels as K
        from svd_probe.train.model import Rope
        torch.manual_seed(0)
        B, T, H, D, R = 2, 40, 2, 16, 16
        rope = Rope(D, R, 10000.0, 64)
        def f(qkv, q, kv, y, b):
            o1 = K.short_attention(qkv, None, rope.cos, rope.sin, R, False)
            o2 = K.short_attention(q, kv, rope.cos, rope.sin, R, True)
            h = K.swiglu_bias(y, b)
            return o1.sum() + (o2 * o2).sum() + (h * h).sum()
        args = [torch.randn(B, T, 3, H, D), torch.randn(B, T, H, D), torch.randn(B, T, H, 2, D),
                torch.randn(50, 64), torch.randn(64)]
        outs = {}
        for name, fn in (("eager", f), ("compiled", torch.compile(f, fullgraph=True))):
            xs = [a.clone().requires_grad_() for a in args]
            loss = fn(*xs)
            outs[name] = (loss.detach(), torch.autograd.grad(loss, xs))
        (le, ge), (lc, gc) = outs["eager"], outs["compiled"]
        print(abs(le - lc).item(), max((a - b).abs().max().item() for a, b in zip(ge, gc)), le.item() != 0)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["0.0", "0.0", "True"], run.stdout


def test_train_kernels_choice_reaches_every_module_and_a_bad_one_is_refused():
    from svd_probe.errors import SvdProbeError
    from svd_probe.train import kernels
    from svd_probe.train.config import KERNELS_CHOICES, KERNELS_DEFAULT, build_train_config, preset
    from svd_probe.train.model import MaskedLM

    # triton: attention and pad-vocab, not swiglu (slower than inductor's code on an H100)
    for choice, want in (("torch", (False, False, False)), ("triton", (True, False, True))):
        with kernels.enabled(choice):  # Triton imports here (the skip above)
            model = MaskedLM(preset("mla-o", "tiny"))
        for flag, on in zip(("fast_attention", "fast_swiglu"), want[:2], strict=True):
            flags = [getattr(m, flag) for m in model.modules() if hasattr(m, flag)]
            assert len(flags) == model.encoder.cfg.n_layers and set(flags) == {on}, (choice, flag)
        assert model.pad_vocab is want[2]
    assert kernels.ENABLED == kernels.CHOICES[KERNELS_DEFAULT]  # the block restores the default
    assert tuple(kernels.CHOICES) == KERNELS_CHOICES  # the config's check and the kernels agree
    assert build_train_config(overrides={"kernels": "torch"}).kernels == "torch"
    with pytest.raises(SvdProbeError, match="kernels must be triton or torch, got 'cuda'"):
        build_train_config(overrides={"kernels": "cuda"})
