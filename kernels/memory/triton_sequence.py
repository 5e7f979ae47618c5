"""Whole-sequence Triton variant: the chunk loop inside the kernel (one launch forward, one backward).

For memories whose write term does not depend on the state (``w`` fixed per token): linear memories
with the ``running`` L2 gradient or the ``dot`` loss, plain (not self-generated) targets. That is
Gated DeltaNet's memory, and the Titans/HOPE linear memories when their targets are plain. Each
program owns one row and one block of output columns for the whole sequence, carrying its state
block through the chunks (written to the chunk-start state buffer, re-read after a barrier), so the
rows and column blocks stay independent and no Python loop or per-chunk launch is needed.

Memory: the forward keeps every chunk-start state ``(N, T/C + 1, o, d)`` fp32 (plus momentum), the
O(T/C x state) the backward needs; the backward walks the chunks in reverse with the same chunk
bodies as :mod:`kernels.memory.triton_affine`. Transient in the backward: dK and dQ partials
``(column blocks, N, T, d)`` fp32, summed deterministically by PyTorch afterwards.

Packed documents (``resets (N, n_chunks)`` bool, column 0 ignored): where ``resets[n, j]``, chunk j
of row n starts from the given initial state and momentum. Forward: before chunk j the program
copies slot 0 of its state block (the initial state) over slot j (the end state of chunk j - 1).
Backward: after chunk j the program adds the chunk-start cotangent of slot j into a per-row
accumulator ``(N, o, d)`` (the reset chunks' share of the initial-state gradient, added to slot 0
by PyTorch afterwards) and zeroes slot j, so chunk j - 1 sees a zero end-state cotangent. Each
program only touches its own state block: deterministic, no atomics. ``RESETS`` is a constexpr:
without resets the kernels are the ones without this code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.memory.spec import MemorySpec
from kernels.memory.triton_affine import bwd_chunk, fwd_chunk
from kernels.memory.triton_impl import _blocks, _dot_precision, _lastdim_contig, _on_device


@triton.jit
def _restart_rows(BASE, j, r_lo, r_hi, d_dim, slot, BO: tl.constexpr, BD: tl.constexpr):
    """Rows ``[r_lo, r_hi)`` of slot ``j`` of one row's state buffer (slots of ``slot`` elements,
    rows of ``d_dim``) = the same rows of slot 0 (the initial state): a document starts at chunk j."""
    rr = tl.arange(0, BO)
    rd = tl.arange(0, BD)
    for r0 in range(r_lo, r_hi, BO):
        ro = r0 + rr
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            off = ro[:, None] * d_dim + dd[None, :]
            m = (ro < r_hi)[:, None] & (dd < d_dim)[None, :]
            tl.store(BASE + j * slot + off, tl.load(BASE + off, mask=m, other=0.0), mask=m)


@triton.jit
def _flush_rows(D, ACC, j, r_lo, r_hi, d_dim, slot, BO: tl.constexpr, BD: tl.constexpr):
    """``ACC += D[slot j]`` and ``D[slot j] = 0`` on rows ``[r_lo, r_hi)`` (one row's buffers): the
    chunk-start cotangent of a reset chunk goes to the initial state, none to chunk j - 1's end."""
    rr = tl.arange(0, BO)
    rd = tl.arange(0, BD)
    for r0 in range(r_lo, r_hi, BO):
        ro = r0 + rr
        for d0 in range(0, d_dim, BD):
            dd = d0 + rd
            off = ro[:, None] * d_dim + dd[None, :]
            m = (ro < r_hi)[:, None] & (dd < d_dim)[None, :]
            dt = tl.load(D + j * slot + off, mask=m, other=0.0)
            tl.store(ACC + off, tl.load(ACC + off, mask=m, other=0.0) + dt, mask=m)
            tl.store(D + j * slot + off, dt * 0.0, mask=m)


@triton.jit
def affine_seq_fwd_kernel(
    STATES, MSTATES, K, Q, CV, RHO, WV, LA, BETA, R, RS,
    T_len, chunk, n_chunks, o_dim, d_dim,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    RESETS: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    n = tl.program_id(0)
    ob = tl.program_id(1)
    od = o_dim * d_dim
    for j in range(0, n_chunks):
        t0 = j * chunk
        c_len = tl.minimum(chunk, T_len - t0)
        if RESETS:  # RS (N, n_chunks) int8, column 0 zeroed by the host
            if tl.load(RS + n * n_chunks + j) != 0:
                r_lo = ob * BO
                r_hi = tl.minimum(r_lo + BO, o_dim)
                _restart_rows(STATES + n * s_w, j, r_lo, r_hi, d_dim, od, BO, BD)
                if HAS_MOM:
                    _restart_rows(MSTATES + n * s_w, j, r_lo, r_hi, d_dim, od, BO, BD)
                tl.debug_barrier()  # fwd_chunk reads the restarted block with other threads
        fwd_chunk(STATES + j * od, MSTATES + j * od, K + t0 * s_kt, Q + t0 * s_qt, CV + t0, RHO + t0,
                  WV + t0 * s_vt, LA + t0, BETA, R + t0 * s_rt, STATES + (j + 1) * od, MSTATES + (j + 1) * od,
                  n, ob, c_len, o_dim, d_dim,
                  s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
                  HAS_C, HAS_RHO, HAS_MOM, HAS_Q, BC, BO, BD, PREC)
        tl.debug_barrier()  # the next chunk reads this state block, written by other threads


@triton.jit
def affine_seq_bwd_kernel(
    STATES, MSTATES, K, Q, CV, RHO, WV, LA, BETA, DR, DSTATES, DMSTATES,
    DWV, DK, DQ, DCV, DRHO, DLA, DBETA, RS, DACC, DMACC,
    T_len, chunk, n_chunks, o_dim, d_dim, n_rows,
    s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
    HAS_C: tl.constexpr, HAS_RHO: tl.constexpr, HAS_MOM: tl.constexpr, HAS_Q: tl.constexpr,
    RESETS: tl.constexpr,
    BC: tl.constexpr, BO: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    n = tl.program_id(0)
    ob = tl.program_id(1)
    od = o_dim * d_dim
    for jj in range(0, n_chunks):
        j = n_chunks - 1 - jj
        t0 = j * chunk
        c_len = tl.minimum(chunk, T_len - t0)
        bwd_chunk(STATES + j * od, MSTATES + j * od, K + t0 * s_kt, Q + t0 * s_qt, CV + t0, RHO + t0,
                  WV + t0 * s_vt, LA + t0, BETA, DR + t0 * s_rt,
                  DSTATES + (j + 1) * od, DMSTATES + (j + 1) * od, DSTATES + j * od, DMSTATES + j * od,
                  DWV + t0 * s_vt, DK + t0 * d_dim, DQ + t0 * d_dim, DCV + t0, DRHO + t0, DLA + t0, DBETA + j,
                  n, ob, c_len, o_dim, d_dim, n_rows, T_len, n_chunks,
                  s_w, s_kn, s_kt, s_qn, s_qt, s_vn, s_vt, s_rn, s_rt, s_cn, s_pn, s_la,
                  HAS_C, HAS_RHO, HAS_MOM, HAS_Q, BC, BO, BD, PREC)
        tl.debug_barrier()  # the previous chunk reads this chunk's start-state cotangent
        if RESETS:
            if tl.load(RS + n * n_chunks + j) != 0:
                r_lo = ob * BO
                r_hi = tl.minimum(r_lo + BO, o_dim)
                _flush_rows(DSTATES + n * s_w, DACC + n * od, j, r_lo, r_hi, d_dim, od, BO, BD)
                if HAS_MOM:
                    _flush_rows(DMSTATES + n * s_w, DMACC + n * od, j, r_lo, r_hi, d_dim, od, BO, BD)
                tl.debug_barrier()  # chunk j - 1 reads the zeroed end-state cotangent


class AffineRank1Sequence(torch.autograd.Function):
    """``(reads (N,T,o), W_T, S_T)`` of one weight matrix over a whole sequence in chunks of C."""

    @staticmethod
    def forward(ctx, W0, S0, K, Q, cv, rho, w, log_alpha, beta, chunk, rs=None):
        K, Q, cv, rho = (_lastdim_contig(x) for x in (K, Q, cv, rho))
        w, log_alpha = w.contiguous(), _lastdim_contig(log_alpha)
        N, o, d = W0.shape
        T = K.shape[1]
        n_chunks = triton.cdiv(T, chunk)
        bc, bo, bd, warps = _blocks(chunk, o, d)
        has_q, has_mom = Q is not None, beta is not None
        f32 = dict(device=W0.device, dtype=torch.float32)
        states = torch.empty(N, n_chunks + 1, o, d, **f32)
        states[:, 0] = W0
        mstates = torch.empty(N, n_chunks + 1, o, d, **f32) if has_mom else states
        if has_mom:
            mstates[:, 0] = S0
        reads = torch.empty(N, T, o, **f32) if has_q else torch.empty(0, **f32)
        prec = _dot_precision(W0, S0, K, Q, w)
        dummy = log_alpha
        Qp = Q if has_q else K
        with _on_device(K):
            affine_seq_fwd_kernel[(N, triton.cdiv(o, bo))](
                states, mstates, K, Qp, cv if cv is not None else dummy, rho if rho is not None else dummy,
                w, log_alpha, beta if has_mom else dummy, reads if has_q else states,
                rs if rs is not None else dummy,
                T, chunk, n_chunks, o, d,
                (n_chunks + 1) * o * d, K.stride(0), K.stride(1), Qp.stride(0), Qp.stride(1),
                w.stride(0), w.stride(1), T * o, o,
                (cv if cv is not None else dummy).stride(0), (rho if rho is not None else dummy).stride(0),
                log_alpha.stride(0),
                HAS_C=cv is not None, HAS_RHO=rho is not None, HAS_MOM=has_mom, HAS_Q=has_q,
                RESETS=rs is not None, BC=bc, BO=bo, BD=bd, PREC=prec, num_warps=warps, num_stages=2,
            )
        ctx.save_for_backward(states, mstates if has_mom else None, K, Q, cv, rho, w, log_alpha, beta, rs)
        ctx.meta = (chunk, bc, bo, bd, warps, prec, W0.dtype, S0.dtype if S0 is not None else None)
        W_T = states[:, -1].clone()
        S_T = mstates[:, -1].clone() if has_mom else torch.empty(0, **f32)
        return reads, W_T, S_T

    @staticmethod
    def backward(ctx, dR, dWT, dST):
        states, mstates, K, Q, cv, rho, w, log_alpha, beta, rs = ctx.saved_tensors
        chunk, bc, bo, bd, warps, prec, w_dtype, s_dtype = ctx.meta
        N, n_states, o, d = states.shape
        n_chunks, T = n_states - 1, K.shape[1]
        nob = triton.cdiv(o, bo)
        has_q, has_mom = Q is not None, beta is not None
        f32 = dict(device=states.device, dtype=torch.float32)
        dstates = torch.empty_like(states)
        dstates[:, -1] = dWT if dWT is not None else 0.0
        dmstates = torch.empty_like(states) if has_mom else dstates
        if has_mom:
            dmstates[:, -1] = dST if dST is not None else 0.0
        dR = dR.contiguous() if (has_q and dR is not None) else torch.zeros(N, T, o, **f32)
        dw = torch.empty(N, T, o, **f32)
        dK = torch.empty(nob, N, T, d, **f32)
        dQ = torch.empty(nob, N, T, d, **f32) if has_q else dK
        dcv = torch.empty(nob, N, T, **f32) if cv is not None else dw
        drho = torch.empty(nob, N, T, **f32) if rho is not None else dw
        dla = torch.empty(nob, N, T, **f32)
        dbeta = torch.empty(nob, N, n_chunks, **f32) if has_mom else dla
        dummy = log_alpha
        dacc = torch.zeros(N, o, d, **f32) if rs is not None else dummy          # reset chunks' dW0
        dmacc = torch.zeros(N, o, d, **f32) if (rs is not None and has_mom) else dacc
        Qp = Q if has_q else K
        with _on_device(K):
            affine_seq_bwd_kernel[(N, nob)](
                states, mstates if has_mom else states, K, Qp, cv if cv is not None else dummy,
                rho if rho is not None else dummy, w, log_alpha, beta if has_mom else dummy, dR, dstates, dmstates,
                dw, dK, dQ, dcv, drho, dla, dbeta, rs if rs is not None else dummy, dacc, dmacc,
                T, chunk, n_chunks, o, d, N,
                n_states * o * d, K.stride(0), K.stride(1), Qp.stride(0), Qp.stride(1),
                w.stride(0), w.stride(1), T * o, o,
                (cv if cv is not None else dummy).stride(0), (rho if rho is not None else dummy).stride(0),
                log_alpha.stride(0),
                HAS_C=cv is not None, HAS_RHO=rho is not None, HAS_MOM=has_mom, HAS_Q=has_q,
                RESETS=rs is not None, BC=bc, BO=bo, BD=bd, PREC=prec, num_warps=warps, num_stages=1,
            )
        dW0, dS0 = dstates[:, 0], dmstates[:, 0]
        if rs is not None:
            dW0 = dW0 + dacc
            if has_mom:
                dS0 = dS0 + dmacc

        def out(x, like_dtype, need):
            return x.to(like_dtype) if need else None

        ng = ctx.needs_input_grad
        return (
            out(dW0, w_dtype, ng[0]),
            out(dS0, s_dtype, ng[1] and has_mom),
            out(dK.sum(0), K.dtype, ng[2]),
            out(dQ.sum(0), Q.dtype if has_q else None, ng[3] and has_q),
            out(dcv.sum(0), cv.dtype if cv is not None else None, ng[4] and cv is not None),
            out(drho.sum(0), rho.dtype if rho is not None else None, ng[5] and rho is not None),
            out(dw, w.dtype, ng[6]),
            out(dla.sum(0), log_alpha.dtype, ng[7]),
            out(dbeta.sum((0, 2)), beta.dtype if has_mom else None, ng[8] and has_mom),
            None, None,
        )


def sequence_supported(spec: MemorySpec) -> bool:
    """Whole-sequence kernel applies: a linear memory whose write term ignores the state."""
    return spec.kind == "linear" and (spec.loss == "dot" or spec.grad_at == "running")


def reset_flags(resets, N: int, n_chunks: int, device):
    """``resets (N, n_chunks)`` bool -> int8 flags on ``device`` for the kernels (a copy, column 0
    cleared), or None."""
    if resets is None:
        return None
    if tuple(resets.shape) != (N, n_chunks):
        raise ValueError(f"resets must be (N, n_chunks) = ({N}, {n_chunks}); got {tuple(resets.shape)}")
    rs = resets.detach().to(device=device, dtype=torch.int8, copy=True).contiguous()
    rs[:, 0] = 0
    return rs


def linear_memory_sequence(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q, chunk: int, resets=None):
    """The whole sequence of :func:`kernels.memory.dispatch.memory_chunk` calls in chunks of
    ``chunk`` tokens (last one possibly short), in one launch: ``k, q: (N, T, d)``, ``vhat: (N, T, o)``,
    ``eta, alpha: (N, T)``. Returns ``(reads (N, T, o), (W_T,), (S_T,) or None)``, all fp32.
    ``resets (N, n_chunks)`` bool or None: as in :func:`kernels.memory.sequence_torch.memory_sequence`
    (chunk j of a row restarts from ``state`` / ``mom`` where true; column 0 ignored)."""
    if not sequence_supported(spec):
        raise ValueError(f"whole-sequence kernel needs a linear memory with the running or dot gradient; "
                         f"got kind={spec.kind} loss={spec.loss} grad_at={spec.grad_at}: use the chunk loop")
    _blocks(chunk, 1, 1)                               # validates chunk <= MAX_CHUNK
    with torch.autocast(k.device.type, enabled=False):
        return _linear_memory_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, resets)


def _linear_memory_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, resets=None):
    (W0,) = state
    W0 = W0.float().contiguous()
    S0 = mom[0].float().contiguous() if spec.momentum else None
    eta = eta.float()
    w = eta[..., None] * vhat.float()
    rho = -eta if spec.loss == "l2" else None          # running gradient at M_{t-1}
    dgd_c = eta if spec.rule == "dgd" else None
    b = beta.float().contiguous() if spec.momentum else None
    rs = reset_flags(resets, k.shape[0], triton.cdiv(k.shape[1], chunk), k.device)
    reads, W_T, S_T = AffineRank1Sequence.apply(W0, S0, k, q, dgd_c, rho, w, alpha.float().log(), b, chunk, rs)
    return (reads if q is not None else None), (W_T,), ((S_T,) if spec.momentum else None)
