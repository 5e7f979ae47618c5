"""The one functional interface every memory implementation sits behind.

A memory is a tuple of fast weights per row (row = one sequence x one head):

- ``linear``: ``(W,)`` with ``W: (N, d_out, d_in)``;  ``M(z) = W z``
- ``mlp``:    ``(W1, W2)`` with ``W1: (N, d_out, h)``, ``W2: (N, h, d_in)``;
  ``M(z) = z + W1 silu(W2 z)`` (the residual only when ``d_in == d_out``).

:func:`memory_chunk` advances a memory over one chunk of ``c <= C`` tokens (paper §8.2): every
gradient is taken at the chunk-start state ``M_ref`` (or, for linear memories with
``grad_at='running'``, at ``M_{t-1}``), the updates accumulate token by token, and optional reads
``M_{t-1}(q_t)`` use the state *before* token t is written. Targets ``vhat`` come from the caller
(self-generated targets need ``M_ref``, which the caller already holds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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
        z, state = _to_fp32([z, tuple(state)])         # mixed inputs outside autocast: read in fp32
    if spec.kind == "linear":
        return z @ state[0].transpose(1, 2)
    w1, w2 = state
    out = F.silu(z @ w2.transpose(1, 2)) @ w1.transpose(1, 2)
    if spec.residual and w1.shape[1] == w2.shape[2]:
        out = out + z
    return out


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, tuple):
            yield from a


def _to_fp32(args):
    def cast(a):
        if isinstance(a, torch.Tensor):
            return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
        if isinstance(a, tuple):
            return tuple(cast(x) for x in a)
        return a
    return [cast(a) for a in args]


def available_impls() -> tuple:
    impls = ["reference", "torch"]
    try:
        from kernels.memory import triton_impl  # noqa: F401
        impls.append("triton")
    except Exception:  # triton missing or no kernel module yet
        pass
    return tuple(impls)


def memory_chunk(
    spec: MemorySpec,
    state: State,
    mom: Optional[State],
    k: torch.Tensor,
    vhat: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: Optional[torch.Tensor],
    q: Optional[torch.Tensor] = None,
    impl: str = "torch",
):
    """Advance one memory over one chunk.

    Shapes: ``k, q: (N, c, d_in)``, ``vhat: (N, c, d_out)``, ``eta, alpha: (N, c)``,
    ``beta: (N,)`` (momentum) or None. Returns ``(reads, new_state, new_mom)`` where ``reads`` is
    ``M_{t-1}(q_t)`` for each token (None when ``q`` is None).
    """
    if spec.momentum != (mom is not None and beta is not None):
        raise ValueError(f"spec.momentum={spec.momentum} but mom/beta given={mom is not None}/{beta is not None}")
    if impl in ("torch", "reference"):
        if impl == "torch":
            from kernels.memory.chunk_torch import memory_chunk as run
        else:
            from kernels.memory.naive import memory_chunk as run
        args = (state, mom, k, vhat, eta, alpha, beta, q)
        low = any(t.dtype in (torch.float16, torch.bfloat16) for t in _tensors(args))
        if not low and not torch.is_autocast_enabled(k.device.type):
            return run(spec, *args)
        # bf16/fp16 inputs or autocast: state and accumulation stay in fp32
        with torch.autocast(k.device.type, enabled=False):
            return run(spec, *_to_fp32(args))
    if impl == "triton":
        from kernels.memory import triton_impl
        return triton_impl.memory_chunk(spec, state, mom, k, vhat, eta, alpha, beta, q)
    raise ValueError(f"memory impl '{impl}' is not one of ('reference', 'torch', 'triton')")
