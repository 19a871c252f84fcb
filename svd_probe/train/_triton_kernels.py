"""The Triton kernels behind svd_probe/train/kernels.py (which says why each is hand-written and
when it runs). Imported only where Triton is: this module imports it at the top, so that the
kernels can call each other (Triton resolves a kernel's callees from its module's globals)."""

import triton
import triton.language as tl


@triton.jit
def _rotated(ptr, d, tmask, perm, sign, cos, sin):
    """x·cos + rotate_half(x)·sin for one [BN, D] tile, in fp32 (the backward's adjoint is
    `_unrotate`)."""
    x = tl.load(ptr + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    xp = tl.load(ptr + perm[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    return x * cos + sign[None, :] * xp * sin


@triton.jit
def _dims(D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr):
    """Head-dim indices, each one's rotate-half partner (itself past R) and its sign."""
    d = tl.arange(0, D)
    perm = tl.where(d < HALF, d + HALF, tl.where(d < R, d - HALF, d))
    sign = tl.where(d < HALF, -1.0, 1.0)
    return d, perm, sign


@triton.jit
def _tables(COS, SIN, t, tmask, d, D: tl.constexpr):
    """The cos/sin tables' rows t [BN, D] (cos 1, sin 0 past T)."""
    cs = t[:, None] * D + d[None, :]
    return tl.load(COS + cs, mask=tmask[:, None], other=1.0), tl.load(SIN + cs, mask=tmask[:, None], other=0.0)


@triton.jit
def attn_fwd(
    Q, K, V, OUT, LSE, COS, SIN,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot,
    T, H, scale_log2,
    D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    t = tl.arange(0, BT)
    tmask = t < T
    d, perm, sign = _dims(D, HALF, R)
    cos, sin = _tables(COS, SIN, t, tmask, d, D)
    qr = _rotated(Q + b * sqb + h * sqh + t[:, None] * sqt, d, tmask, perm, sign, cos, sin)
    kr = _rotated(K + b * skb + h * skh + t[:, None] * skt, d, tmask, perm, sign, cos, sin)
    v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=tmask[:, None], other=0.0)
    dt = v.dtype
    s = tl.dot(qr.to(dt), tl.trans(kr.to(dt))) * scale_log2  # base-2 logits
    keep = tmask[None, :]
    if CAUSAL:
        keep = keep & (t[None, :] <= t[:, None])
    s = tl.where(keep, s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    lsum = tl.sum(p, 1)
    o = tl.dot(p.to(dt), v) / lsum[:, None]
    tl.store(OUT + b * sob + t[:, None] * sot + h * D + d[None, :], o.to(dt), mask=tmask[:, None])
    tl.store(LSE + pid * BT + t, m + tl.log2(lsum))


@triton.jit
def attn_bwd(
    Q, K, V, OUT, DO, LSE, COS, SIN, DQ, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot,
    T, H, scale, scale_log2,
    D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr,
    BQ: tl.constexpr,
):  # fmt: skip
    # DQ, DK, DV have the strides of Q, K, V; DO those of OUT. Every key of the sequence is in
    # registers; the queries come BQ at a time (a [BQ, BT] score tile, not [BT, BT], so the
    # program keeps to its registers), each block's dQ complete at once, dK and dV summed over
    # the blocks.
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    d, perm, sign = _dims(D, HALF, R)
    t = tl.arange(0, BT)
    tmask = t < T
    cos, sin = _tables(COS, SIN, t, tmask, d, D)
    k_off = b * skb + h * skh + t[:, None] * skt
    v_off = b * svb + h * svh + t[:, None] * svt + d[None, :]
    kr = _rotated(K + k_off, d, tmask, perm, sign, cos, sin)
    v = tl.load(V + v_off, mask=tmask[:, None], other=0.0)
    dt = v.dtype
    kr = kr.to(dt)
    dk = tl.zeros([BT, D], dtype=tl.float32)
    dv = tl.zeros([BT, D], dtype=tl.float32)
    for q0 in range(0, BT, BQ):
        tq = q0 + tl.arange(0, BQ)
        qmask = tq < T
        cq, sq = _tables(COS, SIN, tq, qmask, d, D)
        q_off = b * sqb + h * sqh + tq[:, None] * sqt
        o_off = b * sob + tq[:, None] * sot + h * D + d[None, :]
        qr = _rotated(Q + q_off, d, qmask, perm, sign, cq, sq)
        qr = qr.to(dt)
        do = tl.load(DO + o_off, mask=qmask[:, None], other=0.0)
        o = tl.load(OUT + o_off, mask=qmask[:, None], other=0.0)
        lse = tl.load(LSE + pid * BT + tq)
        s = tl.dot(qr, tl.trans(kr)) * scale_log2
        keep = tmask[None, :] & qmask[:, None]
        if CAUSAL:
            keep = keep & (t[None, :] <= tq[:, None])
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(dt)), do)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(dt)
        _unrotate(DQ + q_off, tl.dot(ds, kr) * scale, d, qmask, perm, sign, cq, sq)
        dk += tl.dot(tl.trans(ds), qr)
    tl.store(DV + v_off, dv.to(dt), mask=tmask[:, None])
    cos, sin = _tables(COS, SIN, t, tmask, d, D)  # loaded again: not live through the loop
    _unrotate(DK + k_off, dk * scale, d, tmask, perm, sign, cos, sin)


@triton.jit
def _unrotate(ptr, g, d, tmask, perm, sign, cos, sin):
    """Store the gradient of x for the gradient g [BN, D] of its rotation x·cos + sign·x_perm·sin:
    g·cos - sign·g_perm·sin (the rotation's adjoint; cos, sin equal on partners). g_perm comes
    back through memory: g is stored, and read again at the partner columns by the same
    program (a register tile cannot be permuted), then overwritten."""
    tl.store(ptr + d[None, :], g.to(ptr.dtype.element_ty), mask=tmask[:, None])
    tl.debug_barrier()  # every thread's columns are written before any thread reads its partners
    gp = tl.load(ptr + perm[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    tl.debug_barrier()  # every partner read before any column is overwritten
    out = g * cos - sign[None, :] * gp * sin
    tl.store(ptr + d[None, :], out.to(ptr.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _gate_up(Y, B, r, c, N, F):
    """The tile's mask, its rows' offsets in y [N, 2F], and gate + b_g, up + b_u in fp32."""
    mask = (r[:, None] < N) & (c[None, :] < F)
    row = r[:, None].to(tl.int64) * (2 * F)
    g = tl.load(Y + row + c[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Y + row + F + c[None, :], mask=mask, other=0.0).to(tl.float32)
    g += tl.load(B + c, mask=c < F, other=0.0).to(tl.float32)[None, :]
    u += tl.load(B + F + c, mask=c < F, other=0.0).to(tl.float32)[None, :]
    return mask, row, g, u


@triton.jit
def swiglu_fwd(Y, B, Hout, N, F, BM: tl.constexpr, BF: tl.constexpr):
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    mask, row, g, u = _gate_up(Y, B, r, c, N, F)
    h = g * tl.sigmoid(g) * u
    tl.store(Hout + r[:, None].to(tl.int64) * F + c[None, :], h.to(Hout.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd(DH, Y, B, DY, DB, N, F, BM: tl.constexpr, BF: tl.constexpr, STEPS: tl.constexpr):
    # STEPS blocks of BM rows a program, their bias-gradient sums kept in registers: one row of
    # partial sums per BM·STEPS rows.
    pm = tl.program_id(0)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    sum_g = tl.zeros([BF], dtype=tl.float32)
    sum_u = tl.zeros([BF], dtype=tl.float32)
    for i in range(STEPS):
        r = (pm * STEPS + i) * BM + tl.arange(0, BM)
        dg, du = _swiglu_bwd_block(DH, Y, B, DY, r, c, N, F)
        sum_g += tl.sum(dg, 0)
        sum_u += tl.sum(du, 0)
    tl.store(DB + pm * 2 * F + c, sum_g, mask=c < F)
    tl.store(DB + pm * 2 * F + F + c, sum_u, mask=c < F)


@triton.jit
def _swiglu_bwd_block(DH, Y, B, DY, r, c, N, F):
    mask, row, g, u = _gate_up(Y, B, r, c, N, F)
    dh = tl.load(DH + r[:, None].to(tl.int64) * F + c[None, :], mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    silu = g * sg
    dg = dh * u * sg * (1.0 + g * (1.0 - sg))  # d silu(g)/dg = σ(g)(1 + g(1 - σ(g)))
    du = dh * silu
    dg = tl.where(mask, dg, 0.0)
    du = tl.where(mask, du, 0.0)
    tl.store(DY + row + c[None, :], dg.to(DY.dtype.element_ty), mask=mask)
    tl.store(DY + row + F + c[None, :], du.to(DY.dtype.element_ty), mask=mask)
    return dg, du
