"""Shared helpers for kernel tests and benchmarks: one relative-error definition for all of them."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)`` in float64 (Frobenius norms); ``b`` is the reference.

    Both zero gives 0; a nonzero ``a`` against an all-zero ``b`` gives ``||a|| / tiny`` (large), so a
    spurious gradient is never hidden. Shapes must match.
    """
    if a.shape != b.shape:
        raise ValueError(f"rel_err shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.detach().double(), b.detach().double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()
