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
    BQ: tl.constexpr,
):  # fmt: skip
    # One program a (batch row, head, block of BQ queries), every key of the sequence at once.
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    t = tl.arange(0, BT)
    tmask = t < T
    tq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    qmask = tq < T
    d, perm, sign = _dims(D, HALF, R)
    cos, sin = _tables(COS, SIN, t, tmask, d, D)
    cq, sq = _tables(COS, SIN, tq, qmask, d, D)
    qr = _rotated(Q + b * sqb + h * sqh + tq[:, None] * sqt, d, qmask, perm, sign, cq, sq)
    kr = _rotated(K + b * skb + h * skh + t[:, None] * skt, d, tmask, perm, sign, cos, sin)
    v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=tmask[:, None], other=0.0)
    dt = v.dtype
    s = tl.dot(qr.to(dt), tl.trans(kr.to(dt))) * scale_log2  # base-2 logits
    keep = tmask[None, :]
    if CAUSAL:
        keep = keep & (t[None, :] <= tq[:, None])
    s = tl.where(keep, s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    lsum = tl.sum(p, 1)
    o = tl.dot(p.to(dt), v) / lsum[:, None]
    tl.store(OUT + b * sob + tq[:, None] * sot + h * D + d[None, :], o.to(dt), mask=qmask[:, None])
    tl.store(LSE + pid * BT + tq, m + tl.log2(lsum))


@triton.jit
def _query_block(Q, OUT, DO, LSE_ROW, COS, SIN, b, h, tq, qmask, d, perm, sign, sqb, sqt, sqh, sob, sot,
                 D: tl.constexpr):  # fmt: skip
    """What the backward needs of a block of queries tq: their rotated q (in DO's dtype), dO,
    log-sum-exp (LSE_ROW: this (row, head)'s), delta = rowsum(dO·O), tables and q offsets."""
    cq, sq = _tables(COS, SIN, tq, qmask, d, D)
    q_off = b * sqb + h * sqh + tq[:, None] * sqt
    o_off = b * sob + tq[:, None] * sot + h * D + d[None, :]
    do = tl.load(DO + o_off, mask=qmask[:, None], other=0.0)
    qr = _rotated(Q + q_off, d, qmask, perm, sign, cq, sq).to(do.dtype)
    o = tl.load(OUT + o_off, mask=qmask[:, None], other=0.0)
    lse = tl.load(LSE_ROW + tq)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    return qr, do, lse, delta, cq, sq, q_off


@triton.jit
def _key_block(K, V, COS, SIN, b, h, tk, kmask, d, perm, sign, skb, skt, skh, svb, svt, svh, D: tl.constexpr):
    """A block of keys tk: rotated k (in V's dtype), v, tables and offsets."""
    ck, sk = _tables(COS, SIN, tk, kmask, d, D)
    k_off = b * skb + h * skh + tk[:, None] * skt
    v_off = b * svb + h * svh + tk[:, None] * svt + d[None, :]
    v = tl.load(V + v_off, mask=kmask[:, None], other=0.0)
    kr = _rotated(K + k_off, d, kmask, perm, sign, ck, sk).to(v.dtype)
    return kr, v, ck, sk, k_off, v_off


@triton.jit
def _probabilities(qr, kr, lse, tq, qmask, tk, kmask, scale_log2, CAUSAL: tl.constexpr):
    """softmax(q·kᵀ/√D) [BQ, BK] of the forward, from its log-sum-exp; 0 where masked."""
    s = tl.dot(qr, tl.trans(kr)) * scale_log2
    keep = kmask[None, :] & qmask[:, None]
    if CAUSAL:
        keep = keep & (tk[None, :] <= tq[:, None])
    return tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, OUT, DO, LSE, COS, SIN, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot,
    T, H, scale, scale_log2,
    D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # The split backward, first half: one program a (row, head, block of BK keys), the queries
    # BQ at a time; dK and dV summed in registers and written once. dQ is attn_bwd_dq's.
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    d, perm, sign = _dims(D, HALF, R)
    k0 = tl.program_id(1) * BK
    tk = k0 + tl.arange(0, BK)
    kmask = tk < T
    kr, v, ck, sk, k_off, v_off = _key_block(K, V, COS, SIN, b, h, tk, kmask, d, perm, sign,
                                             skb, skt, skh, svb, svt, svh, D)  # fmt: skip
    dt = v.dtype
    dk = tl.zeros([BK, D], dtype=tl.float32)
    dv = tl.zeros([BK, D], dtype=tl.float32)
    lo = (k0 // BQ) * BQ if CAUSAL else 0  # causal: no query before the block's first key
    for q0 in range(lo, BT, BQ):
        tq = q0 + tl.arange(0, BQ)
        qmask = tq < T
        qr, do, lse, delta, cq, sq, q_off = _query_block(Q, OUT, DO, LSE + pid * BT, COS, SIN, b, h, tq, qmask,
                                                         d, perm, sign, sqb, sqt, sqh, sob, sot, D)  # fmt: skip
        p = _probabilities(qr, kr, lse, tq, qmask, tk, kmask, scale_log2, CAUSAL)
        dv += tl.dot(tl.trans(p.to(dt)), do)
        ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(dt)
        dk += tl.dot(tl.trans(ds), qr)
    tl.store(DV + v_off, dv.to(dt), mask=kmask[:, None])
    _unrotate(DK + k_off, dk * scale, d, kmask, perm, sign, ck, sk)


@triton.jit
def attn_bwd_dq(
    Q, K, V, OUT, DO, LSE, COS, SIN, DQ,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot,
    T, H, scale, scale_log2,
    D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # The split backward, second half: one program a (row, head, block of BQ queries), the keys
    # BK at a time, recomputing the probabilities; dQ summed in registers and written once.
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    d, perm, sign = _dims(D, HALF, R)
    q0 = tl.program_id(1) * BQ
    tq = q0 + tl.arange(0, BQ)
    qmask = tq < T
    qr, do, lse, delta, cq, sq, q_off = _query_block(Q, OUT, DO, LSE + pid * BT, COS, SIN, b, h, tq, qmask,
                                                     d, perm, sign, sqb, sqt, sqh, sob, sot, D)  # fmt: skip
    dt = do.dtype
    dq = tl.zeros([BQ, D], dtype=tl.float32)
    hi = q0 + BQ if CAUSAL else BT  # causal: no key after the block's last query
    for k0 in range(0, hi, BK):
        tk = k0 + tl.arange(0, BK)
        kmask = tk < T
        kr, v, ck, sk, k_off, v_off = _key_block(K, V, COS, SIN, b, h, tk, kmask, d, perm, sign,
                                                 skb, skt, skh, svb, svt, svh, D)  # fmt: skip
        p = _probabilities(qr, kr, lse, tq, qmask, tk, kmask, scale_log2, CAUSAL)
        ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(dt)
        dq += tl.dot(ds, kr)
    _unrotate(DQ + q_off, dq * scale, d, qmask, perm, sign, cq, sq)


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
