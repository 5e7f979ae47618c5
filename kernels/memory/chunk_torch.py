"""Chunk-parallel PyTorch form of the memory update: matmuls inside each chunk.

Every rule of docs/MODEL.md §2 is, inside a chunk, a rank-1 affine recurrence on each weight matrix
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

The coefficients of a chunk (decay matrices, key Gram matrices, the triangular inverse) depend
only on the chunk's tokens, not on the state: :func:`chunk_coefficients` builds them for any
leading batch shape, so a sequence can build those of every chunk in one batched call and leave
only :func:`affine_apply` (the state-dependent part) inside its chunk loop. A coefficient set may
carry a group dimension ``g``: output columns in different groups have different momentum
coefficients (the stacked projection memories); ``gmask (g, o)`` says which column is in which.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.memory.spec import MemorySpec, compose_chunk


def _shift_rows(x: torch.Tensor, fill: float, dim: int) -> torch.Tensor:
    """Entry i takes entry i-1 along ``dim`` (the state *before* token i); entry 0 gets ``fill``."""
    first = torch.full_like(x.narrow(dim, 0, 1), fill)
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim)


def chunk_coefficients(log_alpha, beta, K, Q=None, c=None, rho=None):
    """Every state-independent coefficient of a chunk, for any leading shape ``...``.

    ``log_alpha, c, rho: (..., n)``; ``beta: (..., g)`` or None (g momentum groups); ``K, Q: (..., n, d)``
    (``Q`` may be None, or left out to be given to :func:`affine_apply` instead). Returns a dict:
    ``Gp, Dp (..., g', n, n)``, ``gp, Ep, gl, Dl, bl (..., g', n)``, ``gc, Ec, bC (..., g')`` (g' = 1
    without momentum), the masked Grams ``DpA``/``GpA`` (state-dependent writes only), ``DpAq``/``GpAq``
    (with Q) and ``T = (I + L)^{-1}`` (state-dependent writes only)."""
    n = log_alpha.shape[-1]
    idx = torch.arange(n, device=log_alpha.device)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    lg = log_alpha.cumsum(-1)
    G = (lg[..., :, None] - lg[..., None, :]).masked_fill(~causal, float("-inf")).exp().unsqueeze(-3)
    gamma = lg.exp().unsqueeze(-2)                                               # (..., 1, n)
    if beta is None:
        D, E = G, None
        bl = bC = None
    else:
        lb = beta.clamp_min(1e-30).log()                                         # (..., g)
        lag = (idx[:, None] - idx[None, :]).to(log_alpha.dtype)
        B = (lag * lb[..., None, None]).masked_fill(~causal, float("-inf")).exp()
        D = G @ B
        E = (G @ ((idx + 1).to(log_alpha.dtype) * lb[..., None]).exp()[..., None])[..., 0]   # sum G beta^(r+1)
        bl = ((n - 1 - idx).to(log_alpha.dtype) * lb[..., None]).exp()          # beta^(n-1-s)
        bC = (n * lb).exp()                                                      # beta^n
    co = dict(Gp=_shift_rows(G, 0.0, -2), Dp=_shift_rows(D, 0.0, -2), gp=_shift_rows(gamma, 1.0, -1),
              Ep=_shift_rows(E, 0.0, -1) if E is not None else None,
              gl=G[..., -1, :], Dl=D[..., -1, :], gc=gamma[..., -1], Ec=E[..., -1] if E is not None else None,
              bl=bl, bC=bC, c=c, rho=rho, T=None)
    if c is not None or rho is not None:                                         # y_i depends on the state
        A = (K @ K.transpose(-1, -2)).masked_fill(~strict, 0.0).unsqueeze(-3)
        co["DpA"], co["GpA"] = co["Dp"] * A, co["Gp"] * A
        L = torch.zeros_like(co["DpA"])
        if c is not None:
            L = L + co["GpA"] * c[..., None, None, :]
        if rho is not None:
            L = L - co["DpA"] * rho[..., None, None, :]
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        co["T"] = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    if Q is not None:
        co.update(_query_coefficients(co, K, Q))
    return co


def _query_coefficients(co, K, Q):
    n = K.shape[-2]
    strict = torch.ones(n, n, dtype=torch.bool, device=K.device).tril(-1)
    Aq = (Q @ K.transpose(-1, -2)).masked_fill(~strict, 0.0).unsqueeze(-3)
    return dict(DpAq=co["Dp"] * Aq, GpAq=co["Gp"] * Aq)


def per_chunk(co, n_chunks: int):
    """Split a set built for ``(N, n_chunks, ...)`` into one set per chunk. ``unbind`` once (its
    backward is one stack) rather than indexing chunk by chunk (each index's backward would write a
    zero tensor of the whole set)."""
    parts = {k: (v.unbind(1) if isinstance(v, torch.Tensor) else (v,) * n_chunks) for k, v in co.items()}
    return [{k: parts[k][j] for k in co} for j in range(n_chunks)]


def _mix(x: torch.Tensor, gmask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(N, g, n, o) -> (N, n, o)``: each output column from its own group."""
    if x.shape[1] == 1:
        return x[:, 0]
    return (x * gmask[:, None, :]).sum(1)


