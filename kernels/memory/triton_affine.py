"""Triton kernels for ``affine_rank1_chunk``: one weight matrix over one chunk, forward and backward.

The math is the one of :mod:`kernels.memory.chunk_torch` (its docstring derives it); per row and
chunk of ``c`` tokens, with ``Gp/Dp/gp/Ep`` the decay coefficients of the state *before* token i:

    A   = K K^T (strictly lower),       Aq = Q K^T (strictly lower)
    L   = (Gp.A) diag(c) - (Dp.A) diag(rho)
    rhs = gp.(K W0^T) + Ep.(K S0^T) + (Dp.A) w
    Y   = (I + L)^{-1} rhs               (forward substitution, in registers)
    delta = -c.Y,   u = w + rho.Y
    reads = gp.(Q W0^T) + Ep.(Q S0^T) + (Dp.Aq) u + (Gp.Aq) delta
    W_new = gamma_c W0 + E_c S0 + (Dl.u + gl.delta)^T K,     S_new = beta^c S0 + (bl.u)^T K

Grid: one program per (row, block of BO output columns). The columns of W are independent given the
c x c matrices, so each program recomputes A, the decay matrices and ``T = (I+L)^{-1}`` for its
block (cheap: c^2 d) and the d dimension is looped in BD tiles. The backward kernel recomputes the
forward inside the chunk from the saved inputs (nothing c x c is stored between passes) and writes
the VJP derived in docs/KERNELS.md; quantities shared by all column blocks (dK, dQ, dc, drho,
dlog_alpha, dbeta) are written per block and summed by the caller, so the result is deterministic.
Everything inside a program is fp32 whatever the input dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decay(LA, BETA, n, s_la, c_len, BC: tl.constexpr, HAS_MOM: tl.constexpr, PREC: tl.constexpr):
    """Decay coefficients of one chunk (see module docstring); all fp32, padded rows inert."""
    rc = tl.arange(0, BC)
    mc = rc < c_len
    ii = rc[:, None]
    ss = rc[None, :]
    strict = ss < ii
    la = tl.load(LA + n * s_la + rc, mask=mc, other=0.0).to(tl.float32)
    lg = tl.cumsum(la, 0)
    lgp = lg - la                                                     # log gamma_{i-1}
    lgL = tl.sum(tl.where(rc == c_len - 1, lg, 0.0), 0)               # log gamma_{c-1}
    Gp = tl.exp(tl.where(strict, lgp[:, None] - lg[None, :], float("-inf")))
    gp = tl.exp(lgp)
    gl = tl.exp(tl.where(mc, lgL - lg, float("-inf")))
    gL = tl.exp(lgL)
    if HAS_MOM:
        lb = tl.log(tl.maximum(tl.load(BETA + n).to(tl.float32), 1e-30))
        Bm = tl.exp(tl.where(ss <= ii, (ii - ss).to(tl.float32) * lb, float("-inf")))
        Dp = tl.dot(Gp, Bm, input_precision=PREC)
        bpow = tl.exp((rc + 1).to(tl.float32) * lb)                   # beta^(r+1)
        Ep = tl.sum(Gp * bpow[None, :], 1)
        Dl = tl.sum(gl[:, None] * Bm, 0)
        EL = tl.sum(gl * bpow, 0)
        bl = tl.exp(tl.where(mc, (c_len - 1 - rc).to(tl.float32) * lb, float("-inf")))
        bC = tl.exp(c_len * lb)
    else:
        lb = 0.0
        Bm = Gp
        Dp = Gp
        bpow = gp * 0.0
        Ep = gp * 0.0
        Dl = gl
        EL = 0.0
        bl = gl * 0.0
        bC = 0.0
    return Gp, gp, gl, gL, Dp, Ep, Dl, EL, bl, bC, Bm, bpow, lb


@triton.jit
def _solve_inverse(L, BC: tl.constexpr, c_len):
    """``(I + L)^{-1}`` for strictly lower ``L`` by forward substitution, one row per step."""
    rc = tl.arange(0, BC)
    ii = rc[:, None]
    ss = rc[None, :]
    T = tl.where(ii == ss, 1.0, 0.0)
    for i in range(1, c_len):
        lrow = tl.sum(tl.where(ii == i, L, 0.0), 0)                   # L[i, :], zero for j >= i
        trow = -tl.sum(lrow[:, None] * T, 0) + (rc == i).to(tl.float32)
        T = tl.where(ii == i, trow[None, :], T)
    return T


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
def affine_fwd_kernel(
    W0, S0, K, Q, CV, RHO, WV, LA, BETA, R, WN, SN,
    c_len, o_dim, d_dim,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    n = tl.program_id(0)
    ob = tl.program_id(1)
    rc = tl.arange(0, BC)
    ro = ob * BO + tl.arange(0, BO)
    rd = tl.arange(0, BD)
    mc = rc < c_len
    mo = ro < o_dim
    strict = rc[None, :] < rc[:, None]
    Gp, gp, gl, gL, Dp, Ep, Dl, EL, bl, bC, Bm, bpow, lb = _decay(LA, BETA, n, s_la, c_len, BC, HAS_MOM, PREC)

    A = tl.zeros([BC, BC], tl.float32)
    Aq = tl.zeros([BC, BC], tl.float32)
    KW = tl.zeros([BC, BO], tl.float32)
    KS = tl.zeros([BC, BO], tl.float32)
    QW = tl.zeros([BC, BO], tl.float32)
    QS = tl.zeros([BC, BO], tl.float32)
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                    ro, mo, dd, dd < d_dim, d_dim, HAS_Q, HAS_MOM)
        A += tl.dot(kt, tl.trans(kt), input_precision=PREC)
        KW += tl.dot(kt, tl.trans(w0t), input_precision=PREC)
        if HAS_MOM:
            KS += tl.dot(kt, tl.trans(s0t), input_precision=PREC)
        if HAS_Q:
            Aq += tl.dot(qt, tl.trans(kt), input_precision=PREC)
            QW += tl.dot(qt, tl.trans(w0t), input_precision=PREC)
            if HAS_MOM:
                QS += tl.dot(qt, tl.trans(s0t), input_precision=PREC)
    A = tl.where(strict, A, 0.0)
    Aq = tl.where(strict, Aq, 0.0)

    vmask = mc[:, None] & mo[None, :]
    wv = tl.load(WV + n * s_vn + rc[:, None] * s_vt + ro[None, :], mask=vmask, other=0.0).to(tl.float32)
    rhs = gp[:, None] * KW + Ep[:, None] * KS + tl.dot(Dp * A, wv, input_precision=PREC)
    if HAS_C or HAS_RHO:
        L = tl.zeros([BC, BC], tl.float32)
        if HAS_C:
            cv = tl.load(CV + n * s_cn + rc, mask=mc, other=0.0).to(tl.float32)
            L += Gp * A * cv[None, :]
        if HAS_RHO:
            rh = tl.load(RHO + n * s_pn + rc, mask=mc, other=0.0).to(tl.float32)
            L -= Dp * A * rh[None, :]
        Y = tl.dot(_solve_inverse(L, BC, c_len), rhs, input_precision=PREC)
    else:
        Y = rhs * 0.0
    if HAS_C:
        delta = -cv[:, None] * Y
    else:
        delta = Y * 0.0
    if HAS_RHO:
        u = wv + rh[:, None] * Y
    else:
        u = wv

    if HAS_Q:
        reads = gp[:, None] * QW + Ep[:, None] * QS + tl.dot(Dp * Aq, u, input_precision=PREC)
        if HAS_C:
            reads += tl.dot(Gp * Aq, delta, input_precision=PREC)
        tl.store(R + n * s_rn + rc[:, None] * s_rt + ro[None, :], reads, mask=vmask)

    P = Dl[:, None] * u + gl[:, None] * delta        # coefficients of the last state
    Pm = bl[:, None] * u
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                    ro, mo, dd, dd < d_dim, d_dim, False, HAS_MOM)
        wn = gL * w0t + tl.dot(tl.trans(P), kt, input_precision=PREC)
        if HAS_MOM:
            wn += EL * s0t
            sn = bC * s0t + tl.dot(tl.trans(Pm), kt, input_precision=PREC)
            tl.store(SN + woff, sn, mask=wmask)
        tl.store(WN + woff, wn, mask=wmask)


@triton.jit
def affine_bwd_kernel(
    W0, S0, K, Q, CV, RHO, WV, LA, BETA, DR, DWN, DSN,
    DW0, DS0, DWV, DK, DQ, DCV, DRHO, DLA, DBETA,
    c_len, o_dim, d_dim, n_rows,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """VJP of :func:`affine_fwd_kernel`. Outputs DW0, DS0, DWV are owned by this column block;
    DK, DQ ``(blocks, N, c, d)``, DCV, DRHO, DLA ``(blocks, N, c)``, DBETA ``(blocks, N)`` are
    per-block partial sums (contiguous)."""
    n = tl.program_id(0)
    ob = tl.program_id(1)
    rc = tl.arange(0, BC)
    ro = ob * BO + tl.arange(0, BO)
    rd = tl.arange(0, BD)
    mc = rc < c_len
    mo = ro < o_dim
    ii = rc[:, None]
    ss = rc[None, :]
    strict = ss < ii
    Gp, gp, gl, gL, Dp, Ep, Dl, EL, bl, bC, Bm, bpow, lb = _decay(LA, BETA, n, s_la, c_len, BC, HAS_MOM, PREC)

    # -- recompute the forward of this chunk, and contract the state cotangents with K ----------
    A = tl.zeros([BC, BC], tl.float32)
    Aq = tl.zeros([BC, BC], tl.float32)
    KW = tl.zeros([BC, BO], tl.float32)
    KS = tl.zeros([BC, BO], tl.float32)
    QW = tl.zeros([BC, BO], tl.float32)
    QS = tl.zeros([BC, BO], tl.float32)
    dP = tl.zeros([BC, BO], tl.float32)
    dPm = tl.zeros([BC, BO], tl.float32)
    dgL = 0.0
    dEL = 0.0
    dbC = 0.0
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                    ro, mo, dd, dd < d_dim, d_dim, HAS_Q, HAS_MOM)
        dwn = tl.load(DWN + woff, mask=wmask, other=0.0).to(tl.float32)
        A += tl.dot(kt, tl.trans(kt), input_precision=PREC)
        KW += tl.dot(kt, tl.trans(w0t), input_precision=PREC)
        dP += tl.dot(kt, tl.trans(dwn), input_precision=PREC)
        dgL += tl.sum(tl.sum(dwn * w0t, 1), 0)
        if HAS_MOM:
            dsn = tl.load(DSN + woff, mask=wmask, other=0.0).to(tl.float32)
            KS += tl.dot(kt, tl.trans(s0t), input_precision=PREC)
            dPm += tl.dot(kt, tl.trans(dsn), input_precision=PREC)
            dEL += tl.sum(tl.sum(dwn * s0t, 1), 0)
            dbC += tl.sum(tl.sum(dsn * s0t, 1), 0)
        if HAS_Q:
            Aq += tl.dot(qt, tl.trans(kt), input_precision=PREC)
            QW += tl.dot(qt, tl.trans(w0t), input_precision=PREC)
            if HAS_MOM:
                QS += tl.dot(qt, tl.trans(s0t), input_precision=PREC)
    A = tl.where(strict, A, 0.0)
    Aq = tl.where(strict, Aq, 0.0)
    M1 = Gp * A
    M2 = Dp * A
    M3 = Dp * Aq
    M4 = Gp * Aq

    vmask = mc[:, None] & mo[None, :]
    voff = n * s_vn + rc[:, None] * s_vt + ro[None, :]
    wv = tl.load(WV + voff, mask=vmask, other=0.0).to(tl.float32)
    rhs = gp[:, None] * KW + Ep[:, None] * KS + tl.dot(M2, wv, input_precision=PREC)
    L = tl.zeros([BC, BC], tl.float32)
    cv = tl.zeros([BC], tl.float32)
    rh = tl.zeros([BC], tl.float32)
    if HAS_C:
        cv = tl.load(CV + n * s_cn + rc, mask=mc, other=0.0).to(tl.float32)
        L += M1 * cv[None, :]
    if HAS_RHO:
        rh = tl.load(RHO + n * s_pn + rc, mask=mc, other=0.0).to(tl.float32)
        L -= M2 * rh[None, :]
    if HAS_C or HAS_RHO:
        T = _solve_inverse(L, BC, c_len)
        Y = tl.dot(T, rhs, input_precision=PREC)
    else:
        T = tl.where(ii == ss, 1.0, 0.0)
        Y = rhs * 0.0
    delta = -cv[:, None] * Y
    u = wv + rh[:, None] * Y
    P = Dl[:, None] * u + gl[:, None] * delta
    Pm = bl[:, None] * u

    # -- VJP through reads, the solve and the masked matrices (docs/KERNELS.md) -----------------
    if HAS_Q:
        dR = tl.load(DR + n * s_rn + rc[:, None] * s_rt + ro[None, :], mask=vmask, other=0.0).to(tl.float32)
    else:
        dR = wv * 0.0
    du = Dl[:, None] * dP + bl[:, None] * dPm + tl.dot(tl.trans(M3), dR, input_precision=PREC)
    ddelta = gl[:, None] * dP + tl.dot(tl.trans(M4), dR, input_precision=PREC)
    dY = -cv[:, None] * ddelta + rh[:, None] * du
    drhs = tl.dot(tl.trans(T), dY, input_precision=PREC)
    dL = tl.where(strict, -tl.dot(drhs, tl.trans(Y), input_precision=PREC), 0.0)
    dwv = du + tl.dot(tl.trans(M2), drhs, input_precision=PREC)
    tl.store(DWV + voff, dwv, mask=vmask)
    dM1 = dL * cv[None, :]
    dM2 = tl.where(strict, tl.dot(drhs, tl.trans(wv), input_precision=PREC), 0.0) - dL * rh[None, :]
    dM3 = tl.where(strict, tl.dot(dR, tl.trans(u), input_precision=PREC), 0.0)
    dM4 = tl.where(strict, tl.dot(dR, tl.trans(delta), input_precision=PREC), 0.0)
    dA = dM1 * Gp + dM2 * Dp
    dAq = dM3 * Dp + dM4 * Gp
    dGp = dM1 * A + dM4 * Aq
    dDp = dM2 * A + dM3 * Aq
    dgp = tl.sum(dR * QW + drhs * KW, 1)
    dEp = tl.sum(dR * QS + drhs * KS, 1)
    dDl = tl.sum(dP * u, 1)
    dgl = tl.sum(dP * delta, 1)
    dbl = tl.sum(dPm * u, 1)
    pbase = ob * n_rows + n
    if HAS_C:
        dcv = -tl.sum(ddelta * Y, 1) + tl.sum(dL * M1, 0)
        tl.store(DCV + pbase * c_len + rc, dcv, mask=mc)
    if HAS_RHO:
        drh = tl.sum(du * Y, 1) - tl.sum(dL * M2, 0)
        tl.store(DRHO + pbase * c_len + rc, drh, mask=mc)

    # -- d-sized outputs -------------------------------------------------------------------------
    dAs = dA + tl.trans(dA)
    gR = gp[:, None] * dR
    eR = Ep[:, None] * dR
    gH = gp[:, None] * drhs
    eH = Ep[:, None] * drhs
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        md = dd < d_dim
        kt, qt, w0t, s0t, woff, wmask = _load_tiles(K, Q, W0, S0, n, s_kn, s_kt, s_qn, s_qt, s_w, rc, mc,
                                                    ro, mo, dd, md, d_dim, HAS_Q, HAS_MOM)
        dwn = tl.load(DWN + woff, mask=wmask, other=0.0).to(tl.float32)
        dk = tl.dot(dAs, kt, input_precision=PREC) + tl.dot(gH, w0t, input_precision=PREC) \
            + tl.dot(P, dwn, input_precision=PREC)
        dw0 = gL * dwn + tl.dot(tl.trans(gH), kt, input_precision=PREC)
        if HAS_MOM:
            dsn = tl.load(DSN + woff, mask=wmask, other=0.0).to(tl.float32)
            dk += tl.dot(eH, s0t, input_precision=PREC) + tl.dot(Pm, dsn, input_precision=PREC)
            ds0 = EL * dwn + bC * dsn + tl.dot(tl.trans(eH), kt, input_precision=PREC)
        if HAS_Q:
            dk += tl.dot(tl.trans(dAq), qt, input_precision=PREC)
            dq = tl.dot(dAq, kt, input_precision=PREC) + tl.dot(gR, w0t, input_precision=PREC)
            dw0 += tl.dot(tl.trans(gR), qt, input_precision=PREC)
            if HAS_MOM:
                dq += tl.dot(eR, s0t, input_precision=PREC)
                ds0 += tl.dot(tl.trans(eR), qt, input_precision=PREC)
            tl.store(DQ + (pbase * c_len + rc[:, None]) * d_dim + dd[None, :], dq, mask=mc[:, None] & md[None, :])
        tl.store(DK + (pbase * c_len + rc[:, None]) * d_dim + dd[None, :], dk, mask=mc[:, None] & md[None, :])
        tl.store(DW0 + woff, dw0, mask=wmask)
        if HAS_MOM:
            tl.store(DS0 + woff, ds0, mask=wmask)

    # -- decay: back through Dp = Gp Bm, Ep = Gp bpow, Dl = gl Bm, E_c = gl.bpow, exps, cumsum -----
    if HAS_MOM:
        dGp += tl.dot(dDp, tl.trans(Bm), input_precision=PREC) + dEp[:, None] * bpow[None, :]
        dBm = tl.dot(tl.trans(Gp), dDp, input_precision=PREC) + gl[:, None] * dDl[None, :]
        dbpow = tl.sum(Gp * dEp[:, None], 0) + dEL * gl
        dgl += tl.sum(Bm * dDl[None, :], 1) + dEL * bpow
        lag = (ii - ss).to(tl.float32)
        dpow = tl.where((ss < ii) & (ii < c_len), lag * tl.exp(tl.where(ss < ii, (lag - 1.0) * lb, 0.0)), 0.0)
        rf = rc.to(tl.float32)
        dbeta = tl.sum(tl.sum(dBm * dpow, 1), 0) + tl.sum(tl.where(mc, dbpow * (rf + 1.0) * tl.exp(rf * lb), 0.0), 0)
        m_bl = (c_len - 1 - rc).to(tl.float32)
        dbeta += tl.sum(tl.where(rc < c_len - 1, dbl * m_bl * tl.exp(tl.where(rc < c_len - 1, (m_bl - 1.0) * lb, 0.0)), 0.0), 0)
        dbeta += dbC * c_len * tl.exp((c_len - 1) * lb)
        tl.store(DBETA + pbase, dbeta)
    else:
        dGp += dDp
        dgl += dDl
    t1 = dGp * Gp
    dlgp = tl.sum(t1, 1) + dgp * gp
    dlg = -tl.sum(t1, 0) - dgl * gl + dlgp
    dlgL = tl.sum(dgl * gl, 0) + dgL * gL
    dlg += tl.where(rc == c_len - 1, dlgL, 0.0)
    dla = tl.cumsum(dlg, 0, reverse=True) - dlgp
    tl.store(DLA + pbase * c_len + rc, dla, mask=mc)
