"""Whole-sequence Triton kernel of HOPE's self-modifying projection pass (one launch each way).

Contract: :func:`kernels.memory.sequence_torch.projection_sequence` (same arguments, same returns).
The four linear projection memories k, v, eta, alpha are stacked into ``P (N, R, d)``, R = 2d + 2
rows (d = d_h). Per chunk of ``c`` tokens ``u (c, d)`` with ``P`` the chunk-start state:

    Rm = u P^T                               (c, R): reads at the chunk-start state
    k = l2norm(Rm_k),  v = Rm_v,  eta = eta_max sig(Rm_eta + b_eta),  alpha = sig(Rm_alpha + b_alpha)
    vn = l2norm(v),    vhat = vn P^T         (c, R): self-generated targets of all four memories
    es = s eta (s = update_eta_scale);  cv = es (dgd);  rho = -es (running L2);  la = log alpha
    w = es vhat (dot loss, running L2)   or   w = -es (k P^T - vhat) (chunk-start L2)
    (P', S') = affine_rank1(P, S, k, cv, rho, w, la, beta_g)   per block of rows, beta_g = beta of its memory

``l2norm(x) = x rsqrt(|x|^2 + 1e-6)``. The affine update is :func:`triton_affine.fwd_chunk` (one call
per block of output rows: rows of a linear memory evolve independently given the keys, so each
block only needs the keys, the gates and its own columns of ``w``); its VJP is
:func:`triton_affine.bwd_chunk`.

Layout: one program per row n (grid ``(N,)``) carries the whole state through the chunk loop. The
glue needs every row of ``P`` at once (|Rm_k| over all k rows, ``vn`` feeds every target), so each
phase is a loop over (BO rows x BD columns) tiles of ``P`` with the intermediate per-chunk tensors in
small global workspaces ``(N, BC, R)`` / ``(N, BC, d)``, and ``tl.debug_barrier()`` between phases
(the next phase reads what other threads of the program wrote). Nothing larger than a
(BC x BO), (BC x BD) or (BO x BD) tile is ever held in registers, so d = 128 / 256 fit.

Forward, per chunk j: (1) Rm tiles -> workspace, row sums |Rm_k|^2, |Rm_v|^2 and the eta / alpha
columns -> gates; (2) k, v -> outputs; (3) vhat (and k P^T for chunk-start) -> ``w`` workspace;
(4) fwd_chunk for each row block: state j -> state j+1 in the buffer ``(N, T/C + 1, R, d)``
(plus momentum), which is also what the backward reads.

Backward (derivation). Cotangents of the outputs ``dk_o, dv_o, deta_o, dalpha_o`` and of the chunk
end state ``dP', dS'``. Per chunk, walking the chunks in reverse, after recomputing the forward
glue from the saved chunk-start state:

    bwd_chunk (per row block):  dP_aff, dS (cotangents of the chunk-start state through the
        update),  dw (c, R),  dk_aff = sum of its per-block partials,  dcv, drho, dla (summed)
    w = es X with X = vhat (dot/running) or X = vhat - k P^T (chunk-start):
        des = sum_r dw X + dcv - drho;   dvhat = es dw;   [chunk-start: d(kP^T) = -dvhat]
    vhat = vn P^T:          dvn = dvhat P;          dP += dvhat^T vn
    k P^T (chunk-start):    dk += -dvhat P = -dvn;  dP += -dvhat^T k
    dk = dk_o + dk_aff (+ the chunk-start term above)
    k = l2norm(Rm_k):       dRm_k = rk (dk - k <k, dk>),        rk = rsqrt(|Rm_k|^2 + eps)
    vn = l2norm(v):         dv = dv_o + rv (dvn - vn <vn, dvn>), rv = rsqrt(|v|^2 + eps)
    eta:                    dRm_eta = (deta_o + s des) eta_max sig_e (1 - sig_e);  db_eta += sum_i
    alpha = sig, la = log:  dRm_alpha = (dalpha_o + dla / alpha) alpha (1 - alpha); db_alpha += sum_i
    Rm = u P^T:             du = dRm P;             dP += dRm^T u
    dP_chunk_start = dP_aff + dRm^T u + dvhat^T (vn - [chunk-start] k)

(``l2norm``: y = x r with r = (|x|^2+eps)^(-1/2), dr/dx = -r^3 x, so dx = r (g - y <y, g>).)
The backward phases per chunk: recompute Rm / gates / k / vn / X / w into the workspaces; the
bwd_chunk calls (their dK, dcv, drho, dla, dbeta go to per-block partial buffers, dP_aff / dS into
the state-cotangent buffer at j); sum the partials and form des, dvhat; dvn and the total dk with
the row dots <k, dk>, <vn, dvn>; dRm; then du and the final dP at j (read-modify-write of the
tile bwd_chunk wrote). dbeta partials ``(blocks, N, T/C)`` are summed per memory by PyTorch.

Packed documents (``resets (N, n_chunks)`` bool, column 0 ignored): where ``resets[n, j]``, chunk j
of row n starts from the given ``P`` / ``S`` (zero momentum when ``S`` is None). Forward: before
chunk j the program copies slot 0 of the state (and momentum) buffer over slot j. Backward: once
chunk j's start-state cotangent is complete, the program adds it into a per-row accumulator
``(N, R, d)`` (added to slot 0 by PyTorch afterwards: the gradient of ``P`` / ``S``) and zeroes slot
j, so chunk j - 1 sees a zero end-state cotangent. One program per row: deterministic. ``RESETS``
is a constexpr, so the kernels without resets are unchanged. Equal to the PyTorch contract with the
same resets in the interpreter; RESETS variants (momentum on/off) compile for sm_90, no device run.

Memory: chunk-start states (and momenta) ``(N, T/C + 1, R, d)`` fp32 from the forward, the same
for their cotangents in the backward; workspaces O(N x BC x R) and O(blocks x N x BC x d).
Precision: fp32 state, momentum, gates and accumulation; ``u`` may be bf16 (upcast on load); dots
IEEE fp32 for fp32 inputs (TF32 if torch allows TF32 matmuls), TF32 with bf16 ``u``
(:func:`triton_impl._dot_precision`). Outputs fp32.

Status: equal to the PyTorch contract to ~1e-7..3e-6 (fp32) in the Triton interpreter for every
rule / loss / gradient point, momentum on and off; all 24 constexpr variants compile for sm_90
(Triton 3.9's ptxas, no device). HOPE preset (gd, l2, running, momentum), BC = 64, BO = BD = 32,
8 warps, TF32: 255 registers, 0.9 KiB (forward) / 3.6 KiB (backward) spill stack per thread;
BC = 16, 4 warps: 40 B / 0.8 KiB. No GPU run yet: speed and GPU numerics unmeasured.
Tuning levers for a GPU session: every row block recomputes the chunk's c x c matrices and the
triangular inverse (2 d / BO + 2 blocks per chunk: 10 at d_h = 128, 18 at 256), and the grid has
only N programs (rows = sequences x heads), each walking all T / C chunks serially.
"""
from __future__ import annotations

