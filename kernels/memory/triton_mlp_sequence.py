"""Whole-sequence Triton kernel of an MLP fast-weight memory: the chunk loop inside the kernel.

Contract: :func:`mlp_memory_sequence` returns what
:func:`kernels.memory.sequence_torch.memory_sequence` returns for ``spec.kind == "mlp"`` (the
``chunk_torch.memory_chunk`` MLP branch applied chunk after chunk), in **one launch forward and one
launch backward** whatever T, plus a constant number of PyTorch allocations/copies/sums.

Algorithm, per row and chunk (K, Q the chunk's keys/queries, W1 ``(d_out, h)``, W2 ``(h, d_in)``
the chunk-start state, every gradient taken there):

    a = K W2^T,  hK = silu(a)
    target = vhat                       or  silu(vn W2^T) W1^T (+ vn)   vn = l2norm(v)  (self_targets)
    r = hK W1^T (+ K) - target   (l2)   or  -target                      (dot)
    g2 = (r W1) * silu'(a)
    W2: affine rank-1 recurrence, key K, query Q, write -eta g2, dgd coefficient eta (rule dgd)
        -> W2 reads hq (c x h), W2_new, S2_new
    W1: affine rank-1 recurrence, key hK, query silu(hq), write -eta r
        -> reads (c x d_out) (+ q), W1_new, S1_new

(``+ K``, ``+ vn``, ``+ q``: the residual, when ``spec.residual`` and ``d_in == d_out``.) The two
affine recurrences are the chunk bodies of :mod:`kernels.memory.triton_affine` (``fwd_chunk`` /
``bwd_chunk``, hand-derived VJP in docs/KERNELS.md), called here for each block of output columns
in turn; the prep above and its VJP are written out in this file.

Grid: ``(N,)``, one program per row owning the whole state of that row for the whole sequence,
because the chunk-start prep couples everything (``hK`` needs all of W2's columns for each hidden
unit, ``r`` needs all of W1). Nothing is held whole in registers: every matrix is walked in tiles
(chunk x BO / BD / BH and BO x BH / BH x BD state tiles, BO, BD, BH <= 32) through global memory:
the state buffers and a per-row workspace of chunk-sized intermediates (a, hK, r, g2 write terms,
the W2 reads, ...), with ``tl.debug_barrier()`` between phases that read what other threads of the
program wrote (the same pattern as :mod:`kernels.memory.triton_sequence`).

Saved for the backward (memory): every chunk-start state ``(T/C + 1, N, ., .)`` fp32 for W1, W2
(and S1, S2 with momentum), i.e. O(T/C x state), plus the inputs. The backward walks the chunks in
reverse; in each it recomputes the prep and the W2 forward (for the reads that feed W1's query)
from the saved chunk-start state, then runs W1's VJP, the silu between, W2's VJP and the prep's
VJP. State cotangents live in two ping-pong slots ``(2, N, ., .)``. Transient: per-column-block
partials of dK/dQ (``(blocks, N, C, max(h, d_in))``, summed inside the kernel), chunk-sized
workspaces, and the per-token gradients (fp32, cast to the inputs' dtypes at the end).

Packed documents (``resets (N, n_chunks)``, constexpr RESETS; the default None path compiles
without any of it): at a reset chunk j >= 1 the forward overwrites the row's chunk-start slot j
with slot 0 (the initial state and momentum) before the chunk's prep; the backward, once chunk j's
VJP is done, adds the row's chunk-start cotangents to per-row accumulators ``(N, ., .)`` of the
initial state/momentum (gradient = slot 0 + accumulator) and zeroes them, so chunk j-1's end state
receives none. Per row inside its program: deterministic, no atomics.

Precision: states, momenta, decay, workspaces and every accumulation fp32; k, q, vhat may be bf16
(cast to fp32 right after loading). Dots: IEEE fp32 for fp32 inputs (TF32 when torch allows TF32
matmuls), TF32 for bf16 inputs (:func:`kernels.memory.triton_impl._dot_precision`). Returns fp32.

Status: equal to sequence_torch in the Triton interpreter (fp32 errors 4e-8 .. 6e-7, every
gradient); compiles for sm_90 (``triton.compile``, no device) on triton 3.9 and 3.6: at chunk 64,
32-wide tiles, 8 warps, tf32 dots: forward 255 registers + 2.2 KiB spill stack, 80 KiB shared;
backward 255 + 5.6 KiB, 108 KiB shared (IEEE fp32 backward: 120 KiB shared). No GPU run yet: speed
unmeasured. One CTA per row means only N programs in flight (N = batch x heads); the backward
recomputes the W2 forward of each chunk (about a third more work than storing its reads).

Limits: chunk <= 64 (``triton_impl.MAX_CHUNK``); any widths (masked tiles; tl.dot tiles >= 16);
``self_targets`` needs ``d_in == d_out``. Offsets inside the kernel are int32: each state buffer
``(T/C + 1) * N * d_out * h`` and token tensor must stay below 2^31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.memory.spec import MemorySpec
from kernels.memory.triton_affine import bwd_chunk, fwd_chunk
from kernels.memory.triton_impl import MAX_CHUNK, TILE_CAP, _dot_precision, _lastdim_contig, _on_device

# workspace slots: (slots, N, C, h) and (slots, N, C, d_out)
_H_SLOTS_FWD, _H_SLOTS_BWD = 7, 14
_O_SLOTS_FWD, _O_SLOTS_BWD = 2, 5


# ------------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _silu(x):
    return x * _sigmoid(x)


@triton.jit
def _silu_d1(x):
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def _silu_d2(x):
    s = _sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


@triton.jit
def _ld(P, rows, mr, cols, mcol, s_r):
    """fp32 tile ``P[rows, cols]`` (row stride ``s_r``, unit column stride), zeros outside the masks."""
    return tl.load(P + rows[:, None] * s_r + cols[None, :], mask=mr[:, None] & mcol[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _st(P, x, rows, mr, cols, mcol, s_r):
    tl.store(P + rows[:, None] * s_r + cols[None, :], x, mask=mr[:, None] & mcol[None, :])


@triton.jit
def _inv_norm(Vp, s_vt, rc, mc, d_out, BC: tl.constexpr, BO: tl.constexpr):
    """``1 / sqrt(||v_i||^2 + 1e-6)`` per token (sequence_torch.l2norm)."""
    ss = tl.zeros([BC], tl.float32)
    for o0 in range(0, d_out, BO):
        oo = o0 + tl.arange(0, BO)
        vt = _ld(Vp, rc, mc, oo, oo < d_out, s_vt)
        ss += tl.sum(vt * vt, 1)
    return 1.0 / tl.sqrt(ss + 1e-6)


@triton.jit
def _prep(W1p, W2p, Kp, Vp, s_kt, s_vt, eta, rn, WHn, WOn, sh, so, c_len, d_in, d_out, h_dim,
          SAVE_AV: tl.constexpr, SELF: tl.constexpr, L2: tl.constexpr, RES: tl.constexpr,
          BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr):
    """Chunk-start prep of one row into its workspace (pointers at this row, tokens at t0).

    h-slots: 0 a, 1 hK = silu(a), 2 hv = silu(vn W2^T), 3 rW1 = r W1, 4 w2 = -eta g2, 7 av = vn W2^T;
    o-slots: 0 r, 1 w1 = -eta r. Ends with a barrier."""
    rc = tl.arange(0, BC)
    mc = rc < c_len
    # a = K W2^T (and av = vn W2^T) -------------------------------------------------------------
    for h0 in range(0, h_dim, BH):
        hh = h0 + tl.arange(0, BH)
        mh = hh < h_dim
        acc = tl.zeros([BC, BH], tl.float32)
        accv = tl.zeros([BC, BH], tl.float32)
        for d0 in range(0, d_in, BD):
            dd = d0 + tl.arange(0, BD)
            md = dd < d_in
            w2t = _ld(W2p, hh, mh, dd, md, d_in)                                   # (BH, BD)
            acc += tl.dot(_ld(Kp, rc, mc, dd, md, s_kt), tl.trans(w2t), input_precision=PREC)
            if SELF:
                vt = _ld(Vp, rc, mc, dd, md, s_vt) * rn[:, None]
                accv += tl.dot(vt, tl.trans(w2t), input_precision=PREC)
        _st(WHn, acc, rc, mc, hh, mh, h_dim)
        _st(WHn + sh, _silu(acc), rc, mc, hh, mh, h_dim)
        if SELF:
            _st(WHn + 2 * sh, _silu(accv), rc, mc, hh, mh, h_dim)
            if SAVE_AV:
                _st(WHn + 7 * sh, accv, rc, mc, hh, mh, h_dim)
    tl.debug_barrier()
    # r = M_ref(K) - target  (or -target) -------------------------------------------------------
    for o0 in range(0, d_out, BO):
        oo = o0 + tl.arange(0, BO)
        mo = oo < d_out
        pred = tl.zeros([BC, BO], tl.float32)
        tgt = tl.zeros([BC, BO], tl.float32)
        if L2 or SELF:
            for h0 in range(0, h_dim, BH):
                hh = h0 + tl.arange(0, BH)
                mh = hh < h_dim
                w1t = _ld(W1p, oo, mo, hh, mh, h_dim)                               # (BO, BH)
                if L2:
                    pred += tl.dot(_ld(WHn + sh, rc, mc, hh, mh, h_dim), tl.trans(w1t), input_precision=PREC)
                if SELF:
                    tgt += tl.dot(_ld(WHn + 2 * sh, rc, mc, hh, mh, h_dim), tl.trans(w1t),
                                  input_precision=PREC)
        if SELF:
            if RES:
                tgt += _ld(Vp, rc, mc, oo, mo, s_vt) * rn[:, None]
        else:
            tgt = _ld(Vp, rc, mc, oo, mo, s_vt)
        if L2:
            if RES:
                pred += _ld(Kp, rc, mc, oo, mo, s_kt)
            r = pred - tgt
        else:
            r = -tgt
        _st(WOn, r, rc, mc, oo, mo, d_out)
        _st(WOn + so, -eta[:, None] * r, rc, mc, oo, mo, d_out)
    tl.debug_barrier()
    # g2 = (r W1) * silu'(a) ---------------------------------------------------------------------
    for h0 in range(0, h_dim, BH):
        hh = h0 + tl.arange(0, BH)
        mh = hh < h_dim
        rw = tl.zeros([BC, BH], tl.float32)
        for o0 in range(0, d_out, BO):
            oo = o0 + tl.arange(0, BO)
            mo = oo < d_out
            rw += tl.dot(_ld(WOn, rc, mc, oo, mo, d_out), _ld(W1p, oo, mo, hh, mh, h_dim), input_precision=PREC)
        g2 = rw * _silu_d1(_ld(WHn, rc, mc, hh, mh, h_dim))
        _st(WHn + 3 * sh, rw, rc, mc, hh, mh, h_dim)
        _st(WHn + 4 * sh, -eta[:, None] * g2, rc, mc, hh, mh, h_dim)
    tl.debug_barrier()


@triton.jit
def _silu_q(WHn, sh, c_len, h_dim, BC: tl.constexpr, BH: tl.constexpr):
    """h-slot 6 = silu(h-slot 5): W1's queries from W2's reads. Ends with a barrier."""
    rc = tl.arange(0, BC)
    mc = rc < c_len
    for h0 in range(0, h_dim, BH):
        hh = h0 + tl.arange(0, BH)
        mh = hh < h_dim
        _st(WHn + 6 * sh, _silu(_ld(WHn + 5 * sh, rc, mc, hh, mh, h_dim)), rc, mc, hh, mh, h_dim)
    tl.debug_barrier()


@triton.jit
def _copy_mat(SRC, DST, rows, cols, BR: tl.constexpr, BK: tl.constexpr):
    """``DST = SRC`` for one row's ``(rows, cols)`` matrix (contiguous), walked in tiles."""
    for r0 in range(0, rows, BR):
        rr = r0 + tl.arange(0, BR)
        mr = rr < rows
        for c0 in range(0, cols, BK):
            cc = c0 + tl.arange(0, BK)
            mk = cc < cols
            _st(DST, _ld(SRC, rr, mr, cc, mk, cols), rr, mr, cc, mk, cols)


