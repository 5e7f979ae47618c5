"""Whole-sequence operators in PyTorch: the chunk loop of paper §8.2 around ``chunk_torch``.

These are the contracts of the whole-sequence Triton kernels (which run the same loop inside one
launch) and the CPU path of the model. Each takes per-token tensors of a whole sequence
(rows N = sequences x heads) and returns per-token outputs plus the final states.

- :func:`memory_sequence`: one memory (linear or MLP) over a sequence, read with ``q`` before each
  write; targets plain (``vhat``) or self-generated from the chunk-start state
  (``self_targets=True``: ``vhat`` holds ``v`` and the target is ``M_ref(l2norm(v))``, Eq. 84-85).
- :func:`projection_sequence`: the self-modifying projection pass of HOPE: the four linear
  projection memories k, v, eta, alpha stacked into one matrix ``P = [P_k; P_v; P_eta; P_alpha]``
  of ``2 d_h + 2`` output rows that share their keys, learning rates and retention gates, with a
  momentum coefficient per memory (per block of output rows).
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.memory.chunk_torch import affine_apply, chunk_coefficients, per_chunk
from kernels.memory.spec import MemorySpec, compose_chunk, linear_write, memory_read


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def memory_sequence(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q, chunk: int,
                    self_targets: bool = False, resets=None, recompute: bool = False):
    """``(reads (N,T,d_out) or None, final state, final momentum)`` of one memory over T tokens.

    ``k, q: (N, T, d_in)``; ``vhat: (N, T, d_out)`` (or ``v`` with ``self_targets``); ``eta, alpha:
    (N, T)``; ``beta: (N,)`` or None. Chunks of ``chunk`` tokens, the last one possibly short.
    ``resets: (N, n_chunks)`` bool or None: where true, chunk j of that row starts again from the
    given ``state`` and ``mom`` (a new document begins there; packed documents, column 0 ignored).

    Everything that does not depend on the state (decay matrices, key Grams, the triangular
    inverse of the weight that reads k) is built for all full chunks in one batched call before
    the loop; the loop keeps only the state-dependent work (gradients at the chunk-start state,
    self-generated targets, an MLP's hidden keys).

    ``recompute``: every chunk's step runs under activation checkpointing, so the backward keeps only
    the chunk-start states and momenta (and the per-token inputs) and recomputes each chunk's
    coefficients and intermediates from them (activation memory per token: the inputs plus one
    state per chunk, instead of the C x C matrices and every intermediate of every chunk)."""
    if recompute and torch.is_grad_enabled():
        return _recomputed_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, self_targets, resets)
    N, T = k.shape[:2]
    n_full = T // chunk
    c_all = eta if spec.rule == "dgd" else None
    rho_all = -eta if (spec.kind == "linear" and spec.loss == "l2" and spec.grad_at == "running") else None
    b = beta[:, None] if spec.momentum else None

    def blocks(x):
        return None if x is None else x[:, :n_full * chunk].reshape(N, n_full, chunk, *x.shape[2:])

    full = []
    if n_full:
        full = per_chunk(chunk_coefficients(blocks(alpha.log()), b[:, None].expand(N, n_full, 1) if b is not None
                                            else None, blocks(k), blocks(q), blocks(c_all), blocks(rho_all)), n_full)
    # split once: each slice's backward would write a zero tensor of the whole sequence
    pieces = [_chunks(x, chunk, T) for x in (k, q, vhat, eta, alpha, c_all, rho_all)]
    init = (state, mom)
    outs = []
    for j, (kc, qc, vc, ec, ac, cc, rc) in enumerate(zip(*pieces)):
        if resets is not None and j > 0:
            state, mom = restart(resets[:, j], init, (state, mom))
        if j < n_full:
            co = full[j]
        else:                                                    # the short last chunk
            co = chunk_coefficients(ac.log(), b, kc, qc, cc, rc)
        o, state, mom = _chunk_step(spec, co, state, mom, kc, qc, vc, ec, ac, beta, self_targets)
        outs.append(o)
    return (torch.cat(outs, 1) if q is not None else None), state, mom


def _chunk_step(spec, co, state, mom, kc, qc, vc, ec, ac, beta, self_targets):
    """One chunk from its start state, given the chunk's coefficients: ``(reads, state, mom)``."""
    co_h = {key: v for key, v in co.items() if key not in ("DpA", "GpA", "DpAq", "GpAq")}
    co_h.update(c=None, rho=None, T=None)                         # an MLP's W1: key h, no erase term
    target = memory_read(spec, state, l2norm(vc)) if self_targets else vc
    affine = (lambda W0, S0, K, Q, c, rho, w, la, bb, co=co: affine_apply(co, W0, S0, K, Q, w),
              lambda W0, S0, K, Q, c, rho, w, la, bb, co=co_h: affine_apply(co, W0, S0, K, Q, w))
    return compose_chunk(spec, affine, state, mom, kc, target, ec, ac, beta, qc)


def _recomputed_sequence(spec, state, mom, k, vhat, eta, alpha, beta, q, chunk, self_targets, resets):
    """:func:`memory_sequence` with each chunk checkpointed (coefficients built inside the chunk)."""
    from torch.utils.checkpoint import checkpoint
    T = k.shape[1]
    c_all = eta if spec.rule == "dgd" else None
    rho_all = -eta if (spec.kind == "linear" and spec.loss == "l2" and spec.grad_at == "running") else None
    b = beta[:, None] if spec.momentum else None
    n_state = len(state)

    def step(kc, qc, vc, ec, ac, cc, rc, bt, *carried):
        st, mo = tuple(carried[:n_state]), (tuple(carried[n_state:]) if mom is not None else None)
        co = chunk_coefficients(ac.log(), bt[:, None] if bt is not None else None, kc, qc, cc, rc)
        o, st, mo = _chunk_step(spec, co, st, mo, kc, qc, vc, ec, ac, bt, self_targets)
        return (o,) + tuple(st) + (tuple(mo) if mo is not None else ())

    pieces = [_chunks(x, chunk, T) for x in (k, q, vhat, eta, alpha, c_all, rho_all)]
    init = (state, mom)
    outs = []
    for j, (kc, qc, vc, ec, ac, cc, rc) in enumerate(zip(*pieces)):
        if resets is not None and j > 0:
            state, mom = restart(resets[:, j], init, (state, mom))
        res = checkpoint(step, kc, qc, vc, ec, ac, cc, rc, beta if b is not None else None, *state,
                         *(mom if mom is not None else ()), use_reentrant=False)
        outs.append(res[0])
        state = tuple(res[1:1 + n_state])
        mom = tuple(res[1 + n_state:]) if mom is not None else None
    return (torch.cat(outs, 1) if q is not None else None), state, mom


def restart(flags, init, carried):
    """Per row: the initial ``(state, mom)`` where ``flags`` is true, else the carried ones."""
    def pick(a, b):
        if a is None:
            return None
        return tuple(torch.where(flags.view(-1, *([1] * (x.dim() - 1))), x, y) for x, y in zip(a, b))
    (s0, m0), (s, m) = init, carried
    if m0 is None and m is not None:
        m0 = tuple(torch.zeros_like(x) for x in m)
    return pick(s0, s), pick(m0, m)


def split(x, chunk: int):
    """``x`` cut along time into chunks (views); a list of Nones for ``x = None``."""
    return torch.split(x, chunk, dim=1) if x is not None else None


def _chunks(x, chunk: int, T: int):
    return split(x, chunk) if x is not None else [None] * (-(-T // chunk))


def projection_groups(d_h: int):
    """Output-row slices of the stacked projection memory: k, v, eta, alpha."""
    return (slice(0, d_h), slice(d_h, 2 * d_h), slice(2 * d_h, 2 * d_h + 1), slice(2 * d_h + 1, 2 * d_h + 2))


def projection_reads(P: torch.Tensor, u: torch.Tensor, eta_bias, alpha_bias, eta_max: float):
    """``k, v, eta, alpha`` of the tokens ``u`` read at the (chunk-start) state ``P``.

    ``k = l2norm(P_k u)``, ``v = P_v u``, ``eta = eta_max sigmoid(P_eta u + b_eta)``,
    ``alpha = sigmoid(P_alpha u + b_alpha)``; biases are per row ``(N,)``."""
    dh = u.shape[-1]
    R = u @ P.transpose(1, 2)
    k = l2norm(R[..., :dh])
    v = R[..., dh:2 * dh]
    eta = eta_max * torch.sigmoid(R[..., 2 * dh] + eta_bias[:, None])
    alpha = torch.sigmoid(R[..., 2 * dh + 1] + alpha_bias[:, None])
    return k, v, eta, alpha


def projection_sequence(spec: MemorySpec, P, S, u, beta, eta_bias, alpha_bias, eta_max: float, chunk: int,
                        update_eta_scale: float = 1.0, resets=None, recompute: bool = False):
    """The projection pass over T tokens: ``((k, v, eta, alpha), P_T, S_T)``.

    ``P, S: (N, 2 d_h + 2, d_h)`` (``S`` None without momentum); ``u: (N, T, d_h)``;
    ``beta: (N, 4)`` (k, v, eta, alpha) or None; ``eta_bias, alpha_bias: (N,)``. Per chunk, with
    ``P_ref`` the chunk-start state: ``k, v, eta, alpha = projection_reads(P_ref, u)``, targets
    ``vhat = P_ref l2norm(v)`` (all four memories at once, Eq. 84-85), then each memory's write
    (``spec``: a linear memory, any rule/loss/gradient point) with keys ``k``, learning rate
    ``eta * update_eta_scale`` and retention ``alpha``. Rows of a linear memory evolve independently
    given the keys, so the stacked write equals the four separate writes; only the momentum
    coefficient differs per memory. ``resets``, ``recompute``: as in :func:`memory_sequence`."""
    if spec.kind != "linear":
        raise ValueError("projection_sequence stacks linear projection memories; "
                         f"got kind={spec.kind} (use the per-memory chunk loop)")
    dh, T = u.shape[-1], u.shape[1]
    groups = projection_groups(dh)
    if beta is not None and S is None:                 # momentum from zero
        S = torch.zeros_like(P)
    pieces = []
    init = ((P,), (S,) if S is not None else None)
    for j, uc in enumerate(split(u, chunk)):
        if resets is not None and j > 0:
            (P,), mom = restart(resets[:, j], init, ((P,), (S,) if S is not None else None))
            S = mom[0] if mom is not None else None
        if recompute and torch.is_grad_enabled():     # keep only the chunk-start P, S (see memory_sequence)
            from torch.utils.checkpoint import checkpoint
            k, v, eta, alpha, P, S = checkpoint(_projection_chunk, spec, P, S, uc, beta, eta_bias, alpha_bias,
                                                eta_max, update_eta_scale, groups, use_reentrant=False)
        else:
            k, v, eta, alpha, P, S = _projection_chunk(spec, P, S, uc, beta, eta_bias, alpha_bias, eta_max,
                                                       update_eta_scale, groups)
        pieces.append((k, v, eta, alpha))
    return tuple(torch.cat(p, 1) for p in zip(*pieces)), P, S


def _projection_chunk(spec, P, S, uc, beta, eta_bias, alpha_bias, eta_max, update_eta_scale, groups):
    """One chunk of the projection pass: its reads at the chunk-start ``P`` and the stacked write."""
    k, v, eta, alpha = projection_reads(P, uc, eta_bias, alpha_bias, eta_max)
    vhat = l2norm(v) @ P.transpose(1, 2)
    P, S = _stacked_write(spec, P, S, k, vhat, eta * update_eta_scale, alpha, beta, groups)
    return k, v, eta, alpha, P, S


def _stacked_write(spec, P, S, k, vhat, eta, alpha, beta, groups):
    """One chunk's write of the stacked linear memory: one coefficient set with a group per
    memory (momentum coefficients differ), applied to every output row at once."""
    dgd_c = eta if spec.rule == "dgd" else None
    w, rho = linear_write(spec, P, k, vhat, eta)
    co = chunk_coefficients(alpha.log(), beta, k, None, dgd_c, rho)
    gmask = None
    if beta is not None:
        gmask = torch.zeros(len(groups), P.shape[1], dtype=P.dtype, device=P.device)
        for g, sl in enumerate(groups):
            gmask[g, sl] = 1.0
    _, Pn, Sn = affine_apply(co, P, S, k, None, w, gmask)
    return Pn, Sn
