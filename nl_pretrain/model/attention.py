"""Causal softmax attention with RoPE: flash-attn on CUDA when installed, SDPA otherwise."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nl_pretrain.model.layers import rope
from nl_pretrain.model.sharding import COLUMN, ROW

try:  # optional GPU extra
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # not installed (always the case on CPU machines)
    flash_attn_func = None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """``q, k, v: (B, H, T, D)`` -> ``(B, H, T, D)``; ``mask: (B, 1, T, T)`` bool (packed documents)
    replaces the plain causal mask."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    tp_plan = {"w_q": COLUMN, "w_k": COLUMN, "w_v": COLUMN, "w_o": ROW}

    def __init__(self, d: int, n_heads: int, rope_theta: float):
        super().__init__()
        self.d_head, self.rope_theta = d // n_heads, rope_theta
        self.w_q = nn.Linear(d, d, bias=False)
        self.w_k = nn.Linear(d, d, bias=False)
        self.w_v = nn.Linear(d, d, bias=False)
        self.w_o = nn.Linear(d, d, bias=False)

    @property
    def n_heads(self) -> int:
        """Heads this module holds (all of them, or a tensor-parallel rank's share)."""
        return self.w_q.weight.shape[0] // self.d_head

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, -1, self.d_head).transpose(1, 2)  # noqa: E731
        pos = docs.position if docs is not None else None
        q = rope(split(self.w_q(x)), self.rope_theta, pos)
        k = rope(split(self.w_k(x)), self.rope_theta, pos)
        out = causal_attention(q, k, split(self.w_v(x)), docs.attention_mask() if docs is not None else None)
        return self.w_o(out.transpose(1, 2).reshape(B, T, -1))
