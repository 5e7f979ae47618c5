"""The leaf of the memory operator: what a memory is and how it is read. Imports only torch.

A memory is a tuple of fast weights per row (row = one sequence x one head):

- ``linear``: ``(W,)`` with ``W: (N, d_out, d_in)``;  ``M(z) = W z``
- ``mlp``:    ``(W1, W2)`` with ``W1: (N, d_out, h)``, ``W2: (N, h, d_in)``;
  ``M(z) = z + W1 silu(W2 z)`` (the residual only when ``d_in == d_out``).

Every implementation (``naive``, ``chunk_torch``, the Triton kernels) imports this module and
nothing imports them back except :mod:`kernels.memory.dispatch`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

State = Tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class MemorySpec:
    kind: str = "linear"          # linear | mlp
    rule: str = "dgd"             # gd | dgd   (paper Eq. 88 for dgd)
    loss: str = "l2"              # l2 (Eq. 86) | dot (Eq. 92)
    grad_at: str = "chunk_start"  # chunk_start | running (linear memories only)
    momentum: bool = True
    residual: bool = True         # mlp only: z + W1 phi(W2 z) when widths agree

    def __post_init__(self):
        for name, value, allowed in (
            ("kind", self.kind, ("linear", "mlp")),
            ("rule", self.rule, ("gd", "dgd")),
            ("loss", self.loss, ("l2", "dot")),
            ("grad_at", self.grad_at, ("chunk_start", "running")),
        ):
            if value not in allowed:
                raise ValueError(f"memory {name} '{value}' is not one of {allowed}")
        if self.kind == "mlp" and self.grad_at == "running":
            raise ValueError("grad_at 'running' exists only for linear memories; use 'chunk_start' for mlp")


def memory_read(spec: MemorySpec, state: State, z: torch.Tensor) -> torch.Tensor:
    """``M(z)`` for every token, with one state per row: ``z: (N, c, d_in) -> (N, c, d_out)``."""
    if z.dtype != state[0].dtype and not torch.is_autocast_enabled(z.device.type):
        z, state = to_fp32([z, tuple(state)])          # mixed inputs outside autocast: read in fp32
    if spec.kind == "linear":
        return z @ state[0].transpose(1, 2)
    w1, w2 = state
    out = F.silu(z @ w2.transpose(1, 2)) @ w1.transpose(1, 2)
    if spec.residual and w1.shape[1] == w2.shape[2]:
        out = out + z
    return out


def silu_grad(a: torch.Tensor) -> torch.Tensor:
    """d silu(a) / da."""
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def tensors(args):
    """Every tensor in a list of tensors, tuples of tensors and Nones."""
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, tuple):
            yield from a


def to_fp32(args):
    """The same list with every bf16/fp16 tensor (also inside tuples) cast to fp32."""
    def cast(a):
        if isinstance(a, torch.Tensor):
            return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
        if isinstance(a, tuple):
            return tuple(cast(x) for x in a)
        return a
    return [cast(a) for a in args]


def compose_chunk(spec: MemorySpec, affine, state, mom, k, vhat, eta, alpha, beta, q=None):
    """One memory over one chunk, written once for every implementation (paper §8.2).

    ``affine`` is an implementation's ``affine_rank1_chunk(W0, S0, K, Q, c, rho, w, log_alpha, beta)``
    (chunk_torch: PyTorch matmuls; triton_impl: the Triton kernels), or a pair of them: the first
    for the weight that reads k, the second for an MLP's W1 (a sequence that precomputed each
    chunk's coefficients passes two closures). This function prepares each weight's write term from
    the inner-loss gradient and composes the weights:

    - linear: one call; ``w = eta vhat`` (dot loss, Eq. 92, state free), ``w = eta vhat, rho = -eta``
      (L2 loss with the running gradient at ``M_{t-1}``), or ``w = -eta (W0 k - vhat)`` (L2 loss
      with the gradient at the chunk-start state ``M_ref = W0``).
    - mlp: every gradient at ``M_ref``: ``a = W2 k``, ``h = silu(a)``, ``r = M_ref(k) - vhat`` (L2)
      or ``-vhat`` (dot), ``g2 = (W1^T r) * silu'(a)``; W2 reads k, so the dgd preconditioner acts
      there (Eq. 88); W1 is written with key ``h`` and read with ``silu`` of W2's reads.
    The ``dgd`` rule adds ``c = eta`` (the ``- eta (W k) k^T`` erase); momentum passes ``beta``.
    Returns ``(reads or None, new_state, new_mom)``.
    """
    affine_k, affine_h = affine if isinstance(affine, tuple) else (affine, affine)
    log_alpha = alpha.log()
    dgd_c = eta if spec.rule == "dgd" else None
    b = beta if spec.momentum else None
    if spec.kind == "linear":
        (W0,) = state
        S0 = mom[0] if mom is not None else None
        w, rho = linear_write(spec, W0, k, vhat, eta)
        reads, W, S = affine_k(W0, S0, k, q, dgd_c, rho, w, log_alpha, b)
        return reads, (W,), ((S,) if S is not None else None)

    W1, W2 = state
    S1, S2 = mom if mom is not None else (None, None)
    a = k @ W2.transpose(1, 2)
    h = F.silu(a)
    if spec.loss == "l2":                       # M_ref(k) - vhat, reusing h = silu(W2 k)
        pred = h @ W1.transpose(1, 2)
        r = (pred + k if (spec.residual and W1.shape[1] == W2.shape[2]) else pred) - vhat
    else:
        r = -vhat
    g2 = (r @ W1) * silu_grad(a)
    hq_pre, W2n, S2n = affine_k(W2, S2, k, q, dgd_c, None, -eta[..., None] * g2, log_alpha, b)
    q1 = F.silu(hq_pre) if q is not None else None
    reads1, W1n, S1n = affine_h(W1, S1, h, q1, None, None, -eta[..., None] * r, log_alpha, b)
    reads = None
    if q is not None:
        reads = reads1 + q if (spec.residual and W1.shape[1] == W2.shape[2]) else reads1
    return reads, (W1n, W2n), ((S1n, S2n) if spec.momentum else None)


def linear_write(spec: MemorySpec, W0, k, vhat, eta):
    """``(w, rho)`` of a linear memory's write ``u_i = w_i + rho_i W_{i-1} k_i``: ``eta vhat`` (dot
    loss, Eq. 92), ``eta vhat`` with ``rho = -eta`` (L2 with the running gradient at ``M_{t-1}``), or
    ``-eta (W0 k - vhat)`` (L2 with the gradient at the chunk-start state ``M_ref = W0``)."""
    if spec.loss == "dot":
        return eta[..., None] * vhat, None
    if spec.grad_at == "running":
        return eta[..., None] * vhat, -eta
    return -eta[..., None] * (k @ W0.transpose(-1, -2) - vhat), None
