"""Per-chunk Triton implementation of :func:`kernels.memory.dispatch.memory_chunk`.

The ``affine_rank1_chunk`` kernels (:mod:`kernels.memory.triton_affine`), composed into a memory by
:func:`kernels.memory.spec.compose_chunk`, the same composition the PyTorch form uses: a linear
memory is one call; an MLP memory is W2 (the weight that reads k, where the dgd preconditioner
acts) and then W1. The gradient preparation around the kernels stays in PyTorch matmuls. The model
uses the whole-sequence kernels; this per-chunk form serves recurrent decoding, the fallbacks and
the tests of the chunk bodies.

Precision: states, momenta, decay and every accumulation are fp32; inputs are upcast to fp32
before the prep; dots are IEEE fp32 unless torch allows TF32 matmuls. Reads, new states and
momenta come back fp32, as from the PyTorch path with bf16 inputs.

Autograd: :class:`AffineRank1Chunk` saves only its inputs (the chunk-start state and the chunk's
tokens) and its backward kernel recomputes the chunk's c x c matrices, the solve and the reads, so
activation memory is O(T/C x state) plus the per-token inputs. No double backward.

Imports on any machine that has triton; runs on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before Python started.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from kernels.memory.spec import MemorySpec, compose_chunk
from kernels.memory.triton_affine import affine_bwd_kernel, affine_fwd_kernel

MAX_CHUNK = 64
# Upper bounds of the column / input tiles (tests lower them to 16). 32 x 32 with the whole chunk
# (64) in one tile and 8 warps kept ptxas spills small for sm_90 in tf32 (docs/KERNELS.md).
TILE_CAP = {"o": 32, "d": 32}


def _blocks(c: int, o: int, d: int):
    """Tile sizes: the whole chunk in one tile, output columns in blocks of <= TILE_CAP['o'], the
    input dimension looped in tiles of <= TILE_CAP['d']; tl.dot needs >= 16. Returns also warps."""
    if c > MAX_CHUNK:
        raise ValueError(f"chunk length {c} exceeds the Triton kernel's limit {MAX_CHUNK}; "
                         f"use chunk <= {MAX_CHUNK}")
    bc = max(16, triton.next_power_of_2(c))
    bo = max(16, min(TILE_CAP["o"], triton.next_power_of_2(o)))
    bd = max(16, min(TILE_CAP["d"], triton.next_power_of_2(d)))
    return bc, bo, bd, (4 if bc <= 32 else 8)


def _dot_precision(*tensors) -> str:
    """IEEE fp32 dots for fp32 inputs unless torch allows TF32 matmuls (then TF32, like torch's own
    matmuls); TF32 for bf16 inputs (bf16 values are exact in TF32; fp32 intermediates are rounded
    to TF32 inside the dots, accumulation stays fp32)."""
    if all(t.dtype == torch.float32 for t in tensors if t is not None):
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _lastdim_contig(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return x if x.stride(-1) == 1 else x.contiguous()


class AffineRank1Chunk(torch.autograd.Function):
    """``(reads, W_new, S_new)`` of one weight matrix over one chunk; ``reads``/``S_new`` are empty
    tensors when ``Q``/momentum are absent (see :func:`affine_rank1_chunk`)."""

    @staticmethod
    def forward(ctx, W0, S0, K, Q, cv, rho, w, log_alpha, beta):
        W0 = W0.contiguous()
        S0 = S0.contiguous() if S0 is not None else None
        K, Q = _lastdim_contig(K), _lastdim_contig(Q)
        cv, rho = _lastdim_contig(cv), _lastdim_contig(rho)
        w, log_alpha = w.contiguous(), _lastdim_contig(log_alpha)
        beta = beta.contiguous() if beta is not None else None
        N, o, d = W0.shape
        c = K.shape[1]
        bc, bo, bd, warps = _blocks(c, o, d)
        f32 = dict(device=W0.device, dtype=torch.float32)
        has_q, has_mom = Q is not None, beta is not None
        reads = torch.empty(N, c, o, **f32) if has_q else torch.empty(0, **f32)
        W_new = torch.empty(N, o, d, **f32)
        S_new = torch.empty(N, o, d, **f32) if has_mom else torch.empty(0, **f32)
        prec = _dot_precision(W0, S0, K, Q, w)
        grid = (N, triton.cdiv(o, bo))
        Qp = Q if has_q else K
        with _on_device(W0):
            affine_fwd_kernel[grid](
                W0, S0 if has_mom else W0, K, Qp, cv if cv is not None else log_alpha,
                rho if rho is not None else log_alpha, w, log_alpha, beta if has_mom else log_alpha,
                reads if has_q else W_new, W_new, S_new if has_mom else W_new,
                c, o, d,
                o * d, K.stride(0), K.stride(1), Qp.stride(0), Qp.stride(1), w.stride(0), w.stride(1),
                c * o, o, (cv if cv is not None else log_alpha).stride(0),
                (rho if rho is not None else log_alpha).stride(0), log_alpha.stride(0),
                HAS_C=cv is not None, HAS_RHO=rho is not None, HAS_MOM=has_mom, HAS_Q=has_q,
                BC=bc, BO=bo, BD=bd, PREC=prec, num_warps=warps, num_stages=2,
            )
        ctx.save_for_backward(W0, S0, K, Q, cv, rho, w, log_alpha, beta)
        ctx.meta = (bc, bo, bd, warps, prec)
        return reads, W_new, S_new

    @staticmethod
    def backward(ctx, dR, dWn, dSn):
        W0, S0, K, Q, cv, rho, w, log_alpha, beta = ctx.saved_tensors
        bc, bo, bd, warps, prec = ctx.meta
        N, o, d = W0.shape
        c = K.shape[1]
        nob = triton.cdiv(o, bo)
        has_q, has_mom = Q is not None, beta is not None
        f32 = dict(device=W0.device, dtype=torch.float32)
        zeros_state = torch.zeros(N, o, d, **f32)
        dWn = dWn.contiguous() if dWn is not None else zeros_state
        dSn = dSn.contiguous() if (has_mom and dSn is not None) else zeros_state
        dR = dR.contiguous() if (has_q and dR is not None) else torch.zeros(N, c, o, **f32)
        dW0 = torch.empty(N, o, d, **f32)
        dS0 = torch.empty(N, o, d, **f32) if has_mom else dW0
        dw = torch.empty(N, c, o, **f32)
        dK = torch.empty(nob, N, c, d, **f32)
        dQ = torch.empty(nob, N, c, d, **f32) if has_q else dK
        dcv = torch.empty(nob, N, c, **f32) if cv is not None else dw
        drho = torch.empty(nob, N, c, **f32) if rho is not None else dw
        dla = torch.empty(nob, N, c, **f32)
        dbeta = torch.empty(nob, N, **f32) if has_mom else dla
        Qp = Q if has_q else K
        dummy = log_alpha
        with _on_device(W0):
            affine_bwd_kernel[(N, nob)](
                W0, S0 if has_mom else W0, K, Qp, cv if cv is not None else dummy,
                rho if rho is not None else dummy, w, log_alpha, beta if has_mom else dummy,
                dR, dWn, dSn,
                dW0, dS0, dw, dK, dQ, dcv, drho, dla, dbeta,
                c, o, d, N,
                o * d, K.stride(0), K.stride(1), Qp.stride(0), Qp.stride(1), w.stride(0), w.stride(1),
                c * o, o, (cv if cv is not None else dummy).stride(0),
                (rho if rho is not None else dummy).stride(0), log_alpha.stride(0),
                HAS_C=cv is not None, HAS_RHO=rho is not None, HAS_MOM=has_mom, HAS_Q=has_q,
                BC=bc, BO=bo, BD=bd, PREC=prec, num_warps=warps, num_stages=1,
            )

        def out(x, like, need):
            return x.to(like.dtype) if (need and like is not None) else None

        ng = ctx.needs_input_grad
        return (
            out(dW0, W0, ng[0]),
            out(dS0, S0, ng[1] and has_mom),
            out(dK.sum(0), K, ng[2]),
            out(dQ.sum(0), Q, ng[3] and has_q),
            out(dcv.sum(0), cv, ng[4] and cv is not None),
            out(drho.sum(0), rho, ng[5] and rho is not None),
            out(dw, w, ng[6]),
            out(dla.sum(0), log_alpha, ng[7]),
            out(dbeta.sum(0), beta, ng[8] and has_mom),
        )


def affine_rank1_chunk(W0, S0, K, Q, c, rho, w, log_alpha, beta):
    """Same contract as :func:`kernels.memory.chunk_torch.affine_rank1_chunk` (Triton kernels).

    ``W0, S0: (N, o, d)``; ``K, Q: (N, c, d)``; ``c, rho: (N, c)`` or None; ``w: (N, c, o)``;
    ``log_alpha: (N, c)``; ``beta: (N,)`` or None (then ``S0`` is ignored). Returns
    ``(reads (N, c, o) fp32 or None, W_new fp32, S_new fp32 or None)``.
    """
    if beta is None:
        S0 = None
    elif S0 is None:
        S0 = torch.zeros_like(W0)
    reads, W_new, S_new = AffineRank1Chunk.apply(W0, S0, K, Q, c, rho, w, log_alpha, beta)
    return (reads if Q is not None else None), W_new, (S_new if beta is not None else None)


def memory_chunk(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q=None):
    """Triton equivalent of :func:`kernels.memory.chunk_torch.memory_chunk` (same contract).

    Reads, states and momenta come back fp32 whatever the input dtypes (as the PyTorch path does
    for bf16 inputs); autocast is off inside, so the PyTorch prep matmuls stay fp32 too."""
    with torch.autocast(k.device.type, enabled=False):
        return _memory_chunk(spec, state, mom, k, vhat, eta, alpha, beta, q)


def _memory_chunk(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q=None):
    f = lambda x: x.float() if x is not None else None  # noqa: E731  the PyTorch prep runs in fp32
    state = tuple(s.float() for s in state)
    mom = tuple(s.float() for s in mom) if mom is not None else None
    return compose_chunk(spec, affine_rank1_chunk, state, mom, f(k), f(vhat), f(eta), f(alpha), f(beta), f(q))
