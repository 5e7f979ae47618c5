"""Chunk-parallel PyTorch form of the memory update: matmuls inside each chunk.

Every rule of DESIGN.md §4.2 is, inside a chunk, a rank-1 affine recurrence on each weight matrix
``W`` (tokens i = 0..c-1, ``y_i = W_{i-1} k_i`` the read of the write key before token i):

    W_i = alpha_i W_{i-1} - c_i y_i k_i^T + [S_i  or  u_i k_i^T]      u_i = rho_i y_i + w_i
    S_i = beta S_{i-1} + u_i k_i^T                                    (momentum)

``c_i = eta_i`` for dgd on the weight that reads k (Eq. 88) and 0 otherwise; ``rho_i = -eta_i`` for
the running L2 gradient and 0 when the gradient is taken at the chunk start (then it sits in
``w_i``). Unrolled with gamma_i = prod_{j<=i} alpha_j:

    W_i = gamma_i W_0 + E_i S_0 + sum_{s<=i} (G_is delta_s + D_is u_s) k_s^T,   delta_s = -c_s y_s
    G_is = gamma_i / gamma_s,  D = G @ B with B_rs = beta^(r-s)  (D = G without momentum),
    E_i = sum_{r<=i} G_ir beta^(r+1)

so all y_i solve one unit-lower-triangular system, and every read is a masked matmul, like
chunked (gated) DeltaNet. Decay ratios are formed as exp of differences of cumulative logs,
so they never exceed 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.memory.spec import MemorySpec, compose_chunk


def _decay_matrices(log_alpha: torch.Tensor, beta: Optional[torch.Tensor]):
    """G, D (N,c,c), E (N,c) and gamma (N,c) for one chunk."""
    n, c = log_alpha.shape
    lg = log_alpha.cumsum(-1)
    idx = torch.arange(c, device=log_alpha.device)
    causal = idx[:, None] >= idx[None, :]
    diff = (lg[:, :, None] - lg[:, None, :]).masked_fill(~causal, float("-inf"))
    G = diff.exp()
    gamma = lg.exp()
    if beta is None:
        return G, G, None, gamma
    log_beta = beta.clamp_min(1e-30).log()[:, None, None]
    lag = (idx[:, None] - idx[None, :]).to(log_alpha.dtype)
    B = (lag * log_beta).masked_fill(~causal, float("-inf")).exp()
    D = G @ B
    bpow = ((idx + 1).to(log_alpha.dtype) * log_beta[:, :, 0]).exp()      # beta^(r+1)
    E = (G @ bpow[:, :, None])[:, :, 0]
    return G, D, E, gamma


def _shift(x: torch.Tensor, fill: float) -> torch.Tensor:
    """Row i takes row i-1 (the state *before* token i); row 0 gets ``fill``."""
    pad = torch.full_like(x[:, :1], fill)
    return torch.cat([pad, x[:, :-1]], 1)


def affine_rank1_chunk(W0, S0, K, Q, c, rho, w, log_alpha, beta):
    """One weight matrix over one chunk (see module docstring).

    ``W0, S0: (N, o, d)``; ``K: (N, c, d)`` write keys; ``Q: (N, c, d)`` or None; ``c, rho: (N, c)``
    or None; ``w: (N, c, o)``; ``log_alpha: (N, c)``; ``beta: (N,)`` or None.
    Returns ``(reads (N,c,o) or None, W_new, S_new)``.
    """
    G, D, E, gamma = _decay_matrices(log_alpha, beta)
    strict = torch.ones_like(G[0], dtype=torch.bool).tril(-1)
    Gp, Dp = _shift(G, 0.0), _shift(D, 0.0)
    gp = _shift(gamma, 1.0)
    Ep = _shift(E, 0.0) if E is not None else None

    def base(Z):  # gamma_{i-1} W0 z_i + E_{i-1} S0 z_i
        out = gp[..., None] * (Z @ W0.transpose(1, 2))
        if Ep is not None:
            out = out + Ep[..., None] * (Z @ S0.transpose(1, 2))
        return out

    state_dependent = c is not None or rho is not None
    if state_dependent:
        A = (K @ K.transpose(1, 2)).masked_fill(~strict, 0.0)
        L = torch.zeros_like(A)
        if c is not None:
            L = L + (Gp * A) * c[:, None, :]
        if rho is not None:
            L = L - (Dp * A) * rho[:, None, :]
        rhs = base(K) + (Dp * A) @ w
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        Y = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
        delta = -c[..., None] * Y if c is not None else None
        u = w + rho[..., None] * Y if rho is not None else w
    else:
        delta, u = None, w

    reads = None
    if Q is not None:
        Aq = (Q @ K.transpose(1, 2)).masked_fill(~strict, 0.0)
        reads = base(Q) + (Dp * Aq) @ u
        if delta is not None:
            reads = reads + (Gp * Aq) @ delta

    gl, Dl = G[:, -1], D[:, -1]             # coefficients of the last token's state
    W_new = gamma[:, -1, None, None] * W0 + (u * Dl[..., None]).transpose(1, 2) @ K
    if delta is not None:
        W_new = W_new + (delta * gl[..., None]).transpose(1, 2) @ K
    S_new = None
    if beta is not None:
        W_new = W_new + E[:, -1, None, None] * S0
        n_tok = K.shape[1]
        lag = torch.arange(n_tok - 1, -1, -1, device=K.device, dtype=K.dtype)
        bl = (lag[None] * beta.clamp_min(1e-30).log()[:, None]).exp()       # beta^(c-1-s)
        S_new = beta[:, None, None] ** n_tok * S0 + (u * bl[..., None]).transpose(1, 2) @ K
    return reads, W_new, S_new


def memory_chunk(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q=None):
    """Chunk-parallel equivalent of :func:`kernels.memory.naive.memory_chunk`."""
    return compose_chunk(spec, affine_rank1_chunk, state, mom, k, vhat, eta, alpha, beta, q)
