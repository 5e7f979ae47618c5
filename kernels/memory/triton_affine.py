"""Triton kernels for ``affine_rank1_chunk``: one weight matrix over one chunk, forward and backward.

The math is the one of :mod:`kernels.memory.chunk_torch` (its docstring derives it); per row and
chunk of ``c`` tokens, with ``Gp/Dp/gp/Ep`` the decay coefficients of the state *before* token i:

    A   = K K^T (strictly lower),       Aq = Q K^T (strictly lower)
    L   = (Gp.A) diag(c) - (Dp.A) diag(rho)
    rhs = gp.(K W0^T) + Ep.(K S0^T) + (Dp.A) w
    Y   = (I + L)^{-1} rhs               (blocked substitution as matmuls, in registers)
    delta = -c.Y,   u = w + rho.Y
    reads = gp.(Q W0^T) + Ep.(Q S0^T) + (Dp.Aq) u + (Gp.Aq) delta
    W_new = gamma_c W0 + E_c S0 + (Dl.u + gl.delta)^T K,     S_new = beta^c S0 + (bl.u)^T K

``fwd_chunk`` / ``bwd_chunk`` are the bodies for one (row, block of BO output columns) and one chunk;
``affine_fwd_kernel`` / ``affine_bwd_kernel`` run them on a grid of (rows, column blocks), and
:mod:`kernels.memory.triton_sequence` loops them over the chunks of a sequence. The columns of W
are independent given the c x c matrices, so each program recomputes A, the decay matrices and
``T = (I+L)^{-1}`` for its block (cheap: c^2 d); d is looped in BD tiles. The backward recomputes
the chunk's forward from the saved inputs (nothing c x c is stored between passes) and applies the
VJP derived in docs/KERNELS.md; quantities shared by all column blocks (dK, dQ, dc, drho,
dlog_alpha, dbeta) are written per block and summed by the caller, so results are deterministic.
Everything inside a program is fp32 whatever the input dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decay(LA, BETA, n, s_la, c_len, BC: tl.constexpr, HAS_MOM: tl.constexpr):
    """Decay vectors of one chunk (see module docstring); all fp32, padded rows inert.

    Returns log gamma (``lg``), log gamma_{i-1} (``lgp``), ``gp, gl, gL, Ep, Dl, EL, bl, bC, bpow``
    and ``lb = log beta``. The c x c matrices come from :func:`_gp` and :func:`_bm`."""
    rc = tl.arange(0, BC)
    mc = rc < c_len
    la = tl.load(LA + n * s_la + rc, mask=mc, other=0.0).to(tl.float32)
    lg = tl.cumsum(la, 0)
    lgp = lg - la
    lgL = tl.sum(tl.where(rc == c_len - 1, lg, 0.0), 0)               # log gamma_{c-1}
    gp = tl.exp(lgp)
    gl = tl.exp(tl.where(mc, lgL - lg, float("-inf")))
    gL = tl.exp(lgL)
    if HAS_MOM:
        lb = tl.log(tl.maximum(tl.load(BETA + n).to(tl.float32), 1e-30))
        bpow = tl.exp((rc + 1).to(tl.float32) * lb)                   # beta^(r+1)
        Gp = _gp(lg, lgp, BC)
        Ep = tl.sum(Gp * bpow[None, :], 1)
        Dl = tl.sum(gl[:, None] * _bm(lb, BC), 0)
        EL = tl.sum(gl * bpow, 0)
        bl = tl.exp(tl.where(mc, (c_len - 1 - rc).to(tl.float32) * lb, float("-inf")))
        bC = tl.exp(c_len * lb)
    else:
        lb = 0.0
        bpow = gp * 0.0
        Ep = gp * 0.0
        Dl = gl
        EL = 0.0
        bl = gl * 0.0
        bC = 0.0
    return lg, lgp, gp, gl, gL, Ep, Dl, EL, bl, bC, bpow, lb


@triton.jit
def _gp(lg, lgp, BC: tl.constexpr):
    """``Gp[i, s] = gamma_{i-1} / gamma_s`` for s < i (decay from token s to the state before i)."""
    rc = tl.arange(0, BC)
    return tl.exp(tl.where(rc[None, :] < rc[:, None], lgp[:, None] - lg[None, :], float("-inf")))


@triton.jit
def _bm(lb, BC: tl.constexpr):
    """``Bm[r, s] = beta^(r - s)`` for s <= r."""
    rc = tl.arange(0, BC)
    ii = rc[:, None]
    ss = rc[None, :]
    return tl.exp(tl.where(ss <= ii, (ii - ss).to(tl.float32) * lb, float("-inf")))


@triton.jit
def _inverse_unit_lower(L, c_len, BC: tl.constexpr, PREC: tl.constexpr):
    """``(I + L)^{-1}`` for strictly lower ``L`` (BC x BC, BC a multiple of 16).

    Forward substitution inside the 16 x 16 diagonal blocks, one row of every block per step (16
    steps of a BC^3 matmul instead of BC cross-thread reductions), then the off-diagonal blocks:
    with ``Td = (I + Ld)^{-1}`` and ``N = Td Lo`` (block strictly lower, nilpotent of index BC/16),
    ``(I + L)^{-1} = (I + N)^{-1} Td = (I - N + N^2 - ...) Td`` (Horner). Every product has at most
    BC/16 - 1 off-diagonal factors, the blocked substitution written as matmuls.
    """
    rc = tl.arange(0, BC)
    ii = rc[:, None]
    ss = rc[None, :]
    eye = tl.where(ii == ss, 1.0, 0.0)
    same = (ii // 16) == (ss // 16)
    Ld = tl.where(same, L, 0.0)
    Td = eye
    for i in range(1, tl.minimum(c_len, 16)):
        Td = tl.where((ii % 16) == i, eye - tl.dot(Ld, Td, input_precision=PREC), Td)
    if BC > 16:
        Nm = tl.dot(Td, tl.where(same, 0.0, L), input_precision=PREC)
        X = eye
        for _ in tl.static_range(BC // 16 - 1):
            X = eye - tl.dot(Nm, X, input_precision=PREC)
        Td = tl.dot(X, Td, input_precision=PREC)
    return Td


@triton.jit
def _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc, ro, mo, dd, md, d_dim,
                HAS_Q: tl.constexpr, HAS_MOM: tl.constexpr):
    kt = tl.load(K + n * s_kn + rc[:, None] * s_kt + dd[None, :], mask=mc[:, None] & md[None, :],
                 other=0.0).to(tl.float32)
    wmask = mo[:, None] & md[None, :]
    woff = n * s_w + ro[:, None] * d_dim + dd[None, :]
    w0t = tl.load(W0 + woff, mask=wmask, other=0.0).to(tl.float32)
    if HAS_Q:
        qt = tl.load(Q + n * s_qn + rc[:, None] * s_qt + dd[None, :], mask=mc[:, None] & md[None, :],
                     other=0.0).to(tl.float32)
    else:
        qt = kt * 0.0
    if HAS_MOM:
        s0t = tl.load(S0 + woff, mask=wmask, other=0.0).to(tl.float32)
    else:
        s0t = w0t * 0.0
    return kt, qt, w0t, s0t, woff, wmask


@triton.jit
def fwd_chunk(
    W0, S0, K, Q, CV, RHO, WV, LA, BETA, R, WN, SN,
    n, ob, c_len, o_dim, d_dim,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """Forward of row ``n``, column block ``ob`` over one chunk whose pointers start at its first
    token (token inputs) and at its start / end state (W0, S0 / WN, SN, all with row stride s_w)."""
    rc = tl.arange(0, BC)
    ro = ob * BO + tl.arange(0, BO)
    rd = tl.arange(0, BD)
    mc = rc < c_len
    mo = ro < o_dim
    strict = rc[None, :] < rc[:, None]
    lg, lgp, gp, gl, gL, Ep, Dl, EL, bl, bC, bpow, lb = _decay(LA, BETA, n, s_la, c_len, BC, HAS_MOM)
    Gp = _gp(lg, lgp, BC)
    if HAS_MOM:
        Dp = tl.dot(Gp, _bm(lb, BC), input_precision=PREC)
    else:
        Dp = Gp

    vmask = mc[:, None] & mo[None, :]
    wv = tl.load(WV + n * s_vn + rc[:, None] * s_vt + ro[None, :], mask=vmask, other=0.0).to(tl.float32)
    if HAS_C or HAS_RHO:
        # pass 1 over d: A = K K^T and the base term gp.(K W0^T) + Ep.(K S0^T) (rows of K pre-scaled)
        A = tl.zeros([BC, BC], tl.float32)
        KB = tl.zeros([BC, BO], tl.float32)
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                        ro, mo, dd, dd < d_dim, d_dim, False, HAS_MOM)
            A += tl.dot(kt, tl.trans(kt), input_precision=PREC)
            KB += tl.dot(kt * gp[:, None], tl.trans(w0t), input_precision=PREC)
            if HAS_MOM:
                KB += tl.dot(kt * Ep[:, None], tl.trans(s0t), input_precision=PREC)
        A = tl.where(strict, A, 0.0)
        rhs = KB + tl.dot(Dp * A, wv, input_precision=PREC)
        L = tl.zeros([BC, BC], tl.float32)
        if HAS_C:
            cv = tl.load(CV + n * s_cn + rc, mask=mc, other=0.0).to(tl.float32)
            L += Gp * A * cv[None, :]
        if HAS_RHO:
            rh = tl.load(RHO + n * s_pn + rc, mask=mc, other=0.0).to(tl.float32)
            L -= Dp * A * rh[None, :]
        Y = tl.dot(_inverse_unit_lower(L, c_len, BC, PREC), rhs, input_precision=PREC)
    else:  # no state-dependent write (gd with chunk-start or dot gradients): u = w, delta = 0
        Y = wv * 0.0
    if HAS_C:
        delta = -cv[:, None] * Y
    else:
        delta = Y * 0.0
    if HAS_RHO:
        u = wv + rh[:, None] * Y
    else:
        u = wv

    # pass 2 over d: new state tiles, and Q K^T / the read base term
    P = Dl[:, None] * u + gl[:, None] * delta        # coefficients of the last state
    Pm = bl[:, None] * u
    Aq = tl.zeros([BC, BC], tl.float32)
    QB = tl.zeros([BC, BO], tl.float32)
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                    ro, mo, dd, dd < d_dim, d_dim, HAS_Q, HAS_MOM)
        wn = gL * w0t + tl.dot(tl.trans(P), kt, input_precision=PREC)
        if HAS_MOM:
            wn += EL * s0t
            sn = bC * s0t + tl.dot(tl.trans(Pm), kt, input_precision=PREC)
            tl.store(SN + woff, sn, mask=wmask)
        tl.store(WN + woff, wn, mask=wmask)
        if HAS_Q:
            Aq += tl.dot(qt, tl.trans(kt), input_precision=PREC)
            QB += tl.dot(qt * gp[:, None], tl.trans(w0t), input_precision=PREC)
            if HAS_MOM:
                QB += tl.dot(qt * Ep[:, None], tl.trans(s0t), input_precision=PREC)
    if HAS_Q:
        Aq = tl.where(strict, Aq, 0.0)
        reads = QB + tl.dot(Dp * Aq, u, input_precision=PREC)
        if HAS_C:
            reads += tl.dot(Gp * Aq, delta, input_precision=PREC)
        tl.store(R + n * s_rn + rc[:, None] * s_rt + ro[None, :], reads, mask=vmask)


@triton.jit
def bwd_chunk(
    W0, S0, K, Q, CV, RHO, WV, LA, BETA, DR, DWN, DSN,
    DW0, DS0, DWV, DK, DQ, DCV, DRHO, DLA, DBETA,
    n, ob, c_len, o_dim, d_dim, n_rows, s_pt, s_pb,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """VJP of :func:`fwd_chunk` (pointers placed the same way; DWN/DSN are the cotangents of the
    end state, DW0/DS0 receive those of the start state). DW0, DS0, DWV belong to this column
    block; DK, DQ ``(blocks, N, s_pt, d)``, DCV, DRHO, DLA ``(blocks, N, s_pt)`` and DBETA
    ``(blocks, N, s_pb)`` are per-block partial sums, pointers placed at this chunk."""
    rc = tl.arange(0, BC)
    ro = ob * BO + tl.arange(0, BO)
    rd = tl.arange(0, BD)
    mc = rc < c_len
    mo = ro < o_dim
    ii = rc[:, None]
    ss = rc[None, :]
    strict = ss < ii
    lg, lgp, gp, gl, gL, Ep, Dl, EL, bl, bC, bpow, lb = _decay(LA, BETA, n, s_la, c_len, BC, HAS_MOM)
    Gp = _gp(lg, lgp, BC)
    if HAS_MOM:
        Dp = tl.dot(Gp, _bm(lb, BC), input_precision=PREC)
    else:
        Dp = Gp

    # -- pass 1 over d: recompute A, Aq, the rhs base; contract the state cotangents with K -------
    A = tl.zeros([BC, BC], tl.float32)
    Aq = tl.zeros([BC, BC], tl.float32)
    KB = tl.zeros([BC, BO], tl.float32)
    dP = tl.zeros([BC, BO], tl.float32)
    dPm = tl.zeros([BC, BO], tl.float32)
    dgL = tl.sum(gp * 0.0, 0)
    dEL = tl.sum(gp * 0.0, 0)
    dbC = tl.sum(gp * 0.0, 0)
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                    ro, mo, dd, dd < d_dim, d_dim, HAS_Q, HAS_MOM)
        dwn = tl.load(DWN + woff, mask=wmask, other=0.0).to(tl.float32)
        if HAS_C or HAS_RHO:
            A += tl.dot(kt, tl.trans(kt), input_precision=PREC)
            KB += tl.dot(kt * gp[:, None], tl.trans(w0t), input_precision=PREC)
            if HAS_MOM:
                KB += tl.dot(kt * Ep[:, None], tl.trans(s0t), input_precision=PREC)
        dP += tl.dot(kt, tl.trans(dwn), input_precision=PREC)
        dgL += tl.sum(tl.sum(dwn * w0t, 1), 0)
        if HAS_MOM:
            dsn = tl.load(DSN + woff, mask=wmask, other=0.0).to(tl.float32)
            dPm += tl.dot(kt, tl.trans(dsn), input_precision=PREC)
            dEL += tl.sum(tl.sum(dwn * s0t, 1), 0)
            dbC += tl.sum(tl.sum(dsn * s0t, 1), 0)
        if HAS_Q:
            Aq += tl.dot(qt, tl.trans(kt), input_precision=PREC)
    A = tl.where(strict, A, 0.0)
    Aq = tl.where(strict, Aq, 0.0)

    # -- recompute the solve, then the VJP through reads, solve and masked matrices ---------------
    vmask = mc[:, None] & mo[None, :]
    voff = n * s_vn + rc[:, None] * s_vt + ro[None, :]
    wv = tl.load(WV + voff, mask=vmask, other=0.0).to(tl.float32)
    cv = tl.zeros([BC], tl.float32)
    rh = tl.zeros([BC], tl.float32)
    if HAS_C:
        cv = tl.load(CV + n * s_cn + rc, mask=mc, other=0.0).to(tl.float32)
    if HAS_RHO:
        rh = tl.load(RHO + n * s_pn + rc, mask=mc, other=0.0).to(tl.float32)
    if HAS_Q:
        dR = tl.load(DR + n * s_rn + rc[:, None] * s_rt + ro[None, :], mask=vmask, other=0.0).to(tl.float32)
    else:
        dR = wv * 0.0
    if HAS_C or HAS_RHO:
        T = _inverse_unit_lower(Gp * A * cv[None, :] - Dp * A * rh[None, :], c_len, BC, PREC)
        Y = tl.dot(T, KB + tl.dot(Dp * A, wv, input_precision=PREC), input_precision=PREC)
    else:
        Y = wv * 0.0
    delta = -cv[:, None] * Y
    u = wv + rh[:, None] * Y
    du = Dl[:, None] * dP + bl[:, None] * dPm + tl.dot(tl.trans(Dp * Aq), dR, input_precision=PREC)
    ddelta = gl[:, None] * dP + tl.dot(tl.trans(Gp * Aq), dR, input_precision=PREC)
    dM3 = tl.where(strict, tl.dot(dR, tl.trans(u), input_precision=PREC), 0.0)      # M3 = Dp.Aq
    dM4 = tl.where(strict, tl.dot(dR, tl.trans(delta), input_precision=PREC), 0.0)  # M4 = Gp.Aq
    dAq = dM3 * Dp + dM4 * Gp
    dGp = dM4 * Aq
    dDp = dM3 * Aq
    pbase = ob * n_rows + n
    if HAS_C or HAS_RHO:
        drhs = tl.dot(tl.trans(T), rh[:, None] * du - cv[:, None] * ddelta, input_precision=PREC)
        dL = tl.where(strict, -tl.dot(drhs, tl.trans(Y), input_precision=PREC), 0.0)
        tl.store(DWV + voff, du + tl.dot(tl.trans(Dp * A), drhs, input_precision=PREC), mask=vmask)
        dM1 = dL * cv[None, :]                                                    # M1 = Gp.A
        dM2 = tl.where(strict, tl.dot(drhs, tl.trans(wv), input_precision=PREC), 0.0) - dL * rh[None, :]
        dA = dM1 * Gp + dM2 * Dp
        dGp += dM1 * A
        dDp += dM2 * A
        if HAS_C:
            dcv = -tl.sum(ddelta * Y, 1) + tl.sum(dL * Gp * A, 0)
            tl.store(DCV + pbase * s_pt + rc, dcv, mask=mc)
        if HAS_RHO:
            drh = tl.sum(du * Y, 1) - tl.sum(dL * Dp * A, 0)
            tl.store(DRHO + pbase * s_pt + rc, drh, mask=mc)
    else:
        drhs = du * 0.0
        dA = dAq * 0.0
        tl.store(DWV + voff, du, mask=vmask)
    dDl = tl.sum(dP * u, 1)
    dgl = tl.sum(dP * delta, 1)
    dbl = tl.sum(dPm * u, 1)

    # -- decay, c x c part: back through Dp = Gp Bm, Dl = gl Bm, E_c = gl.bpow and Gp = exp(.) ------
    dbeta = tl.sum(gp * 0.0, 0)
    if HAS_MOM:
        Bm = _bm(lb, BC)
        dGp += tl.dot(dDp, tl.trans(Bm), input_precision=PREC)
        dBm = tl.dot(tl.trans(Gp), dDp, input_precision=PREC) + gl[:, None] * dDl[None, :]
        dgl += tl.sum(Bm * dDl[None, :], 1) + dEL * bpow
        lag = (ii - ss).to(tl.float32)
        dpow = tl.where(strict & (ii < c_len), lag * tl.exp(tl.where(strict, (lag - 1.0) * lb, 0.0)), 0.0)
        dbeta += tl.sum(tl.sum(dBm * dpow, 1), 0)
    else:
        dGp += dDp
        dgl += dDl
    t1 = dGp * Gp
    dlgp = tl.sum(t1, 1)
    dlg = -tl.sum(t1, 0) - dgl * gl

    # -- pass 2 over d: d-sized outputs, and the gradients of the base terms' row scales ---------
    dAs = dA + tl.trans(dA)
    P = Dl[:, None] * u + gl[:, None] * delta        # coefficients of the last state
    Pm = bl[:, None] * u
    dgp = gp * 0.0
    dEp = gp * 0.0
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        md = dd < d_dim
        kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                    ro, mo, dd, md, d_dim, HAS_Q, HAS_MOM)
        dwn = tl.load(DWN + woff, mask=wmask, other=0.0).to(tl.float32)
        dk = tl.dot(P, dwn, input_precision=PREC)
        dw0 = gL * dwn
        if HAS_C or HAS_RHO:
            X1 = tl.dot(drhs, w0t, input_precision=PREC)               # d(K W0^T), before the gp scale
            dgp += tl.sum(kt * X1, 1)
            dk += tl.dot(dAs, kt, input_precision=PREC) + gp[:, None] * X1
            dw0 += tl.dot(tl.trans(drhs * gp[:, None]), kt, input_precision=PREC)
        if HAS_MOM:
            dsn = tl.load(DSN + woff, mask=wmask, other=0.0).to(tl.float32)
            dk += tl.dot(Pm, dsn, input_precision=PREC)
            ds0 = EL * dwn + bC * dsn
            if HAS_C or HAS_RHO:
                X2 = tl.dot(drhs, s0t, input_precision=PREC)
                dEp += tl.sum(kt * X2, 1)
                dk += Ep[:, None] * X2
                ds0 += tl.dot(tl.trans(drhs * Ep[:, None]), kt, input_precision=PREC)
        if HAS_Q:
            X3 = tl.dot(dR, w0t, input_precision=PREC)
            dgp += tl.sum(qt * X3, 1)
            dk += tl.dot(tl.trans(dAq), qt, input_precision=PREC)
            dq = tl.dot(dAq, kt, input_precision=PREC) + gp[:, None] * X3
            dw0 += tl.dot(tl.trans(dR * gp[:, None]), qt, input_precision=PREC)
            if HAS_MOM:
                X4 = tl.dot(dR, s0t, input_precision=PREC)
                dEp += tl.sum(qt * X4, 1)
                dq += Ep[:, None] * X4
                ds0 += tl.dot(tl.trans(dR * Ep[:, None]), qt, input_precision=PREC)
            tl.store(DQ + (pbase * s_pt + rc[:, None]) * d_dim + dd[None, :], dq, mask=mc[:, None] & md[None, :])
        tl.store(DK + (pbase * s_pt + rc[:, None]) * d_dim + dd[None, :], dk, mask=mc[:, None] & md[None, :])
        tl.store(DW0 + woff, dw0, mask=wmask)
        if HAS_MOM:
            tl.store(DS0 + woff, ds0, mask=wmask)

    # -- decay, vector part: gp = exp(lgp), Ep = Gp bpow, gl, gamma_c, bl, beta^c, then the cumsum --
    dlgp += dgp * gp
    if HAS_MOM:
        v = tl.sum(_gp(lg, lgp, BC) * dEp[:, None], 0)                 # Gp^T dEp
        dlgp += dEp * Ep
        dlg -= v * bpow
        rf = rc.to(tl.float32)
        dbeta += tl.sum(tl.where(mc, (v + dEL * gl) * (rf + 1.0) * tl.exp(rf * lb), 0.0), 0)
        m_bl = (c_len - 1 - rc).to(tl.float32)
        last = rc < c_len - 1
        dbeta += tl.sum(tl.where(last, dbl * m_bl * tl.exp(tl.where(last, (m_bl - 1.0) * lb, 0.0)), 0.0), 0)
        dbeta += dbC * c_len * tl.exp((c_len - 1) * lb)
        tl.store(DBETA + pbase * s_pb, dbeta)
    dlgL = tl.sum(dgl * gl, 0) + dgL * gL
    dlg += tl.where(rc == c_len - 1, dlgL, 0.0) + dlgp
    dla = tl.cumsum(dlg, 0, reverse=True) - dlgp
    tl.store(DLA + pbase * s_pt + rc, dla, mask=mc)



@triton.jit
def affine_fwd_kernel(
    W0, S0, K, Q, CV, RHO, WV, LA, BETA, R, WN, SN,
    c_len, o_dim, d_dim,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk; grid ``(N, column blocks)``."""
    fwd_chunk(W0, S0, K, Q, CV, RHO, WV, LA, BETA, R, WN, SN,
              tl.program_id(0), tl.program_id(1), c_len, o_dim, d_dim,
              s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
              HAS_C, HAS_RHO, HAS_MOM, HAS_Q, BC, BO, BD, PREC)


@triton.jit
def affine_bwd_kernel(
    W0, S0, K, Q, CV, RHO, WV, LA, BETA, DR, DWN, DSN,
    DW0, DS0, DWV, DK, DQ, DCV, DRHO, DLA, DBETA,
    c_len, o_dim, d_dim, n_rows,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """VJP of one chunk; grid ``(N, column blocks)``; partials ``(blocks, N, c, ...)``."""
    bwd_chunk(W0, S0, K, Q, CV, RHO, WV, LA, BETA, DR, DWN, DSN,
              DW0, DS0, DWV, DK, DQ, DCV, DRHO, DLA, DBETA,
              tl.program_id(0), tl.program_id(1), c_len, o_dim, d_dim, n_rows, c_len, 1,
              s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
              HAS_C, HAS_RHO, HAS_MOM, HAS_Q, BC, BO, BD, PREC)
