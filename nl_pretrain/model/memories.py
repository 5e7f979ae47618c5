"""Learned initial states of fast-weight memories, one per head (outer-loop parameters)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn

from kernels.memory import MemorySpec


class MemoryInit(nn.Module):
    """Initial state ``M_0`` of one memory for every head: ``(H, d_out, d_in)`` or two MLP weights.

    ``expand(batch)`` repeats it per sequence, giving rows ``N = batch * H`` (batch-major), so every
    sequence starts from the same learned state and gradients of all rows flow back into it.
    """

    def __init__(self, kind: str, heads: int, d_in: int, d_out: int, expansion: float,
                 identity: bool = False, std: float = 0.02):
        super().__init__()
        self.kind, self.identity, self.std = kind, identity, std    # read by nl_pretrain/model/init.py
        if kind == "linear":
            w = torch.randn(heads, d_out, d_in) * std
            if identity and d_in == d_out:
                w = w + torch.eye(d_in)
            self.weights = nn.ParameterList([nn.Parameter(w)])
        else:
            hidden = max(1, int(round(expansion * d_in)))
            w1 = torch.randn(heads, d_out, hidden) * std
            w2 = torch.randn(heads, hidden, d_in) / math.sqrt(d_in)
            self.weights = nn.ParameterList([nn.Parameter(w1), nn.Parameter(w2)])

    def expand(self, batch: int) -> Tuple[torch.Tensor, ...]:
        return tuple(w.unsqueeze(0).expand(batch, *w.shape).reshape(batch * w.shape[0], *w.shape[1:])
                     for w in self.weights)

    def zeros(self, batch: int) -> Tuple[torch.Tensor, ...]:
        return tuple(torch.zeros_like(s) for s in self.expand(batch))


class ResolvedImpl:
    """``memory_impl`` of one layer, resolved once per device type (not on every forward)."""

    def __init__(self, requested: str):
        self.requested = requested
        self._by_device = {}

    def __call__(self, device: torch.device) -> str:
        key = torch.device(device).type
        if key not in self._by_device:
            from kernels.memory.dispatch import resolve_impl
            self._by_device[key] = resolve_impl(self.requested, device)
        return self._by_device[key]


def make_spec(kind: str, rule: str, loss: str, linear_grad: str, momentum: bool) -> MemorySpec:
    return MemorySpec(kind=kind, rule=rule, loss=loss,
                      grad_at=linear_grad if kind == "linear" else "chunk_start",
                      momentum=momentum, residual=True)


def to_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, T, H*D)`` -> ``(B*H, T, D)`` (batch-major rows, matching :meth:`MemoryInit.expand`)."""
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).permute(0, 2, 1, 3).reshape(B * heads, T, -1)


def from_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B*H, T, D)`` -> ``(B, T, H*D)``."""
    N, T, D = x.shape
    return x.view(batch, N // batch, T, D).permute(0, 2, 1, 3).reshape(batch, T, -1)
