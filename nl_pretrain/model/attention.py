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

    def forward(self, x: torch.Tensor, docs=None, cache: "KVCache" = None):
        """``cache`` (inference): attend over the cached keys too, append the new ones, and return
        ``(output, cache)``."""
        if cache is not None:
            return self._cached(x, cache)
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, -1, self.d_head).transpose(1, 2)  # noqa: E731
        pos = docs.position if docs is not None else None
        q = rope(split(self.w_q(x)), self.rope_theta, pos)
        k = rope(split(self.w_k(x)), self.rope_theta, pos)
        out = causal_attention(q, k, split(self.w_v(x)), docs.attention_mask() if docs is not None else None)
        return self.w_o(out.transpose(1, 2).reshape(B, T, -1))

    def _cached(self, x: torch.Tensor, cache: "KVCache"):
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, -1, self.d_head).transpose(1, 2)  # noqa: E731
        steps = torch.arange(T, device=x.device)
        pos = (cache.length - cache.start)[:, None] + steps             # RoPE counts from the document start
        q = rope(split(self.w_q(x)), self.rope_theta, pos)
        slots = cache.length[:, None] + steps                            # where the new tokens go, per row
        cache.append(rope(split(self.w_k(x)), self.rope_theta, pos), split(self.w_v(x)), slots)
        keys = torch.arange(cache.k.shape[2], device=x.device)
        mask = (keys >= cache.start[:, None, None]) & (keys <= slots[:, :, None])    # (B, T, S): own document, past
        out = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask[:, None])
        return self.w_o(out.transpose(1, 2).reshape(B, T, -1)), cache


class KVCache:
    """Keys (after RoPE) and values of the tokens a row has seen: ``(B, H, capacity, D)``; row b's
    tokens fill slots ``[0, length[b])`` and its current document starts at slot ``start[b]`` (keys
    before it are masked, as packed documents mask them in training). Written in place; the
    capacity doubles when it runs out."""

    def __init__(self, batch: int, heads: int, d_head: int, capacity: int, like: torch.Tensor):
        self.k = like.new_zeros(batch, heads, capacity, d_head)
        self.v = like.new_zeros(batch, heads, capacity, d_head)
        self.length = torch.zeros(batch, dtype=torch.long, device=like.device)
        self.start = torch.zeros(batch, dtype=torch.long, device=like.device)

    def append(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        need = int(slots.max()) + 1
        if need > self.k.shape[2]:
            cap = max(need, 2 * self.k.shape[2])
            grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], cap - t.shape[2], t.shape[3])], 2)  # noqa: E731
            self.k, self.v = grow(self.k), grow(self.v)
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(slots)
        self.k.transpose(1, 2)[rows, slots] = k.transpose(1, 2)
        self.v.transpose(1, 2)[rows, slots] = v.transpose(1, 2)
        self.length = slots[:, -1] + 1