@triton.jit
def _drain_mat(SRC, ACC, rows, cols, BR: tl.constexpr, BK: tl.constexpr):
    """``ACC += SRC; SRC = 0`` for one row's ``(rows, cols)`` matrix (contiguous)."""
    for r0 in range(0, rows, BR):
        rr = r0 + tl.arange(0, BR)
        mr = rr < rows
        for c0 in range(0, cols, BK):
            cc = c0 + tl.arange(0, BK)
            mk = cc < cols
            x = _ld(SRC, rr, mr, cc, mk, cols)
            _st(ACC, _ld(ACC, rr, mr, cc, mk, cols) + x, rr, mr, cc, mk, cols)
            _st(SRC, x * 0.0, rr, mr, cc, mk, cols)


# ------------------------------------------------------------------------------------------------
@triton.jit
def mlp_seq_fwd_kernel(
    ST1, ST2, MS1, MS2, K, Q, V, ETA, LA, BETA, READS, WH, WO, RS,
    T_len, chunk, n_chunks, n_rows, d_in, d_out, h_dim, n_ob1, n_ob2,
    s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_en, s_la,
    DGD: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr, SELF: tl.constexpr,
    L2: tl.constexpr, RES: tl.constexpr, RESETS: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(N,)``. ST1/MS1 ``(n_chunks+1, N, d_out, h)``, ST2/MS2 ``(n_chunks+1, N, h, d_in)``
    (slot 0 holds the initial state); READS ``(N, T, d_out)``; WH/WO the workspaces; RS
    ``(N, n_chunks)`` int32 reset flags (column 0 zero; read only when RESETS): at a reset chunk the
    row's chunk-start slot is overwritten with slot 0 (the initial state and momentum)."""
    n = tl.program_id(0)
    rc = tl.arange(0, BC)
    s1 = d_out * h_dim
    s2 = h_dim * d_in
    sh = n_rows * chunk * h_dim
    so = n_rows * chunk * d_out
    WHn = WH + n * chunk * h_dim
    WOn = WO + n * chunk * d_out
    for j in range(0, n_chunks):
        t0 = j * chunk
        c_len = tl.minimum(chunk, T_len - t0)
        mc = rc < c_len
        st1 = ST1 + j * n_rows * s1
        st2 = ST2 + j * n_rows * s2
        ms1 = MS1 + j * n_rows * s1
        ms2 = MS2 + j * n_rows * s2
        if RESETS:   # a document starts here: this row restarts from its initial state / momentum
            if tl.load(RS + n * n_chunks + j) != 0:
                _copy_mat(ST1 + n * s1, st1 + n * s1, d_out, h_dim, BO, BH)
                _copy_mat(ST2 + n * s2, st2 + n * s2, h_dim, d_in, BH, BD)
                if HAS_MOM:
                    _copy_mat(MS1 + n * s1, ms1 + n * s1, d_out, h_dim, BO, BH)
                    _copy_mat(MS2 + n * s2, ms2 + n * s2, h_dim, d_in, BH, BD)
            tl.debug_barrier()
        Kp = K + n * s_kn + t0 * s_kt
        Vp = V + n * s_vn + t0 * s_vt
        eta = tl.load(ETA + n * s_en + t0 + rc, mask=mc, other=0.0).to(tl.float32)
        if SELF:
            rn = _inv_norm(Vp, s_vt, rc, mc, d_out, BC, BO)
        else:
            rn = eta * 0.0
        _prep(st1 + n * s1, st2 + n * s2, Kp, Vp, s_kt, s_vt, eta, rn, WHn, WOn, sh, so, c_len,
              d_in, d_out, h_dim, False, SELF, L2, RES, BC, BO, BD, BH, PREC)
        # W2: key k, query q, write -eta g2 (h-slot 4), reads -> h-slot 5
        for ob in range(0, n_ob2):
            fwd_chunk(st2, ms2, K + t0 * s_kt, Q + t0 * s_qt, ETA + t0, ETA + t0, WH + 4 * sh, LA + t0, BETA,
                      WH + 5 * sh, st2 + n_rows * s2, ms2 + n_rows * s2,
                      n, ob, c_len, h_dim, d_in,
                      s2, s_kn, s_kt, s_qn, s_qt, chunk * h_dim, h_dim, chunk * h_dim, h_dim, s_en, s_en, s_la,
                      DGD, False, HAS_MOM, HAS_Q, BC, BH, BD, PREC)
        tl.debug_barrier()
        if HAS_Q:
            _silu_q(WHn, sh, c_len, h_dim, BC, BH)
        # W1: key hK (h-slot 1), query silu(W2 reads) (h-slot 6), write -eta r (o-slot 1)
        for ob in range(0, n_ob1):
            fwd_chunk(st1, ms1, WH + sh, WH + 6 * sh, ETA + t0, ETA + t0, WO + so, LA + t0, BETA,
                      READS + t0 * d_out, st1 + n_rows * s1, ms1 + n_rows * s1,
                      n, ob, c_len, d_out, h_dim,
                      s1, chunk * h_dim, h_dim, chunk * h_dim, h_dim, chunk * d_out, d_out, T_len * d_out, d_out,
                      s_en, s_en, s_la,
                      False, False, HAS_MOM, HAS_Q, BC, BO, BH, PREC)
        tl.debug_barrier()
        if HAS_Q:
            if RES:
                Rp = READS + (n * T_len + t0) * d_out
                for o0 in range(0, d_out, BO):
                    oo = o0 + tl.arange(0, BO)
                    mo = oo < d_out
                    x = _ld(Rp, rc, mc, oo, mo, d_out) + _ld(Q + n * s_qn + t0 * s_qt, rc, mc, oo, mo, s_qt)
                    _st(Rp, x, rc, mc, oo, mo, d_out)
                tl.debug_barrier()


@triton.jit
def mlp_seq_bwd_kernel(
    ST1, ST2, MS1, MS2, K, Q, V, ETA, LA, BETA, DREADS,
    DST1, DST2, DMS1, DMS2, SCR2, SCRM2, WH, WO, PK, PQ, PC, PL, PB,
    DK, DQ, DV, DETA, DLA, DBETA, RS, DA1, DA2, DAM1, DAM2,
    T_len, chunk, n_chunks, n_rows, d_in, d_out, h_dim, n_ob1, n_ob2,
    s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_en, s_la,
    DGD: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr, SELF: tl.constexpr,
    L2: tl.constexpr, RES: tl.constexpr, RESETS: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(N,)``; chunks in reverse. DST*/DMS* ``(2, N, ., .)`` ping-pong state cotangents (slot
    ``n_chunks % 2`` holds the final states' cotangents on entry, slot 0 the initial ones on exit);
    SCR2/SCRM2 ``(N, h, d_in)`` scratch for the recomputed W2 forward; PK/PQ ``(blocks, N, C, .)``,
    PC/PL ``(blocks, N, C)``, PB ``(blocks, N)`` per-column-block partials; DK, DQ ``(N, T, d_in)``,
    DV ``(N, T, d_out)``, DETA, DLA ``(N, T)``, DBETA ``(N, n_chunks)`` fp32 outputs. With RESETS:
    RS as in the forward; at a reset chunk the row's chunk-start cotangents move (added) into
    DA1, DA2 ``(N, ., .)`` (DAM1, DAM2 for the momenta; zeros on entry) and are zeroed, so the
    previous chunk's end state gets none; the initial state's gradient is slot 0 + DA."""
    n = tl.program_id(0)
    rc = tl.arange(0, BC)
    s1 = d_out * h_dim
    s2 = h_dim * d_in
    sh = n_rows * chunk * h_dim
    so = n_rows * chunk * d_out
    WHn = WH + n * chunk * h_dim
    WOn = WO + n * chunk * d_out
    for jj in range(0, n_chunks):
        j = n_chunks - 1 - jj
        t0 = j * chunk
        c_len = tl.minimum(chunk, T_len - t0)
        mc = rc < c_len
        st1 = ST1 + j * n_rows * s1
        st2 = ST2 + j * n_rows * s2
        ms1 = MS1 + j * n_rows * s1
        ms2 = MS2 + j * n_rows * s2
        e_slot = (j + 1) % 2
        s_slot = j % 2
        W1p = st1 + n * s1
        W2p = st2 + n * s2
        Kp = K + n * s_kn + t0 * s_kt
        Vp = V + n * s_vn + t0 * s_vt
        DRp = DREADS + (n * T_len + t0) * d_out
        eta = tl.load(ETA + n * s_en + t0 + rc, mask=mc, other=0.0).to(tl.float32)
        if SELF:
            rn = _inv_norm(Vp, s_vt, rc, mc, d_out, BC, BO)
        else:
            rn = eta * 0.0
        # -- recompute the chunk's forward up to W1's inputs --------------------------------------
        _prep(W1p, W2p, Kp, Vp, s_kt, s_vt, eta, rn, WHn, WOn, sh, so, c_len,
              d_in, d_out, h_dim, True, SELF, L2, RES, BC, BO, BD, BH, PREC)
        if HAS_Q:
            for ob in range(0, n_ob2):
                fwd_chunk(st2, ms2, K + t0 * s_kt, Q + t0 * s_qt, ETA + t0, ETA + t0, WH + 4 * sh, LA + t0, BETA,
                          WH + 5 * sh, SCR2, SCRM2,
                          n, ob, c_len, h_dim, d_in,
                          s2, s_kn, s_kt, s_qn, s_qt, chunk * h_dim, h_dim, chunk * h_dim, h_dim, s_en, s_en, s_la,
                          DGD, False, HAS_MOM, HAS_Q, BC, BH, BD, PREC)
            tl.debug_barrier()
            _silu_q(WHn, sh, c_len, h_dim, BC, BH)
        # -- W1's VJP: dW1/dS1 start (slot s), dw1 -> o-slot 2, partials of dhK, dq1, dla, dbeta ---
        for ob in range(0, n_ob1):
            bwd_chunk(st1, ms1, WH + sh, WH + 6 * sh, ETA + t0, ETA + t0, WO + so, LA + t0, BETA,
                      DREADS + t0 * d_out,
                      DST1 + e_slot * n_rows * s1, DMS1 + e_slot * n_rows * s1,
                      DST1 + s_slot * n_rows * s1, DMS1 + s_slot * n_rows * s1,
                      WO + 2 * so, PK, PQ, PC, PC, PL, PB,
                      n, ob, c_len, d_out, h_dim, n_rows, chunk, 1,
                      s1, chunk * h_dim, h_dim, chunk * h_dim, h_dim, chunk * d_out, d_out, T_len * d_out, d_out,
                      s_en, s_en, s_la,
                      False, False, HAS_MOM, HAS_Q, BC, BO, BH, PREC)
        tl.debug_barrier()
        dla = tl.zeros([BC], tl.float32)
        dbeta = tl.sum(tl.zeros([BC], tl.float32), 0)
        for ob in range(0, n_ob1):
            dla += tl.load(PL + (ob * n_rows + n) * chunk + rc, mask=mc, other=0.0)
            if HAS_MOM:
                dbeta += tl.load(PB + ob * n_rows + n)
        for h0 in range(0, h_dim, BH):
            hh = h0 + tl.arange(0, BH)
            mh = hh < h_dim
            dhk = tl.zeros([BC, BH], tl.float32)
            dq1 = tl.zeros([BC, BH], tl.float32)
            for ob in range(0, n_ob1):
                pofs = (ob * n_rows + n) * chunk * h_dim
                dhk += _ld(PK + pofs, rc, mc, hh, mh, h_dim)
                if HAS_Q:
                    dq1 += _ld(PQ + pofs, rc, mc, hh, mh, h_dim)
            _st(WHn + 9 * sh, dhk, rc, mc, hh, mh, h_dim)
            if HAS_Q:
                dhq = dq1 * _silu_d1(_ld(WHn + 5 * sh, rc, mc, hh, mh, h_dim))
                _st(WHn + 10 * sh, dhq, rc, mc, hh, mh, h_dim)
        tl.debug_barrier()
        # -- W2's VJP: dW2/dS2 start, dw2 -> h-slot 8, partials of dk, dq, deta (dgd), dla, dbeta --
        for ob in range(0, n_ob2):
            bwd_chunk(st2, ms2, K + t0 * s_kt, Q + t0 * s_qt, ETA + t0, ETA + t0, WH + 4 * sh, LA + t0, BETA,
                      WH + 10 * sh,
                      DST2 + e_slot * n_rows * s2, DMS2 + e_slot * n_rows * s2,
                      DST2 + s_slot * n_rows * s2, DMS2 + s_slot * n_rows * s2,
                      WH + 8 * sh, PK, PQ, PC, PC, PL, PB,
                      n, ob, c_len, h_dim, d_in, n_rows, chunk, 1,
                      s2, s_kn, s_kt, s_qn, s_qt, chunk * h_dim, h_dim, chunk * h_dim, h_dim, s_en, s_en, s_la,
                      DGD, False, HAS_MOM, HAS_Q, BC, BH, BD, PREC)
        tl.debug_barrier()
        deta = tl.zeros([BC], tl.float32)
        for ob in range(0, n_ob2):
            dla += tl.load(PL + (ob * n_rows + n) * chunk + rc, mask=mc, other=0.0)
            if DGD:
                deta += tl.load(PC + (ob * n_rows + n) * chunk + rc, mask=mc, other=0.0)
            if HAS_MOM:
                dbeta += tl.load(PB + ob * n_rows + n)
        # -- prep VJP 1: through w2 = -eta g2, g2 = rW1 * silu'(a): drW1 -> h-slot 11 --------------
        for h0 in range(0, h_dim, BH):
            hh = h0 + tl.arange(0, BH)
            mh = hh < h_dim
            dw2 = _ld(WHn + 8 * sh, rc, mc, hh, mh, h_dim)
            sp = _silu_d1(_ld(WHn, rc, mc, hh, mh, h_dim))
            rw = _ld(WHn + 3 * sh, rc, mc, hh, mh, h_dim)
            deta -= tl.sum(rw * sp * dw2, 1)
            _st(WHn + 11 * sh, -eta[:, None] * dw2 * sp, rc, mc, hh, mh, h_dim)
        tl.debug_barrier()
        # -- prep VJP 2: dr = -eta dw1 + drW1 W1^T -> o-slot 3; dvhat = -dr (plain targets) ---------
        for o0 in range(0, d_out, BO):
            oo = o0 + tl.arange(0, BO)
            mo = oo < d_out
            dw1 = _ld(WOn + 2 * so, rc, mc, oo, mo, d_out)
            deta -= tl.sum(_ld(WOn, rc, mc, oo, mo, d_out) * dw1, 1)
            dr = -eta[:, None] * dw1
            for h0 in range(0, h_dim, BH):
                hh = h0 + tl.arange(0, BH)
                mh = hh < h_dim
                dr += tl.dot(_ld(WHn + 11 * sh, rc, mc, hh, mh, h_dim),
                             tl.trans(_ld(W1p, oo, mo, hh, mh, h_dim)), input_precision=PREC)
            _st(WOn + 3 * so, dr, rc, mc, oo, mo, d_out)
            if not SELF:
                _st(DV + (n * T_len + t0) * d_out, -dr, rc, mc, oo, mo, d_out)
        tl.debug_barrier()
        # -- prep VJP 3: da -> h-slot 12 (dav -> 13); dW1 += r^T drW1 + dr^T hK - dr^T hv ---------------
        for h0 in range(0, h_dim, BH):
            hh = h0 + tl.arange(0, BH)
            mh = hh < h_dim
            a = _ld(WHn, rc, mc, hh, mh, h_dim)
            sp = _silu_d1(a)
            dg2 = -eta[:, None] * _ld(WHn + 8 * sh, rc, mc, hh, mh, h_dim)
            dhk = _ld(WHn + 9 * sh, rc, mc, hh, mh, h_dim)
            m = tl.zeros([BC, BH], tl.float32)
            if L2 or SELF:
                for o0 in range(0, d_out, BO):
                    oo = o0 + tl.arange(0, BO)
                    mo = oo < d_out
                    m += tl.dot(_ld(WOn + 3 * so, rc, mc, oo, mo, d_out), _ld(W1p, oo, mo, hh, mh, h_dim),
                                input_precision=PREC)
            if L2:
                dhk += m
            da = dg2 * _ld(WHn + 3 * sh, rc, mc, hh, mh, h_dim) * _silu_d2(a) + dhk * sp
            _st(WHn + 12 * sh, da, rc, mc, hh, mh, h_dim)
            if SELF:
                dav = -m * _silu_d1(_ld(WHn + 7 * sh, rc, mc, hh, mh, h_dim))
                _st(WHn + 13 * sh, dav, rc, mc, hh, mh, h_dim)
        DW1p = DST1 + s_slot * n_rows * s1 + n * s1
        for o0 in range(0, d_out, BO):
            oo = o0 + tl.arange(0, BO)
            mo = oo < d_out
            r_t = tl.trans(_ld(WOn, rc, mc, oo, mo, d_out))
            dr_t = tl.trans(_ld(WOn + 3 * so, rc, mc, oo, mo, d_out))
            for h0 in range(0, h_dim, BH):
                hh = h0 + tl.arange(0, BH)
                mh = hh < h_dim
                acc = tl.dot(r_t, _ld(WHn + 11 * sh, rc, mc, hh, mh, h_dim), input_precision=PREC)
                if L2:
                    acc += tl.dot(dr_t, _ld(WHn + sh, rc, mc, hh, mh, h_dim), input_precision=PREC)
                if SELF:
                    acc -= tl.dot(dr_t, _ld(WHn + 2 * sh, rc, mc, hh, mh, h_dim), input_precision=PREC)
                _st(DW1p, _ld(DW1p, oo, mo, hh, mh, h_dim) + acc, oo, mo, hh, mh, h_dim)
        tl.debug_barrier()
        # -- prep VJP 4: dk = partials + da W2 (+ dr), dq = partials (+ dreads), dv (self targets) ---
        dvdot = tl.zeros([BC], tl.float32)
        for d0 in range(0, d_in, BD):
            dd = d0 + tl.arange(0, BD)
            md = dd < d_in
            dk = tl.zeros([BC, BD], tl.float32)
            dq = tl.zeros([BC, BD], tl.float32)
            dvn = tl.zeros([BC, BD], tl.float32)
            for ob in range(0, n_ob2):
                pofs = (ob * n_rows + n) * chunk * d_in
                dk += _ld(PK + pofs, rc, mc, dd, md, d_in)
                if HAS_Q:
                    dq += _ld(PQ + pofs, rc, mc, dd, md, d_in)
            for h0 in range(0, h_dim, BH):
                hh = h0 + tl.arange(0, BH)
                mh = hh < h_dim
                w2t = _ld(W2p, hh, mh, dd, md, d_in)
                dk += tl.dot(_ld(WHn + 12 * sh, rc, mc, hh, mh, h_dim), w2t, input_precision=PREC)
                if SELF:
                    dvn += tl.dot(_ld(WHn + 13 * sh, rc, mc, hh, mh, h_dim), w2t, input_precision=PREC)
            if RES:
                if L2:
                    dk += _ld(WOn + 3 * so, rc, mc, dd, md, d_out)
                if HAS_Q:
                    dq += _ld(DRp, rc, mc, dd, md, d_out)
                if SELF:
                    dvn -= _ld(WOn + 3 * so, rc, mc, dd, md, d_out)
            _st(DK + (n * T_len + t0) * d_in, dk, rc, mc, dd, md, d_in)
            if HAS_Q:
                _st(DQ + (n * T_len + t0) * d_in, dq, rc, mc, dd, md, d_in)
            if SELF:
                _st(WOn + 4 * so, dvn, rc, mc, dd, md, d_out)
                dvdot += tl.sum(_ld(Vp, rc, mc, dd, md, s_vt) * rn[:, None] * dvn, 1)
        if SELF:
            tl.debug_barrier()
            for d0 in range(0, d_in, BD):
                dd = d0 + tl.arange(0, BD)
                md = dd < d_in
                vn = _ld(Vp, rc, mc, dd, md, s_vt) * rn[:, None]
                dv = rn[:, None] * (_ld(WOn + 4 * so, rc, mc, dd, md, d_out) - vn * dvdot[:, None])
                _st(DV + (n * T_len + t0) * d_out, dv, rc, mc, dd, md, d_out)
        DW2p = DST2 + s_slot * n_rows * s2 + n * s2
        for h0 in range(0, h_dim, BH):
            hh = h0 + tl.arange(0, BH)
            mh = hh < h_dim
            da_t = tl.trans(_ld(WHn + 12 * sh, rc, mc, hh, mh, h_dim))
            if SELF:
                dav_t = tl.trans(_ld(WHn + 13 * sh, rc, mc, hh, mh, h_dim))
            for d0 in range(0, d_in, BD):
                dd = d0 + tl.arange(0, BD)
                md = dd < d_in
                acc = tl.dot(da_t, _ld(Kp, rc, mc, dd, md, s_kt), input_precision=PREC)
                if SELF:
                    acc += tl.dot(dav_t, _ld(Vp, rc, mc, dd, md, s_vt) * rn[:, None], input_precision=PREC)
                _st(DW2p, _ld(DW2p, hh, mh, dd, md, d_in) + acc, hh, mh, dd, md, d_in)
        tl.store(DETA + n * T_len + t0 + rc, deta, mask=mc)
        tl.store(DLA + n * T_len + t0 + rc, dla, mask=mc)
        if HAS_MOM:
            tl.store(DBETA + n * n_chunks + j, dbeta)
        tl.debug_barrier()  # the previous chunk reads this chunk's start-state cotangents
        if RESETS:   # this chunk started from the initial state: its cotangent goes there
            if tl.load(RS + n * n_chunks + j) != 0:
                _drain_mat(DST1 + s_slot * n_rows * s1 + n * s1, DA1 + n * s1, d_out, h_dim, BO, BH)
                _drain_mat(DST2 + s_slot * n_rows * s2 + n * s2, DA2 + n * s2, h_dim, d_in, BH, BD)
                if HAS_MOM:
                    _drain_mat(DMS1 + s_slot * n_rows * s1 + n * s1, DAM1 + n * s1, d_out, h_dim, BO, BH)
                    _drain_mat(DMS2 + s_slot * n_rows * s2 + n * s2, DAM2 + n * s2, h_dim, d_in, BH, BD)
            tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
def _tiles(chunk: int, d_in: int, d_out: int, h: int):
    """``BC, BO, BD, BH, warps``: the whole chunk in one tile; d_out, d_in, h walked in tiles of at
    most ``TILE_CAP`` (tests lower it to 16); tl.dot needs >= 16."""
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk length {chunk} is outside the Triton kernel's range 1..{MAX_CHUNK}")
    np2 = triton.next_power_of_2
    bc = max(16, np2(chunk))
    bo = max(16, min(TILE_CAP["o"], np2(d_out)))
    bd = max(16, min(TILE_CAP["d"], np2(d_in)))
    bh = max(16, min(TILE_CAP["o"], TILE_CAP["d"], np2(h)))
    return bc, bo, bd, bh, (4 if bc <= 32 else 8)


class MLPMemorySequence(torch.autograd.Function):
    """``(reads, W1_T, W2_T, S1_T, S2_T)`` of an MLP memory over a whole sequence (empty tensors for
    absent reads / momenta). ``flags = (chunk, dgd, has_mom, self_targets, l2, residual)``."""

    @staticmethod
    def forward(ctx, W1, W2, S1, S2, k, v, eta, log_alpha, beta, q, rs, flags):
        chunk, dgd, has_mom, self_t, l2, res = flags
        N, o, h = W1.shape
        d, T = W2.shape[2], k.shape[1]
        n_chunks = triton.cdiv(T, chunk)
        bc, bo, bd, bh, warps = _tiles(chunk, d, o, h)
        has_q = q is not None
        f32 = dict(device=W1.device, dtype=torch.float32)
        st1 = torch.empty(n_chunks + 1, N, o, h, **f32)
        st2 = torch.empty(n_chunks + 1, N, h, d, **f32)
        st1[0], st2[0] = W1, W2
        if has_mom:
            ms1, ms2 = torch.empty_like(st1), torch.empty_like(st2)
            ms1[0], ms2[0] = S1, S2
        else:
            ms1, ms2 = st1, st2
        reads = torch.empty(N, T, o, **f32) if has_q else torch.empty(0, **f32)
        wh = torch.empty(_H_SLOTS_FWD, N, chunk, h, **f32)
        wo = torch.empty(_O_SLOTS_FWD, N, chunk, o, **f32)
        prec = _dot_precision(W1, W2, k, q, v)
        qp = q if has_q else k
        bp = beta if has_mom else eta
        with _on_device(W1):
            _launch(mlp_seq_fwd_kernel, (N,),
                    st1, st2, ms1, ms2, k, qp, v, eta, log_alpha, bp, reads if has_q else st1, wh, wo,
                    rs if rs is not None else eta,
                    T, chunk, n_chunks, N, d, o, h, triton.cdiv(o, bo), triton.cdiv(h, bh),
                    k.stride(0), k.stride(1), qp.stride(0), qp.stride(1), v.stride(0), v.stride(1),
                    eta.stride(0), log_alpha.stride(0),
                    DGD=dgd, HAS_MOM=has_mom, HAS_Q=has_q, SELF=self_t, L2=l2, RES=res,
                    RESETS=rs is not None,
                    BC=bc, BO=bo, BD=bd, BH=bh, PREC=prec, num_warps=warps, num_stages=1)
        ctx.rs = rs
        ctx.save_for_backward(st1, st2, ms1 if has_mom else None, ms2 if has_mom else None,
                              k, v, eta, log_alpha, beta if has_mom else None, q)
        ctx.flags, ctx.meta = flags, (bc, bo, bd, bh, warps, prec)
        ctx.dtypes = (W1.dtype, W2.dtype, None if S1 is None else S1.dtype, None if S2 is None else S2.dtype)
        W1T, W2T = st1[-1].clone(), st2[-1].clone()
        if has_mom:
            S1T, S2T = ms1[-1].clone(), ms2[-1].clone()
        else:
            S1T = S2T = torch.empty(0, **f32)
        return reads, W1T, W2T, S1T, S2T

    @staticmethod
    def backward(ctx, dR, dW1T, dW2T, dS1T, dS2T):
        st1, st2, ms1, ms2, k, v, eta, log_alpha, beta, q = ctx.saved_tensors
        chunk, dgd, has_mom, self_t, l2, res = ctx.flags
        bc, bo, bd, bh, warps, prec = ctx.meta
        n_states, N, o, h = st1.shape
        d, T = st2.shape[3], k.shape[1]
        n_chunks = n_states - 1
        has_q = q is not None
        f32 = dict(device=st1.device, dtype=torch.float32)
        last = n_chunks % 2
        dst1 = torch.zeros(2, N, o, h, **f32)
        dst2 = torch.zeros(2, N, h, d, **f32)
        if dW1T is not None:
            dst1[last] = dW1T
        if dW2T is not None:
            dst2[last] = dW2T
        if has_mom:
            dms1, dms2 = torch.zeros_like(dst1), torch.zeros_like(dst2)
            if dS1T is not None:
                dms1[last] = dS1T
            if dS2T is not None:
                dms2[last] = dS2T
            scrm2 = torch.empty(N, h, d, **f32)
        else:
            dms1, dms2, scrm2 = dst1, dst2, st2
        dreads = (dR.float().contiguous() if (has_q and dR is not None) else torch.zeros(N, T, o, **f32))
        n_ob1, n_ob2 = triton.cdiv(o, bo), triton.cdiv(h, bh)
        nob = max(n_ob1, n_ob2)
        wh = torch.empty(_H_SLOTS_BWD, N, chunk, h, **f32)
        wo = torch.empty(_O_SLOTS_BWD, N, chunk, o, **f32)
        pk = torch.empty(nob, N, chunk, max(h, d), **f32)
        pq = torch.empty_like(pk) if has_q else pk
        pc = torch.empty(nob, N, chunk, **f32) if dgd else log_alpha
        pl = torch.empty(nob, N, chunk, **f32)
        pb = torch.empty(nob, N, **f32) if has_mom else pl
        scr2 = torch.empty(N, h, d, **f32) if has_q else st2
        dk = torch.empty(N, T, d, **f32)
        dq = torch.empty(N, T, d, **f32) if has_q else dk
        dv = torch.empty(N, T, o, **f32)
        deta = torch.empty(N, T, **f32)
        dla = torch.empty(N, T, **f32)
        dbeta = torch.empty(N, n_chunks, **f32) if has_mom else dla
        qp = q if has_q else k
        bp = beta if has_mom else eta
        rs = ctx.rs
        if rs is not None:   # gradients of the initial state/momentum from the reset chunks
            da1, da2 = torch.zeros(N, o, h, **f32), torch.zeros(N, h, d, **f32)
            dam1, dam2 = (torch.zeros_like(da1), torch.zeros_like(da2)) if has_mom else (da1, da2)
        else:
            da1 = da2 = dam1 = dam2 = dla
        with _on_device(st1):
            _launch(mlp_seq_bwd_kernel, (N,),
                    st1, st2, ms1 if has_mom else st1, ms2 if has_mom else st2, k, qp, v, eta, log_alpha, bp,
                    dreads, dst1, dst2, dms1, dms2, scr2, scrm2, wh, wo, pk, pq, pc, pl, pb,
                    dk, dq, dv, deta, dla, dbeta, rs if rs is not None else dla, da1, da2, dam1, dam2,
                    T, chunk, n_chunks, N, d, o, h, n_ob1, n_ob2,
                    k.stride(0), k.stride(1), qp.stride(0), qp.stride(1), v.stride(0), v.stride(1),
                    eta.stride(0), log_alpha.stride(0),
                    DGD=dgd, HAS_MOM=has_mom, HAS_Q=has_q, SELF=self_t, L2=l2, RES=res,
                    RESETS=rs is not None,
                    BC=bc, BO=bo, BD=bd, BH=bh, PREC=prec, num_warps=warps, num_stages=1)
        g1, g2, gm1, gm2 = dst1[0], dst2[0], dms1[0], dms2[0]
        if rs is not None:
            g1, g2 = g1 + da1, g2 + da2
            if has_mom:
                gm1, gm2 = gm1 + dam1, gm2 + dam2
        w1_dt, w2_dt, s1_dt, s2_dt = ctx.dtypes
        ng = ctx.needs_input_grad
        return (
            g1.to(w1_dt) if ng[0] else None,
            g2.to(w2_dt) if ng[1] else None,
            gm1.to(s1_dt) if (ng[2] and has_mom) else None,
            gm2.to(s2_dt) if (ng[3] and has_mom) else None,
            dk.to(k.dtype) if ng[4] else None,
            dv.to(v.dtype) if ng[5] else None,
            deta.to(eta.dtype) if ng[6] else None,
            dla.to(log_alpha.dtype) if ng[7] else None,
            dbeta.sum(1).to(beta.dtype) if (ng[8] and has_mom) else None,
            dq.to(q.dtype) if (ng[9] and has_q) else None,
            None,
            None,
        )


LAUNCHES = {"fwd": 0, "bwd": 0}   # Triton launches of this module's kernels (tests read it)


def _launch(kernel, grid, *args, **kw):
    LAUNCHES["fwd" if kernel is mlp_seq_fwd_kernel else "bwd"] += 1
    kernel[grid](*args, **kw)


def mlp_memory_sequence(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q, chunk: int,
                        self_targets: bool = False, resets=None):
    """:func:`kernels.memory.sequence_torch.memory_sequence` for an MLP memory, one launch forward
    and one backward.

    ``state = (W1 (N, d_out, h), W2 (N, h, d_in))``; ``mom`` the same shapes or None (zeros when
    ``spec.momentum`` and None); ``k, q: (N, T, d_in)`` (q may be None); ``vhat: (N, T, d_out)``
    (``v`` with ``self_targets``: the target of each chunk is ``M_ref(l2norm(v))``, needs
    ``d_in == d_out``); ``eta, alpha: (N, T)``; ``beta: (N,)`` or None. Chunks of ``chunk`` tokens
    (1..64), the last one possibly short. ``resets: (N, ceil(T / chunk))`` bool or None: where
    true (column 0 ignored), chunk j of that row starts again from the given ``state`` and ``mom``
    (a packed document begins there). Returns ``(reads (N, T, d_out) or None, (W1_T, W2_T),
    (S1_T, S2_T) or None)``, all fp32; gradients flow to every tensor input."""
    if spec.kind != "mlp":
        raise ValueError(f"mlp_memory_sequence needs an MLP memory; got kind={spec.kind}")
    W1, W2 = state
    N, d_out, h = W1.shape
    d_in = W2.shape[2]
    if W2.shape[:2] != (N, h) or k.shape[0] != N or k.shape[2] != d_in or vhat.shape[2] != d_out:
        raise ValueError(f"shapes do not fit an MLP memory: W1 {tuple(W1.shape)}, W2 {tuple(W2.shape)}, "
                         f"k {tuple(k.shape)}, vhat {tuple(vhat.shape)}")
    if self_targets and d_in != d_out:
        raise ValueError("self_targets reads the memory at l2norm(v): needs d_in == d_out")
    _tiles(chunk, d_in, d_out, h)
    n_states = -(-k.shape[1] // chunk) + 1
    rs = None
    if resets is not None:
        if tuple(resets.shape) != (N, n_states - 1):
            raise ValueError(f"resets must be (N, n_chunks) = ({N}, {n_states - 1}); got {tuple(resets.shape)}")
        rs = torch.zeros(N, n_states - 1, device=k.device, dtype=torch.int32)   # column 0 stays 0
        rs[:, 1:] = resets[:, 1:]
    if max(n_states * N * h * max(d_in, d_out), N * k.shape[1] * max(d_in, d_out)) >= 2 ** 31:
        raise ValueError("mlp_memory_sequence: a state buffer or token tensor of 2^31 elements or more "
                         "(int32 offsets in the kernel); split the rows into several calls")
    with torch.autocast(k.device.type, enabled=False):
        W1, W2 = W1.float().contiguous(), W2.float().contiguous()
        if spec.momentum:
            if mom is None:
                S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
            else:
                S1, S2 = mom[0].float().contiguous(), mom[1].float().contiguous()
            b = beta.float().contiguous()
        else:
            S1 = S2 = b = None
        eta32 = eta.float().contiguous()
        log_alpha = alpha.float().log().contiguous()
        k, vhat, q = _lastdim_contig(k), _lastdim_contig(vhat), _lastdim_contig(q)
        flags = (int(chunk), spec.rule == "dgd", bool(spec.momentum), bool(self_targets), spec.loss == "l2",
                 bool(spec.residual and d_in == d_out))
        reads, W1T, W2T, S1T, S2T = MLPMemorySequence.apply(W1, W2, S1, S2, k, vhat, eta32, log_alpha, b, q,
                                                            rs, flags)
    return (reads if q is not None else None), (W1T, W2T), ((S1T, S2T) if spec.momentum else None)
