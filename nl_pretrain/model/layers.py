"""Small shared layers: RMSNorm, rotary embeddings, SwiGLU, causal depthwise convolution."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nl_pretrain.model.sharding import COLUMN, REPLICATED, ROW


class RMSNorm(nn.Module):
    tp_plan = {"weight": REPLICATED}

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.to(x.dtype) * self.weight


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def rope(x: torch.Tensor, theta: float, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotary position embedding on ``x: (B, H, T, D)`` (half-split layout) at positions 0..T-1, or
    at ``positions: (B, T)`` (packed documents: each counts from its own start)."""
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    pos = torch.arange(T, device=x.device) if positions is None else positions[:, None, :]
    ang = pos.to(torch.float32)[..., None] * freqs
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    return torch.cat([rotated, x[..., 2 * half:]], -1)


class SwiGLU(nn.Module):
    """``W_down (silu(x W_gate) * x W_up)``, no biases."""
    tp_plan = {"w_gate": COLUMN, "w_up": COLUMN, "w_down": ROW}

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d, hidden, bias=False)
        self.w_up = nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class CausalConv(nn.Module):
    """Depthwise causal convolution over time: output t sees inputs t-K+1..t only."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel))
        with torch.no_grad():  # start close to identity: the newest tap carries the signal
            self.weight[:, 0, -1] = 1.0
            self.weight.add_(0.02 * torch.randn_like(self.weight))

    def stream(self, x: torch.Tensor, tail: torch.Tensor):
        """Inference: the convolution of ``x`` continuing after ``tail`` (the previous ``K-1`` inputs,
        zeros at a sequence start, which is the zero padding of :meth:`forward`); returns the output
        and the new tail."""
        full = torch.cat([tail.to(x.dtype), x], 1)
        y = F.conv1d(full.transpose(1, 2), self.weight, groups=x.shape[-1]).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.kernel - 1):]

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:  # x: (B, T, C)
        T = x.shape[1]
        if docs is None:
            y = F.conv1d(x.transpose(1, 2), self.weight, padding=self.kernel - 1, groups=x.shape[-1])
            return y[..., :T].transpose(1, 2)
        # packed documents: a tap that reaches into the previous document reads zero
        w = self.weight[:, 0]                                          # (C, K), tap K-1 is the newest
        y = x * w[:, -1]
        for lag in range(1, self.kernel):
            shifted = F.pad(x, (0, 0, lag, 0))[:, :T]
            y = y + (shifted * docs.conv_mask(lag)) * w[:, -1 - lag]
        return y
