"""Next-token sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus)."""
from __future__ import annotations

from typing import Optional

import torch


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Bad settings: one message naming the value and the allowed range (before any work)."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if not temperature >= 0:
        raise ValueError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"--top-k {top_k} must be >= 0 (0 = no top-k cut)")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p {top_p} must be in (0, 1] (1 = no nucleus cut)")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``logits (B, V)`` -> ``(B,)`` token ids. Disallowed ids carry ``-inf`` already."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p          # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)