def _per_column(v: torch.Tensor, gmask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(N, g) -> (N, o)`` (or ``(N, 1)`` when there is one group)."""
    return v if v.shape[1] == 1 else v @ gmask


def affine_apply(co, W0, S0, K, Q, w, gmask=None):
    """The state-dependent part of one chunk: ``(reads or None, W_new, S_new or None)``.

    ``co`` from :func:`chunk_coefficients` for this chunk (leading shape ``N``); ``W0, S0: (N, o, d)``;
    ``K, Q: (N, n, d)``; ``w: (N, n, o)``; ``gmask: (g, o)`` one-hot groups of the output columns."""
    c, rho = co["c"], co["rho"]
    has_mom = co["Ec"] is not None

    def base(Z):                        # gamma_{i-1} W0 z_i + E_{i-1} S0 z_i, per group
        out = co["gp"][..., None] * (Z @ W0.transpose(1, 2))[:, None]
        if has_mom:
            out = out + co["Ep"][..., None] * (Z @ S0.transpose(1, 2))[:, None]
        return out

    delta, u = None, w
    if co["T"] is not None:
        rhs = base(K) + co["DpA"] @ w[:, None]
        Y = _mix(co["T"] @ rhs, gmask)
        delta = -c[..., None] * Y if c is not None else None
        u = w + rho[..., None] * Y if rho is not None else w
    reads = None
    if Q is not None:
        if "DpAq" not in co:
            co = dict(co, **_query_coefficients(co, K, Q))
        reads = _mix(base(Q) + co["DpAq"] @ u[:, None], gmask)
        if delta is not None:
            reads = reads + co["GpAq"][:, 0] @ delta
    P = _mix(co["Dl"][..., None] * u[:, None], gmask)
    if delta is not None:
        P = P + co["gl"][:, 0, :, None] * delta
    W_new = co["gc"][..., None] * W0 + P.transpose(1, 2) @ K
    S_new = None
    if has_mom:
        W_new = W_new + _per_column(co["Ec"], gmask)[..., None] * S0
        S_new = (_per_column(co["bC"], gmask)[..., None] * S0
                 + _mix(co["bl"][..., None] * u[:, None], gmask).transpose(1, 2) @ K)
    return reads, W_new, S_new


def affine_rank1_chunk(W0, S0, K, Q, c, rho, w, log_alpha, beta):
    """One weight matrix over one chunk (see module docstring).

    ``W0, S0: (N, o, d)``; ``K: (N, c, d)`` write keys; ``Q: (N, c, d)`` or None; ``c, rho: (N, c)``
    or None; ``w: (N, c, o)``; ``log_alpha: (N, c)``; ``beta: (N,)`` or None.
    Returns ``(reads (N,c,o) or None, W_new, S_new)``.
    """
    b = beta[:, None] if beta is not None else None
    co = chunk_coefficients(log_alpha, b, K, Q, c, rho)
    return affine_apply(co, W0, S0 if beta is not None else None, K, Q, w)


def memory_chunk(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q=None):
    """Chunk-parallel equivalent of :func:`kernels.memory.naive.memory_chunk`."""
    return compose_chunk(spec, affine_rank1_chunk, state, mom, k, vhat, eta, alpha, beta, q)
