"""Token-by-token reference of the memory update (docs/MODEL.md §2). Readable first, slow.

Each token: gradient of the inner loss at ``M_ref`` (chunk start) or at ``M_{t-1}`` (``running``),
optional momentum, then the ``gd`` or ``dgd`` (Eq. 88) write. Reads ``M_{t-1}(q_t)`` happen before
the write. Gradients of the inner loss are written out by hand; a test checks them against autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.memory.spec import MemorySpec, memory_read, silu_grad  # noqa: F401



def inner_grad(spec: MemorySpec, state, k, vhat):
    """Gradient of the inner loss at ``state`` for one token per row.

    ``l2`` (Eq. 86): ``1/2 ||M(k) - vhat||^2``;  ``dot`` (Eq. 92): ``-<M(k), vhat>``.
    ``k: (N, d_in)``, ``vhat: (N, d_out)``; returns a tuple shaped like ``state``.
    """
    pred = memory_read(spec, state, k[:, None])[:, 0]
    r = pred - vhat if spec.loss == "l2" else -vhat       # dl/dM(k)
    if spec.kind == "linear":
        return (r[:, :, None] * k[:, None, :],)
    w1, w2 = state
    a = torch.einsum("nhd,nd->nh", w2, k)
    g1 = r[:, :, None] * F.silu(a)[:, None, :]
    g2 = (torch.einsum("noh,no->nh", w1, r) * silu_grad(a))[:, :, None] * k[:, None, :]
    return (g1, g2)


def write(spec: MemorySpec, state, mom, step, k, eta, alpha, beta):
    """One token's write given the gradient ``step`` (a tuple like ``state``)."""
    e = eta[:, None, None]
    a = alpha[:, None, None]
    if mom is not None:  # S_t = beta S_{t-1} - eta_t grad; S_t replaces the gradient term
        mom = tuple(beta[:, None, None] * s - e * g for s, g in zip(mom, step))
        incr = mom
    else:
        incr = tuple(-e * g for g in step)
    new = []
    for i, (w, inc) in enumerate(zip(state, incr)):
        reads_k = (i == len(state) - 1)  # the weight that reads k: W (linear) or W2 (mlp)
        if spec.rule == "dgd" and reads_k:  # Eq. 88: M_{t-1}(alpha I - eta k k^T)
            wk = torch.einsum("nod,nd->no", w, k)
            w = a * w - e * wk[:, :, None] * k[:, None, :]
        else:
            w = a * w
        new.append(w + inc)
    return tuple(new), mom


def memory_chunk(spec: MemorySpec, state, mom, k, vhat, eta, alpha, beta, q=None):
    """Same contract as :func:`kernels.memory.dispatch.memory_chunk`, one token at a time."""
    ref = state
    reads = []
    for t in range(k.shape[1]):
        if q is not None:
            reads.append(memory_read(spec, state, q[:, t:t + 1])[:, 0])
        at = state if spec.grad_at == "running" else ref
        step = inner_grad(spec, at, k[:, t], vhat[:, t])
        state, mom = write(spec, state, mom, step, k[:, t], eta[:, t], alpha[:, t], beta)
    out = torch.stack(reads, 1) if q is not None else None
    return out, state, mom