from collections import Counter

import torch
import triton
import triton.language as tl

from kernels.memory.spec import MemorySpec
from kernels.memory.triton_affine import bwd_chunk, fwd_chunk
from kernels.memory.triton_impl import _blocks, _dot_precision, _on_device
from kernels.memory.triton_sequence import _flush_rows, _restart_rows, reset_flags

EPS = 1e-6          # sequence_torch.l2norm
LAUNCHES = Counter()  # kernel launches of this module: "fwd", "bwd" (tests check one each)
LOSS_DOT, LOSS_RUNNING, LOSS_CHUNK_START = 0, 1, 2


# ----------------------------------------------------------------------------------------------
@triton.jit
def _block_info(b, nbk, d_dim, n_rows, HAS_MOM: tl.constexpr):
    """Row block ``b`` of the stacked memory -> (group g, first row, group rows, block in group).

    With momentum the groups are k (nbk blocks), v (nbk blocks), eta (1), alpha (1), so a block
    never straddles two momentum coefficients; without, one group of all 2d + 2 rows."""
    if HAS_MOM:
        g = tl.where(b < 2 * nbk, b // nbk, b - 2 * nbk + 2)
        row0 = tl.where(g < 2, g * d_dim, 2 * d_dim + g - 2)
        o_len = tl.where(g < 2, d_dim, 1)
        ob = tl.where(g < 2, b - g * nbk, 0)
    else:
        g = b * 0
        row0 = b * 0
        o_len = b * 0 + 2 * d_dim + 2
        ob = b
    return g, row0, o_len, ob


@triton.jit
def _glue_reads(P0, U, EB, AB, RW, CW, PW, LW, n, t0, c_len, d_dim, eta_max, eta_scale, s_un, s_ut,
                BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """Rm = u P^T (to the workspace RW), and the gates (learning rates and log alpha to CW, PW, LW).
    Returns rk, rv (the l2norm scales), sig(Rm_eta + b_eta) and alpha (BC vectors)."""
    R_dim = 2 * d_dim + 2
    rc = tl.arange(0, BC)
    rr = tl.arange(0, BO)
    rd = tl.arange(0, BD)
    mc = rc < c_len
    ssk = tl.zeros([BC], tl.float32)
    ssv = tl.zeros([BC], tl.float32)
    ze = tl.zeros([BC], tl.float32)
    za = tl.zeros([BC], tl.float32)
    for r0 in range(0, R_dim, BO):
        ro = r0 + rr
        mo = ro < R_dim
        acc = tl.zeros([BC, BO], tl.float32)
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            md = dd < d_dim
            ut = tl.load(U + n * s_un + (t0 + rc)[:, None] * s_ut + dd[None, :], mask=mc[:, None] & md[None, :],
                         other=0.0).to(tl.float32)
            pt = tl.load(P0 + ro[:, None] * d_dim + dd[None, :], mask=mo[:, None] & md[None, :], other=0.0)
            acc += tl.dot(ut, tl.trans(pt), input_precision=PREC)
        tl.store(RW + n * BC * R_dim + rc[:, None] * R_dim + ro[None, :], acc, mask=mc[:, None] & mo[None, :])
        sq = acc * acc
        ssk += tl.sum(tl.where(ro[None, :] < d_dim, sq, 0.0), 1)
        ssv += tl.sum(tl.where((ro[None, :] >= d_dim) & (ro[None, :] < 2 * d_dim), sq, 0.0), 1)
        ze += tl.sum(tl.where(ro[None, :] == 2 * d_dim, acc, 0.0), 1)
        za += tl.sum(tl.where(ro[None, :] == 2 * d_dim + 1, acc, 0.0), 1)
    rk = 1.0 / tl.sqrt(ssk + 1e-6)
    rv = 1.0 / tl.sqrt(ssv + 1e-6)
    se = tl.sigmoid(ze + tl.load(EB + n).to(tl.float32))
    alpha = tl.sigmoid(za + tl.load(AB + n).to(tl.float32))
    es = (eta_max * se) * eta_scale
    tl.store(CW + n * BC + rc, es, mask=mc)
    tl.store(PW + n * BC + rc, -es, mask=mc)
    tl.store(LW + n * BC + rc, tl.log(alpha), mask=mc)
    return rk, rv, se, alpha


@triton.jit
def _glue_kv(RW, KD, VD, rk, rv, n, c_len, d_dim, s_kn, s_kt,
             SCALE_V: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """k = rk Rm_k -> KD, and v = Rm_v (``SCALE_V``: vn = rv v) -> VD; row strides s_kn, s_kt."""
    R_dim = 2 * d_dim + 2
    rc = tl.arange(0, BC)
    rd = tl.arange(0, BD)
    mc = rc < c_len
    for d0 in range(0, d_dim, BD):
        dd = d0 + rd
        m2 = mc[:, None] & (dd < d_dim)[None, :]
        src = RW + n * BC * R_dim + rc[:, None] * R_dim + dd[None, :]
        dst = n * s_kn + rc[:, None] * s_kt + dd[None, :]
        tl.store(KD + dst, tl.load(src, mask=m2, other=0.0) * rk[:, None], mask=m2)
        vt = tl.load(src + d_dim, mask=m2, other=0.0)
        if SCALE_V:
            vt = vt * rv[:, None]
        tl.store(VD + dst, vt, mask=m2)


@triton.jit
def _glue_targets(P0, KD, VD, XW, WW, rv, es, n, c_len, d_dim, s_kn, s_kt,
                  SCALE_V: tl.constexpr, LOSS: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr,
                  BD: tl.constexpr, PREC: tl.constexpr):
    """X = vhat = vn P^T (chunk-start L2: X = vhat - k P^T) -> XW (if XW is used), w = es X -> WW."""
    R_dim = 2 * d_dim + 2
    rc = tl.arange(0, BC)
    rr = tl.arange(0, BO)
    rd = tl.arange(0, BD)
    mc = rc < c_len
    for r0 in range(0, R_dim, BO):
        ro = r0 + rr
        mo = ro < R_dim
        vh = tl.zeros([BC, BO], tl.float32)
        kp = tl.zeros([BC, BO], tl.float32)
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            md = dd < d_dim
            m2 = mc[:, None] & md[None, :]
            src = n * s_kn + rc[:, None] * s_kt + dd[None, :]
            vt = tl.load(VD + src, mask=m2, other=0.0)
            if SCALE_V:
                vt = vt * rv[:, None]
            pt = tl.load(P0 + ro[:, None] * d_dim + dd[None, :], mask=mo[:, None] & md[None, :], other=0.0)
            vh += tl.dot(vt, tl.trans(pt), input_precision=PREC)
            if LOSS == 2:
                kt = tl.load(KD + src, mask=m2, other=0.0)
                kp += tl.dot(kt, tl.trans(pt), input_precision=PREC)
        if LOSS == 2:
            x = vh - kp
        else:
            x = vh
        off = n * BC * R_dim + rc[:, None] * R_dim + ro[None, :]
        mw = mc[:, None] & mo[None, :]
        tl.store(XW + off, x, mask=mw)
        tl.store(WW + off, es[:, None] * x, mask=mw)


@triton.jit
def projection_fwd_kernel(
    STATES, MSTATES, U, BETA_T, EB, AB,
    KO, VO, EO, AO,
    RW, XW, WW, CW, PW, LW, RS,
    T_len, chunk, n_chunks, d_dim, n_rows, eta_max, eta_scale, s_un, s_ut,
    DGD: tl.constexpr, LOSS: tl.constexpr, HAS_MOM: tl.constexpr, RESETS: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # row offsets n * s_w can pass 2^31
    R_dim = 2 * d_dim + 2
    RD = R_dim * d_dim
    s_w = (n_chunks + 1) * RD
    nbk = (d_dim + BO - 1) // BO
    if HAS_MOM:
        nblk = 2 * nbk + 2
    else:
        nblk = (R_dim + BO - 1) // BO
    rc = tl.arange(0, BC)
    for j in range(0, n_chunks):
        t0 = j * chunk
        c_len = tl.minimum(chunk, T_len - t0)
        mc = rc < c_len
        if RESETS:  # RS (N, n_chunks) int8, column 0 zeroed by the host
            if tl.load(RS + n * n_chunks + j) != 0:
                _restart_rows(STATES + n * s_w, j, 0, R_dim, d_dim, RD, BO, BD)
                if HAS_MOM:
                    _restart_rows(MSTATES + n * s_w, j, 0, R_dim, d_dim, RD, BO, BD)
                tl.debug_barrier()  # the glue and fwd_chunk read the restarted state
        P0 = STATES + n * s_w + j * RD
        rk, rv, se, alpha = _glue_reads(P0, U, EB, AB, RW, CW, PW, LW, n, t0, c_len, d_dim, eta_max, eta_scale,
                                        s_un, s_ut, BC, BO, BD, PREC)
        eta = eta_max * se
        tl.store(EO + n * T_len + t0 + rc, eta, mask=mc)
        tl.store(AO + n * T_len + t0 + rc, alpha, mask=mc)
        tl.debug_barrier()
        _glue_kv(RW, KO + t0 * d_dim, VO + t0 * d_dim, rk, rv, n, c_len, d_dim, T_len * d_dim, d_dim,
                 False, BC, BD)
        tl.debug_barrier()
        _glue_targets(P0, KO + t0 * d_dim, VO + t0 * d_dim, XW, WW, rv, eta * eta_scale, n, c_len, d_dim,
                      T_len * d_dim, d_dim, True, LOSS, BC, BO, BD, PREC)
        tl.debug_barrier()
        for b in range(0, nblk):
            g, row0, o_len, ob = _block_info(b, nbk, d_dim, n_rows, HAS_MOM)
            fwd_chunk(STATES + j * RD + row0 * d_dim, MSTATES + j * RD + row0 * d_dim,
                      KO + t0 * d_dim, KO + t0 * d_dim, CW, PW, WW + row0, LW, BETA_T + g * n_rows,
                      WW, STATES + (j + 1) * RD + row0 * d_dim, MSTATES + (j + 1) * RD + row0 * d_dim,
                      n, ob, c_len, o_len, d_dim,
                      s_w, T_len * d_dim, d_dim, T_len * d_dim, d_dim, BC * R_dim, R_dim, 0, 0, BC, BC, BC,
                      DGD, LOSS == 1, HAS_MOM, False, BC, BO, BD, PREC)
        tl.debug_barrier()  # the next chunk reads the state written by every block


@triton.jit
def projection_bwd_kernel(
    STATES, MSTATES, U, BETA_T, EB, AB,
    DKO, DVO, DEO, DAO, DSTATES, DMSTATES,
    DU, DEB, DAB, DBETA,
    RW, KW, VW, XW, WW, CW, PW, LW,
    DWW, DKP, DCP, DRP, DLP, DVH, DRM, DKT, DVN, RS, DACC, DMACC,
    T_len, chunk, n_chunks, d_dim, n_rows, eta_max, eta_scale, s_un, s_ut,
    DGD: tl.constexpr, LOSS: tl.constexpr, HAS_MOM: tl.constexpr, RESETS: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # row offsets n * s_w can pass 2^31
    R_dim = 2 * d_dim + 2
    RD = R_dim * d_dim
    s_w = (n_chunks + 1) * RD
    nbk = (d_dim + BO - 1) // BO
    if HAS_MOM:
        nblk = 2 * nbk + 2
    else:
        nblk = (R_dim + BO - 1) // BO
    rc = tl.arange(0, BC)
    rr = tl.arange(0, BO)
    rd = tl.arange(0, BD)
    ws_r = n * BC * R_dim          # this row's (BC, R) workspaces
    ws_d = n * BC * d_dim          # this row's (BC, d) workspaces
    deb = tl.sum(tl.zeros([BC], tl.float32), 0)
    dab = tl.sum(tl.zeros([BC], tl.float32), 0)
    for jj in range(0, n_chunks):
        j = n_chunks - 1 - jj
        t0 = j * chunk
        c_len = tl.minimum(chunk, T_len - t0)
        mc = rc < c_len
        P0 = STATES + n * s_w + j * RD
        # -- recompute the glue of this chunk --------------------------------------------------
        rk, rv, se, alpha = _glue_reads(P0, U, EB, AB, RW, CW, PW, LW, n, t0, c_len, d_dim, eta_max, eta_scale,
                                        s_un, s_ut, BC, BO, BD, PREC)
        es = (eta_max * se) * eta_scale
        tl.debug_barrier()
        _glue_kv(RW, KW, VW, rk, rv, n, c_len, d_dim, BC * d_dim, d_dim, True, BC, BD)
        tl.debug_barrier()
        _glue_targets(P0, KW, VW, XW, WW, rv, es, n, c_len, d_dim, BC * d_dim, d_dim, False, LOSS,
                      BC, BO, BD, PREC)
        tl.debug_barrier()
        # -- VJP of the affine update, per row block ------------------------------------------------
        for b in range(0, nblk):
            g, row0, o_len, ob = _block_info(b, nbk, d_dim, n_rows, HAS_MOM)
            blk0 = b - ob
            bwd_chunk(STATES + j * RD + row0 * d_dim, MSTATES + j * RD + row0 * d_dim, KW, KW, CW, PW,
                      WW + row0, LW, BETA_T + g * n_rows, WW,
                      DSTATES + (j + 1) * RD + row0 * d_dim, DMSTATES + (j + 1) * RD + row0 * d_dim,
                      DSTATES + j * RD + row0 * d_dim, DMSTATES + j * RD + row0 * d_dim, DWW + row0,
                      DKP + blk0 * n_rows * BC * d_dim, DKP, DCP + blk0 * n_rows * BC, DRP + blk0 * n_rows * BC,
                      DLP + blk0 * n_rows * BC, DBETA + blk0 * n_rows * n_chunks + j,
                      n, ob, c_len, o_len, d_dim, n_rows, BC, n_chunks,
                      s_w, BC * d_dim, d_dim, BC * d_dim, d_dim, BC * R_dim, R_dim, 0, 0, BC, BC, BC,
                      DGD, LOSS == 1, HAS_MOM, False, BC, BO, BD, PREC)
        tl.debug_barrier()
        # -- glue VJP: gates, des, dvhat ----------------------------------------------------------
        dla = tl.zeros([BC], tl.float32)
        des = tl.zeros([BC], tl.float32)
        for b in range(0, nblk):
            pb = (b * n_rows + n) * BC + rc
            dla += tl.load(DLP + pb, mask=mc, other=0.0)
            if DGD:
                des += tl.load(DCP + pb, mask=mc, other=0.0)
            if LOSS == 1:
                des -= tl.load(DRP + pb, mask=mc, other=0.0)
        for r0 in range(0, R_dim, BO):
            ro = r0 + rr
            mw = mc[:, None] & (ro < R_dim)[None, :]
            off = ws_r + rc[:, None] * R_dim + ro[None, :]
            dwt = tl.load(DWW + off, mask=mw, other=0.0)
            des += tl.sum(dwt * tl.load(XW + off, mask=mw, other=0.0), 1)
            tl.store(DVH + off, es[:, None] * dwt, mask=mw)
        deta = tl.load(DEO + n * T_len + t0 + rc, mask=mc, other=0.0) + eta_scale * des
        dze = tl.where(mc, deta * eta_max * se * (1.0 - se), 0.0)
        dalpha = tl.load(DAO + n * T_len + t0 + rc, mask=mc, other=0.0) + dla / alpha
        dza = tl.where(mc, dalpha * alpha * (1.0 - alpha), 0.0)
        deb += tl.sum(dze, 0)
        dab += tl.sum(dza, 0)
        tl.store(DRM + ws_r + rc * R_dim + 2 * d_dim, dze, mask=mc)
        tl.store(DRM + ws_r + rc * R_dim + 2 * d_dim + 1, dza, mask=mc)
        tl.debug_barrier()
        # -- dvn = dvhat P, total dk, and the row dots of the two l2norms ---------------------------
        dotk = tl.zeros([BC], tl.float32)
        dotv = tl.zeros([BC], tl.float32)
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            md = dd < d_dim
            m2 = mc[:, None] & md[None, :]
            dvn = tl.zeros([BC, BD], tl.float32)
            for r0 in range(0, R_dim, BO):
                ro = r0 + rr
                mo = ro < R_dim
                dvh = tl.load(DVH + ws_r + rc[:, None] * R_dim + ro[None, :], mask=mc[:, None] & mo[None, :],
                              other=0.0)
                pt = tl.load(P0 + ro[:, None] * d_dim + dd[None, :], mask=mo[:, None] & md[None, :], other=0.0)
                dvn += tl.dot(dvh, pt, input_precision=PREC)
            doff = ws_d + rc[:, None] * d_dim + dd[None, :]
            dk = tl.load(DKO + n * T_len * d_dim + (t0 + rc)[:, None] * d_dim + dd[None, :], mask=m2, other=0.0)
            for b in range(0, nblk):
                dk += tl.load(DKP + (b * n_rows + n) * BC * d_dim + rc[:, None] * d_dim + dd[None, :], mask=m2,
                              other=0.0)
            if LOSS == 2:
                dk -= dvn
            dotk += tl.sum(dk * tl.load(KW + doff, mask=m2, other=0.0), 1)
            dotv += tl.sum(dvn * tl.load(VW + doff, mask=m2, other=0.0), 1)
            tl.store(DKT + doff, dk, mask=m2)
            tl.store(DVN + doff, dvn, mask=m2)
        tl.debug_barrier()
        # -- dRm for the k and v rows ----------------------------------------------------------------
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            m2 = mc[:, None] & (dd < d_dim)[None, :]
            doff = ws_d + rc[:, None] * d_dim + dd[None, :]
            kt = tl.load(KW + doff, mask=m2, other=0.0)
            dRk = rk[:, None] * (tl.load(DKT + doff, mask=m2, other=0.0) - kt * dotk[:, None])
            vt = tl.load(VW + doff, mask=m2, other=0.0)
            dv = tl.load(DVO + n * T_len * d_dim + (t0 + rc)[:, None] * d_dim + dd[None, :], mask=m2, other=0.0)
            dv += rv[:, None] * (tl.load(DVN + doff, mask=m2, other=0.0) - vt * dotv[:, None])
            roff = ws_r + rc[:, None] * R_dim + dd[None, :]
            tl.store(DRM + roff, dRk, mask=m2)
            tl.store(DRM + roff + d_dim, dv, mask=m2)
        tl.debug_barrier()
        # -- du = dRm P;  dP_j = dP_aff + dRm^T u + dvhat^T (vn - [chunk-start] k) -------------------
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            md = dd < d_dim
            acc = tl.zeros([BC, BD], tl.float32)
            for r0 in range(0, R_dim, BO):
                ro = r0 + rr
                mo = ro < R_dim
                drm = tl.load(DRM + ws_r + rc[:, None] * R_dim + ro[None, :], mask=mc[:, None] & mo[None, :],
                              other=0.0)
                pt = tl.load(P0 + ro[:, None] * d_dim + dd[None, :], mask=mo[:, None] & md[None, :], other=0.0)
                acc += tl.dot(drm, pt, input_precision=PREC)
            tl.store(DU + n * T_len * d_dim + (t0 + rc)[:, None] * d_dim + dd[None, :], acc,
                     mask=mc[:, None] & md[None, :])
        for r0 in range(0, R_dim, BO):
            ro = r0 + rr
            mo = ro < R_dim
            mw = mc[:, None] & mo[None, :]
            drm = tl.load(DRM + ws_r + rc[:, None] * R_dim + ro[None, :], mask=mw, other=0.0)
            dvh = tl.load(DVH + ws_r + rc[:, None] * R_dim + ro[None, :], mask=mw, other=0.0)
            for d0 in range(0, d_dim, BD):
                dd = d0 + rd
                md = dd < d_dim
                m2 = mc[:, None] & md[None, :]
                ut = tl.load(U + n * s_un + (t0 + rc)[:, None] * s_ut + dd[None, :], mask=m2, other=0.0).to(tl.float32)
                z = tl.load(VW + ws_d + rc[:, None] * d_dim + dd[None, :], mask=m2, other=0.0)
                if LOSS == 2:
                    z -= tl.load(KW + ws_d + rc[:, None] * d_dim + dd[None, :], mask=m2, other=0.0)
                poff = DSTATES + n * s_w + j * RD + ro[:, None] * d_dim + dd[None, :]
                pm = mo[:, None] & md[None, :]
                dp = tl.load(poff, mask=pm, other=0.0)
                dp += tl.dot(tl.trans(drm), ut, input_precision=PREC)
                dp += tl.dot(tl.trans(dvh), z, input_precision=PREC)
                tl.store(poff, dp, mask=pm)
        tl.debug_barrier()  # the previous chunk reads this chunk's start-state cotangent
        if RESETS:
            if tl.load(RS + n * n_chunks + j) != 0:
                _flush_rows(DSTATES + n * s_w, DACC + n * RD, j, 0, R_dim, d_dim, RD, BO, BD)
                if HAS_MOM:
                    _flush_rows(DMSTATES + n * s_w, DMACC + n * RD, j, 0, R_dim, d_dim, RD, BO, BD)
                tl.debug_barrier()  # chunk j - 1 reads the zeroed end-state cotangent
    tl.store(DEB + n, deb)
    tl.store(DAB + n, dab)


# ----------------------------------------------------------------------------------------------
def _launch(name, kernel, grid, *args, **kw):
    LAUNCHES[name] += 1
    kernel[grid](*args, **kw)


class ProjectionSequence(torch.autograd.Function):
    """``(k, v, eta, alpha, P_T, S_T)`` of the projection pass (``S_T`` empty without momentum)."""

    @staticmethod
    def forward(ctx, P, S, u, beta, eta_bias, alpha_bias, eta_max, chunk, eta_scale, dgd, loss_mode, rs=None):
        N, R, d = P.shape
        T = u.shape[1]
        n_chunks = triton.cdiv(T, chunk)
        bc, bo, bd, warps = _blocks(chunk, d, d)
        has_mom = beta is not None
        f32 = dict(device=P.device, dtype=torch.float32)
        u = u.contiguous()
        states = torch.empty(N, n_chunks + 1, R, d, **f32)
        states[:, 0] = P
        mstates = torch.empty(N, n_chunks + 1, R, d, **f32) if has_mom else states
        if has_mom:
            mstates[:, 0] = S if S is not None else 0.0
            beta_t = beta.float().t().contiguous()             # (4, N): memory g at g * N
        else:
            beta_t = states
        eb, ab = eta_bias.float().contiguous(), alpha_bias.float().contiguous()
        k = torch.empty(N, T, d, **f32)
        v = torch.empty(N, T, d, **f32)
        eta = torch.empty(N, T, **f32)
        alpha = torch.empty(N, T, **f32)
        ws = torch.empty(3, N, bc, R, **f32)
        gates = torch.empty(3, N, bc, **f32)
        prec = _dot_precision(P, S, u)
        with _on_device(u):
            _launch("fwd", projection_fwd_kernel, (N,),
                    states, mstates, u, beta_t, eb, ab, k, v, eta, alpha,
                    ws[0], ws[1], ws[2], gates[0], gates[1], gates[2], rs if rs is not None else eb,
                    T, chunk, n_chunks, d, N, float(eta_max), float(eta_scale), u.stride(0), u.stride(1),
                    DGD=dgd, LOSS=loss_mode, HAS_MOM=has_mom, RESETS=rs is not None, BC=bc, BO=bo, BD=bd,
                    PREC=prec, num_warps=warps, num_stages=1)
        ctx.save_for_backward(states, mstates if has_mom else None, u, beta_t if has_mom else None, eb, ab, rs)
        ctx.meta = (chunk, bc, bo, bd, warps, prec, float(eta_max), float(eta_scale), dgd, loss_mode, has_mom,
                    P.dtype, S.dtype if S is not None else None, u.dtype,
                    beta.dtype if has_mom else None, eta_bias.dtype, alpha_bias.dtype)
        P_T = states[:, -1].clone()
        S_T = mstates[:, -1].clone() if has_mom else torch.empty(0, **f32)
        return k, v, eta, alpha, P_T, S_T

    @staticmethod
    def backward(ctx, dk, dv, deta, dalpha, dPT, dST):
        states, mstates, u, beta_t, eb, ab, rs = ctx.saved_tensors
        (chunk, bc, bo, bd, warps, prec, eta_max, eta_scale, dgd, loss_mode, has_mom,
         p_dtype, s_dtype, u_dtype, beta_dtype, eb_dtype, ab_dtype) = ctx.meta
        N, n_states, R, d = states.shape
        n_chunks, T = n_states - 1, u.shape[1]
        f32 = dict(device=states.device, dtype=torch.float32)

        def cot(x, *shape):
            return x.float().contiguous() if x is not None else torch.zeros(*shape, **f32)
        dk, dv = cot(dk, N, T, d), cot(dv, N, T, d)
        deta, dalpha = cot(deta, N, T), cot(dalpha, N, T)
        dstates = torch.empty_like(states)
        dstates[:, -1] = dPT if dPT is not None else 0.0
        dmstates = torch.empty_like(states) if has_mom else dstates
        if has_mom:
            dmstates[:, -1] = dST if dST is not None else 0.0
        nbk = triton.cdiv(d, bo)
        nblk = 2 * nbk + 2 if has_mom else triton.cdiv(R, bo)
        du = torch.empty(N, T, d, **f32)
        deb = torch.empty(N, **f32)
        dab = torch.empty(N, **f32)
        dbeta = torch.empty(nblk, N, n_chunks, **f32) if has_mom else deb
        wr = torch.empty(7, N, bc, R, **f32)       # RW XW WW DWW DVH DRM (+1 spare)
        wd = torch.empty(4, N, bc, d, **f32)       # KW VW DKT DVN
        gates = torch.empty(3, N, bc, **f32)       # CW PW LW
        parts_k = torch.empty(nblk, N, bc, d, **f32)
        parts = torch.empty(3, nblk, N, bc, **f32)  # dcv drho dla partials
        dacc = torch.zeros(N, R, d, **f32) if rs is not None else deb            # reset chunks' dP
        dmacc = torch.zeros(N, R, d, **f32) if (rs is not None and has_mom) else dacc
        with _on_device(u):
            _launch("bwd", projection_bwd_kernel, (N,),
                    states, mstates if has_mom else states, u, beta_t if has_mom else states, eb, ab,
                    dk, dv, deta, dalpha, dstates, dmstates, du, deb, dab, dbeta,
                    wr[0], wd[0], wd[1], wr[1], wr[2], gates[0], gates[1], gates[2],
                    wr[3], parts_k, parts[0], parts[1], parts[2], wr[4], wr[5], wd[2], wd[3],
                    rs if rs is not None else eb, dacc, dmacc,
                    T, chunk, n_chunks, d, N, eta_max, eta_scale, u.stride(0), u.stride(1),
                    DGD=dgd, LOSS=loss_mode, HAS_MOM=has_mom, RESETS=rs is not None, BC=bc, BO=bo, BD=bd,
                    PREC=prec, num_warps=warps, num_stages=1)
        ng = ctx.needs_input_grad
        dP0, dS0 = dstates[:, 0], dmstates[:, 0]
        if rs is not None:
            dP0 = dP0 + dacc
            if has_mom:
                dS0 = dS0 + dmacc
        dP = dP0.to(p_dtype) if ng[0] else None
        dS = dS0.to(s_dtype) if (ng[1] and has_mom and s_dtype is not None) else None
        dbeta_out = None
        if has_mom and ng[3]:
            per_block = dbeta.sum(2)                                   # (blocks, N)
            dbeta_out = torch.stack([per_block[:nbk].sum(0), per_block[nbk:2 * nbk].sum(0),
                                     per_block[2 * nbk], per_block[2 * nbk + 1]], 1).to(beta_dtype)
        return (dP, dS, du.to(u_dtype) if ng[2] else None, dbeta_out,
                deb.to(eb_dtype) if ng[4] else None, dab.to(ab_dtype) if ng[5] else None,
                None, None, None, None, None, None)


def projection_sequence(spec: MemorySpec, P, S, u, beta, eta_bias, alpha_bias, eta_max: float, chunk: int,
                        update_eta_scale: float = 1.0, resets=None):
    """Same contract as :func:`kernels.memory.sequence_torch.projection_sequence`, one Triton launch
    forward and one backward: ``((k, v, eta, alpha), P_T, S_T or None)``, all fp32.

    ``P, S: (N, 2 d_h + 2, d_h)`` (``S`` None without momentum); ``u: (N, T, d_h)`` (fp32 or bf16);
    ``beta: (N, 4)`` (k, v, eta, alpha memories) or None; ``eta_bias, alpha_bias: (N,)``. As in the
    PyTorch contract, momentum is on exactly when ``beta`` is given (``S`` None then means zero
    momentum). Chunk length <= 64; the last chunk may be short. Gradients for P, S, u, beta and the
    biases; autocast is off inside. ``resets (N, n_chunks)`` bool or None: chunk j of a row restarts
    from ``P`` / ``S`` where true (packed documents; column 0 ignored), as in the PyTorch contract."""
    if spec.kind != "linear":
        raise ValueError("projection_sequence stacks linear projection memories; "
                         f"got kind={spec.kind} (use the per-memory chunk loop)")
    d = u.shape[-1]
    if P.shape[-2:] != (2 * d + 2, d):
        raise ValueError(f"P must be (N, 2 d_h + 2, d_h) = (N, {2 * d + 2}, {d}); got {tuple(P.shape)}")
    _blocks(chunk, 1, 1)                                # validates chunk <= MAX_CHUNK
    loss_mode = LOSS_DOT if spec.loss == "dot" else (LOSS_RUNNING if spec.grad_at == "running" else LOSS_CHUNK_START)
    rs = reset_flags(resets, u.shape[0], triton.cdiv(u.shape[1], chunk), u.device)
    with torch.autocast(u.device.type, enabled=False):
        P32 = P.float()
        S32 = S.float() if (S is not None and beta is not None) else None
        k, v, eta, alpha, P_T, S_T = ProjectionSequence.apply(
            P32, S32, u, beta, eta_bias, alpha_bias, eta_max, chunk, update_eta_scale, spec.rule == "dgd",
            loss_mode, rs)
    return (k, v, eta, alpha), P_T, (S_T if beta is not None else None)
