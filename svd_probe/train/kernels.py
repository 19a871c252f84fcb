"""Hand-written Triton kernels for the training step at the lab's shapes, and when they apply.

Two jobs, each one a forward and a backward kernel behind a `torch.library.custom_op` (so
torch.compile and the whole-step CUDA graph take them as single opaque calls, autograd through
`register_autograd`):

- `short_attention`: RoPE + softmax attention for sequences of at most 128 tokens, the whole
  sequence of one (batch row, head) in one program. Why hand-written: at the lab's shape
  (128 tokens, head_dim 32, 2,048 sequences a layer) the library kernels are tiled for long
  sequences. cuDNN's flash backward accumulates dQ in fp32 across key blocks and converts it
  after (`convert_dq_to_16bits`), runs a separate `dot(dO, O)` pass, and RoPE and the heads'
  transposes are kernels of their own on each side. Together they took 1.46 ms of the 7.44 ms
  step (H200, benchmarks/README.md "Where the stepgraph's GPU time goes"). With one program per
  sequence there is no cross-block reduction at all: the program reads q, k, v straight out of
  the projection's output (any strides), rotates them in registers, and writes the gradients
  straight into the projection's gradient layout.
- `swiglu_bias`: silu(gate + b_g) · (up + b_u) from the bias-free gate_up GEMM, and its backward
  with the bias gradient summed in the same pass. Why: torch.compile writes the backward as one
  pointwise kernel over the concatenated [gate | up] gradient, so each half reads its inputs
  again (2.5 TB/s, 0.13 ms a layer), and the bias gradient as a second full read.

Neither changes the function: the same math in fp32 registers on bf16 inputs, as the compiled
torch code computes it. `tests/test_train_kernels.py` checks both against float64 references in
Triton's interpreter, and `benchmarks/train_speed.py --kernels` times them against the torch
path on the GPU: on an H100 the attention kernel gives mha's whole step 4.1%, and the SwiGLU
kernel loses to inductor's fused code (0.65 against 0.54 ms), so `--kernels triton` leaves it out
(CHOICES below; benchmarks/README.md, "The kernels timed").

Where a kernel does not apply (no CUDA, no Triton, fp32 or fp64 inputs, a key-padding mask,
more than 128 tokens, a head size that is not 16, 32, 64 or 128) the model runs its torch code,
so every test that runs the model on the CPU runs that path.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from svd_probe.train.config import KERNELS_DEFAULT

# The fast paths a model built now takes where they apply: "attention" (short_attention),
# "swiglu" (swiglu_bias) and "pad-vocab" (the tied head's matmul over a vocabulary padded to a
# multiple of 64, so the logits' rows are 16-byte aligned; the padding is sliced off before the
# loss). Each module copies its own flag at construction, a plain attribute that torch.compile
# guards on; benchmarks/train_speed.py --kernels builds models under several sets.
ALL = frozenset({"attention", "swiglu", "pad-vocab"})
VOCAB_ALIGN = 64
# `svd-probe train --kernels`: the fast-path sets a run may choose (config.KERNELS_DEFAULT says
# which is the default, and why). "triton" leaves out "swiglu": in the whole mha step on an H100
# (2026-12-07) every fast path but swiglu took 8.37 ms a step and all three 8.53 ms, and the
# kernel alone took 0.65 ms against inductor's fused torch code's 0.54 ms (benchmarks/README.md,
# "The kernels timed"). It stays in ALL for benchmarks/train_speed.py.
CHOICES = {"triton": ALL - {"swiglu"}, "torch": frozenset()}
ENABLED: frozenset[str] = CHOICES[KERNELS_DEFAULT]


@contextlib.contextmanager
def enabled(choice: str | frozenset[str]) -> Iterator[None]:
    """Build models inside this block with the fast paths of `choice`: "triton" or "torch"
    (`svd-probe train --kernels`), or a set of names from ALL (benchmarks/train_speed.py)."""
    global ENABLED
    saved, ENABLED = ENABLED, (CHOICES[choice] if isinstance(choice, str) else frozenset(choice))
    try:
        yield
    finally:
        ENABLED = saved


MAX_TOKENS = 128
HEAD_DIMS = (16, 32, 64, 128)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means "not here"
        return False
    return True


def _gpu_ok(x: torch.Tensor) -> bool:
    """Only where the kernels are meant to run: bf16/fp16 on CUDA (the training step under
    autocast). Whether Triton imports is asked once, when a module is built (`available`), not
    here: this runs inside the traced forward."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def available(name: str) -> bool:
    """Whether a module built now takes fast path `name` (where its inputs allow). On a CUDA
    host a kernel first passes `self_check` once in this process."""
    if name not in ENABLED:
        return False
    if name == "pad-vocab":  # no kernel
        return True
    if not triton_available():
        return False
    return not torch.cuda.is_available() or self_check(name)


@functools.cache
def self_check(name: str, device: str | None = None, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Run kernel `name`, forward and backward, once on `device` (None: the current CUDA device;
    the CPU only under TRITON_INTERPRET=1) at a small shape, against the torch code it replaces
    in fp32 from the same `dtype` inputs (the training step's bf16). Where it fails to compile or
    run (another Triton, another GPU) or disagrees, warn once and leave the model on its torch
    code, so a training run never depends on a kernel this machine cannot run."""
    import warnings

    # The first module built decides when this runs, and that may be under `with
    # torch.device("meta")` (model.pretraining_parameters counts parameters that way): inputs made
    # there have no data, and the cached False would keep the kernel off for the whole process.
    # The check builds its inputs on the CPU whatever default device the caller set.
    try:
        with torch.device("cpu"):
            return _self_check(name, device, dtype)
    except Exception as e:  # noqa: BLE001 - any failure: the torch code stands in
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        warnings.warn(
            f"svd-probe: the {name} kernel does not work on this GPU ({first}); training uses the torch code",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def _self_check(name: str, device: str | None, dtype: torch.dtype) -> bool:
    """self_check's work: True, or an exception that says what failed."""
    g = torch.Generator(device="cpu").manual_seed(0)
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    dev = torch.device(device) if device else torch.device("cuda", torch.cuda.current_device())
    if name == "attention":
        from svd_probe.train.model import Rope, _attend  # the torch code it replaces

        B, T, H, D, R = 2, 40, 2, 32, 16
        x = torch.randn(B, T, 3, H, D, generator=g).to(dev, dtype).requires_grad_()
        rope = Rope(D, R, 10000.0, T).to(dev)

        def attention_kernel(x):
            return short_attention(x, None, rope.cos, rope.sin, R, False)

        def attention_reference(x):
            q, k, v = x.float().unbind(2)
            q, k = rope(q, k)
            return _attend(q, k, v, None, False)

        kernel, reference, inputs = attention_kernel, attention_reference, (x,)
    elif name == "swiglu":
        y = torch.randn(70, 2 * 200, generator=g).to(dev, dtype).requires_grad_()
        b = torch.randn(400, generator=g).to(dev).requires_grad_()

        def swiglu_reference(y, b):
            gate, up = (y.float() + b).chunk(2, -1)
            return torch.nn.functional.silu(gate) * up

        kernel, reference, inputs = swiglu_bias, swiglu_reference, (y, b)
    else:
        raise ValueError(f"no kernel named {name!r}")
    got, ref = kernel(*inputs), reference(*inputs)
    dout = torch.randn(ref.shape, generator=g).to(dev)
    pairs = [(got.float(), ref)]
    grads = torch.autograd.grad(got, inputs, dout.to(got.dtype))
    pairs += zip(grads, torch.autograd.grad(ref, inputs, dout), strict=True)
    for i, (a, r) in enumerate(pairs):
        err = ((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
        if not err < 3e-2:  # bf16 results: a few 1e-3 relative
            what = "output" if i == 0 else f"gradient {i}"
            raise RuntimeError(f"its {what} differs from the torch code's by {err:.1e} (relative)")
    return True


def attention_applies(q: torch.Tensor, key_mask, rope_dims: int) -> bool:
    """Whether `short_attention` runs for q [B, T, H, D] (key_mask: None or a padding mask)."""
    T, D = q.shape[1], q.shape[3]
    return key_mask is None and T <= MAX_TOKENS and D in HEAD_DIMS and rope_dims % 2 == 0 and _gpu_ok(q)


def swiglu_applies(y: torch.Tensor) -> bool:
    """Whether the gate_up GEMM's output y [N, 2F] goes through `swiglu_bias`."""
    return _gpu_ok(y)


def vocab_padding(h: torch.Tensor, vocab_size: int) -> int:
    """Rows to pad the tied head's weight with before its matmul (0: none)."""
    return -vocab_size % VOCAB_ALIGN if h.is_cuda else 0


@dataclass(frozen=True)
class AttentionCut:
    """How the attention kernels cut one (batch row, head) into programs, for one padded length.

    The forward takes `fwd_queries` queries a program against every key. The backward is either
    `attn_bwd` (`split` False: one program a row and head, every key in registers, the queries
    `bwd_queries` at a time), or `split`: `attn_bwd_dkdv` (one program a block of `bwd_keys`
    keys, the queries `bwd_queries` at a time) then `attn_bwd_dq` (one a block of `bwd_queries`
    queries, the keys `bwd_keys` at a time, the probabilities computed again): 7 matmuls a
    block pair against 5, for several times the programs and fewer registers each. `stages` is
    Triton's software pipelining depth of the loops (None: Triton's default). Block sizes are
    clipped to the padded length. benchmarks/bench_train_kernels.py times the choices."""

    fwd_queries: int = 128
    fwd_warps: int = 8
    split: bool = False
    bwd_queries: int = 64
    bwd_keys: int = 64
    bwd_warps: int = 4
    dq_warps: int = 8
    stages: int | None = None


# By the padded sequence length; other lengths take AttentionCut(fwd_warps=4, bwd_warps=4,
# dq_warps=4). At 128 tokens (benchmarks/README.md, "The attention kernels' cuts", H100,
# 2026-12-07): the forward whole at 8 warps (0.060-0.067 ms; 64 or 32 queries a program are
# slower), the fused backward 64 queries a step at 4 warps (0.124-0.128 ms, against 0.179 ms at
# 8 warps: two programs an SM), every split cut slower (0.20-0.79 ms), pipelining stages
# indifferent. In the whole step that is +3.4% for mha over the 8-warp backward.
ATTENTION_CUTS: dict[int, AttentionCut] = {128: AttentionCut()}
_SMALL_CUT = AttentionCut(fwd_warps=4, bwd_warps=4, dq_warps=4)


def _block_tokens(T: int) -> int:
    return max(16, 1 << (T - 1).bit_length())


@functools.cache
def _attention_kernels():  # noqa: ANN202 - triton.JITFunctions
    from svd_probe.train import _triton_kernels as tk

    return tk.attn_fwd, tk.attn_bwd, tk.attn_bwd_dkdv, tk.attn_bwd_dq


def _qkv_views(q_src: torch.Tensor, kv_src: torch.Tensor, packed: bool):
    """(q, k, v) as [B, T, H, D] views: packed, q_src is [B, T, 3, H, D] (mha's qkv) and kv_src
    is unused; otherwise q_src is [B, T, H, D] and kv_src [B, T, H, 2, D] (mla's per-head
    [key | value])."""
    if packed:
        return q_src[:, :, 0], q_src[:, :, 1], q_src[:, :, 2]
    return q_src, kv_src[..., 0, :], kv_src[..., 1, :]


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _launch_attention(q, k, v, cos, sin, rope_dims: int, causal: bool, grads=None, o=None, lse=None, do=None):
    fwd, bwd, bwd_dkdv, bwd_dq = _attention_kernels()
    B, T, H, D = q.shape
    BT = _block_tokens(T)
    cut = ATTENTION_CUTS.get(BT, _SMALL_CUT)
    scale = 1.0 / math.sqrt(D)
    common = dict(D=D, HALF=rope_dims // 2, R=rope_dims, BT=BT, CAUSAL=causal)
    if cut.stages is not None:
        common["num_stages"] = cut.stages
    strides = (*_strides(q), *_strides(k), *_strides(v))
    if grads is None:
        o = torch.empty((B, T, H * D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B * H, BT), dtype=torch.float32, device=q.device)
        BQ = min(BT, cut.fwd_queries)
        fwd[(B * H, BT // BQ)](
            q, k, v, o, lse, cos, sin, *strides, o.stride(0), o.stride(1), T, H, scale / math.log(2),
            **common, BQ=BQ, num_warps=cut.fwd_warps,
        )  # fmt: skip
        return o, lse
    dq, dk, dv = grads
    assert do.stride() == o.stride()
    args = (*strides, o.stride(0), o.stride(1), T, H, scale, scale / math.log(2))
    BQ, BK = min(BT, cut.bwd_queries), min(BT, cut.bwd_keys)
    if not cut.split:
        bwd[(B * H,)](q, k, v, o, do, lse, cos, sin, dq, dk, dv, *args, **common, BQ=BQ, num_warps=cut.bwd_warps)
        return None
    bwd_dkdv[(B * H, BT // BK)](
        q, k, v, o, do, lse, cos, sin, dk, dv, *args, **common, BQ=BQ, BK=BK, num_warps=cut.bwd_warps
    )
    bwd_dq[(B * H, BT // BQ)](q, k, v, o, do, lse, cos, sin, dq, *args, **common, BQ=BQ, BK=BK, num_warps=cut.dq_warps)
    return None


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cos[:T].float().contiguous(), sin[:T].float().contiguous()


@torch.library.custom_op("svd_probe::short_attention", mutates_args=())
def _short_attention_op(
    q_src: torch.Tensor, kv_src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    rope_dims: int, causal: bool, packed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    q, k, v = _qkv_views(q_src, kv_src, packed)
    return _launch_attention(q, k, v, cos, sin, rope_dims, causal)


@_short_attention_op.register_fake
def _(q_src, kv_src, cos, sin, rope_dims, causal, packed):
    q, _, _ = _qkv_views(q_src, kv_src, packed)
    B, T, H, D = q.shape
    return q.new_empty((B, T, H * D)), q.new_empty((B * H, _block_tokens(T)), dtype=torch.float32)


@torch.library.custom_op("svd_probe::short_attention_backward", mutates_args=())
def _short_attention_backward_op(
    do: torch.Tensor, q_src: torch.Tensor, kv_src: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, rope_dims: int, causal: bool, packed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    dq_src = torch.empty_like(q_src)
    dkv_src = torch.empty_like(kv_src) if not packed else q_src.new_empty(0)
    q, k, v = _qkv_views(q_src, kv_src, packed)
    grads = _qkv_views(dq_src, dkv_src, packed)
    _launch_attention(q, k, v, cos, sin, rope_dims, causal, grads=grads, o=o, lse=lse, do=do.contiguous())
    return dq_src, dkv_src


@_short_attention_backward_op.register_fake
def _(do, q_src, kv_src, o, lse, cos, sin, rope_dims, causal, packed):
    return torch.empty_like(q_src), (torch.empty_like(kv_src) if not packed else q_src.new_empty(0))


def _attention_setup(ctx, inputs, output):
    q_src, kv_src, cos, sin, rope_dims, causal, packed = inputs
    o, lse = output
    ctx.save_for_backward(q_src, kv_src, o, lse, cos, sin)
    ctx.args = (rope_dims, causal, packed)


def _attention_backward(ctx, do, _dlse):
    q_src, kv_src, o, lse, cos, sin = ctx.saved_tensors
    dq_src, dkv_src = _short_attention_backward_op(do, q_src, kv_src, o, lse, cos, sin, *ctx.args)
    packed = ctx.args[-1]
    return dq_src, (None if packed else dkv_src), None, None, None, None, None


_short_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def short_attention(
    q_src: torch.Tensor,
    kv_src: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rope_dims: int,
    causal: bool,
) -> torch.Tensor:
    """RoPE (on the first rope_dims of each q and k head, rotate-half pairing, tables [≥T, D])
    and softmax attention with scale 1/√D -> [B, T, H·D].

    kv_src None: q_src is mha's qkv, [B, T, 3, H, D]. Otherwise q_src [B, T, H, D] and kv_src
    [B, T, H, 2, D] (mla's per-head [key | value]). Gradients come back in those layouts."""
    packed = kv_src is None
    T = q_src.shape[1]
    cos, sin = _rope_tables(cos, sin, T)
    o, _ = _short_attention_op(q_src, q_src.new_empty(0) if packed else kv_src, cos, sin, rope_dims, causal, packed)
    return o


# --- SwiGLU with the bias folded in ----------------------------------------------------------

# Tiles of 16 rows x 128 columns, 4 warps: 64 registers a thread (sm_90, Triton 3.9), so 8
# programs an SM keep enough loads in flight; 64 x 128 at 8 warps took 142 and 1 program an SM.
# The backward walks 16 such row blocks a program and writes one row of partial bias sums.
_SWIGLU_ROWS = 16
_SWIGLU_COLS = 128
_SWIGLU_STEPS = 16


@functools.cache
def _swiglu_kernels():  # noqa: ANN202 - triton.JITFunctions
    from svd_probe.train import _triton_kernels as tk

    return tk.swiglu_fwd, tk.swiglu_bwd


def _swiglu_grid(N: int, F: int, steps: int = 1) -> tuple[int, int]:
    return (-(-N // (_SWIGLU_ROWS * steps)), -(-F // _SWIGLU_COLS))


@torch.library.custom_op("svd_probe::swiglu_bias", mutates_args=())
def _swiglu_op(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    N, F = y.shape[0], y.shape[1] // 2
    h = y.new_empty((N, F))
    fwd, _ = _swiglu_kernels()
    fwd[_swiglu_grid(N, F)](y, b, h, N, F, BM=_SWIGLU_ROWS, BF=_SWIGLU_COLS, num_warps=4)
    return h


@_swiglu_op.register_fake
def _(y, b):
    return y.new_empty((y.shape[0], y.shape[1] // 2))


@torch.library.custom_op("svd_probe::swiglu_bias_backward", mutates_args=())
def _swiglu_backward_op(dh: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, F = y.shape[0], y.shape[1] // 2
    dy = torch.empty_like(y)
    steps = max(1, min(_SWIGLU_STEPS, -(-N // _SWIGLU_ROWS)))
    grid = _swiglu_grid(N, F, steps)
    partial = torch.empty((grid[0], 2 * F), dtype=torch.float32, device=y.device)
    _, bwd = _swiglu_kernels()
    bwd[grid](dh.contiguous(), y, b, dy, partial, N, F, BM=_SWIGLU_ROWS, BF=_SWIGLU_COLS, STEPS=steps, num_warps=4)
    return dy, partial.sum(0).to(b.dtype)


@_swiglu_backward_op.register_fake
def _(dh, y, b):
    return torch.empty_like(y), torch.empty_like(b)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dh):
    y, b = ctx.saved_tensors
    return _swiglu_backward_op(dh, y, b)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu_bias(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(y[:, :F] + b[:F]) · (y[:, F:] + b[F:]) for y [N, 2F] (contiguous), b [2F]."""
    return _swiglu_op(y.contiguous(), b)
